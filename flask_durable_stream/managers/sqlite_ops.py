"""The operations the SQLite writer thread runs, several per transaction (group commit).

Each checks before it writes and raises a :class:`StreamError` for a request that
cannot apply (unknown stream, ended stream, conflicting retry): then nothing of
it was written and the rest of the transaction goes on.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Sequence
from typing import TypeVar

from .. import protocol
from ..exceptions import StreamClosed, StreamError, StreamExists, StreamNotFound
from .base import PRODUCER_LOST, Event, StreamManager, StreamStatus, status_after
from .sqlite_io import INSERT_EVENT, INSERT_PACKED, LENGTH_LIMIT, PACK

_OPEN = StreamStatus.OPEN.value
#: ``UPDATE ... FROM`` (SQLite 3.33): the appends of many streams in one statement.
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
#: The most rows (streams, events) one statement of :meth:`_append_together` carries:
#: 4 parameters a row stays under the 999 an older SQLite allows.
PART = 64
T = TypeVar("T")


def _usual_case(token: str, tail: str, table: str = "") -> str:
    """The checks of an append's ``UPDATE`` of its stream's row, for the usual case: the
    writer's ``token``, the stream still open, its stored tail at ``tail`` (the seq before
    the events), and no cancel asked. One text for the single append and the joint one."""
    return (
        f" AND {table}token = {token} AND {table}status = '{_OPEN}'"
        f" AND {table}last_seq = {tail} AND {table}cancel_requested = 0"
    )


_GUARD = _usual_case("?", "?")


class SQLiteOperations(StreamManager):
    """The writer thread's operations; :class:`~.sqlite.SQLiteStreamManager` runs them."""

    def _op_open(
        self, conn: sqlite3.Connection, stream_id: str, owner: str | None, flow: str | None
    ) -> int:
        now = self.now()
        row = conn.execute(
            "SELECT expires_at FROM ds_streams WHERE stream_id = ?", (stream_id,)
        ).fetchone()
        if row is not None:
            if row[0] is None or row[0] > now:
                raise StreamExists(f"stream {stream_id} already exists")
            conn.execute("DELETE FROM ds_events WHERE stream_id = ?", (stream_id,))
            conn.execute("DELETE FROM ds_streams WHERE stream_id = ?", (stream_id,))
        token = int.from_bytes(os.urandom(7), "big")
        conn.execute(
            "INSERT INTO ds_streams (stream_id, token, status, owner, created_at, updated_at,"
            " heartbeat_at, flow) VALUES (?, ?, 'open', ?, ?, ?, ?, ?)",
            (stream_id, token, owner, now, now, now, flow),
        )
        return token

    def _op_append(
        self, conn: sqlite3.Connection, stream_id: str, token: int, events: Sequence[Event]
    ) -> bool:
        """Store ``events``; the stream's cancel flag (an append is also a heartbeat)."""
        # The usual case, events that follow the stored ones on an open stream that nobody
        # asked to cancel: one UPDATE checks that, moves the tail and refreshes the lease,
        # and the events are inserted (a RETURNING of the flag would cost that UPDATE a
        # third more). Otherwise (a retry, an ended or replaced stream, the cancel flag)
        # nothing was written yet and the checks below say what to do.
        now, last = self.now(), events[-1]
        if self._advance(conn, stream_id, last, now, _GUARD, (token, events[0].seq - 1)):
            self._insert(conn, stream_id, events)
            return False
        row = conn.execute(
            "SELECT status, last_seq, token, cancel_requested FROM ds_streams WHERE stream_id = ?",
            (stream_id,),
        ).fetchone()
        if row is None or row[2] != token:
            raise StreamClosed(f"stream {stream_id} no longer exists")
        status, last_seq = row[0], row[1]
        stored = events[: max(0, last_seq + 1 - events[0].seq)]  # events are contiguous
        if stored:  # a retry of events that did reach storage: they must be the same
            have = conn.execute(
                "SELECT seq, kind, payload FROM ds_events"
                " WHERE stream_id = ? AND seq BETWEEN ? AND ?",
                (stream_id, stored[0].seq, stored[-1].seq),
            ).fetchall()
            if [Event(*r) for r in have] != stored:
                raise StreamClosed(f"stream {stream_id}: conflicting event at an existing seq")
        new = events[len(stored) :]
        if not new:
            return self._op_heartbeat(conn, stream_id, token)
        if status != _OPEN or new[0].seq != last_seq + 1:
            raise StreamClosed(f"stream {stream_id} already ended")
        self._insert(conn, stream_id, new)
        self._advance(conn, stream_id, last, now)
        return bool(row[3])

    def _op_append_many(
        self, conn: sqlite3.Connection, entries: Sequence[tuple[str, int, Sequence[Event]]]
    ) -> list[bool | StreamError]:
        """The appends of several streams, ``(stream_id, token, events)`` each: for each,
        what :meth:`_op_append` returns (the cancel flag) or the :class:`StreamError` it
        raises, in order.

        Running streams that nobody asked to cancel, whose events follow the stored
        ones, are stored together: one ``UPDATE`` and one ``INSERT`` statement for all
        of them, where one each per stream made the writer thread take the interpreter
        lock back after every statement. An append that ends its stream, and all of them
        if any check fails, take :meth:`_op_append` one by one, with the same answers.
        """
        results: list[bool | StreamError | None] = [None] * len(entries)
        running = [i for i, entry in enumerate(entries) if not entry[2][-1].terminal]
        if len(running) > 1 and self._append_together(conn, [entries[i] for i in running]):
            for i in running:
                results[i] = False
        for i, (stream_id, token, events) in enumerate(entries):
            if results[i] is None:
                try:
                    results[i] = self._op_append(conn, stream_id, token, events)
                except StreamError as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]  # every one set above

    def _append_together(
        self, conn: sqlite3.Connection, entries: Sequence[tuple[str, int, Sequence[Event]]]
    ) -> bool:
        """Store ``entries`` (no terminal event among them) if every stream passes the
        usual case's checks; else nothing of them is written and False.

        The checks are read first, so that nothing written ever has to be undone: a
        savepoint would make SQLite copy every page the statements change into a
        statement journal, and move that journal to a temporary file on disk once it
        passes 64 KiB (16 pages: about a dozen streams). For the same reason the statements are
        ``OR IGNORE`` ones, which cannot fail halfway (nothing they write can conflict).
        This connection is the only writer and the transaction holds the write lock, so
        what was read stays true until the statements run.
        """
        if not UPDATE_FROM or len({entry[0] for entry in entries}) != len(entries):
            return False  # an UPDATE ... FROM matches a row once, however often it is named
        parts = []
        ready = 0
        for part in _parts(entries):
            args: list[object] = []
            for stream_id, token, events in part:
                args += (stream_id, events[-1].seq, token, events[0].seq - 1)
            ready += conn.execute(_check_sql(len(part)), args).fetchone()[0]
            parts.append((len(part), args))
        if ready != len(entries):  # one was cancelled, ended, replaced, or this is a retry
            return False
        now = self.now()
        for size, args in parts:
            if conn.execute(_update_sql(size), [now, now, *args]).rowcount != size:
                # Cannot happen (see above); the whole transaction is rolled back.
                raise RuntimeError("a stream's row changed between its checks and its update")
        rows = [(sid, e.seq, e.kind, e.payload) for sid, _, events in entries for e in events]
        for some in _parts(rows):
            conn.execute(_insert_sql(len(some)), [value for row in some for value in row])
        return True

    def _advance(
        self,
        conn: sqlite3.Connection,
        stream_id: str,
        last: Event,
        now: float,
        guard: str = "",
        guard_args: tuple[object, ...] = (),
    ) -> bool:
        """Move the stream's tail to ``last`` (ending the stream if it is terminal) where
        ``guard`` holds; whether it did."""
        if last.terminal:
            sql = (
                "UPDATE ds_streams SET last_seq = ?, updated_at = ?, heartbeat_at = ?,"
                " status = ?, expires_at = ? WHERE stream_id = ?"
            )
            args: tuple[object, ...] = (
                *(last.seq, now, now, status_after(last).value, now + self.ttl_seconds),
                stream_id,
            )
        else:
            sql = (
                "UPDATE ds_streams SET last_seq = ?, updated_at = ?, heartbeat_at = ?"
                " WHERE stream_id = ?"
            )
            args = (last.seq, now, now, stream_id)
        return conn.execute(sql + guard, args + guard_args).rowcount == 1

    @staticmethod
    def _insert(conn: sqlite3.Connection, stream_id: str, events: Sequence[Event]) -> None:
        if len(events) >= 8:
            # One statement for the whole batch: SQLite unpacks a JSON array of the
            # payload texts in C, about twice as fast as a row-by-row executemany.
            # StreamWriter.append checked that only the last event may be terminal.
            # JSON text never holds a raw NUL, which would end SQLite's string early.
            packed = PACK.encode(list(map(protocol.payload_of, events)))
            if "\x00" not in packed and len(packed) * 4 < LENGTH_LIMIT:
                conn.execute(
                    INSERT_PACKED,
                    (stream_id, events[0].seq, len(events) - 1, events[-1].kind, packed),
                )
                return
        if len(events) == 1:  # an LLM-paced stream's every append
            event = events[0]
            conn.execute(INSERT_EVENT, (stream_id, event.seq, event.kind, event.payload))
            return
        conn.executemany(INSERT_EVENT, [(stream_id, e.seq, e.kind, e.payload) for e in events])

    def _op_heartbeat(self, conn: sqlite3.Connection, stream_id: str, token: int) -> bool:
        row = conn.execute(
            "UPDATE ds_streams SET heartbeat_at = ? WHERE stream_id = ? AND token = ?"
            " RETURNING cancel_requested",
            (self.now(), stream_id, token),
        ).fetchone()
        return bool(row and row[0])

    def _op_cancel(self, conn: sqlite3.Connection, stream_id: str) -> bool:
        now = self.now()
        row = conn.execute(
            "SELECT status, expires_at FROM ds_streams WHERE stream_id = ?", (stream_id,)
        ).fetchone()
        if row is None or (row[1] is not None and row[1] <= now):
            raise StreamNotFound(f"stream {stream_id} not found")
        if row[0] != StreamStatus.OPEN.value:
            return False
        conn.execute(
            "UPDATE ds_streams SET cancel_requested = 1, updated_at = ? WHERE stream_id = ?",
            (now, stream_id),
        )
        return True

    def _op_mark_lost(
        self, conn: sqlite3.Connection, stream_id: str, token: int, last_seq: int
    ) -> bool:
        """End an open stream whose producer stopped beating, unless anything moved meanwhile."""
        now = self.now()
        row = conn.execute(
            "SELECT status, last_seq, token, heartbeat_at FROM ds_streams WHERE stream_id = ?",
            (stream_id,),
        ).fetchone()
        if (
            row is None
            or row[0] != StreamStatus.OPEN.value
            or row[1] != last_seq
            or row[2] != token
            or (row[3] is not None and now - row[3] <= self.lease_seconds)
        ):
            return False
        seq = last_seq + 1
        conn.execute(
            "INSERT INTO ds_events (stream_id, seq, kind, payload) VALUES (?, ?, ?, ?)",
            (stream_id, seq, protocol.ERROR, protocol.encode(PRODUCER_LOST)),
        )
        conn.execute(
            "UPDATE ds_streams SET status = 'error', last_seq = ?, updated_at = ?, expires_at = ?"
            " WHERE stream_id = ?",
            (seq, now, now + self.ttl_seconds, stream_id),
        )
        return True

    def _op_gc(self, conn: sqlite3.Connection, now: float) -> int:
        # Open streams whose producer died with nobody reading them: end them as a
        # reader would (PRODUCER_LOST), so that they expire like any finished stream.
        abandoned = conn.execute(
            "SELECT stream_id, token, last_seq FROM ds_streams"
            " WHERE status = 'open' AND heartbeat_at < ?",
            (now - self.lease_seconds,),
        ).fetchall()
        for stream_id, token, last_seq in abandoned:
            self._op_mark_lost(conn, stream_id, token, last_seq)
        dead = "SELECT stream_id FROM ds_streams WHERE expires_at <= ?"
        conn.execute(f"DELETE FROM ds_events WHERE stream_id IN ({dead})", (now,))
        return conn.execute("DELETE FROM ds_streams WHERE expires_at <= ?", (now,)).rowcount

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
        return bool(conn.execute(sql, (key, stream_id)).rowcount > 0)


def _parts(items: Sequence[T]) -> list[Sequence[T]]:
    """``items`` cut into parts of PART, 32, 16, ... 1: few statements, and few texts of
    them for the connection's cache of prepared statements."""
    parts = []
    start, size = 0, PART
    while start < len(items):
        while size > len(items) - start:
            size //= 2
        parts.append(items[start : start + size])
        start += size
    return parts


def _passing(n: int) -> str:
    """``n`` streams, ``(stream_id, last seq, token, tail)`` each, as ``u``, joined to their
    rows where the usual case's checks pass: the checks' and the update's one text."""
    values = ", ".join(["(?, ?, ?, ?)"] * n)
    checks = _usual_case("u.column3", "u.column4", "ds_streams.")
    return f"(VALUES {values}) AS u WHERE ds_streams.stream_id = u.column1{checks}"


@functools.cache
def _check_sql(n: int) -> str:
    """How many of ``n`` streams pass the usual case's checks."""
    return "SELECT count(*) FROM ds_streams, " + _passing(n)


@functools.cache
def _update_sql(n: int) -> str:
    return (
        "UPDATE OR IGNORE ds_streams SET last_seq = u.column2, updated_at = ?, heartbeat_at = ?"
        " FROM " + _passing(n)
    )


@functools.cache
def _insert_sql(n: int) -> str:
    values = ", ".join(["(?, ?, ?, ?)"] * n)
    return f"INSERT OR IGNORE INTO ds_events (stream_id, seq, kind, payload) VALUES {values}"
