"""Streams in one SQLite file, shared by every worker process of one host.

Layout: one row per stream (``ds_streams``) and one row per event
(``ds_events``, primary key ``(stream_id, seq)``, so a retried append is a
no-op). The database runs in WAL mode: readers never wait for the writer.

The manager puts together three parts that do not know each other:

* :mod:`.sqlite_writer`: one writer OS thread per process that owns the only
  writing connection and commits every queued operation in one transaction
  (group commit), off the gevent hub; a caller waits cooperatively.
* :mod:`.sqlite_reader`: pooled read connections, followers, and the change
  poller that finds the commits of other processes.
* :mod:`.sqlite_ops`: the operations the writer thread runs (this class
  inherits them), on :mod:`.sqlite_io`'s schema and statements.

Subscribers in the writing process are woken as soon as a commit lands.
See ``docs/sqlite.md`` for figures and limits.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .._concurrency import TaskGroup, gevent_patched
from ..exceptions import StreamNotFound
from .base import (
    Event,
    StreamInfo,
    StreamWriter,
    check_event_sizes,
    check_pointer_key,
    check_store_interval,
    common_options,
)
from .common import Sweep, check_sweep_interval
from .sqlite_io import ABANDONED, MAX_EVENT_BYTES, ROW, SYNC_MODES, check_path, noop, row_info
from .sqlite_ops import SQLiteOperations
from .sqlite_reader import Reader
from .sqlite_writer import WriterThread

if TYPE_CHECKING:
    from flask import Flask

    from ..durable_streams.store import DSStore

log = logging.getLogger("flask_durable_stream.managers.sqlite")


class SQLiteStreamManager(SQLiteOperations):
    """Durable streams in a local SQLite file; safe for several processes and threads/greenlets.

    ``synchronous="NORMAL"`` (WAL) survives a process crash and loses at most
    the last commits on power loss; ``"FULL"`` fsyncs every commit.

    ``store_interval`` (seconds, ``DURABLE_STREAM_SQLITE_STORE_INTERVAL``, default 0):
    under gevent, while no follower of this process waits on a stream, the runner
    stores its events in one append at most this long after the first of them,
    instead of an append per event. An append costs the writer thread about as
    much whatever it carries, so a loaded worker spends less CPU per chunk. The
    price: followers in other processes see the events up to this much later, and
    a crash of the producing process loses up to this much more of what its live
    clients already received (its stream ends "Producer lost" either way). A
    follower of this process has them stored when it starts reading. 0 (the
    default) stores each event as it comes.
    """

    max_event_bytes = MAX_EVENT_BYTES
    backend_name = "SQLite"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_SQLITE_PATH": None,
        "DURABLE_STREAM_SQLITE_STORE_INTERVAL": 0.0,
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> SQLiteStreamManager:
        """``DURABLE_STREAM_SQLITE_PATH``, by default a file in the app's instance folder."""
        path = config["DURABLE_STREAM_SQLITE_PATH"]
        if not path:  # the default lives in the app's instance folder, created if needed
            path = os.path.join(app.instance_path, "durable-streams.sqlite3")
            os.makedirs(app.instance_path, exist_ok=True)
        interval = float(config["DURABLE_STREAM_SQLITE_STORE_INTERVAL"])
        return cls(path, store_interval=interval, **common_options(config))

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
        store_interval: float = 0.0,
    ) -> None:
        self.store_interval = check_store_interval(
            store_interval, "DURABLE_STREAM_SQLITE_STORE_INTERVAL"
        )
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
        if self.synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        #: Seconds between two runs of :meth:`gc` in the background; 0: never.
        self.sweep_interval = check_sweep_interval(
            sweep_interval, max(0.05, min(30.0, ttl_seconds / 2))
        )
        self.read_pool_size = read_pool_size
        self.max_batch = max_batch
        self._tasks = TaskGroup()
        self._stopping = threading.Event()
        self._sweep = Sweep(self._stopping, name="durable-stream-sqlite-sweep")
        #: This process's runs that hold events back (store_interval): how to store them now.
        self._held: dict[str, Callable[[], None]] = {}
        self._writer = self._new_writer()
        self._reader = self._new_reader()
        self._appends: weakref.WeakKeyDictionary[Any, _Appends] = weakref.WeakKeyDictionary()
        ref = weakref.ref(self)

        def after_fork() -> None:
            manager = ref()
            if manager is not None:
                manager._after_fork()

        os.register_at_fork(after_in_child=after_fork)

    def _new_writer(self) -> WriterThread:
        return WriterThread(
            self.path,
            synchronous=self.synchronous,
            busy_timeout=self.busy_timeout,
            max_batch=self.max_batch,
            on_commit=self._on_commit,
        )

    def _new_reader(self) -> Reader:
        return Reader(
            self.path,
            busy_timeout=self.busy_timeout,
            pool_size=self.read_pool_size,
            poll_interval=self.poll_interval,
            lease_seconds=self.lease_seconds,
            producer_watches=self.producer_watches,
            now=self.now,
            make_schema=self._make_schema,
            mark_lost=self._op_mark_lost,
            tasks=self._tasks,
            stopping=self._stopping,
            catch_up=self._catch_up,
        )

    def _appends_here(self) -> _Appends:
        """The running flows' appends under the calling thread's gevent hub."""
        import gevent

        hub = gevent.get_hub()
        appends = self._appends.get(hub)
        if appends is None:
            appends = self._appends[hub] = _Appends(self, hub)
        return appends

    def _catch_up(self, stream_id: str) -> None:
        """A follower of this process is about to read: what the stream's run holds back
        goes to storage now (its commit wakes the follower), not at the timer."""
        store_now = self._held.get(stream_id)
        if store_now is not None:
            store_now()

    def _on_commit(self, stream_ids: set[str]) -> None:
        self._reader.wake(stream_ids)  # the writer thread knows nothing of followers

    def _make_schema(self) -> None:
        self._writer.submit(noop)

    def _after_fork(self) -> None:
        # Threads and SQLite connections do not survive fork(). The parent's
        # connections are left untouched (even closing one in the child is unsafe)
        # and nothing is started here: a child about to exec (``subprocess``) must
        # not touch SQLite at all. A child that uses the manager starts its own
        # writer on first use.
        ABANDONED.append(self._reader.connections())
        self._tasks = TaskGroup()
        self._writer = self._new_writer()
        self._reader = self._new_reader()
        for appends in list(self._appends.values()):
            appends.drop()  # the parent's runs' appends, which its own hub sends
        self._appends = weakref.WeakKeyDictionary()

    # -- what operators (and tests) may look at ----------------------------------------
    @property
    def transactions(self) -> int:
        """Write transactions committed by this process."""
        return self._writer.transactions

    @property
    def operations(self) -> int:
        """Operations those transactions carried (more than one each: group commit at work)."""
        return self._writer.operations

    @property
    def in_flight(self) -> int:
        """Writes submitted and not yet answered."""
        return self._writer.in_flight

    @property
    def watched_streams(self) -> int:
        """Streams with a follower in this process."""
        return self._reader.watched

    @property
    def polling(self) -> bool:
        """True while the change poller runs (only while somebody follows a stream)."""
        return self._reader.polling

    # -- producer ----------------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        token = self._writer.submit(self._op_open, stream_id, owner, flow)
        self._sweep.start(self._tasks.spawn, self.gc, self.sweep_interval)
        return _SQLiteWriter(self, stream_id, token)

    # -- consumer ----------------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        row = self._reader.row(stream_id)
        if row is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        return self._reader.follow(
            stream_id, row[9], max(after + 1, 0), self.timeout if timeout is None else timeout
        )

    # -- metadata ----------------------------------------------------------------------
    def info(self, stream_id: str) -> StreamInfo | None:
        row = self._reader.row(stream_id)
        return None if row is None else row_info(row)

    def request_cancel(self, stream_id: str) -> bool:
        return bool(self._writer.submit(self._op_cancel, stream_id))

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        rows = self._reader.read(
            f"{ROW} WHERE expires_at IS NULL OR expires_at > ? ORDER BY created_at DESC LIMIT ?",
            (self.now(), limit),
        )
        return [row_info(row) for row in rows]

    # -- pointers ----------------------------------------------------------------------
    def set_pointer(self, key: str, stream_id: str) -> None:
        self._writer.submit(self._op_set_pointer, check_pointer_key(key), stream_id)

    def get_pointer(self, key: str) -> str | None:
        rows = self._reader.read(
            "SELECT stream_id FROM ds_pointers WHERE key = ?", (check_pointer_key(key),)
        )
        return str(rows[0][0]) if rows else None

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        return bool(self._writer.submit(self._op_clear_pointer, check_pointer_key(key), stream_id))

    # -- expiry --------------------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        return int(self._writer.submit(self._op_gc, self.now() if now is None else now))

    def __enter__(self) -> SQLiteStreamManager:
        return self

    def close(self) -> None:
        self._stopping.set()
        self._tasks.join(5)
        self._reader.close()
        self._writer.close(30)

    def durable_streams_store(self) -> DSStore:
        """Durable Streams kept next to this manager's streams (see docs/durable-streams.md)."""
        store: DSStore | None = getattr(self, "_ds_store", None)
        if store is None:
            from ..durable_streams.sqlite import SQLiteDSStore

            store = self._ds_store = SQLiteDSStore(self.path)
        return store


class _SQLiteWriter(StreamWriter):
    append_beats = True  # the append's UPDATE refreshes the lease and reads the cancel flag

    def __init__(self, manager: SQLiteStreamManager, stream_id: str, token: int) -> None:
        super().__init__(stream_id)
        self._manager = manager
        self._token = token
        self._done: Callable[[BaseException | None], None] | None = None  # store_nowait's
        self._appends: _Appends | None = None  # this hub's, found on the first store_nowait
        self._store_now: Callable[[], None] | None = None  # while the runner may hold events

    def store(self, events: Sequence[Event]) -> None:
        manager = self._manager
        check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        self.cancel_requested = manager._writer.submit(
            manager._op_append, self.stream_id, self._token, list(events), stream_id=self.stream_id
        )

    def store_nowait(
        self, events: Sequence[Event], done: Callable[[BaseException | None], None]
    ) -> bool:
        # Under gevent: the writer thread answers through the hub's loop, so the run's
        # events go to storage without a task (and its stack) waiting for each commit.
        if not gevent_patched():
            return False
        manager = self._manager
        check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        self._done = done  # one append at a time (append_nowait's contract)
        appends = self._appends
        if appends is None:
            appends = self._appends = manager._appends_here()
        appends.add(self, list(events))
        return True

    def _answered(self, cancel: bool, error: BaseException | None) -> None:
        done, self._done = self._done, None
        if error is None:
            self.cancel_requested = cancel
        assert done is not None
        done(error)

    def heartbeat(self) -> bool:
        manager = self._manager
        return bool(manager._writer.submit(manager._op_heartbeat, self.stream_id, self._token))

    def may_delay(self) -> bool:
        return not self._manager._reader.follows(self.stream_id)

    def delaying(self, store_now: Callable[[], None]) -> None:
        self._store_now = store_now
        self._manager._held[self.stream_id] = store_now

    def close(self) -> None:
        held = self._manager._held
        if self._store_now is not None and held.get(self.stream_id) is self._store_now:
            del held[self.stream_id]


class _Appends:
    """The appends of running flows under one gevent hub (:meth:`_SQLiteWriter.store_nowait`),
    handed to the writer thread together: one request, one wake-up of the thread and one
    answer for all the streams that stored in a turn of the hub's loop, not one each.

    Every lock the writer thread takes back, and every answer it posts, is a round trip
    for the interpreter lock with the hub's thread, which is serving the streams. The
    writer stores them together too (:meth:`~.sqlite_ops.SQLiteOperations._op_append_many`);
    each stream gets its own answer, as from its own append.
    """

    __slots__ = ("_manager", "_loop", "_waiting")

    def __init__(self, manager: SQLiteStreamManager, hub: Any) -> None:
        self._manager = manager
        self._loop = hub.loop
        self._waiting: list[tuple[_SQLiteWriter, list[Event]]] = []

    def add(self, writer: _SQLiteWriter, events: list[Event]) -> None:
        if not self._waiting:  # the first of this turn: the request goes once the turn ends
            self._loop.run_callback(self._send)
        self._waiting.append((writer, events))

    def drop(self) -> None:
        """Forget what waits to be sent: in a forked child, whose parent sends it."""
        self._waiting = []

    def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:  # dropped meanwhile
            return
        writers = [writer for writer, _ in waiting]
        entries = [(writer.stream_id, writer._token, events) for writer, events in waiting]
        manager = self._manager
        try:
            manager._writer.submit_nowait(
                manager._op_append_many,
                entries,
                stream_id=tuple(entry[0] for entry in entries),
                callback=functools.partial(self._answered, writers),
            )
        except Exception as exc:  # the manager is closed: each run's flush task says so
            self._answered(writers, None, exc)

    @staticmethod
    def _answered(
        writers: list[_SQLiteWriter],
        results: list[bool | BaseException] | None,
        error: BaseException | None,
    ) -> None:
        # The request failed as a whole (error), or each stream has its cancel flag or
        # the StreamError its own append raised.
        answers = results if error is None and results is not None else [error] * len(writers)
        for writer, answer in zip(writers, answers, strict=True):
            try:
                if isinstance(answer, BaseException):
                    writer._answered(False, answer)
                else:
                    writer._answered(bool(answer), None)
            except Exception:  # one stream's bug must not keep the others' answers
                log.exception("stream %s: storing its answer failed", writer.stream_id)
