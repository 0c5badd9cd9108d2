"""SQLite specifics beyond the conformance suite: processes, restarts, startup errors, gevent."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flask_durable_stream
from flask_durable_stream import (
    Event,
    StorageUnavailable,
    StreamClosed,
    StreamNotFound,
    StreamStatus,
    protocol,
)
from flask_durable_stream.managers import sqlite_io, sqlite_reader, sqlite_writer
from flask_durable_stream.managers.sqlite import SQLiteStreamManager
from flask_durable_stream.managers.sqlite_reader import Reader

PRODUCER = """
import sys, threading, time
from flask_durable_stream import SQLiteStreamManager
path, sid, mode = sys.argv[1:4]
manager = SQLiteStreamManager(path, lease_seconds=1.0)
writer = manager.open(sid)
for i in range(5):
    writer.write({"i": i})
if mode == "crash":  # beat like the runner does, until SIGKILL
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
        writer.heartbeat()
print("ready", flush=True)
sys.stdin.readline()  # the follower has the first five events; go on
for i in range(5, 40):
    time.sleep(0.005)
    writer.write({"i": i})
writer.done("end")
manager.close()
"""


def start_producer(path: Path, sid: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(path), sid, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "streams.db"


def test_follow_a_stream_produced_by_another_process(db: Path) -> None:
    with SQLiteStreamManager(db, timeout=30) as manager:
        proc = start_producer(db, "cross", "normal")
        try:
            sub = manager.subscribe("cross")
            first = [next(sub) for _ in range(5)]
            info = manager.info("cross")
            assert info is not None and info.status is StreamStatus.OPEN  # truly live
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            events = first + list(sub)
        finally:
            assert proc.wait(30) == 0
    assert [e.seq for e in events] == list(range(41))
    assert [e.payload for e in events[:40]] == [f'{{"i":{i}}}' for i in range(40)]
    assert events[-1] == Event(40, "done", '"end"')


def test_killed_producer_process_ends_stream_with_unavailable(db: Path) -> None:
    lease = 1.0
    with SQLiteStreamManager(db, timeout=30, lease_seconds=lease) as manager:
        proc = start_producer(db, "doomed", "crash")
        sub = manager.subscribe("doomed")
        assert [next(sub).seq for _ in range(5)] == list(range(5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        terminal = next(sub)
        # The lease ended it (well before the 30 s reader timeout), however slow the machine.
        assert time.monotonic() - killed < lease + 15
        assert terminal.seq == 5 and terminal.kind == "error"
        assert terminal.value["status"] == "UNAVAILABLE"
        assert list(manager.subscribe("doomed", after=4)) == [terminal]
        info = manager.info("doomed")
        assert info is not None and info.status is StreamStatus.ERROR


def test_restart_replays_finished_streams_byte_for_byte(db: Path) -> None:
    payloads = ["héllo ✓ 🚀", {"nested": [1, 2.5, None]}, "\n\n data: x\n\n", "x" * 70_000]
    with SQLiteStreamManager(db) as manager:
        writer = manager.open("kept", owner="alice")
        for p in payloads:
            writer.write(p)
        writer.done({"ok": True})
        before = [(e.seq, e.kind, e.payload) for e in manager.subscribe("kept")]
    with SQLiteStreamManager(db) as manager:
        after = [(e.seq, e.kind, e.payload) for e in manager.subscribe("kept")]
        info = manager.info("kept")
    assert after == before and len(after) == 5
    assert info is not None and info.status is StreamStatus.DONE and info.owner == "alice"


#: The schema of version 1 files, before streams kept their flow's name.
SCHEMA_V1 = """
CREATE TABLE ds_streams (
    stream_id TEXT PRIMARY KEY, token INTEGER NOT NULL, status TEXT NOT NULL, owner TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, heartbeat_at REAL, expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, last_seq INTEGER NOT NULL DEFAULT -1
);
CREATE INDEX ds_streams_expires ON ds_streams (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX ds_streams_created ON ds_streams (created_at);
CREATE TABLE ds_events (
    stream_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
CREATE TABLE ds_pointers (key TEXT PRIMARY KEY, stream_id TEXT NOT NULL) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def test_the_flow_name_is_stored_with_the_stream_and_survives_a_restart(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        manager.open("named", owner="alice", flow="story").done("end")
        manager.open("anonymous").write("x")
    with SQLiteStreamManager(db) as manager:
        named, anonymous = manager.info("named"), manager.info("anonymous")
        listed = {info.stream_id: info.flow for info in manager.list_streams()}
    assert named is not None and named.flow == "story" and named.owner == "alice"
    assert anonymous is not None and anonymous.flow is None
    assert listed == {"named": "story", "anonymous": None}


@pytest.mark.parametrize("first", ["read", "write"])
def test_a_version_1_file_gains_the_flow_column_and_keeps_its_streams(db: Path, first: str) -> None:
    raw = sqlite3.connect(db)
    raw.executescript(SCHEMA_V1)
    raw.execute(
        "INSERT INTO ds_streams (stream_id, token, status, owner, created_at, updated_at,"
        " last_seq) VALUES ('old', 7, 'done', 'bob', 1.0, 2.0, 1)"
    )
    raw.executemany(
        "INSERT INTO ds_events VALUES ('old', ?, ?, ?)",
        [(0, protocol.CHUNK, '"a"'), (1, protocol.DONE, '"b"')],
    )
    raw.commit()
    raw.close()
    with SQLiteStreamManager(db) as manager:
        if first == "write":  # the writer migrates when it first connects
            manager.open("new", flow="story").done(None)
        old = manager.info("old")  # a read first makes the writer migrate, then reads again
        assert old is not None and old.owner == "bob" and old.flow is None
        assert [e.payload for e in manager.subscribe("old")] == ['"a"', '"b"']
        if first == "read":
            manager.open("new", flow="story").done(None)
        listed = {info.stream_id: info.flow for info in manager.list_streams()}
    assert listed == {"old": None, "new": "story"}
    check = sqlite3.connect(db)
    try:
        columns = [row[1] for row in check.execute("PRAGMA table_info(ds_streams)")]
        version = check.execute("PRAGMA user_version").fetchone()[0]
    finally:
        check.close()
    assert columns.count("flow") == 1 and version == 2


def test_a_file_of_a_newer_schema_is_refused(db: Path) -> None:
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with SQLiteStreamManager(db) as manager:
        with pytest.raises(StorageUnavailable, match="unknown schema version 99"):
            manager.open("s")


def test_corrupt_file_fails_calls_not_the_constructor(db: Path) -> None:
    db.write_bytes(b"this is not a database" * 300)
    with SQLiteStreamManager(db) as manager:  # the worker boots
        with pytest.raises(StorageUnavailable) as info:
            manager.open("s")
        assert "not a database" in str(info.value) and str(db) not in str(info.value)
        assert info.value.status == "UNAVAILABLE"
        db.unlink()  # an operator replaces the file: it works again, no restart
        manager.open("s").done("ok")
        assert [e.payload for e in manager.subscribe("s")] == ['"ok"']


def test_missing_directory_names_the_setting_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DURABLE_STREAM_SQLITE_PATH.*does not exist"):
        SQLiteStreamManager(tmp_path / "no" / "such" / "dir.db")
    assert not (tmp_path / "no").exists()


def test_directory_path_says_it_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DURABLE_STREAM_SQLITE_PATH.*is a directory"):
        SQLiteStreamManager(tmp_path)


@contextlib.contextmanager
def read_only(*files: Path) -> Iterator[None]:
    """Make files unwritable, even for root (which ignores file modes: chattr +i then)."""
    immutable = os.geteuid() == 0
    chattr = shutil.which("chattr")
    if immutable and chattr is None:
        pytest.fail("running as root without chattr: cannot make a file read-only")
    changed = []
    try:
        for f in files:
            if immutable:
                if subprocess.run([str(chattr), "+i", str(f)]).returncode != 0:
                    pytest.fail(f"chattr +i failed on {f} (a file system without attributes?)")
            else:
                f.chmod(0o444)
            changed.append(f)
        yield
    finally:
        for f in changed:
            if immutable:
                subprocess.run([str(chattr), "-i", str(f)], check=True)
            else:
                f.chmod(0o644)


def test_read_only_file_fails_calls_then_recovers_by_itself(db: Path) -> None:
    with SQLiteStreamManager(db) as first:
        first.open("before").done(None)  # leaves a database, its WAL closed
    with SQLiteStreamManager(db) as manager:
        with read_only(db):
            with pytest.raises(StorageUnavailable) as info:
                manager.open("s")
            message = str(info.value)
            assert "readonly" in message or "read-only" in message, message
            assert str(db.parent) not in message
        manager.open("s").done("ok")  # writable again: the same manager works
        assert [e.payload for e in manager.subscribe("s")] == ['"ok"']


def test_exported_lazily_from_the_package() -> None:
    assert flask_durable_stream.SQLiteStreamManager is SQLiteStreamManager


def test_memory_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="InMemoryStreamManager"):
        SQLiteStreamManager(":memory:")


def test_group_commit_puts_queued_appends_in_one_transaction(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        writers = [manager.open(f"s{i}") for i in range(16)]
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        threads = [threading.Thread(target=w.write, args=("x",)) for w in writers]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while manager.in_flight < 16 and time.monotonic() < deadline:
            time.sleep(0.005)  # the first append(s) wait for the lock, the rest queue behind
        assert manager.in_flight == 16
        transactions, operations = manager.transactions, manager.operations
        blocker.execute("COMMIT")
        blocker.close()
        for t in threads:
            t.join(10)
        assert manager.operations - operations == 16
        assert manager.transactions - transactions <= 2
        for i in range(16):
            info = manager.info(f"s{i}")
            assert info is not None and info.last_seq == 0


def test_many_concurrent_writers_all_land(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:

        def produce(n: int) -> None:
            writer = manager.open(f"w{n}")
            for i in range(50):
                writer.write([n, i])
            writer.done(n)

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for n in range(12):
            events = list(manager.subscribe(f"w{n}"))
            assert [e.payload for e in events] == [f"[{n},{i}]" for i in range(50)] + [str(n)]
        assert manager.operations >= 12 * 52


def test_lock_held_too_long_is_unavailable_and_retry_is_idempotent(db: Path) -> None:
    with SQLiteStreamManager(db, busy_timeout=0.2) as manager:
        writer = manager.open("busy")
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        batch = [Event(0, "chunk", '"a"'), Event(1, "chunk", '"b"')]
        with pytest.raises(StorageUnavailable):
            writer.append(batch)
        blocker.execute("COMMIT")
        blocker.close()
        writer.append(batch)  # the runner's retry
        writer.done("end")
        assert [e.seq for e in manager.subscribe("busy")] == [0, 1, 2]


def test_large_batches_round_trip_byte_for_byte_and_retry_idempotently(db: Path) -> None:
    tricky = ['"héllo ✓ 🚀"', '"\\u0000 nul, \\" quote"', '{"a":[1,2.50,1e5]}', '"\\n\\n"']
    batch = [Event(i, "chunk", tricky[i % 4]) for i in range(40)] + [Event(40, "done", "null")]
    with SQLiteStreamManager(db) as manager:
        writer = manager.open("packed")
        writer.store(batch)  # reached storage, reported failure
        writer.append(batch)  # the retry
        assert list(manager.subscribe("packed")) == batch
        with pytest.raises(StreamClosed, match="conflicting"):
            writer.store(batch[:20] + [Event(20, "chunk", '"x"')])


def append_many(manager: SQLiteStreamManager, entries: list[tuple[Any, ...]]) -> list[Any]:
    """What the writer thread answers for the appends of several streams in one request
    (how a gevent worker stores its running flows), and how many took the one-by-one way."""
    one_by_one = []
    alone = manager._op_append

    def counted(conn: Any, stream_id: str, *args: Any) -> Any:
        one_by_one.append(stream_id)
        return alone(conn, stream_id, *args)

    manager._op_append = counted  # type: ignore[method-assign]
    try:
        results = manager._writer.submit(manager._op_append_many, entries)
    finally:
        manager._op_append = alone  # type: ignore[method-assign]
    return [one_by_one, *results]


def chunk(seq: int, value: str) -> Event:
    return Event(seq, "chunk", protocol.encode(value))


def test_the_appends_of_many_running_streams_are_stored_together(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        # 100 streams (more than one statement carries), one to three events each.
        writers = [manager.open(f"s{n}") for n in range(100)]
        entries = [
            (w.stream_id, w._token, [chunk(i, f"{n}.{i}") for i in range(1 + n % 3)])
            for n, w in enumerate(writers)
        ]
        one_by_one, *results = append_many(manager, entries)
        assert one_by_one == [] and results == [False] * 100  # no cancel asked
        for n, w in enumerate(writers):
            info = manager.info(w.stream_id)
            assert info is not None and info.last_seq == n % 3
            w._moved_past(entries[n][2])
            w.done("end")
            stored = [e.value for e in manager.subscribe(w.stream_id)]
            assert stored == [f"{n}.{i}" for i in range(1 + n % 3)] + ["end"]


def test_appends_together_answer_each_stream_as_its_own_append_would(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        plain, ending, cancelled, retried, forged, gone = (
            manager.open(name)
            for name in ("plain", "ending", "cancelled", "retried", "forged", "gone")
        )
        retried.write("stored before")  # a retry: the writer thread had it stored
        forged.write("original")
        gone.done("over")  # ended: a late append must be refused
        assert manager.request_cancel("cancelled")
        entries = [
            ("plain", plain._token, [chunk(0, "p")]),
            ("ending", ending._token, [chunk(0, "e"), Event(1, "done", '"end"')]),
            ("cancelled", cancelled._token, [chunk(0, "c")]),
            ("retried", retried._token, [chunk(0, "stored before"), chunk(1, "new")]),
            ("forged", forged._token, [chunk(0, "forged")]),
            ("gone", gone._token, [chunk(1, "late")]),
        ]
        one_by_one, *results = append_many(manager, entries)
        # A check failed: nothing of them was stored together; each went its own way.
        assert one_by_one == ["plain", "ending", "cancelled", "retried", "forged", "gone"]
        assert results[:4] == [False, False, True, False]  # the cancel flag, as ever
        assert isinstance(results[4], StreamClosed) and "conflicting" in str(results[4])
        assert isinstance(results[5], StreamClosed) and "ended" in str(results[5])
        stored = {name: [e.value for e in manager.subscribe(name)] for name in ("ending", "gone")}
        assert stored == {"ending": ["e", "end"], "gone": ["over"]}
        assert next(manager.subscribe("forged")).value == "original"
        info = manager.info("forged")
        assert info is not None and info.last_seq == 0  # the forged event was not stored
        for name, values in (
            ("plain", ["p"]),
            ("cancelled", ["c"]),
            ("retried", ["stored before", "new"]),
        ):
            info = manager.info(name)
            assert info is not None and info.last_seq == len(values) - 1
        # Running streams with an end among them: those together, the end on its own.
        one_by_one, *results = append_many(
            manager,
            [
                ("plain", plain._token, [chunk(1, "p1")]),
                ("retried", retried._token, [chunk(2, "r2")]),
                ("cancelled", cancelled._token, [Event(1, "error", '{"status":"CANCELLED"}')]),
            ],
        )
        assert one_by_one == ["cancelled"] and results == [False, False, True]
        info = manager.info("cancelled")
        assert info is not None and info.status is StreamStatus.CANCELLED


def test_one_failed_check_among_a_thousand_streams_writes_nothing_of_them_together(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joint append reads every stream's checks before it writes anything (so it
    never has to undo a write): of a thousand streams, 64 to a statement, the last
    one's check fails. Nothing is written together (the writer's connection runs no
    statement of the joint form but the checks); each append runs on its own."""
    statements: list[str] = []

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = sqlite_io.connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite_writer, "connect", traced)
    with SQLiteStreamManager(db) as manager:
        writers = [manager.open(f"stream-{n:04d}-" + "x" * 60) for n in range(1000)]
        last = writers[-1].stream_id
        assert manager.request_cancel(last)  # its check fails: all go one by one
        entries = [(w.stream_id, w._token, [chunk(0, str(n))]) for n, w in enumerate(writers)]
        statements.clear()
        one_by_one, *results = append_many(manager, entries)
        joint = [s for s in statements if ") AS u WHERE" in s or "), (" in s]
        assert len(joint) == 17  # 15 of 64 streams, 32 and 8: the checks alone
        assert all(s.startswith("SELECT count(*)") for s in joint), joint[-1][:80]
        assert one_by_one == [w.stream_id for w in writers]
        assert results == [False] * 999 + [True]  # each its own append's answer
        for w in writers:
            info = manager.info(w.stream_id)
            assert info is not None and info.last_seq == 0
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT stream_id, seq, kind, payload FROM ds_events")
            assert sorted(stored.fetchall()) == [
                (w.stream_id, *chunk(0, str(n))) for n, w in enumerate(writers)
            ]


def test_one_stream_twice_in_one_request_is_stored_in_order(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        a, b = manager.open("a"), manager.open("b")
        one_by_one, *results = append_many(
            manager,
            [
                ("a", a._token, [chunk(0, "a0")]),
                ("b", b._token, [chunk(0, "b0")]),
                ("a", a._token, [chunk(1, "a1")]),
            ],
        )
        assert one_by_one == ["a", "b", "a"] and results == [False] * 3
        info = manager.info("a")
        assert info is not None and info.last_seq == 1


def test_conflicting_payload_at_an_existing_seq_is_refused(db: Path) -> None:
    with SQLiteStreamManager(db) as manager:
        writer = manager.open("c")
        writer.write("original")
        with pytest.raises(StreamClosed, match="conflicting"):
            writer.store([Event(0, "chunk", '"forged"')])
        assert next(manager.subscribe("c")).payload == '"original"'
        writer.done("end")  # the writer itself is unaffected
        assert [e.seq for e in manager.subscribe("c")] == [0, 1]


def test_two_managers_on_one_file_share_streams_and_leases(db: Path) -> None:
    with (
        SQLiteStreamManager(db, lease_seconds=30) as a,
        SQLiteStreamManager(db, timeout=30, lease_seconds=0.5) as b,
    ):
        writer = a.open("shared")
        writer.write("from a")
        events = list(b.subscribe("shared"))  # a's producer never beats again
        assert [e.kind for e in events] == ["chunk", "error"]
        assert list(a.subscribe("shared")) == events
        with pytest.raises(StreamClosed):
            writer.write("too late")
        assert a.request_cancel("shared") is False


def test_followers_of_another_managers_streams_are_woken_by_one_shared_poller(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two managers on one file stand for two worker processes: b learns of a's
    # commits only through the file. A waiting follower's own safety re-read
    # (every RECHECK seconds) is pushed out of the test's reach, so every wake-up
    # seen here comes from the shared poller.
    monkeypatch.setattr(sqlite_reader, "RECHECK", 60.0)
    with SQLiteStreamManager(db) as a, SQLiteStreamManager(db, timeout=30) as b:
        writers = [a.open(f"s{i}") for i in range(20)]
        results: dict[int, list[str]] = {}
        reads = [0]
        original_read = Reader.read

        def counting_read(reader: Reader, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
            reads[0] += 1  # only b follows: a's writes read nothing
            return original_read(reader, *args, **kwargs)

        monkeypatch.setattr(Reader, "read", counting_read)

        def follow(i: int) -> None:
            results[i] = [e.payload for e in b.subscribe(f"s{i}")]

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        while b.watched_streams < 20:  # every follower has read and waits
            time.sleep(0.01)
        time.sleep(0.2)
        before = reads[0]
        time.sleep(1.0)
        # Nothing was committed meanwhile, so nobody read: waiting followers do not
        # poll on their own (one poll each per 100 ms would be 200 reads here).
        quiet_reads = reads[0] - before
        polling = b.polling
        for round_ in range(3):
            for i, writer in enumerate(writers):
                writer.write([i, round_])
            time.sleep(0.05)
        for i, writer in enumerate(writers):
            writer.done(i)
        for thread in threads:
            thread.join(10)
        # Checked once the followers have ended, so a failure here cannot leave them
        # reading from a closed manager into the next test.
        assert quiet_reads == 0
        assert polling
        assert results == {i: [f"[{i},{r}]" for r in range(3)] + [str(i)] for i in range(20)}
    # The poller ended with its last follower (the leak check also holds it to that).
    assert not b.polling


def test_expired_stream_is_not_found_before_gc_then_gc_deletes_rows(db: Path) -> None:
    with SQLiteStreamManager(db, ttl_seconds=0.2, sweep_interval=3600) as manager:
        writer = manager.open("old")
        writer.write("a")
        writer.done("b")
        time.sleep(0.3)
        assert manager.info("old") is None
        with pytest.raises(StreamNotFound):
            manager.subscribe("old")
        with pytest.raises(StreamNotFound):
            manager.request_cancel("old")
        assert manager.gc() == 1
        raw = sqlite3.connect(db)
        tables = ("ds_streams", "ds_events")
        counts = [raw.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]
        raw.close()
        assert counts == [0, 0]


def test_sweep_deletes_expired_streams_without_gc_calls(db: Path) -> None:
    with SQLiteStreamManager(db, ttl_seconds=0.1, sweep_interval=0.05) as manager:
        manager.open("swept").done(None)
        raw = sqlite3.connect(db)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if raw.execute("SELECT count(*) FROM ds_streams").fetchone()[0] == 0:
                break
            time.sleep(0.02)
        assert raw.execute("SELECT count(*) FROM ds_streams").fetchone()[0] == 0
        raw.close()


def test_closed_manager_refuses_work(db: Path) -> None:
    manager = SQLiteStreamManager(db)
    writer = manager.open("s")
    manager.close()
    manager.close()  # twice is fine
    with pytest.raises(StorageUnavailable):
        writer.write("x")
    with pytest.raises(StorageUnavailable):
        manager.info("s")


GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys, threading
import gevent
from flask_durable_stream import SQLiteStreamManager, StreamTimeout

assert monkey.is_module_patched("threading")
manager = SQLiteStreamManager(sys.argv[1], timeout=0.5, lease_seconds=30)
alone = manager.open("alone")  # only the main greenlet: nothing else keeps the hub busy
alone.write("a")
alone.done("b")
assert [e.payload for e in manager.subscribe("alone")] == ['"a"', '"b"']
ticks = [0]

def tick():
    while True:
        ticks[0] += 1
        gevent.sleep(0.001)

def produce(n):
    writer = manager.open(f"g{n}")
    for i in range(30):
        writer.write([n, i])
        gevent.sleep(0.002)
    assert writer.heartbeat() is False
    writer.done(n)

def follow(n):
    return [e.payload for e in manager.subscribe(f"g{n}")]

ticker = gevent.spawn(tick)
producers = [gevent.spawn(produce, n) for n in range(4)]
gevent.sleep(0.01)
followers = [gevent.spawn(follow, n) for n in range(4)]
gevent.joinall(producers + followers, timeout=30, raise_error=True)
for n, g in enumerate(followers):
    assert g.value == [f"[{n},{i}]" for i in range(30)] + [str(n)], g.value
late = [e.payload for e in manager.subscribe("g0")]
assert late == followers[0].value
manager.open("quiet")
try:
    list(manager.subscribe("quiet"))
    raise AssertionError("no timeout")
except StreamTimeout:
    pass
assert ticks[0] > 10, ticks  # the hub kept running while SQLite worked
assert threading.active_count() >= 1
ticker.kill()
manager.close()
print("ok", manager.transactions, manager.operations)
"""


def test_works_under_gevent_monkey_patching(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, str(db)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    word, transactions, operations = result.stdout.split()
    assert word == "ok" and 0 < int(transactions) <= int(operations)


FORK_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import os, sqlite3, subprocess, sys, time
from flask_durable_stream import SQLiteStreamManager

path = sys.argv[1]
manager = SQLiteStreamManager(path, busy_timeout=30)
writer = manager.open("parent")
writer.write("before")
# Another process holds the write lock, as a busy worker would.
other = sqlite3.connect(path, isolation_level=None)
other.execute("BEGIN IMMEDIATE")
# gevent's subprocess forks with os.fork(), so fork handlers run in the child.
# The child must exec at once: touching SQLite there would wait for the lock.
result = subprocess.run(["true"], timeout=10)
assert result.returncode == 0
pid = os.fork()
if pid == 0:
    os._exit(0)  # a child that never uses the manager does nothing with SQLite
for _ in range(100):
    if os.waitpid(pid, os.WNOHANG)[0] == pid:
        break
    time.sleep(0.05)
else:
    raise AssertionError("the forked child did not exit while the database was locked")
other.execute("COMMIT")
other.close()
pid = os.fork()
if pid == 0:  # a child that does use the manager gets its own writer
    try:
        child = manager.open("child")
        child.write("from the child")
        child.done("end")
        assert manager.info("parent").last_seq == 0  # reads work in the child too
    except BaseException as exc:
        print("child failed:", repr(exc), file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
assert [e.payload for e in manager.subscribe("child")] == ['"from the child"', '"end"']
writer.done("end")  # the parent's writer still works after both forks
assert [e.payload for e in manager.subscribe("parent")] == ['"before"', '"end"']
manager.close()
print("ok")
"""


def test_fork_leaves_sqlite_alone_until_the_child_uses_it(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(db)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


FORK_PENDING_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import os, sys
import gevent
from flask_durable_stream import Event, SQLiteStreamManager

manager = SQLiteStreamManager(sys.argv[1])
writers = [manager.open(f"s{n}") for n in range(3)]
answers = []
for writer in writers:  # queued in this turn of the hub's loop, sent when it ends
    assert writer.append_nowait([Event(0, "chunk", '"x"')], answers.append)
pid = os.fork()  # before they went to the writer thread
if pid == 0:
    gevent.sleep(0.2)  # the child's hub runs what it inherited
    # The parent's appends are the parent's to send: the child's writer did nothing.
    os._exit(0 if (manager.transactions, manager.operations, answers) == (0, 0, []) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child sent the parent's appends"
while len(answers) < 3:
    gevent.sleep(0.01)
assert answers == [None] * 3 and manager.operations == 6, (answers, manager.operations)
manager.close()
print("ok")
"""


def test_a_forked_child_does_not_send_the_parents_queued_appends(db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORK_PENDING_SCRIPT, str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


def test_replay_reaches_the_http_layer_in_pages(tmp_path: Path) -> None:
    # The HTTP layer writes each batch of subscribe_batches() in one go; the base class's
    # default yields one event per batch, which makes a 20,000-chunk replay about 25 times
    # slower than the in-memory manager's (bench/bench_sqlite_server.py, part a).
    with SQLiteStreamManager(tmp_path / "streams.sqlite3") as manager:
        writer = manager.open("long")
        writer.append([Event(i, protocol.CHUNK, '"x"') for i in range(1000)])
        writer.done("end")
        batches = list(manager.subscribe_batches("long"))
    assert [e.seq for batch in batches for e in batch] == list(range(1001))
    assert len(batches) <= 10


def test_gc_ends_abandoned_open_streams_so_they_expire(tmp_path: Path) -> None:
    with SQLiteStreamManager(
        tmp_path / "s.sqlite3", lease_seconds=0.3, ttl_seconds=0.3, sweep_interval=60
    ) as manager:
        writer = manager.open("abandoned")
        writer.write("last words")  # then the producer's process dies: no heartbeat, no reader
        alive = manager.open("alive")
        time.sleep(0.5)
        alive.heartbeat()
        assert manager.gc() == 0  # ended, not yet expired
        info = manager.info("abandoned")
        assert info is not None and info.status is StreamStatus.ERROR
        assert [e.kind for e in manager.subscribe("abandoned")] == ["chunk", "error"]
        alive_info = manager.info("alive")
        assert alive_info is not None and alive_info.status is StreamStatus.OPEN
        time.sleep(0.4)
        alive.heartbeat()
        assert manager.gc() == 1
        assert manager.info("abandoned") is None
        assert manager.info("alive") is not None


def test_wal_made_unwritable_mid_stream_is_transient_then_recovers(db: Path) -> None:
    """Writes fail as StorageUnavailable while the WAL cannot be written, then resume.

    (The ``-shm`` file is left alone: SQLite maps it into memory, and the kernel
    answers a write to a mapping of a file made immutable with SIGBUS, which no
    program can catch; see docs/sqlite.md.)
    """
    if os.geteuid() != 0:
        pytest.skip("only root can make a file that is already open unwritable (chattr +i)")
    with SQLiteStreamManager(db) as manager:
        writer = manager.open("s")
        writer.write("before")
        wal = Path(f"{db}-wal")
        with read_only(wal):
            with pytest.raises(StorageUnavailable) as info:
                for i in range(2000):  # until the WAL needs a write past what is cached
                    writer.write("x" * 1000 + str(i))
            assert str(db.parent) not in str(info.value)
            failed_at = writer.next_seq  # the failed append changed nothing
        writer.write("after")  # the same seq again, as the runner retries
        writer.done("end")
        replay = list(manager.subscribe("s"))
    assert [e.seq for e in replay] == list(range(failed_at + 2))
    assert replay[0].payload == '"before"' and replay[failed_at].payload == '"after"'
    assert replay[-1].payload == '"end"'


def test_declaring_a_producer_lost_never_waits_for_the_write_lock(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower gives up at once while another connection writes, and looks again.

    Before, it queued the marking on its process's writer thread, which then
    waited up to the busy timeout for the lock: every write of that process
    (other producers' events and heartbeats) stalled behind it.
    """
    with (
        SQLiteStreamManager(db, lease_seconds=0.2) as producer_side,
        SQLiteStreamManager(db, lease_seconds=0.2, busy_timeout=60) as reader_side,
    ):
        producer_side.open("quiet").write("one")  # then its producer goes silent
        attempts: list[bool] = []
        original = Reader.mark_lost

        def counted(reader: Reader, *args: Any) -> bool:
            result = original(reader, *args)  # only reader_side follows, so only it marks
            attempts.append(result)
            return result

        monkeypatch.setattr(Reader, "mark_lost", counted)
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # a writer elsewhere holds the lock
        sub = reader_side.subscribe("quiet")
        assert next(sub).payload == '"one"'
        got: list[Event] = []
        follower = threading.Thread(target=lambda: got.extend(sub), daemon=True)
        follower.start()
        deadline = time.monotonic() + 30
        while attempts.count(False) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert attempts.count(False) >= 3  # tried, found the lock taken, came back
        assert reader_side.in_flight == 0  # nothing of it waits in the writer thread
        blocker.execute("COMMIT")
        blocker.close()
        follower.join(30)
    assert [(e.seq, e.kind) for e in got] == [(1, "error")]
    assert got[0].value["status"] == "UNAVAILABLE"
