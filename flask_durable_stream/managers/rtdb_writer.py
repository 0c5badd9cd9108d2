"""The producer's side of a Realtime Database stream: lingering batched writes, heartbeats.

A producer only appends blindly within ``lease_seconds / 2`` of its last
successful conditional write on the stream's meta node; past that it confirms
(a conditional heartbeat) first, so it never writes after a reader has
declared it lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .._concurrency import sleep
from ..exceptions import StreamClosed
from .base import Event, StreamWriter, check_event_sizes
from .rtdb_io import INDEX, OPEN, Meta, RtdbStorage, call


class RtdbWriter(StreamWriter):
    def __init__(
        self,
        storage: RtdbStorage,
        key: str,
        stream_id: str,
        *,
        confirmed: float,
        index_expires: float,
        linger: float,
    ) -> None:
        super().__init__(stream_id)
        self._storage = storage
        self._key = key
        self._index_expires = index_expires
        self._linger = linger
        # monotonic start of the last conditional write that found the stream open
        self._confirmed = confirmed
        self._last_write = 0.0

    def store(self, events: Sequence[Event]) -> None:
        manager = self._storage.manager
        check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        if not events[-1].terminal and self._linger > 0:
            wait = self._last_write + self._linger - time.monotonic()
            if wait > 0:
                sleep(wait)
        if time.monotonic() - self._confirmed > manager.lease_seconds / 2:
            meta = self._confirm()
            if not isinstance(meta, dict) or meta.get("status") != OPEN:
                if self._stored(events):
                    return  # a retry of events that did reach storage
                raise StreamClosed(f"stream {self.stream_id} already ended")
        self._last_write = time.monotonic()
        self._storage.write(self._key, events)

    def _stored(self, events: Sequence[Event]) -> bool:
        found = self._storage.page(self._key, events[0].seq, len(events))
        return found == list(events)

    def _confirm(self) -> Meta | None:
        """Refresh the heartbeat with a conditional write; return the meta it saw or wrote."""
        started = time.monotonic()
        now_of = self._storage.manager.now

        def beat(current: Meta | None) -> Meta | None:
            if not isinstance(current, dict) or current.get("status") != OPEN:
                return None
            now = now_of()
            last = max(current.get("lastSeq", -1), self.next_seq - 1)
            return {**current, "heartbeatAt": now, "updatedAt": now, "lastSeq": last}

        meta, changed = self._storage.cas(f"{self._key}/meta", beat)
        if changed:
            self._confirmed = started
        return meta if isinstance(meta, dict) else None

    def heartbeat(self) -> bool:
        meta = self._confirm()
        if meta is None or meta.get("status") != OPEN:
            return True  # ended elsewhere (lease): the flow should stop
        storage = self._storage
        manager, now = storage.manager, storage.manager.now()
        slack = min(60.0, manager.ttl_seconds)
        if self._index_expires - now < manager.lease_seconds + manager.ttl_seconds + slack / 2:
            self._index_expires = storage.open_expiry(now)
            call(storage.ref(f"{INDEX}/{self._key}/expiresAt").set, self._index_expires)
        return bool(meta.get("cancel"))
