"""One subscription to a Realtime Database stream: the stored pages, then the live part.

The live part watches two locations over the REST streaming API (the stream's
``events`` from the cursor on, and its ``meta``), hands events over in seq
order, and judges the producer's lease with :class:`ProducerWatch`. It reads
and writes only through :class:`.RtdbStorage`.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from typing import Any

from ..exceptions import StorageUnavailable, StreamError, StreamNotFound, StreamTimeout
from .base import Event
from .rtdb_io import OPEN, Meta, RtdbStorage, event_key, stream_id_of, to_event
from .rtdb_stream import Mirror


def follow(
    storage: RtdbStorage, key: str, meta: Meta, cursor: int, timeout: float, page_size: int
) -> Iterator[list[Event]]:
    """Events from ``cursor`` on: what is stored, a page at a time, then live ones."""
    while True:
        page = storage.page(key, cursor, page_size)
        batch = [e for i, e in enumerate(page) if e.seq == cursor + i]
        if batch:
            yield batch
            if batch[-1].terminal:
                return
            cursor = batch[-1].seq + 1
        if len(page) < page_size or len(batch) < len(page):
            break
    if meta.get("status") != OPEN and meta.get("lastSeq", -1) < cursor:
        return  # the caller already has the terminal event
    yield from Follower(storage, key, meta, cursor, timeout).run()


class Follower:
    """The live part of one subscription: two watched locations, one cursor."""

    def __init__(
        self, storage: RtdbStorage, key: str, meta: Meta, cursor: int, timeout: float
    ) -> None:
        self.storage = storage
        self.key = key
        self.meta = meta
        self.cursor = cursor
        self.timeout = timeout
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.events = Mirror()
        self.pending: dict[int, Event] = {}
        self.lease_seconds = storage.manager.lease_seconds
        self.watch = storage.manager.producer_watches.watch(stream_id_of(key), self.lease_seconds)

    def run(self) -> Iterator[list[Event]]:
        storage, lease = self.storage, self.lease_seconds
        watches = [
            storage.watch(
                f"{self.key}/events",
                lambda: {"orderBy": '"$key"', "startAt": json.dumps(event_key(self.cursor))},
                self.inbox,
                "events",
            ),
            storage.watch(f"{self.key}/meta", dict, self.inbox, "meta"),
        ]
        meta_mirror = Mirror()
        meta_mirror.value = self.meta
        beat = self.meta.get("heartbeatAt")
        last_activity = time.monotonic()
        down_since: float | None = None
        next_check = 0.0
        with self.watch:
            try:
                while True:
                    remaining = self.timeout - (time.monotonic() - last_activity)
                    if remaining <= 0:
                        if down_since is not None:
                            raise StorageUnavailable("Realtime Database stream unavailable.")
                        raise StreamTimeout("Stream timed out.")
                    try:
                        items = [self.inbox.get(timeout=min(remaining, max(0.05, lease / 4)))]
                    except queue.Empty:
                        items = []
                    while not self.inbox.empty():
                        items.append(self.inbox.get_nowait())
                    for source, event, data in items:
                        if event == "disconnected":
                            down_since = down_since or time.monotonic()
                            self.watch.storage_failed()  # the producer may be cut off too
                        elif event == "denied":
                            raise StreamError(str(data), status="PERMISSION_DENIED")
                        elif event == "closed":
                            raise StorageUnavailable("The stream manager was closed.")
                        elif event in ("put", "patch"):
                            down_since = None
                            if source == "events":
                                self._take(self.events.apply(event, data))
                            else:
                                meta_mirror.apply(event, data)
                                if not isinstance(meta_mirror.value, dict):
                                    raise StreamNotFound(f"stream {self.key} was deleted")
                                self.meta = meta_mirror.value
                                if self.meta.get("heartbeatAt") != beat:
                                    beat = self.meta.get("heartbeatAt")
                                    last_activity = time.monotonic()
                    batch = self._ready()
                    if batch:
                        last_activity = time.monotonic()
                        yield batch
                        if batch[-1].terminal:
                            return
                    meta = self.meta
                    if meta.get("status") != OPEN and meta.get("lastSeq", -1) < self.cursor:
                        return
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + max(0.05, lease / 4)
                        self._check_lease(meta, time.monotonic() - last_activity)
            finally:
                for watch in watches:
                    storage.unwatch(watch)

    def _ready(self) -> list[Event]:
        """The pending events that continue the cursor, up to a terminal one."""
        batch: list[Event] = []
        while self.cursor in self.pending:
            event = self.pending.pop(self.cursor)
            batch.append(event)
            self.cursor += 1
            if event.terminal:
                break
        return batch

    def _take(self, touched: set[str] | None) -> None:
        tree = self.events.value if isinstance(self.events.value, dict) else {}
        for k in list(tree) if touched is None else touched:
            event = to_event(k, tree.get(k))
            if event is not None:
                self.events.pop(k)
                if event.seq >= self.cursor:
                    self.pending[event.seq] = event

    def _check_lease(self, meta: Meta, idle: float) -> None:
        storage = self.storage
        try:
            if meta.get("status") == OPEN:
                if self.watch.observe(meta.get("heartbeatAt", 0), storage.manager.now()) <= 0:
                    storage.mark_lost(self.key)
            elif meta.get("lost") and meta.get("lastSeq") == self.cursor:
                if idle > self.lease_seconds / 2:  # the marker stopped half-way: finish its work
                    storage.write_lost_event(self.key, meta)
        except StorageUnavailable:
            self.watch.storage_failed()  # the inactivity timeout decides
