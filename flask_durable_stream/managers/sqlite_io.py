"""What the SQLite manager's modules share: the schema, statements, limits, and the
primitives its writer thread and followers use (real OS locks and queues even
under gevent, the request a caller queues for the writer).
"""

from __future__ import annotations

import _queue
import json
import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from .._concurrency import Signal, original
from .._retry import Backoff
from .base import StreamInfo, StreamStatus

log = logging.getLogger("flask_durable_stream.managers.sqlite")

#: 2 added ``ds_streams.flow``; a version 1 file gets the column when first opened for writing.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS ds_streams (
    stream_id TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    heartbeat_at REAL,
    expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT -1,
    flow TEXT
);
CREATE INDEX IF NOT EXISTS ds_streams_expires ON ds_streams (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS ds_streams_created ON ds_streams (created_at);
CREATE TABLE IF NOT EXISTS ds_events (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ds_pointers (
    key TEXT PRIMARY KEY,
    stream_id TEXT NOT NULL
) WITHOUT ROWID;
"""
ROW = (
    "SELECT stream_id, status, created_at, updated_at, last_seq, owner, cancel_requested,"
    " heartbeat_at, expires_at, token, flow FROM ds_streams"
)
INSERT_EVENT = "INSERT OR IGNORE INTO ds_events (stream_id, seq, kind, payload) VALUES (?, ?, ?, ?)"
INSERT_PACKED = (
    "INSERT OR IGNORE INTO ds_events (stream_id, seq, kind, payload)"
    " SELECT ?1, ?2 + key, CASE WHEN key = ?3 THEN ?4 ELSE 'chunk' END, value FROM json_each(?5)"
)
PACK = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
READ_BATCH = 256
HOLD = 0.25  # seconds the change poller stays quick after a watched stream advanced
RECHECK = 2.0  # seconds: a waiting follower re-reads on its own at least this often
#: SQLite's longest string or row (SQLITE_MAX_LENGTH, 1,000,000,000 bytes unless
#: the library was built otherwise), less room for the row's other columns.
LENGTH_LIMIT = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
MAX_EVENT_BYTES = LENGTH_LIMIT - 1024
#: A follower's next look after a lease check found the write lock taken.
BUSY = Backoff(initial=0.02, maximum=0.5)


#: The unpatched queue even after gevent's monkey patching (the lock: ``real_lock``).
RealQueue = original("_queue", "SimpleQueue", _queue.SimpleQueue)
# Connections inherited through fork(): kept referenced so the child never closes them.
ABANDONED: list[Any] = []


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock; the next try may work."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)
    return "locked" in str(exc) or "busy" in str(exc)


def rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # the connection is reopened, which rolls back anyway


def check_path(path: str) -> None:
    """Reject, when the manager is built, a path that no retry could ever make work.

    A missing directory is not created: a typo in the setting would otherwise
    scatter databases (and streams) over directories nobody looks at.
    """
    setting = "DURABLE_STREAM_SQLITE_PATH (SQLiteStreamManager path)"
    if os.path.isdir(path):
        raise ValueError(
            f"{setting} {path!r} is a directory; name a database file in it, "
            f"e.g. {os.path.join(path, 'durable-streams.sqlite3')!r}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(
            f"{setting} {path!r}: the directory {parent!r} does not exist; create it "
            "(it is not created for you)"
        )


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


class Request:
    """One operation for the writer thread.

    Its caller either waits on ``done`` or, with ``callback``, goes on: the
    thread then has ``callback(result, error)`` run by ``loop`` (a gevent hub's
    :class:`~.._concurrency.HubCallbacks`) once it is answered.
    """

    __slots__ = ("op", "args", "stream_id", "done", "callback", "loop", "result", "error")

    def __init__(
        self,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        stream_id: str | tuple[str, ...] | None,
        callback: Callable[[Any, BaseException | None], None] | None = None,
        loop: Any = None,
    ) -> None:
        self.op = op
        self.args = args
        self.stream_id = stream_id
        self.callback = callback
        self.loop = loop
        self.done = Signal() if callback is None else None
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams it writes: a stream's op's one, an append of several's all."""
        sid = self.stream_id
        return () if sid is None else (sid,) if isinstance(sid, str) else sid

    @property
    def operations(self) -> int:
        """What it counts as in the writer's ``operations``: an append of several streams
        as one per stream."""
        return len(self.streams) or 1

    def answer(self) -> None:
        """Wake the caller: called once, by the writer thread, result or error set."""
        if self.callback is not None:
            try:
                self.loop.post(self.callback, self.result, self.error)
            except Exception:  # its hub's loop is gone (the process is ending): nobody waits
                log.debug("a SQLite write was answered after its event loop closed")
        else:
            assert self.done is not None
            self.done.set()


def row_info(row: tuple[Any, ...]) -> StreamInfo:
    return StreamInfo(
        row[0],
        StreamStatus(row[1]),
        row[2],
        row[3],
        row[4],
        row[5],
        bool(row[6]),
        row[7],
        row[8],
        flow=row[10],
    )


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a file of an older schema version up to :data:`SCHEMA_VERSION`, in place.

    Runs in the writer's first transaction, so every process sees the old
    schema or the new one. Columns are only ever added (with NULL for the rows
    already there), so an older version of the library keeps reading the file.
    """
    if version not in (0, 1, SCHEMA_VERSION):
        raise sqlite3.DatabaseError(f"unknown schema version {version}")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)  # CREATE ... IF NOT EXISTS: a new file gets it all
    columns = {row[1] for row in conn.execute("PRAGMA table_info(ds_streams)")}
    if "flow" not in columns:
        conn.execute("ALTER TABLE ds_streams ADD COLUMN flow TEXT")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def stop_writer(conn: sqlite3.Connection) -> None:
    """The writer thread's last request."""


def noop(conn: sqlite3.Connection) -> None:
    """A request that only makes the writer connect (and create the schema)."""


def connect(
    path: str, *, busy_timeout: float, synchronous: str | None = None
) -> sqlite3.Connection:
    """A connection in autocommit mode: the writer's (``synchronous`` given) or a reader's.

    The writer's switches the file to WAL, proves it is writable and creates or
    migrates the schema; a reader's is query-only.
    """
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        if synchronous is not None:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("BEGIN IMMEDIATE")  # also proves the file is writable
            migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute("COMMIT")
        else:
            conn.execute("PRAGMA query_only=1")
    except BaseException:
        conn.close()
        raise
    return conn
