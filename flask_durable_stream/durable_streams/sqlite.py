"""Durable Streams in the SQLite file of a :class:`~..managers.sqlite.SQLiteStreamManager`.

Two tables of their own next to the manager's (``durable_meta``: one row per
stream with its metadata as JSON, plus ``tail`` and ``closed`` for cheap
polling; ``durable_records``: one row per record). A write is one
``BEGIN IMMEDIATE`` transaction, so it is atomic across every worker process
of the host; the engine's function never waits on I/O inside it, so a greenlet
holding it never yields. Writes that arrive together share the transaction
and are answered once it committed (:mod:`.group_commit`). Readers in another
process learn of appends by polling ``tail``/``closed`` of the one row they
follow (:class:`~.store.PolledStore`); readers in the writing process are
woken at once (:class:`~.store.Wakeups`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from .._retry import Backoff
from ..exceptions import StorageUnavailable
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


class _SQLiteTxn(Txn):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.touched: set[str] = set()

    def get(self, path: str) -> Meta | None:
        row = self._conn.execute("SELECT meta FROM durable_meta WHERE path = ?", (path,)).fetchone()
        return Meta.from_dict(json.loads(row[0])) if row else None

    def put(self, path: str, meta: Meta) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO durable_meta (path, meta, tail, closed) VALUES (?, ?, ?, ?)",
            (path, json.dumps(meta.to_dict()), meta.tail, int(meta.closed)),
        )
        self.touched.add(path)

    def append(self, path: str, first: int, records: Sequence[bytes]) -> None:
        self._conn.executemany(
            "INSERT OR REPLACE INTO durable_records (path, idx, data) VALUES (?, ?, ?)",
            [(path, first + i, record) for i, record in enumerate(records)],
        )
        self.touched.add(path)

    def drop(self, path: str) -> None:
        self._conn.execute("DELETE FROM durable_meta WHERE path = ?", (path,))
        self._conn.execute("DELETE FROM durable_records WHERE path = ?", (path,))
        self.touched.add(path)


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
        mmap_size: int = 256 << 20,
    ) -> None:
        self.path = path
        self.mmap_size = mmap_size
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.poll_interval = poll_interval
        self.fast_poll_seconds = fast_poll_seconds
        self._pool: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.wakeups = Wakeups()
        self._group = GroupCommit(self._commit)
        self._ready = False

    # -- connections ----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
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

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._pid != os.getpid():  # a forked worker: the parent's connections are not ours
                self._pool, self._pid = [], os.getpid()
            conn = self._pool.pop() if self._pool else None
        try:
            if conn is None:
                conn = self._connect()
            yield conn
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"SQLite: {exc}") from exc
        finally:
            if conn is not None:
                with self._lock:
                    self._pool.append(conn)

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
        try:
            with self._connection() as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for job in jobs:
                        txn = _SQLiteTxn(conn)
                        try:
                            job.value = job.fn(txn)
                        except Exception as exc:
                            if txn.touched and len(jobs) > 1:
                                raise _PartialWrite from exc
                            job.error = exc
                            if txn.touched:  # alone: nothing of it may stay
                                raise
                        touched |= txn.touched
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except _PartialWrite:
            raise
        except BaseException as exc:  # nothing of the batch committed
            # A kill or timeout of the leading request is its own: the others get a storage error.
            failure = exc if isinstance(exc, Exception) else StorageUnavailable("write interrupted")
            for job in jobs:
                job.value = None
                job.error = job.error or failure
            if failure is not exc:
                raise
            return
        if touched:
            self.wakeups.wake(touched)

    def get(self, path: str) -> Meta | None:
        with self._connection() as conn:
            row = conn.execute("SELECT meta FROM durable_meta WHERE path = ?", (path,)).fetchone()
        return Meta.from_dict(json.loads(row[0])) if row else None

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
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()
