"""The operations the SQLite writer thread runs, several per transaction (group commit).

Each checks before it writes and raises a :class:`StreamError` for a request that
cannot apply (unknown stream, ended stream, conflicting retry): then nothing of
it was written and the rest of the transaction goes on.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence

from .. import protocol
from ..exceptions import StreamClosed, StreamExists, StreamNotFound
from .base import PRODUCER_LOST, Event, StreamManager, StreamStatus, status_after
from .sqlite_io import INSERT_EVENT, INSERT_PACKED, LENGTH_LIMIT, PACK, payload_of

_OPEN = StreamStatus.OPEN.value


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
        guard = " AND token = ? AND status = ? AND last_seq = ? AND cancel_requested = 0"
        if self._advance(conn, stream_id, last, now, guard, (token, _OPEN, events[0].seq - 1)):
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
            packed = PACK.encode(list(map(payload_of, events)))
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
