"""The Durable Streams store contract, on every backend that keeps Durable Streams.

Each case drives the protocol engine over ``manager.durable_streams_store()``.
"Two processes" are two managers on the same storage (for memory, the same
manager: its streams live in one process). Expiry cases own the clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from flask_durable_stream import StreamManager
from flask_durable_stream.durable_streams import DSStore, Engine
from flask_durable_stream.durable_streams.request import START, Producer, encode_messages
from tests.support.ds import append, create

DS_BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=DS_BACKENDS)
def stores(request: pytest.FixtureRequest) -> tuple[DSStore, DSStore]:
    make: Callable[..., StreamManager] = request.getfixturevalue(f"backend_{request.param}")
    first = make()
    second = first if request.param == "memory" else make()
    return first.durable_streams_store(), second.durable_streams_store()


@pytest.fixture
def engine(stores: tuple[DSStore, DSStore]) -> Engine:
    return Engine(stores[0])


def read_all(engine: Engine, path: str) -> bytes:
    meta = engine.current(path)
    assert meta is not None
    out, offset = b"", START
    while True:
        chunk = engine.chunk(path, meta, offset)
        out += chunk.body()
        if chunk.up_to_date:
            return out
        offset = chunk.end


def test_bytes_round_trip_in_pages(stores: tuple[DSStore, DSStore]) -> None:
    engine = Engine(stores[0], max_read_bytes=10)
    assert create(engine, "a/b", record=b"0123456789") == 201
    for part in (b"abc", b"\x00\xff" * 8, b"z"):
        assert append(engine, "a/b", part) == 204
    other = Engine(stores[1])
    assert read_all(engine, "a/b") == read_all(other, "a/b")
    assert read_all(other, "a/b") == b"0123456789abc" + b"\x00\xff" * 8 + b"z"


def test_json_records_keep_message_boundaries(engine: Engine) -> None:
    assert create(engine, "j", "application/json") == 201
    append(engine, "j", encode_messages([{"a": 1}, [1, 2]]), content_type="application/json")
    append(engine, "j", encode_messages(["x"]), content_type="application/json")
    assert read_all(engine, "j") == b'[{"a":1},[1,2],"x"]'


def test_create_is_idempotent_and_conflicts_on_other_config(engine: Engine) -> None:
    assert create(engine, "s", ttl=60) == 201
    assert create(engine, "s", ttl=60) == 200
    assert create(engine, "s", ttl=61) == 409
    assert create(engine, "s", "application/json", ttl=60) == 409


def test_idempotent_producer(engine: Engine) -> None:
    create(engine, "p")
    assert append(engine, "p", b"a", producer=Producer("w", 0, 0)) == 200
    assert append(engine, "p", b"a", producer=Producer("w", 0, 0)) == 204  # a retry
    assert append(engine, "p", b"c", producer=Producer("w", 0, 2)) == 409  # a gap
    assert append(engine, "p", b"b", producer=Producer("w", 1, 0)) == 200  # a new epoch
    assert append(engine, "p", b"z", producer=Producer("w", 0, 1)) == 403  # a zombie
    assert read_all(engine, "p") == b"ab"


def test_one_producer_batch_is_stored_once_across_processes(
    stores: tuple[DSStore, DSStore],
) -> None:
    engines = [Engine(stores[0]), Engine(stores[1])]
    create(engines[0], "race")
    statuses: list[int] = []

    def send(engine: Engine, seq: int) -> None:
        statuses.append(append(engine, "race", f"{seq};".encode(), producer=Producer("w", 0, seq)))

    for seq in range(20):
        threads = [threading.Thread(target=send, args=(e, seq)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(statuses) == [200] * 20 + [204] * 20
    assert read_all(engines[1], "race") == b"".join(f"{i};".encode() for i in range(20))


def test_concurrent_appends_from_two_processes_all_land_in_order(
    stores: tuple[DSStore, DSStore],
) -> None:
    engines = [Engine(stores[0]), Engine(stores[1])]
    create(engines[0], "many")

    def write(i: int) -> None:
        for n in range(25):
            assert append(engines[i], "many", f"{i}:{n};".encode()) == 204

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parts = read_all(engines[0], "many").decode().split(";")[:-1]
    assert sorted(parts) == sorted(f"{i}:{n}" for i in (0, 1) for n in range(25))
    for i in (0, 1):
        assert [p for p in parts if p.startswith(f"{i}:")] == [f"{i}:{n}" for n in range(25)]


def test_a_waiting_reader_wakes_on_an_append_from_another_process(
    stores: tuple[DSStore, DSStore],
) -> None:
    reader, writer = Engine(stores[0]), Engine(stores[1])
    create(writer, "live")
    meta = reader.current("live")
    assert meta is not None
    woke: list[int] = []
    thread = threading.Thread(
        target=lambda: woke.append(reader.wait("live", meta, time.monotonic() + 30).tail)  # type: ignore[union-attr]
    )
    thread.start()
    append(writer, "live", b"x")
    thread.join()
    assert woke == [1]


def test_close_is_final(engine: Engine) -> None:
    create(engine, "c")
    assert append(engine, "c", b"last", close=True) == 204
    assert append(engine, "c", None, close=True) == 204  # close-only is idempotent
    assert append(engine, "c", b"more") == 409
    meta = engine.current("c")
    assert meta is not None and meta.closed and read_all(engine, "c") == b"last"


def test_fork_reads_through_its_source_and_soft_delete_cascades(engine: Engine) -> None:
    create(engine, "src", record=b"one")
    append(engine, "src", b"two")
    assert create(engine, "fork", fork_of="src", fork_offset=1) == 201
    append(engine, "fork", b"-mine")
    append(engine, "src", b"three")
    assert read_all(engine, "fork") == b"one-mine"
    assert create(engine, "sub", fork_of="src", fork_offset=1, fork_sub=2) == 201
    assert read_all(engine, "sub") == b"onetw"
    assert engine.delete("src").status == 204  # forks still read it: soft delete
    assert engine.delete("src").status == 410
    assert create(engine, "src") == 409
    assert read_all(engine, "fork") == b"one-mine"
    assert engine.delete("fork").status == 204
    assert engine.delete("sub").status == 204
    assert engine.store.get("src") is None  # the last fork took its source along


def test_ttl_slides_and_expires(stores: tuple[DSStore, DSStore]) -> None:
    clock = [1000.0]
    store = stores[0]
    store.now = lambda: clock[0]  # type: ignore[method-assign]
    engine = Engine(store)
    create(engine, "t", ttl=10)
    clock[0] += 8
    engine.touch("t")  # a read restarts the window
    clock[0] += 8
    assert engine.current("t") is not None
    clock[0] += 3
    assert engine.current("t") is None
    assert create(engine, "t") == 201  # the path is free again


def test_the_sweep_expires_streams_nobody_touches(stores: tuple[DSStore, DSStore]) -> None:
    clock = [1000.0]
    store = stores[0]
    store.now = lambda: clock[0]  # type: ignore[method-assign]
    engine = Engine(store)
    create(engine, "gone/soon", ttl=5, record=b"x")
    create(engine, "stays")
    create(engine, "src", record=b"y", expires_at="x", expires_ts=1003.0)
    create(engine, "fork", fork_of="src", ttl=100)
    clock[0] += 6
    assert engine.gc() == 2
    assert store.get("gone/soon") is None
    src = store.get("src")
    assert src is not None and src.deleted  # its fork still reads it
    assert sorted(store.paths()) == ["fork", "src", "stays"]
    assert read_all(engine, "fork") == b"y"


def test_expiry_is_decided_at_the_requests_arrival(stores: tuple[DSStore, DSStore]) -> None:
    """A request that arrived before the TTL ran out but reached the store after it (a
    loaded process) still finds the stream, and restarts the TTL from its own write."""
    clock = [1000.0]
    store = stores[0]
    store.now = lambda: clock[0]  # type: ignore[method-assign]
    engine = Engine(store)
    create(engine, "slow", ttl=2)
    arrived = clock[0] + 1.5
    clock[0] += 2.5  # the request waited a second for a CPU
    assert engine.current("slow", arrived) is not None
    assert append(engine, "slow", b"x", at=arrived) == 204
    clock[0] += 1.9  # within 2 s of the write, though 2.4 s after the request arrived
    assert engine.current("slow") is not None
    engine.touch("slow", clock[0] - 0.5)
    clock[0] += 1.9
    assert engine.current("slow") is not None  # the read restarted it at its write too
    clock[0] += 0.2
    assert engine.current("slow") is None  # gone by the time it is asked, however late
    assert engine.current("slow", clock[0] - 5) is None  # and stays gone
    assert append(engine, "slow", b"y", at=clock[0] - 5) == 404


def test_expires_at_is_decided_at_the_requests_arrival(stores: tuple[DSStore, DSStore]) -> None:
    clock = [1000.0]
    store = stores[0]
    store.now = lambda: clock[0]  # type: ignore[method-assign]
    engine = Engine(store)
    create(engine, "fixed", record=b"a", expires_at="x", expires_ts=1003.0)
    create(engine, "src", record=b"b", ttl=1)
    clock[0] += 3.5
    assert append(engine, "fixed", b"b", at=1002.9) == 204  # arrived in time
    assert create(engine, "fork", fork_of="src", at=1000.9) == 201  # its source lived then
    assert engine.current("fixed", 1003.0) is None  # arrived at the deadline: gone
    assert engine.current("fixed", 1002.0) is None  # once removed, a late request cannot revive it


def test_the_sweep_lets_other_requests_in(stores: tuple[DSStore, DSStore]) -> None:
    engine = Engine(stores[0])
    for i in range(10):
        create(engine, f"s{i}")
    pauses: list[int] = []
    assert engine.gc(pause=lambda: pauses.append(1), every=3) == 0
    assert len(pauses) == 3  # after streams 3, 6 and 9 of 10
