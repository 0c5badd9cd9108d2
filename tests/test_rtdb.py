"""RtdbStreamManager beyond the conformance suite: reconnects, write and read counts, gevent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flask_durable_stream import (
    Event,
    EventTooLarge,
    StoragePermanentError,
    StorageUnavailable,
    StreamError,
    StreamExists,
    StreamNotFound,
)
from flask_durable_stream._concurrency import running_tasks
from flask_durable_stream.managers.base import StreamManager
from flask_durable_stream.managers.rtdb import RtdbStreamManager
from flask_durable_stream.managers.rtdb_io import call, node_key
from flask_durable_stream.testing import ManualClock
from tests.backends.rtdb import RtdbServer

ROOT = Path(__file__).resolve().parents[1]
Make = Callable[..., StreamManager]


def new_id() -> str:
    return uuid.uuid4().hex


def requests_for(server: Any, manager: StreamManager, method: str) -> list[str]:
    prefix = "/" + manager.root.key  # type: ignore[attr-defined]
    return [path for m, _, path in server.requests(method) if path.startswith(prefix)]


def wait_for_streams(server: Any, sid: str, count: int = 2) -> None:
    deadline = time.monotonic() + 5
    while sum(sid in w.segs for w in list(server.watchers)) < count:
        assert time.monotonic() < deadline, "the subscriber never connected"
        time.sleep(0.005)


def consume(manager: StreamManager, sid: str, into: list[int]) -> threading.Thread:
    def run() -> None:
        into.extend(e.seq for e in manager.subscribe(sid))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_reader_survives_dropped_connections(backend_rtdb: Make, rtdb_server: RtdbServer) -> None:
    server = rtdb_server.require_hooks()
    manager = backend_rtdb()
    sid = new_id()
    writer = manager.open(sid)
    seen: list[int] = []
    reader = consume(manager, sid, seen)
    drops = 0
    for i in range(40):
        writer.write(i)
        if i % 10 == 5:  # mid-stream, while the reader follows live
            wait_for_streams(server, sid)
            drops += server.drop_streams()
        time.sleep(0.005)
    writer.done("end")
    reader.join(10)
    assert drops >= 8
    assert seen == list(range(41))  # no gap, no duplicate
    assert len(requests_for(server, manager, "STREAM")) >= 2 + 2 * 3  # it did reconnect


def test_auth_revoked_reconnects_and_cancel_denies(
    backend_rtdb: Make, rtdb_server: RtdbServer
) -> None:
    server = rtdb_server.require_hooks()
    manager = backend_rtdb()
    sid = new_id()
    writer = manager.open(sid)
    writer.write("a")
    seen: list[int] = []
    reader = consume(manager, sid, seen)
    wait_for_streams(server, sid)
    assert server.send_to_streams("auth_revoked", "token expired") >= 2
    writer.write("b")
    writer.done("c")
    reader.join(10)
    assert seen == [0, 1, 2]

    other = new_id()
    manager.open(other)
    events = manager.subscribe(other)
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            list(events)
        except StreamError as exc:
            errors.append(exc)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_for_streams(server, other)
    server.send_to_streams("cancel", "Permission denied")
    thread.join(10)
    assert [e.status for e in errors] == ["PERMISSION_DENIED"]


def test_writes_per_chunk_with_linger(backend_rtdb: Make, rtdb_server: RtdbServer) -> None:
    """A producer that hands over everything that piled up (as the runner does) costs few writes."""
    server = rtdb_server.require_hooks()
    manager = backend_rtdb(linger=0.1)
    sid = new_id()
    writer = manager.open(sid)
    produced: list[int] = []
    lock = threading.Condition()

    def flow() -> None:
        for i in range(200):  # 200 chunks at about 200/s
            with lock:
                produced.append(i)
                lock.notify()
            time.sleep(0.005)

    before = len(requests_for(server, manager, "PATCH")) + len(requests_for(server, manager, "PUT"))
    thread = threading.Thread(target=flow, daemon=True)
    thread.start()
    while writer.next_seq < 200:
        with lock:
            while len(produced) <= writer.next_seq:
                lock.wait()
            batch = produced[writer.next_seq :]
        writer.append([manager_event(writer.next_seq + i, n) for i, n in enumerate(batch)])
    thread.join(5)
    writer.done(None)
    writes = len(requests_for(server, manager, "PATCH")) + len(requests_for(server, manager, "PUT"))
    per_chunk = (writes - before) / 200
    assert per_chunk < 0.5, per_chunk
    assert [e.seq for e in manager.subscribe(sid)] == list(range(201))


def manager_event(seq: int, value: int) -> Any:
    from flask_durable_stream import Event

    return Event(seq, "chunk", str(value))


def test_existence_checks_read_only_meta(backend_rtdb: Make, rtdb_server: RtdbServer) -> None:
    server = rtdb_server.require_hooks()
    manager = backend_rtdb()
    sid = new_id()
    writer = manager.open(sid)
    for _ in range(50):
        writer.write("x" * 1000)
    writer.done(None)
    server.reset_log()
    with pytest.raises(StreamExists):
        manager.open(sid)
    with pytest.raises(StreamNotFound):
        manager.subscribe(new_id())
    assert manager.info(sid) is not None
    assert manager.request_cancel(sid) is False
    gets = requests_for(server, manager, "GET")
    assert len(gets) == 4 and all(path.endswith("/meta") for path in gets)
    server.reset_log()
    assert [e.seq for e in manager.subscribe(sid, after=48)] == [49, 50]
    gets = requests_for(server, manager, "GET")
    assert gets[0].endswith("/meta") and all(p.endswith(("/meta", "/events")) for p in gets)


def test_lease_cannot_clobber_a_terminal_event(
    backend_rtdb: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = backend_rtdb(lease_seconds=5)
    assert isinstance(manager, RtdbStreamManager)
    clock = ManualClock()
    manager.clock = clock
    storage = manager.storage
    sid = new_id()
    writer = manager.open(sid)
    writer.write("a")
    clock.advance(6)  # the heartbeat is now stale
    real_last_seq = storage.last_seq

    def racing_last_seq(key: str) -> int:
        # The marker has read meta; the producer finishes before the marker's conditional write.
        monkeypatch.setattr(storage, "last_seq", real_last_seq)
        writer.done("finished by the producer")
        return real_last_seq(key)

    monkeypatch.setattr(storage, "last_seq", racing_last_seq)
    storage.mark_lost(node_key(sid))
    events = [(e.seq, e.kind, e.payload) for e in manager.subscribe(sid)]
    assert events == [(0, "chunk", '"a"'), (1, "done", '"finished by the producer"')]
    info = manager.info(sid)
    assert info is not None and info.status.value == "done"


def test_expired_streams_are_not_found_before_gc(backend_rtdb: Make) -> None:
    manager = backend_rtdb(ttl_seconds=30, sweep_interval=0)  # gc() below, nothing before it
    clock = ManualClock()
    manager.clock = clock
    sid = "dotted.id.v1"  # '.' is stored as ',' in keys
    manager.open(sid).done("x")
    assert [e.payload for e in manager.subscribe(sid)] == ['"x"']
    assert manager.list_streams()[0].stream_id == sid
    clock.advance(31)
    with pytest.raises(StreamNotFound):
        manager.subscribe(sid)
    assert manager.info(sid) is None
    with pytest.raises(StreamNotFound):
        manager.request_cancel(sid)
    assert manager.gc() == 1


def test_the_sweep_deletes_ended_and_abandoned_streams_with_no_gc_job(
    backend_rtdb: Make, rtdb_app: Any
) -> None:
    """By default each process that opens streams runs ``gc()`` every half TTL (at least
    1 s): a finished stream past its TTL, and an open one whose producer stopped beating
    past the lease and the TTL, are deleted from the database with no job; a producer that
    beats keeps its stream. With the sweep off (0) nothing is deleted in the same time."""
    manager = backend_rtdb(lease_seconds=0.3, ttl_seconds=0.5)
    assert manager.sweep_interval == 1.0  # half the TTL, at least 1 s
    unswept = RtdbStreamManager(
        firebase_app=rtdb_app,
        ref_prefix=f"t-{uuid.uuid4().hex[:12]}",
        linger=0.0,
        lease_seconds=0.3,
        ttl_seconds=0.5,
        sweep_interval=0,
    )
    try:
        for each in (manager, unswept):
            each.open("finished").done("x")
            each.open("abandoned").write("last words")  # and nothing after it
        alive = manager.open("alive")

        def stored(m: StreamManager, sid: str) -> bool:
            return call(m.root.child(node_key(sid)).get, shallow=True) is not None  # type: ignore[attr-defined]

        deadline = time.monotonic() + 30
        while stored(manager, "finished") or stored(manager, "abandoned"):
            assert time.monotonic() < deadline, "the sweep never deleted them"
            alive.heartbeat()
            time.sleep(0.1)
        index = call(manager.root.child("_index").get, shallow=True) or {}  # type: ignore[attr-defined]
        assert set(index) == {"alive"}
        info = manager.info("alive")
        assert info is not None and info.status.value == "open"
        assert stored(unswept, "finished") and stored(unswept, "abandoned")
        assert unswept.gc() == 2  # what a job would have to do
    finally:
        unswept.close()


def test_the_sweep_interval_from_config(rtdb_server: RtdbServer) -> None:
    from flask import Flask

    from flask_durable_stream import DurableStream

    managers = []
    for setting, expected in ((None, 30.0), ("0", 0.0), ("5", 5.0)):
        app = Flask(__name__)
        app.config.update(
            DURABLE_STREAM_BACKEND="rtdb",
            DURABLE_STREAM_RTDB_URL=rtdb_server.database_url,
            DURABLE_STREAM_TTL=60.0,
        )
        if setting is not None:
            app.config["DURABLE_STREAM_RTDB_SWEEP_INTERVAL"] = setting
        DurableStream(app, flows={})
        manager = app.extensions["durable_stream"].manager
        managers.append(manager)
        assert isinstance(manager, RtdbStreamManager)
        assert manager.sweep_interval == expected
    with pytest.raises(ValueError, match="sweep_interval"):
        RtdbStreamManager(reference=managers[0].root, sweep_interval=-1)
    for manager in managers:
        manager.close()


def test_closing_a_subscription_is_immediate(backend_rtdb: Make, rtdb_server: RtdbServer) -> None:
    server = rtdb_server.require_hooks()
    manager = backend_rtdb()
    assert isinstance(manager, RtdbStreamManager)
    sid = new_id()
    manager.open(sid).write("only")
    events = manager.subscribe(sid)
    assert next(events).seq == 0
    ended: list[str] = []

    def follow() -> None:
        try:
            next(events, None)
        except StorageUnavailable as exc:
            ended.append(exc.status)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()  # live now, both watches blocked in a read (keep-alives every 30 s)
    wait_for_streams(server, sid)
    manager.close()  # what a worker shutting down does
    thread.join(5)
    assert not thread.is_alive()
    assert not [t for t in running_tasks() if t.name.startswith("rtdb-watch")]
    assert ended == ["UNAVAILABLE"]
    assert server.keepalive >= 30


def test_storage_errors_map_to_unavailable() -> None:
    import socket

    import firebase_admin

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    app = firebase_admin.initialize_app(
        options={"databaseURL": f"http://127.0.0.1:{port}?ns=nowhere"}, name=f"down-{new_id()}"
    )
    try:
        manager = RtdbStreamManager(firebase_app=app)
        with pytest.raises(StorageUnavailable) as info:
            manager.open(new_id())
        assert info.value.status == "UNAVAILABLE" and info.value.__cause__ is not None
        with pytest.raises(StorageUnavailable):
            manager.subscribe(new_id())
        manager.close()
    finally:
        firebase_admin.delete_app(app)


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import json, sys, time, uuid
    import gevent, firebase_admin
    from flask_durable_stream import RtdbStreamManager
    from flask_durable_stream._concurrency import gevent_patched, running_tasks

    app = firebase_admin.initialize_app(options={"databaseURL": sys.argv[1]})
    prefix = "gevent-" + uuid.uuid4().hex
    manager = RtdbStreamManager(firebase_app=app, ref_prefix=prefix, linger=0.02)
    sid = uuid.uuid4().hex
    writer = manager.open(sid)
    ticks = [0]

    def ticker():
        while True:
            gevent.sleep(0.005)
            ticks[0] += 1

    def produce():
        for i in range(30):
            gevent.sleep(0.005)
            writer.write(i)
        writer.done("end")

    def read():
        return [e.seq for e in manager.subscribe(sid)]

    clock = gevent.spawn(ticker)
    readers = [gevent.spawn(read) for _ in range(3)]
    gevent.sleep(0.05)
    producer = gevent.spawn(produce)
    gevent.joinall(readers + [producer], timeout=30)

    quiet = uuid.uuid4().hex
    manager.open(quiet).write("x")
    follower = gevent.spawn(lambda: list(manager.subscribe(quiet)))
    gevent.sleep(0.5)  # following live, both watches blocked in a read
    started = time.monotonic()
    follower.kill(block=True, timeout=10)
    closed_in = time.monotonic() - started
    leftover = [t.name for t in running_tasks()]  # the manager's own sweep, until close
    manager.close()
    clock.kill()
    print(json.dumps({
        "patched": gevent_patched(), "reads": [r.value for r in readers], "ticks": ticks[0],
        "closed_in": closed_in, "follower_dead": follower.dead, "leftover": leftover,
        "after_close": [t.name for t in running_tasks()],
    }))
    """
)


def test_under_gevent_monkey_patching(rtdb_server: RtdbServer, tmp_path: Path) -> None:
    rtdb_server.require_hooks()
    script = tmp_path / "gevent_rtdb.py"
    script.write_text(GEVENT_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), rtdb_server.database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["patched"] is True
    assert result["reads"] == [list(range(31))] * 3
    assert result["ticks"] > 10  # the hub kept running while readers waited on sockets
    assert result["follower_dead"] and result["leftover"] == ["rtdb-sweep"]
    assert result["after_close"] == []
    assert result["closed_in"] < 5  # keep-alives come every 30 s: it did not wait for a byte


def test_an_event_over_10_mb_is_too_large_and_10_mb_is_stored(backend_rtdb: Make) -> None:
    manager = backend_rtdb()
    sid = new_id()
    writer = manager.open(sid)
    limit = 10 * 1024 * 1024
    with pytest.raises(EventTooLarge) as info:
        writer.write("x" * (limit - 1))  # with its quotes, one byte over
    assert info.value.message == (
        f"Chunk 0 is {limit + 1:,} bytes; the Realtime Database backend stores at most {limit:,}"
    )
    writer.write("y" * (limit - 2))  # exactly the limit: the server takes it
    writer.done(None)
    assert [len(e.payload) for e in manager.subscribe(sid)] == [limit, 4]


def test_a_large_batch_is_split_into_writes_under_16_mb(
    backend_rtdb: Make, rtdb_server: RtdbServer
) -> None:
    server = rtdb_server.require_hooks()
    manager = backend_rtdb(linger=0)
    sid = new_id()
    writer = manager.open(sid)
    events = [Event(seq, "chunk", '"' + "z" * (1024 * 1024) + '"') for seq in range(40)]
    events.append(Event(40, "done", '"end"'))
    server.reset_log()
    writer.append(events)  # 40 MiB at once, as a runner hands over a backlog
    patches = [size for size in server.body_sizes if size > 1024 * 1024]
    assert len(patches) >= 3 and max(patches) <= 16 * 1024 * 1024
    assert list(manager.subscribe(sid)) == events


def test_refused_data_is_permanent_and_names_no_url(backend_rtdb: Make) -> None:
    manager = backend_rtdb()
    bad = manager.root.child("bad")  # type: ignore[attr-defined]
    with pytest.raises(StoragePermanentError) as info:
        call(bad.set, {"a" * 769: 1})  # a key over the service's 768 bytes
    assert "127.0.0.1" not in info.value.message and "http" not in info.value.message


def test_database_down_at_startup_then_up_needs_no_restart() -> None:
    import firebase_admin

    from tests.support import servers
    from tests.support.rtdb_server import RtdbProtocolServer

    port = servers.free_port()
    app = firebase_admin.initialize_app(
        options={"databaseURL": f"http://127.0.0.1:{port}?ns=late"}, name=f"late-{new_id()}"
    )
    manager = RtdbStreamManager(firebase_app=app, linger=0)  # nothing sent yet
    try:
        with pytest.raises(StorageUnavailable) as info:
            manager.open("s")
        assert str(port) not in info.value.message
        with RtdbProtocolServer(port=port, namespace="late"):
            manager.open("s").done("ok")
            assert [e.payload for e in manager.subscribe("s")] == ['"ok"']
    finally:
        manager.close()
        firebase_admin.delete_app(app)
