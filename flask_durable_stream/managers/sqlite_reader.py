"""The SQLite read side: pooled read connections, followers, and the change poller.

Reads are short indexed queries on pooled connections, run in place (WAL:
readers never wait for the writer). A follower replays a stream's stored
events and then waits on a :class:`~.._concurrency.Signal` that is fired when
its stream changes: by the writer thread after a commit of this process, or by
the *change poller* for commits of other processes. While anybody follows a
stream, the poller checks ``PRAGMA data_version`` (which moves when another
connection commits) and, only when it moved, reads the watched streams'
``last_seq`` in one query and wakes the followers of those that advanced. It
polls every ``poll_interval[0]`` seconds until watched streams have been quiet
for a quarter second, then less often, up to ``poll_interval[1]``. Idle
followers cost nothing of their own.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._concurrency import Signal, Task, TaskGroup, real_lock
from ..exceptions import StorageUnavailable, StreamNotFound, StreamTimeout
from .base import Event, ProducerWatches, StreamStatus
from .sqlite_io import (
    BUSY,
    HOLD,
    READ_BATCH,
    RECHECK,
    ROW,
    connect,
    is_busy,
    rollback_quietly,
)

log = logging.getLogger("flask_durable_stream.managers.sqlite")

#: ``op(conn, stream_id, token, last_seq)``: end a stream whose producer's lease expired.
MarkLost = Callable[[sqlite3.Connection, str, int, int], bool]


class Reader:
    """Everything of one manager that reads: what a process shares between its followers.

    ``make_schema`` asks the writer to create (or migrate) the schema of a file
    nobody has written yet; ``mark_lost`` is the operation that ends a stream
    whose producer is gone, run here on a connection of its own.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float,
        pool_size: int,
        poll_interval: tuple[float, float],
        lease_seconds: float,
        producer_watches: ProducerWatches,
        now: Callable[[], float],
        make_schema: Callable[[], object],
        mark_lost: MarkLost,
        tasks: TaskGroup,
        stopping: threading.Event,
        catch_up: Callable[[str], object] | None = None,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.pool_size = pool_size
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.now = now
        #: The manager's: what this process's readers saw of each producer, reader to reader.
        self.producer_watches = producer_watches
        self.closed = False
        self._make_schema = make_schema
        self._mark_lost_op = mark_lost
        self._tasks = tasks
        self._stopping = stopping
        #: Called with a stream's id once its follower is registered, before its first
        #: read: this process's writer stores what it holds back (``store_interval``).
        self._catch_up = catch_up
        self._lock = real_lock()
        self._pool: list[sqlite3.Connection] = []
        self._watchers: dict[str, set[Signal]] = {}
        self._poller: Task | None = None

    # -- pooled reads ----------------------------------------------------------------
    def read(
        self, sql: str, args: tuple[Any, ...], *, schema_made: bool = False
    ) -> list[tuple[Any, ...]]:
        if self.closed:
            raise StorageUnavailable("the SQLite stream manager is closed")
        with self._lock:
            conn = self._pool.pop() if self._pool else None
        try:
            if conn is None:
                conn = connect(self.path, busy_timeout=self.busy_timeout)
            rows = conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            missing = "no such table" in str(exc) or "no such column" in str(exc)
            if missing and not schema_made:
                # A new file nobody has written yet, or one of an older schema: the
                # writer creates or migrates the schema (the start is lazy), then read
                # again. A read-only database with its schema never gets here, so
                # finished streams stay readable from it.
                self._make_schema()
                return self.read(sql, args, schema_made=True)
            log.warning("SQLite read failed on %r: %s", self.path, exc)
            raise StorageUnavailable(f"SQLite read failed ({exc})") from exc
        self._give_back(conn)
        return rows

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if len(self._pool) < self.pool_size and not self.closed:
                self._pool.append(conn)
                return
        conn.close()

    def row(self, stream_id: str) -> tuple[Any, ...] | None:
        """The stream's row (see :data:`~.sqlite_io.ROW`), or None if missing or expired."""
        rows = self.read(f"{ROW} WHERE stream_id = ?", (stream_id,))
        if not rows or (rows[0][8] is not None and rows[0][8] <= self.now()):
            return None
        return rows[0]

    def close(self) -> None:
        with self._lock:
            self.closed = True
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    def connections(self) -> list[sqlite3.Connection]:
        """The pooled connections, for a forked child to keep (never close) them."""
        return self._pool

    # -- followers -------------------------------------------------------------------
    @property
    def watched(self) -> int:
        """How many streams have a follower in this process now."""
        with self._lock:
            return len(self._watchers)

    @property
    def polling(self) -> bool:
        """True while the change poller runs (only while somebody follows)."""
        return self._poller is not None

    def follows(self, stream_id: str) -> bool:
        """Whether a follower of this process waits on ``stream_id``."""
        return stream_id in self._watchers  # one lookup, atomic: no lock on the emit path

    def wake(self, stream_ids: Iterable[str]) -> None:
        """Wake the followers of ``stream_ids``; safe from any thread."""
        with self._lock:
            signals = [s for sid in stream_ids for s in self._watchers.get(sid, ())]
        for signal in signals:
            signal.set()

    def follow(
        self, stream_id: str, token: int, cursor: int, timeout: float
    ) -> Iterator[list[Event]]:
        signal = Signal()
        with self._lock:
            self._watchers.setdefault(stream_id, set()).add(signal)
        last_activity = time.monotonic()
        seen_heartbeat = None
        busy = BUSY.delays()
        with self.producer_watches.watch(stream_id, self.lease_seconds) as watch:
            try:
                if self._catch_up is not None:  # its commit wakes us like any other
                    self._catch_up(stream_id)
                while True:
                    signal.clear()  # before reading, so a commit after the read still wakes us
                    rows = self.read(
                        "SELECT seq, kind, payload FROM ds_events WHERE stream_id = ? AND seq >= ?"
                        " ORDER BY seq LIMIT ?",
                        (stream_id, cursor, READ_BATCH),
                    )
                    if rows:
                        batch = [Event(*row) for row in rows]
                        yield batch  # a page at a time: the HTTP layer sends it in one write
                        if batch[-1].terminal:
                            return
                        cursor = rows[-1][0] + 1
                        last_activity = time.monotonic()
                        continue
                    info = self.row(stream_id)
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
                        if self.mark_lost(stream_id, token, info[4]):
                            continue
                        lease_left = next(busy)  # somebody is writing: look again shortly
                    else:
                        busy = BUSY.delays()
                    remaining = timeout - (time.monotonic() - last_activity)
                    if remaining <= 0:
                        raise StreamTimeout("Stream timed out.")
                    if self._poller is None:
                        self._ensure_poller()
                    signal.wait(min(RECHECK, remaining, lease_left + 0.001))
            finally:
                with self._lock:
                    watchers = self._watchers.get(stream_id)
                    if watchers is not None:
                        watchers.discard(signal)
                        if not watchers:
                            del self._watchers[stream_id]

    def mark_lost(self, stream_id: str, token: int, last_seq: int) -> bool:
        """End a stream whose producer's lease expired, from the follower, without waiting.

        On a connection of its own with no busy wait, not through the writer
        thread: if another connection holds the write lock (most likely the
        producer, writing, hence alive) it gives up at once and the follower
        looks again shortly. So a reader never waits for a lock, and never makes
        this process's writes queue behind its attempt. True when the stream
        should be read again now (marked, or changed meanwhile).
        """
        if self.closed:
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
                marked = self._mark_lost_op(conn, stream_id, token, last_seq)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    rollback_quietly(conn)
                raise
        except sqlite3.Error as exc:
            if is_busy(exc):
                return False
            log.warning("SQLite write failed on %r: %s", self.path, exc)
            raise StorageUnavailable(f"SQLite write failed ({exc})") from exc
        finally:
            conn.close()
        if marked:
            self.wake([stream_id])
        return True

    # -- the change poller -------------------------------------------------------------
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
                    if not self._watchers or self.closed:
                        self._poller = None
                        return
                    if conn is None and self._pool:
                        conn = self._pool.pop()
                try:
                    if conn is None:
                        conn = connect(self.path, busy_timeout=self.busy_timeout)
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    advanced = False
                    if now != version:
                        version = now
                        seen, advanced = self._wake_advanced(conn, seen)
                    # Quick while streams move (a token stream pauses between chunks);
                    # a timed wake-up costs CPU, so back off once they have been quiet.
                    if advanced:
                        moved_at = time.monotonic()
                    if time.monotonic() - moved_at < HOLD:
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
                self._give_back(conn)

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
        self.wake(woken)
        return state, bool(woken)
