"""Streams in one SQLite file, shared by every worker process of one host.

Layout: one row per stream (``ds_streams``) and one row per event
(``ds_events``, primary key ``(stream_id, seq)``, so a retried append is a
no-op). The database runs in WAL mode: readers never wait for the writer.

Writes leave the caller's thread: each process has one writer OS thread that
owns the only writing connection, takes every queued operation, runs them in
one transaction and commits once (group commit). Under gevent this keeps
commits, fsyncs and lock waits off the hub; a caller waits cooperatively and is
woken through the hub's thread-safe callback. Reads are short indexed queries
on pooled connections, run in place.

Subscribers in the writing process are woken as soon as a commit lands. Events
written by other processes are found by one *change poller* per process: while
anybody follows a stream, it checks ``PRAGMA data_version`` (which moves when
another connection commits) and, only when it moved, reads the watched streams'
``last_seq`` in one query and wakes the followers of those that advanced. It
polls every ``poll_interval[0]`` seconds until watched streams have been quiet for
a quarter second, then less often, up to ``poll_interval[1]``. Idle followers
cost nothing of their own. See ``docs/sqlite.md`` for figures and limits.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .._concurrency import Signal, Task, TaskGroup
from ..exceptions import (
    StorageUnavailable,
    StreamError,
    StreamNotFound,
    StreamTimeout,
)
from .base import (
    Event,
    ProducerWatch,
    StreamInfo,
    StreamStatus,
    StreamWriter,
    check_event_sizes,
    check_pointer_key,
    common_options,
)
from .sqlite_io import (
    _ABANDONED,
    _BUSY,
    _HOLD,
    _READ_BATCH,
    _RECHECK,
    _ROW,
    _SYNC_MODES,
    MAX_EVENT_BYTES,
    _busy,
    _close_quietly,
    _noop,
    _real_lock,
    _real_start_thread,
    _RealQueue,
    _Request,
    _rollback_quietly,
    _row_info,
    _stop,
    check_path,
    migrate,
)
from .sqlite_ops import SQLiteOperations

if TYPE_CHECKING:
    from flask import Flask

    from ..durable_streams.store import DSStore

log = logging.getLogger(__name__)


class SQLiteStreamManager(SQLiteOperations):
    """Durable streams in a local SQLite file; safe for several processes and threads/greenlets.

    ``synchronous="NORMAL"`` (WAL) survives a process crash and loses at most
    the last commits on power loss; ``"FULL"`` fsyncs every commit.
    """

    max_event_bytes = MAX_EVENT_BYTES
    backend_name = "SQLite"
    config_defaults: ClassVar[Mapping[str, Any]] = {"DURABLE_STREAM_SQLITE_PATH": None}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> SQLiteStreamManager:
        """``DURABLE_STREAM_SQLITE_PATH``, by default a file in the app's instance folder."""
        path = config["DURABLE_STREAM_SQLITE_PATH"]
        if not path:  # the default lives in the app's instance folder, created if needed
            path = os.path.join(app.instance_path, "durable-streams.sqlite3")
            os.makedirs(app.instance_path, exist_ok=True)
        return cls(path, **common_options(config))

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        ttl_seconds: float = 300.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
        synchronous: str = "NORMAL",
        poll_interval: tuple[float, float] = (0.005, 0.1),
        busy_timeout: float = 10.0,
        sweep_interval: float | None = None,
        read_pool_size: int = 8,
        max_batch: int = 512,
    ) -> None:
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            raise ValueError("SQLiteStreamManager needs a file; use InMemoryStreamManager instead")
        check_path(self.path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.sweep_interval = (
            sweep_interval if sweep_interval is not None else max(0.05, min(30.0, ttl_seconds / 2))
        )
        self.read_pool_size = read_pool_size
        self.max_batch = max_batch
        #: Committed write transactions and the operations they carried (group commit at work).
        self.transactions = 0
        self.operations = 0
        self._in_flight = 0  # submitted, not yet answered
        self._lock = _real_lock()
        self._start_lock = threading.Lock()  # held while connecting: greenlet-aware
        self._watchers: dict[str, set[Signal]] = {}
        self._tasks = TaskGroup()
        self._sweeper: Task | None = None
        self._poller: Task | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._readers: list[sqlite3.Connection] = []
        # The writer thread's queue; None until the first write of this process
        # starts it. Lazy, so a database that cannot be written right now does not
        # stop a worker from booting: calls raise StorageUnavailable until it can.
        self._queue: Any = None
        ref = weakref.ref(self)

        def after_fork() -> None:
            manager = ref()
            if manager is not None:
                manager._after_fork()

        os.register_at_fork(after_in_child=after_fork)

    # -- connections -------------------------------------------------------------
    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            if writer:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute("BEGIN IMMEDIATE")  # also proves the file is writable
                migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute("COMMIT")
            else:
                conn.execute("PRAGMA query_only=1")
        except BaseException:
            conn.close()
            raise
        return conn

    def _start(self) -> None:
        """Start the writer thread (caller holds _start_lock); it connects on its own."""
        self._queue = _RealQueue()
        _real_start_thread(self._writer_loop, ())

    def _connect_writer(self) -> sqlite3.Connection:
        try:
            return self._connect(writer=True)
        except sqlite3.Error as exc:
            # The path goes to the log only: this message can reach HTTP clients.
            log.warning("cannot open SQLite database %r for writing: %s", self.path, exc)
            raise StorageUnavailable(
                f"SQLite database cannot be opened for writing ({exc}); "
                "check that the file and its directory are writable"
            ) from exc

    def _after_fork(self) -> None:
        # Threads and SQLite connections do not survive fork(). The parent's
        # connections are left untouched (even closing one in the child is unsafe)
        # and nothing is started here: a child about to exec (``subprocess``) must
        # not touch SQLite at all. A child that uses the manager starts its own
        # writer on first use.
        _ABANDONED.append(self._readers)
        self._readers = []
        self._lock = _real_lock()
        self._start_lock = threading.Lock()
        self._watchers = {}
        self._tasks = TaskGroup()
        self._sweeper = None
        self._poller = None
        self._queue = None
        self._in_flight = 0

    def _read(
        self, sql: str, args: tuple[Any, ...], *, schema_made: bool = False
    ) -> list[tuple[Any, ...]]:
        if self._closed:
            raise StorageUnavailable("the SQLite stream manager is closed")
        with self._lock:
            conn = self._readers.pop() if self._readers else None
        try:
            if conn is None:
                conn = self._connect(writer=False)
            rows = conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if ("no such table" in str(exc) or "no such column" in str(exc)) and not schema_made:
                # A new file nobody has written yet, or one of an older schema: the
                # writer creates or migrates the schema (the start is lazy), then read
                # again. A read-only database with its schema never gets here, so
                # finished streams stay readable from it.
                self._submit(_noop)
                return self._read(sql, args, schema_made=True)
            log.warning("SQLite read failed on %r: %s", self.path, exc)
            raise StorageUnavailable(f"SQLite read failed ({exc})") from exc
        with self._lock:
            if len(self._readers) < self.read_pool_size and not self._closed:
                self._readers.append(conn)
                return rows
        conn.close()
        return rows

    # -- the writer thread -----------------------------------------------------------
    def _submit(self, op: Callable[..., Any], *args: Any, stream_id: str | None = None) -> Any:
        request = _Request(op, args, stream_id)
        if self._queue is None:  # first write in a forked child
            with self._start_lock:
                if self._queue is None and not self._closed:
                    self._start()
        with self._lock:
            if self._closed:
                raise StorageUnavailable("the SQLite stream manager is closed")
            self._in_flight += 1
            self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _writer_loop(self) -> None:
        """Take queued operations, commit them in groups; (re)connect when needed.

        The connection is opened here, off the hub, and opened again after any
        error other than a busy lock: a database that was unwritable (or whose
        files were replaced) is used again as soon as it can be, with no restart.
        """
        queue = self._queue
        stop: _Request | None = None
        conn: sqlite3.Connection | None = None
        try:
            while stop is None:
                batch = [queue.get()]
                while len(batch) < self.max_batch and batch[-1].op is not _stop:
                    try:
                        batch.append(queue.get_nowait())
                    except Exception:  # queue.Empty: nothing else waiting, commit now
                        break
                if batch[-1].op is _stop:
                    stop = batch.pop()
                if not batch:
                    continue
                if conn is None:
                    try:
                        conn = self._connect_writer()
                    except StorageUnavailable as exc:
                        self._answer(batch, exc)
                        continue
                if not self._commit(conn, batch):
                    _close_quietly(conn)
                    conn = None
        finally:
            if conn is not None:
                conn.close()  # the last connection to close checkpoints and removes the WAL
            if stop is not None:
                stop.done.set()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Request]) -> bool:
        """Run ``batch`` in one transaction; False if the connection should be reopened."""
        culprit: _Request | None = None
        healthy = True
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for culprit in batch:
                    try:
                        culprit.result = culprit.op(conn, *culprit.args)
                    except StreamError as exc:  # ops check before they write: nothing to undo
                        culprit.error = exc
                culprit = None
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    _rollback_quietly(conn)
                raise
            self.transactions += 1
            self.operations += len(batch)
        except Exception as exc:
            # Nothing of the batch was stored. A bug in one operation fails that one;
            # storage trouble fails all as UNAVAILABLE, which callers retry. The
            # path stays in the log: this message can reach HTTP clients.
            log.warning("SQLite write failed on %r: %s", self.path, exc)
            error = StorageUnavailable(f"SQLite write failed ({exc})")
            error.__cause__ = exc
            for request in batch:
                request.result = None
                fault = request is culprit and not isinstance(exc, sqlite3.Error)
                request.error = exc if fault else error
            healthy = not isinstance(exc, sqlite3.Error) or _busy(exc)
        self._answer(batch)
        return healthy

    def _answer(self, batch: list[_Request], error: BaseException | None = None) -> None:
        """Wake the callers of ``batch`` (failing them all with ``error`` if given)."""
        if error is not None:
            for request in batch:
                request.result, request.error = None, error
        touched = {r.stream_id for r in batch if r.stream_id is not None and r.error is None}
        with self._lock:
            self._in_flight -= len(batch)
            signals = [s for sid in touched for s in self._watchers.get(sid, ())]
        for request in batch:
            request.done.set()
        for signal in signals:
            signal.set()

    # -- producer ----------------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        token = self._submit(self._op_open, stream_id, owner, flow)
        self._ensure_sweeper()
        return _SQLiteWriter(self, stream_id, token)

    # -- consumer ----------------------------------------------------------------------
    def _row(self, stream_id: str) -> tuple[Any, ...] | None:
        rows = self._read(f"{_ROW} WHERE stream_id = ?", (stream_id,))
        if not rows or (rows[0][8] is not None and rows[0][8] <= self.now()):
            return None
        return rows[0]

    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        row = self._row(stream_id)
        if row is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        return self._follow(
            stream_id, row[9], max(after + 1, 0), self.timeout if timeout is None else timeout
        )

    def _follow(
        self, stream_id: str, token: int, cursor: int, timeout: float
    ) -> Iterator[list[Event]]:
        signal = Signal()
        with self._lock:
            self._watchers.setdefault(stream_id, set()).add(signal)
        last_activity = time.monotonic()
        seen_heartbeat = None
        busy = _BUSY.delays()
        watch = ProducerWatch(self.lease_seconds)
        try:
            while True:
                signal.clear()  # before reading, so a commit after the read still wakes us
                rows = self._read(
                    "SELECT seq, kind, payload FROM ds_events WHERE stream_id = ? AND seq >= ?"
                    " ORDER BY seq LIMIT ?",
                    (stream_id, cursor, _READ_BATCH),
                )
                if rows:
                    batch = [Event(*row) for row in rows]
                    yield batch  # a page at a time: the HTTP layer sends it in one write
                    if batch[-1].terminal:
                        return
                    cursor = rows[-1][0] + 1
                    last_activity = time.monotonic()
                    continue
                info = self._row(stream_id)
                if info is None or info[9] != token:
                    raise StreamNotFound(f"stream {stream_id} not found")
                if info[4] >= cursor:
                    continue  # committed between our two reads
                if info[1] != StreamStatus.OPEN.value:
                    return  # the caller already has the terminal event
                heartbeat = info[7]
                if heartbeat != seen_heartbeat:
                    seen_heartbeat, last_activity = heartbeat, time.monotonic()
                lease_left = watch.observe(heartbeat, self.now())
                if lease_left <= 0:
                    if self._mark_lost(stream_id, token, info[4]):
                        continue
                    lease_left = next(busy)  # somebody is writing: look again shortly
                else:
                    busy = _BUSY.delays()
                remaining = timeout - (time.monotonic() - last_activity)
                if remaining <= 0:
                    raise StreamTimeout("Stream timed out.")
                if self._poller is None:
                    self._ensure_poller()
                signal.wait(min(_RECHECK, remaining, lease_left + 0.001))
        finally:
            with self._lock:
                watchers = self._watchers.get(stream_id)
                if watchers is not None:
                    watchers.discard(signal)
                    if not watchers:
                        del self._watchers[stream_id]

    def _mark_lost(self, stream_id: str, token: int, last_seq: int) -> bool:
        """End a stream whose producer's lease expired, from the follower, without waiting.

        On a connection of its own with no busy wait, not through the writer
        thread: if another connection holds the write lock (most likely the
        producer, writing, hence alive) it gives up at once and the follower
        looks again shortly. So a reader never waits for a lock, and never makes
        this process's writes queue behind its attempt. True when the stream
        should be read again now (marked, or changed meanwhile).
        """
        if self._closed:
            raise StorageUnavailable("the SQLite stream manager is closed")
        try:
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"SQLite read failed ({exc})") from exc
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                marked = self._op_mark_lost(conn, stream_id, token, last_seq)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    _rollback_quietly(conn)
                raise
        except sqlite3.Error as exc:
            if _busy(exc):
                return False
            log.warning("SQLite write failed on %r: %s", self.path, exc)
            raise StorageUnavailable(f"SQLite write failed ({exc})") from exc
        finally:
            conn.close()
        if marked:
            with self._lock:
                signals = list(self._watchers.get(stream_id, ()))
            for signal in signals:
                signal.set()
        return True

    def _ensure_poller(self) -> None:
        with self._lock:
            if self._poller is None and not self._stopping.is_set():
                self._poller = self._tasks.spawn(
                    self._poll_changes, name="durable-stream-sqlite-poller"
                )

    def _poll_changes(self) -> None:
        """Wake the followers of streams that another connection advanced; ends when none is left.

        One cheap ``PRAGMA data_version`` per interval while the file is quiet; one
        indexed query over the watched streams when it moved. The writer thread
        wakes this process's own followers directly; they may be woken twice.
        """
        first, longest = self.poll_interval
        interval, moved_at = first, 0.0
        conn: sqlite3.Connection | None = None
        version = None
        seen: dict[str, tuple[int, str]] = {}
        try:
            while True:
                with self._lock:
                    if not self._watchers or self._closed:
                        self._poller = None
                        return
                    if conn is None and self._readers:
                        conn = self._readers.pop()
                try:
                    if conn is None:
                        conn = self._connect(writer=False)
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    advanced = False
                    if now != version:
                        version = now
                        seen, advanced = self._wake_advanced(conn, seen)
                    # Quick while streams move (a token stream pauses between chunks);
                    # a timed wake-up costs CPU, so back off once they have been quiet.
                    if advanced:
                        moved_at = time.monotonic()
                    if time.monotonic() - moved_at < _HOLD:
                        interval = first
                    else:
                        interval = min(interval * 1.5, longest)
                except sqlite3.Error as exc:  # followers see the trouble on their own reads
                    log.debug("SQLite change poll failed on %r: %s", self.path, exc)
                    if conn is not None:
                        conn.close()
                        conn = None
                self._stopping.wait(interval)
        finally:
            if conn is not None:
                with self._lock:
                    if len(self._readers) < self.read_pool_size and not self._closed:
                        self._readers.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()

    def _wake_advanced(
        self, conn: sqlite3.Connection, seen: dict[str, tuple[int, str]]
    ) -> tuple[dict[str, tuple[int, str]], bool]:
        with self._lock:
            ids = list(self._watchers)  # read after data_version: covers every later commit
        state: dict[str, tuple[int, str]] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for sid, last_seq, status in conn.execute(
                f"SELECT stream_id, last_seq, status FROM ds_streams WHERE stream_id IN ({marks})",
                part,
            ):
                state[sid] = (last_seq, status)
        # A stream seen for the first time, advanced, ended or gone: its followers look.
        woken = [sid for sid in ids if sid not in seen or state.get(sid) != seen[sid]]
        with self._lock:
            signals = [s for sid in woken for s in self._watchers.get(sid, ())]
        for signal in signals:
            signal.set()
        return state, bool(woken)

    # -- metadata ----------------------------------------------------------------------
    def info(self, stream_id: str) -> StreamInfo | None:
        row = self._row(stream_id)
        return None if row is None else _row_info(row)

    def request_cancel(self, stream_id: str) -> bool:
        return bool(self._submit(self._op_cancel, stream_id))

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        rows = self._read(
            f"{_ROW} WHERE expires_at IS NULL OR expires_at > ? ORDER BY created_at DESC LIMIT ?",
            (self.now(), limit),
        )
        return [_row_info(row) for row in rows]

    # -- pointers ----------------------------------------------------------------------
    def set_pointer(self, key: str, stream_id: str) -> None:
        self._submit(self._op_set_pointer, check_pointer_key(key), stream_id)

    def get_pointer(self, key: str) -> str | None:
        rows = self._read(
            "SELECT stream_id FROM ds_pointers WHERE key = ?", (check_pointer_key(key),)
        )
        return str(rows[0][0]) if rows else None

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        return bool(self._submit(self._op_clear_pointer, check_pointer_key(key), stream_id))

    @staticmethod
    def _op_set_pointer(conn: sqlite3.Connection, key: str, stream_id: str) -> None:
        conn.execute(
            "INSERT INTO ds_pointers (key, stream_id) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET stream_id = excluded.stream_id",
            (key, stream_id),
        )

    @staticmethod
    def _op_clear_pointer(conn: sqlite3.Connection, key: str, stream_id: str) -> bool:
        sql = "DELETE FROM ds_pointers WHERE key = ? AND stream_id = ?"
        return conn.execute(sql, (key, stream_id)).rowcount > 0

    # -- expiry --------------------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        return int(self._submit(self._op_gc, self.now() if now is None else now))

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and not self._stopping.is_set():
            self._sweeper = self._tasks.spawn(self._sweep, name="durable-stream-sqlite-sweep")

    def _sweep(self) -> None:
        while not self._stopping.wait(self.sweep_interval):
            try:
                self.gc()
            except StorageUnavailable:
                pass  # busy or closing: the next sweep tries again

    def __enter__(self) -> SQLiteStreamManager:
        return self

    def close(self) -> None:
        self._stopping.set()
        self._tasks.join(5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers, self._readers = self._readers, []
            stop = _Request(_stop, (), None)
            if self._queue is not None:
                self._queue.put(stop)
            else:
                stop.done.set()
        for conn in readers:
            conn.close()
        stop.done.wait(30)

    def durable_streams_store(self) -> DSStore:
        """Durable Streams kept next to this manager's streams (see docs/durable-streams.md)."""
        store: DSStore | None = getattr(self, "_ds_store", None)
        if store is None:
            from ..durable_streams.sqlite import SQLiteDSStore

            store = self._ds_store = SQLiteDSStore(self.path)
        return store


class _SQLiteWriter(StreamWriter):
    def __init__(self, manager: SQLiteStreamManager, stream_id: str, token: int) -> None:
        super().__init__(stream_id)
        self._manager = manager
        self._token = token

    def store(self, events: Sequence[Event]) -> None:
        manager = self._manager
        check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        manager._submit(
            manager._op_append, self.stream_id, self._token, list(events), stream_id=self.stream_id
        )

    def heartbeat(self) -> bool:
        manager = self._manager
        return bool(manager._submit(manager._op_heartbeat, self.stream_id, self._token))
