"""The SQLite writer thread: one per process, the only connection that writes.

Callers queue :class:`~.sqlite_io.Request` objects and wait on their
:class:`~.._concurrency.Signal`; the thread takes every queued request, runs
them in one transaction and commits once (group commit). Under gevent this
keeps commits, fsyncs and lock waits off the hub. The connection is opened
here, off the hub, and opened again after any error other than a busy lock: a
database that was unwritable (or whose files were replaced) is used again as
soon as it can be, with no restart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from .._concurrency import HubCallbacks, real_lock, start_native_thread
from ..exceptions import StorageUnavailable, StreamError
from .sqlite_io import (
    RealQueue,
    Request,
    close_quietly,
    connect,
    is_busy,
    rollback_quietly,
    stop_writer,
)

log = logging.getLogger("flask_durable_stream.managers.sqlite")


class WriterThread:
    """Group commit through one OS thread, started on the first write of the process.

    The start is lazy, so a database that cannot be written right now does not
    stop a worker from booting: calls raise StorageUnavailable until it can.
    ``on_commit`` is called (in the thread) with the streams a commit changed.
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        busy_timeout: float,
        max_batch: int,
        on_commit: Callable[[set[str]], None],
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.max_batch = max_batch
        self.on_commit = on_commit
        #: Committed write transactions and the operations they carried (group commit at work).
        self.transactions = 0
        self.operations = 0
        self.in_flight = 0  # submitted, not yet answered
        self.closed = False
        self._lock = real_lock()
        self._start_lock = threading.Lock()  # held while starting: greenlet-aware
        self._queue: Any = None

    def submit(self, op: Callable[..., Any], *args: Any, stream_id: str | None = None) -> Any:
        """Run ``op(conn, *args)`` in the next transaction; its result, or its error raised."""
        request = self._put(Request(op, args, stream_id))
        assert request.done is not None
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def submit_nowait(
        self,
        op: Callable[..., Any],
        *args: Any,
        stream_id: str | tuple[str, ...] | None,
        callback: Callable[[Any, BaseException | None], None],
    ) -> None:
        """Queue ``op(conn, *args)`` and return; ``callback(result, error)`` runs in this
        greenlet's hub. ``stream_id``: the stream it writes, or a tuple of them for the
        appends of several (each counts in :attr:`operations`).

        Under gevent only: the answer comes as a callback in the hub's thread, through
        :class:`~.._concurrency.HubCallbacks` (the answers of one commit wake it once).
        """
        import gevent

        hub = HubCallbacks.of(gevent.get_hub())
        self._put(Request(op, args, stream_id, callback, hub))
        hub.expect()  # after the put, which may raise; the answer runs in this thread

    def _put(self, request: Request) -> Request:
        if self._queue is None:
            with self._start_lock:
                if self._queue is None and not self.closed:
                    self._queue = RealQueue()
                    start_native_thread(self._run)
        with self._lock:
            queue = self._queue
            if self.closed or queue is None:
                raise StorageUnavailable("the SQLite stream manager is closed")
            self.in_flight += 1
            queue.put(request)
        return request

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread and close its connection."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            stop = Request(stop_writer, (), None)
            if self._queue is not None:
                self._queue.put(stop)
            else:
                stop.answer()
        assert stop.done is not None
        stop.done.wait(timeout)

    def _connect(self) -> sqlite3.Connection:
        try:
            return connect(self.path, busy_timeout=self.busy_timeout, synchronous=self.synchronous)
        except sqlite3.Error as exc:
            # The path goes to the log only: this message can reach HTTP clients.
            log.warning("cannot open SQLite database %r for writing: %s", self.path, exc)
            raise StorageUnavailable(
                f"SQLite database cannot be opened for writing ({exc}); "
                "check that the file and its directory are writable"
            ) from exc

    def _run(self) -> None:
        """Take queued operations, commit them in groups; (re)connect when needed."""
        queue = self._queue
        stop: Request | None = None
        conn: sqlite3.Connection | None = None
        try:
            while stop is None:
                batch = [queue.get()]
                while len(batch) < self.max_batch and batch[-1].op is not stop_writer:
                    try:
                        batch.append(queue.get_nowait())
                    except Exception:  # queue.Empty: nothing else waiting, commit now
                        break
                if batch[-1].op is stop_writer:
                    stop = batch.pop()
                if not batch:
                    continue
                if conn is None:
                    try:
                        conn = self._connect()
                    except StorageUnavailable as exc:
                        self._answer(batch, exc)
                        continue
                if not self._commit(conn, batch):
                    close_quietly(conn)
                    conn = None
        finally:
            if conn is not None:
                conn.close()  # the last connection to close checkpoints and removes the WAL
            if stop is not None:
                stop.answer()

    def _commit(self, conn: sqlite3.Connection, batch: list[Request]) -> bool:
        """Run ``batch`` in one transaction; False if the connection should be reopened."""
        culprit: Request | None = None
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
                    rollback_quietly(conn)
                raise
            self.transactions += 1
            self.operations += sum(request.operations for request in batch)
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
            healthy = not isinstance(exc, sqlite3.Error) or is_busy(exc)
        self._answer(batch)
        return healthy

    def _answer(self, batch: list[Request], error: BaseException | None = None) -> None:
        """Wake the callers of ``batch`` (failing them all with ``error`` if given)."""
        if error is not None:
            for request in batch:
                request.result, request.error = None, error
        touched = {sid for r in batch if r.error is None for sid in r.streams}
        with self._lock:
            self.in_flight -= len(batch)
        for request in batch:
            request.answer()
        if touched:
            self.on_commit(touched)
