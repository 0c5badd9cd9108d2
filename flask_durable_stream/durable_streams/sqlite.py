"""Durable Streams in the SQLite file of a :class:`~..managers.sqlite.SQLiteStreamManager`.

Two tables of their own next to the manager's (``durable_meta``: one row per
stream with its metadata as JSON, plus ``tail`` and ``closed`` for cheap
polling; ``durable_records``: one row per record). A write is one
``BEGIN IMMEDIATE`` transaction, so it is atomic across every worker process
of the host; the engine's function never waits on I/O inside it, so a greenlet
holding it never yields. Writes that arrive together share the transaction
and are answered once it committed (:mod:`.group_commit`). Readers in the
writing process are woken at once (:class:`~.store.Wakeups`); readers in
another process by its doorbell (:mod:`.doorbell`, under gevent), and in any
case by polling ``tail``/``closed`` of the one row they follow
(:class:`~.store.PolledStore`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from .._concurrency import real_lock
from .._retry import Backoff
from ..exceptions import StorageUnavailable
from ..managers.sqlite_io import is_busy
from .doorbell import Doorbell
from .group_commit import GroupCommit, Job
from .store import Meta, PolledStore, Txn, Wakeups

_T = TypeVar("_T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS durable_meta (
    path TEXT PRIMARY KEY,
    meta TEXT NOT NULL,
    tail INTEGER NOT NULL,
    closed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS durable_records (
    path TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (path, idx)
) WITHOUT ROWID
"""
_PAGE = 256
#: Marks a metadata row whose ``tail`` column is authoritative. Versions before it took the
#: tail from the JSON: to them the unknown key is an error, never a stale tail to append at.
TAIL_MARK = "tail_column"
# One string per statement: sqlite3 reuses a connection's prepared statement for the same SQL.
_GET = "SELECT meta, tail FROM durable_meta WHERE path = ?"
_PUT = "INSERT OR REPLACE INTO durable_meta (path, meta, tail, closed) VALUES (?, ?, ?, ?)"
_SET_TAIL = "UPDATE durable_meta SET tail = ? WHERE path = ?"
_ADD = "INSERT OR REPLACE INTO durable_records (path, idx, data) VALUES (?, ?, ?)"


class _Batch:
    """What the jobs of one batch know of the rows they wrote, shared between them.

    The ``tail`` column is the stream's tail (the JSON's copy may lag behind
    it): a plain append changes nothing else, so its metadata write is only a
    new tail, kept here and written once per stream just before ``COMMIT``.
    The batch holds the write lock, so a row it has read changes only by its
    own writes: later jobs read it from here, not from the file. Consecutive
    appends to one stream cost one ``SELECT`` and one ``UPDATE`` per batch,
    not per append.
    """

    __slots__ = ("conn", "parsed", "tails", "seen")

    def __init__(self, conn: sqlite3.Connection, parsed: _Parsed) -> None:
        self.conn = conn
        self.parsed = parsed
        self.tails: dict[str, int] = {}  # path -> a tail not written yet
        #: path -> (JSON, tail) of the row as read or written by the batch; None: no row
        self.seen: dict[str, tuple[str, int] | None] = {}

    def flush(self) -> None:
        """Write the tails the batch moved (inside its transaction, before ``COMMIT``)."""
        for path, tail in self.tails.items():
            self.conn.execute(_SET_TAIL, (tail, path))
        self.tails.clear()


class _SQLiteTxn(Txn):
    """One job's view of the batch's transaction (see :class:`_Batch`)."""

    __slots__ = ("_batch", "touched")

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self.touched: set[str] = set()

    def get(self, path: str) -> Meta | None:
        batch = self._batch
        if path in batch.seen:
            row = batch.seen[path]
        else:
            row = batch.seen[path] = batch.conn.execute(_GET, (path,)).fetchone()
        return _meta(row, path, batch.parsed) if row is not None else None

    def put(self, path: str, meta: Meta) -> None:
        batch = self._batch
        data = meta.to_dict()
        tail = data.pop("tail")
        known = batch.seen.get(path)
        if known is not None and _stored(known[0], path, batch.parsed) == (data, True):
            batch.tails[path] = tail  # only the tail moved, in a row this version marked
            batch.seen[path] = (known[0], tail)
        else:
            # "tail_column" makes an older version (which read the tail from the JSON, and
            # would append at a stale one, overwriting records) refuse the row instead.
            row = json.dumps({**data, "tail": tail, TAIL_MARK: True})
            batch.conn.execute(_PUT, (path, row, tail, int(meta.closed)))
            batch.tails.pop(path, None)
            batch.parsed.remember(path, row, data, True)
            batch.seen[path] = (row, tail)
        self.touched.add(path)

    def append(self, path: str, first: int, records: Sequence[bytes]) -> None:
        conn = self._batch.conn
        if len(records) == 1:
            conn.execute(_ADD, (path, first, records[0]))
        else:
            conn.executemany(_ADD, [(path, first + i, record) for i, record in enumerate(records)])
        self.touched.add(path)

    def drop(self, path: str) -> None:
        batch = self._batch
        batch.conn.execute("DELETE FROM durable_meta WHERE path = ?", (path,))
        batch.conn.execute("DELETE FROM durable_records WHERE path = ?", (path,))
        batch.tails.pop(path, None)
        batch.seen[path] = None
        self.touched.add(path)


class _Parsed(dict[str, tuple[str, dict[str, Any], bool]]):
    """path -> (JSON text, parsed, marked): a row read again unchanged (every append) is not
    re-parsed."""

    limit = 4096

    def remember(self, path: str, text: str, data: dict[str, Any], marked: bool) -> None:
        if len(self) >= self.limit:
            self.clear()
        self[path] = (text, data, marked)


def _stored(text: str, path: str, parsed: _Parsed | None) -> tuple[dict[str, Any], bool]:
    """A row's JSON as stored, tail aside, and whether this version marked it (``TAIL_MARK``).

    Never to be changed by the caller: it is the cache's copy.
    """
    known = parsed.get(path) if parsed is not None else None
    if known is not None and known[0] == text:
        return known[1], known[2]
    data = json.loads(text)
    data.pop("tail", None)
    marked = bool(data.pop(TAIL_MARK, False))
    if parsed is not None:
        parsed.remember(path, text, data, marked)
    return data, marked


def _meta(row: tuple[str, int], path: str, parsed: _Parsed | None = None) -> Meta:
    """The stream's metadata from its row; the ``tail`` column wins over the JSON's.

    A row written by an older version (not marked) reads the same; the first write of this
    version rewrites it whole, marked (see :meth:`_SQLiteTxn.put`).
    """
    data, _ = _stored(row[0], path, parsed)
    producers = data["producers"]
    closed_by = data["closed_by"]
    return Meta(  # its own copies of what may change
        tail=int(row[1]),
        **{
            **data,
            "producers": {k: list(v) for k, v in producers.items()} if producers else {},
            "closed_by": list(closed_by) if closed_by is not None else None,
        },
    )


def _unavailable(exc: sqlite3.OperationalError) -> StorageUnavailable:
    failure = StorageUnavailable(f"SQLite: {exc}")
    failure.__cause__ = exc
    return failure


class _PartialWrite(Exception):
    """A job of a batch failed after writing: the batch must be run job by job."""


class SQLiteDSStore(PolledStore):
    """``path``: the SQLite file (the manager's). Safe to share between processes and greenlets."""

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 10.0,
        synchronous: str = "NORMAL",
        poll_interval: tuple[float, float] = (0.002, 0.05),
        fast_poll_seconds: float = 0.25,
        heard_poll_interval: tuple[float, float] = (0.05, 0.5),
        mmap_size: int = 256 << 20,
    ) -> None:
        self.path = path
        self.mmap_size = mmap_size
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.poll_interval = poll_interval
        self.fast_poll_seconds = fast_poll_seconds
        self.heard_poll_interval = heard_poll_interval
        self._pool: list[sqlite3.Connection] = []
        self._writers: list[sqlite3.Connection] = []  # busy_timeout 0: see _begin
        self._pid = os.getpid()
        self._lock = real_lock()  # the pools' sections never switch
        self.wakeups = Wakeups()
        self.doorbell = Doorbell(path, self.wakeups.wake)  # other workers' readers
        self._group = GroupCommit(self._commit)
        self._parsed = _Parsed()
        self._ready = False

    # -- connections ----------------------------------------------------------------
    def _connect(self, write: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        # WAL is a setting of the file, usually made by the manager already: asking
        # again would take a lock that workers booting together fight over.
        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        # Catch-up reads copy large blobs: mapped pages spare a read() per overflow page.
        conn.execute(f"PRAGMA mmap_size={self.mmap_size}")
        if not self._ready:
            self._create_tables(conn)
        if write:
            conn.execute("PRAGMA busy_timeout=0")
        return conn

    def _create_tables(self, conn: sqlite3.Connection) -> None:
        """On first use, not at start-up: workers booting together would fight over the file."""
        delays = Backoff(initial=0.01, maximum=0.5).delays()
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.executescript(SCHEMA)
                self._ready = True
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(next(delays))

    def _take(self, write: bool) -> sqlite3.Connection:
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: the parent's connections are not ours
                self._pool, self._writers, self._pid = [], [], os.getpid()
            pool = self._writers if write else self._pool
            conn = pool.pop() if pool else None
        return conn if conn is not None else self._connect(write)

    def _give(self, conn: sqlite3.Connection, write: bool) -> None:
        with self._lock:
            (self._writers if write else self._pool).append(conn)

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = None
        try:
            conn = self._take(write)
            yield conn
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc
        finally:
            if conn is not None:
                self._give(conn, write)

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, waiting for another process's write without stopping this one.

        SQLite's own busy handler sleeps the whole process (every greenlet of a
        gevent worker) while another worker holds the write lock; here the wait
        is a patched ``time.sleep``, so this worker's other requests go on.
        """
        delays: Iterator[float] | None = None  # made on the first wait: commits rarely wait
        deadline = 0.0
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                if delays is None:
                    delays = Backoff(initial=0.0005, maximum=0.02).delays()
                    deadline = time.monotonic() + self.busy_timeout
                elif time.monotonic() > deadline:
                    raise
            time.sleep(next(delays))

    # -- the contract ---------------------------------------------------------------
    def transact(self, fn: Callable[[Txn], _T]) -> _T:
        return self._group.run(fn)

    def _commit(self, jobs: Sequence[Job[Any]]) -> None:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` for the batch.

        The engine's functions validate first and write last, so one that
        refuses has written nothing and the batch goes on without it. One that
        fails after writing (a storage error) would leave part of its writes in
        the batch: the batch is rolled back and each job run again on its own.
        """
        try:
            self._commit_batch(jobs)
        except _PartialWrite:
            for job in jobs:
                job.value = job.error = None
                self._commit_batch([job])

    def _commit_batch(self, jobs: Sequence[Job[Any]]) -> None:
        touched: set[str] = set()
        conn = None  # taken and given back by hand: this runs once per batch of writes
        try:
            conn = self._take(write=True)
            self._begin(conn)
            batch = _Batch(conn, self._parsed)
            try:
                for job in jobs:
                    txn = _SQLiteTxn(batch)
                    try:
                        job.value = job.fn(txn)
                    except Exception as exc:
                        if txn.touched and len(jobs) > 1:
                            raise _PartialWrite from exc
                        job.error = exc
                        if txn.touched:  # alone: nothing of it may stay
                            raise
                    touched |= txn.touched
                batch.flush()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except _PartialWrite:
            raise
        except BaseException as exc:  # nothing of the batch committed
            # A kill or timeout of the leading request is its own: the others get a storage error.
            if isinstance(exc, sqlite3.OperationalError):
                failure: BaseException = _unavailable(exc)
            elif isinstance(exc, Exception):
                failure = exc
            else:
                failure = StorageUnavailable("write interrupted")
            for job in jobs:
                job.value = None
                job.error = job.error or failure
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if conn is not None:
                self._give(conn, write=True)
        if touched:
            wakeups = self.wakeups
            # What the batch committed, for the readers it wakes here: a long-poll
            # answers without reading the row back (a read after a commit is the
            # slowest kind: the connection's page cache starts again).
            seen = batch.seen
            metas = {
                path: _meta(row, path, self._parsed)
                for path in touched
                if wakeups.waiting(path) and (row := seen.get(path)) is not None
            }
            wakeups.wake(touched, metas)
            self.doorbell.ring(touched)

    def get(self, path: str) -> Meta | None:
        with self._connection() as conn:
            row = conn.execute(_GET, (path,)).fetchone()
        return _meta(row, path, self._parsed) if row else None

    def records(self, path: str, start: int, end: int, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        with self._connection() as conn:
            cursor = conn.execute(
                "SELECT data FROM durable_records WHERE path = ? AND idx >= ? AND idx < ?"
                " ORDER BY idx",
                (path, start, end),
            )
            while True:
                rows = cursor.fetchmany(_PAGE)
                for (data,) in rows:
                    if out and size + len(data) > max_bytes:
                        return out
                    out.append(bytes(data))
                    size += len(data)
                if len(rows) < _PAGE:
                    return out

    def listen(self) -> None:
        self.doorbell.listen()

    def hears_others(self) -> bool:
        return self.doorbell.listening

    def state(self, path: str) -> tuple[int, bool] | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT tail, closed FROM durable_meta WHERE path = ?", (path,)
            ).fetchone()
        return (int(row[0]), bool(row[1])) if row else None

    def paths(self) -> Iterator[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT path FROM durable_meta").fetchall()
        return (row[0] for row in rows)

    def close(self) -> None:
        self.doorbell.close()
        with self._lock:
            pool, self._pool, self._writers = self._pool + self._writers, [], []
        for conn in pool:
            conn.close()
