"""SQLite's Durable Streams rows: a plain append moves the ``tail`` column only, and every
other change still reaches the JSON metadata, read back by another connection (another worker).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_durable_stream.durable_streams.engine import Engine
from flask_durable_stream.durable_streams.group_commit import Job
from flask_durable_stream.durable_streams.request import Producer
from flask_durable_stream.durable_streams.sqlite import SCHEMA, TAIL_MARK, SQLiteDSStore
from flask_durable_stream.durable_streams.store import Meta, Txn, Wakeups
from tests.support.ds import append_reply, create


def _engine(path: Path) -> Engine:
    return Engine(SQLiteDSStore(str(path)), cache_bytes=0)  # every read from the file


def _append(
    engine: Engine, data: bytes | None, producer: Producer | None = None, close: bool = False
) -> tuple[int, dict[str, str]]:
    reply = append_reply(engine, "s", data, producer=producer, close=close)
    return reply.status, reply.headers


def _row(path: Path) -> tuple[str, int, int]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT meta, tail, closed FROM durable_meta WHERE path = 's'")
        row = row.fetchone()
    finally:
        conn.close()
    return str(row[0]), int(row[1]), int(row[2])


def test_a_plain_append_updates_the_tail_column_and_nothing_else(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    engine = _engine(db)
    assert create(engine, "s") == 201
    before, tail, _ = _row(db)
    assert tail == 0
    for i in range(3):
        assert _append(engine, f"r{i}".encode())[0] == 204
    after, tail, closed = _row(db)
    assert (after, tail, closed) == (before, 3, 0)  # the JSON row was not rewritten
    other = _engine(db)  # another worker's connection reads the column's tail
    meta = other.current("s")
    assert meta is not None and meta.tail == 3
    assert other.store.records("s", 0, 10, 1 << 20) == [b"r0", b"r1", b"r2"]


def test_producer_state_and_closing_still_reach_the_json_row(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    engine = _engine(db)
    assert create(engine, "s") == 201
    assert _append(engine, b"a")[0] == 204
    status, headers = _append(engine, b"b", Producer("p", 0, 0))
    assert status == 200 and headers["Producer-Seq"] == "0"
    assert _append(engine, b"c")[0] == 204
    stored = json.loads(_row(db)[0])
    assert stored["producers"] == {"p": [0, 0]}
    other = _engine(db)
    # The retry of the producer's append, on another worker: a duplicate, not a second copy.
    status, headers = _append(other, b"b", Producer("p", 0, 0))
    assert status == 204 and headers["Producer-Seq"] == "0"
    assert _append(other, b"d", Producer("p", 0, 2))[0] == 409  # a gap
    assert _append(other, None, close=True)[0] == 204
    meta_json, tail, closed = _row(db)
    assert (tail, closed) == (3, 1) and json.loads(meta_json)["closed"] is True
    assert _append(engine, b"e")[0] == 409  # closed, seen by the first worker too
    assert engine.store.records("s", 0, 10, 1 << 20) == [b"a", b"b", b"c"]


def test_a_file_written_before_keeps_working(tmp_path: Path) -> None:
    """Rows as earlier versions wrote them: the JSON carries the tail, equal to the column's."""
    db = tmp_path / "ds.sqlite3"
    meta = {
        "gen": "0123456789abcdef",
        "content_type": "text/plain",
        "created": 1.0,
        "touched": 1.0,
        "tail": 2,
        "base": 0,
        "closed": False,
        "ttl": None,
        "expires_at": None,
        "expires_ts": None,
        "fork_of": None,
        "fork_offset": None,
        "fork_sub": 0,
        "stream_seq": None,
        "producers": {"p": [1, 4]},
        "closed_by": None,
        "refs": 0,
        "deleted": False,
        "owner": None,
    }
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT INTO durable_meta (path, meta, tail, closed) VALUES ('s', ?, 2, 0)",
            (json.dumps(meta),),
        )
        conn.executemany(
            "INSERT INTO durable_records (path, idx, data) VALUES ('s', ?, ?)",
            [(0, b"old0"), (1, b"old1")],
        )
    conn.close()
    engine = _engine(db)
    current = engine.current("s")
    assert current is not None and current.tail == 2 and current.producers == {"p": [1, 4]}
    assert _append(engine, b"new")[0] == 204
    assert _append(engine, b"dup", Producer("p", 1, 4))[0] == 204  # a duplicate of seq 4
    assert _append(engine, b"p5", Producer("p", 1, 5))[0] == 200
    assert engine.store.records("s", 0, 10, 1 << 20) == [b"old0", b"old1", b"new", b"p5"]
    assert _row(db)[1] == 4


def test_an_older_version_refuses_rows_whose_tail_lives_in_the_column(tmp_path: Path) -> None:
    """Earlier versions built the metadata from the JSON alone (``Meta(**json)``) and would
    append at its stale tail, overwriting records. Every row this version writes carries a
    key they do not know, so to them it is an error, never a stale tail."""
    db = tmp_path / "ds.sqlite3"
    engine = _engine(db)
    assert create(engine, "s") == 201
    for i in range(3):
        assert _append(engine, f"r{i}".encode())[0] == 204
    stored = json.loads(_row(db)[0])
    assert stored[TAIL_MARK] is True and stored["tail"] == 0  # the JSON's tail is stale
    with pytest.raises(TypeError):
        Meta.from_dict(stored)  # what an earlier version does with the row


def test_a_row_of_an_earlier_version_is_marked_by_its_first_write(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    engine = _engine(db)
    assert create(engine, "s") == 201
    meta_json, tail, closed = _row(db)
    old = json.loads(meta_json)
    del old[TAIL_MARK]  # as an earlier version wrote it
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE durable_meta SET meta = ? WHERE path = 's'", (json.dumps(old),))
    conn.close()
    fresh = _engine(db)
    assert _append(fresh, b"a")[0] == 204  # a plain append, yet the whole row is written
    stored = json.loads(_row(db)[0])
    assert stored[TAIL_MARK] is True and stored["tail"] == 1
    assert _append(fresh, b"b")[0] == 204  # marked now: the column alone moves
    assert json.loads(_row(db)[0]) == stored and _row(db)[1] == 2


@contextlib.contextmanager
def _one_batch(store: SQLiteDSStore) -> Iterator[list[Job[Any]]]:
    """The writes made inside are queued, then committed as one batch, as if they had
    arrived together; the list yielded holds their jobs afterwards. (Inside, the engine's
    calls return None: only their transactions are collected.)"""
    queued: list[Callable[[Txn], Any]] = []
    jobs: list[Job[Any]] = []
    store.transact = queued.append  # type: ignore[method-assign,assignment]
    try:
        yield jobs
    finally:
        del store.transact
    jobs.extend(Job(fn) for fn in queued)
    store._commit(jobs)


def _with_stream(tmp_path: Path) -> tuple[Path, Engine, SQLiteDSStore]:
    """A fresh file with one text stream ``s``."""
    db = tmp_path / "ds.sqlite3"
    engine = _engine(db)
    store = engine.store
    assert isinstance(store, SQLiteDSStore)
    assert create(engine, "s") == 201
    return db, engine, store


def test_a_batch_reads_each_row_once_and_writes_each_moved_tail_once(tmp_path: Path) -> None:
    """The jobs of one batch see each other's writes without reading the file again."""
    db, engine, store = _with_stream(tmp_path)
    assert _append(engine, b"first")[0] == 204  # the writer's connection exists from here
    statements: list[str] = []
    store._writers[0].set_trace_callback(statements.append)
    with _one_batch(store) as jobs:
        # Producer state: the JSON row is rewritten.
        append_reply(engine, "s", b"a", producer=Producer("p", 0, 0))
        append_reply(engine, "s", b"b")  # plain appends: the tail alone moves
        append_reply(engine, "s", b"c")
        # A duplicate, told from the batch's own write.
        append_reply(engine, "s", b"c", producer=Producer("p", 0, 0))
        # Refused (not the stream's content type): nothing of it is stored.
        append_reply(engine, "s", b"[1]", content_type="application/json")
    assert [job.error for job in jobs] == [None] * 5
    assert [job.value.status for job in jobs] == [200, 204, 204, 204, 409]
    assert jobs[3].value.headers["Producer-Seq"] == "0"

    def count(prefix: str) -> int:
        return sum(s.startswith(prefix) for s in statements)

    assert count("SELECT meta, tail FROM durable_meta") == 1
    assert count("INSERT OR REPLACE INTO durable_meta") == 1  # job 1's producer state
    assert count("UPDATE durable_meta SET tail") == 1  # jobs 2 and 3, once, before COMMIT
    assert count("INSERT OR REPLACE INTO durable_records") == 3
    # Another worker's connection sees everything the batch acknowledged.
    meta_json, tail, closed = _row(db)
    assert (tail, closed) == (4, 0) and json.loads(meta_json)["producers"] == {"p": [0, 0]}
    other = _engine(db)
    assert other.store.records("s", 0, 10, 1 << 20) == [b"first", b"a", b"b", b"c"]
    current = other.current("s")
    assert current is not None and current.tail == 4


def test_a_batch_sees_a_stream_it_closed_or_deleted(tmp_path: Path) -> None:
    db, engine, store = _with_stream(tmp_path)
    assert create(engine, "gone") == 201
    with _one_batch(store) as jobs:
        append_reply(engine, "s", b"a")
        append_reply(engine, "s", None, close=True)
        append_reply(engine, "s", b"late")  # after the batch's own close: refused
        engine.delete("gone")
        engine.delete("gone")  # already deleted by this batch
    assert [job.value.status for job in jobs] == [204, 204, 409, 204, 404]
    assert _row(db)[1:] == (1, 1)
    other = _engine(db)
    assert other.store.records("s", 0, 10, 1 << 20) == [b"a"]
    assert other.current("gone") is None


def test_a_long_poll_woken_by_this_process_gets_the_committed_metadata_unread(
    tmp_path: Path,
) -> None:
    """The append hands the row it committed to the reader it wakes: no read of the file."""
    _, engine, store = _with_stream(tmp_path)
    store.poll_interval = (30.0, 30.0)  # only a wake-up ends this wait, never a poll
    assert _append(engine, b"first")[0] == 204
    meta = engine.current("s")
    assert meta is not None and meta.tail == 1
    looked = threading.Event()
    real_state = store.state

    def state(path: str) -> tuple[int, bool] | None:
        now = real_state(path)
        looked.set()  # the reader has looked once and is about to wait
        return now

    store.state = state  # type: ignore[method-assign]
    gets: list[str] = []
    real_get = store.get
    store.get = lambda path: gets.append(path) or real_get(path)  # type: ignore[method-assign]
    woken: list[Meta | None] = []
    reader = threading.Thread(
        target=lambda: woken.append(engine.wait("s", meta, time.monotonic() + 30))
    )
    reader.start()
    assert looked.wait(10)
    assert _append(engine, b"second")[0] == 204
    reader.join(10)
    assert not reader.is_alive()
    fresh = woken[0]
    assert fresh is not None and (fresh.tail, fresh.closed, fresh.gen) == (2, False, meta.gen)
    assert gets == []  # the reader did not read the row back
    assert engine.chunk("s", fresh, 1).records == [b"second"]


def test_wakeups_hand_each_reader_its_own_metadata_and_a_bare_wake_drops_it() -> None:
    wakeups = Wakeups()
    meta = Meta(gen="g", content_type="text/plain", created=0.0, touched=0.0, tail=3)
    first, second = wakeups.register("p"), wakeups.register("p")
    wakeups.wake(["p"], {"p": meta})
    assert first.is_set() and second.is_set()
    one, two = wakeups.unregister("p", first), wakeups.unregister("p", second)
    assert one == meta and two == meta and one is not two
    later = wakeups.register("p")
    wakeups.wake(["p"], {"p": meta})
    wakeups.wake(["p"])  # e.g. another process's write, rung through the doorbell
    assert wakeups.unregister("p", later) is None  # read again: never an older tail
    assert not wakeups.waiting("p")
