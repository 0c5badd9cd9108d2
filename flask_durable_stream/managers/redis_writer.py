"""The producer's side of a Redis stream: the append script, in pages, and heartbeats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..exceptions import StreamClosed
from .base import Event, StreamWriter, check_event_sizes, payload_bytes, status_after
from .redis_io import RedisStorage, text

APPEND_PAGE = 1000  # events per append script
#: Payload bytes per append script: a script blocks Redis while it runs, and its
#: arguments are one request in Redis's query buffer (1 GiB at most by default).
APPEND_PAGE_BYTES = 8 * 1024 * 1024


class RedisWriter(StreamWriter):
    append_beats = True  # the append script refreshes the lease and reads the cancel flag

    def __init__(self, storage: RedisStorage, stream_id: str, token: str) -> None:
        super().__init__(stream_id)
        self._storage = storage
        self._token = token

    def store(self, events: Sequence[Event]) -> None:
        # A script blocks Redis while it runs: long batches go in pages. A failure
        # part-way leaves a stored prefix, which the retry of the batch finds identical.
        manager = self._storage.manager
        check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        start = 0
        while start < len(events):
            end, size = start, 0
            while end < len(events) and end - start < APPEND_PAGE:
                size += payload_bytes(events[end].payload)
                if end > start and size > APPEND_PAGE_BYTES:
                    break
                end += 1
            self._append_page(events[start:end])
            start = end

    def _append_page(self, events: Sequence[Event]) -> None:
        storage = self._storage
        now = storage.manager.now()
        ttl_ms, expires = storage.ttl_args(now)
        last = events[-1]
        terminal = status_after(last).value if last.terminal else ""
        args: list[Any] = [self._token, repr(now), ttl_ms, expires, terminal, events[0].seq]
        args.append(storage.abandon_ms())
        for event in events:
            args.append(event.kind)
            args.append(event.payload)
        result = text(storage.script("append", storage.keys(self.stream_id), args))
        if result == "gone":
            raise StreamClosed(f"stream {self.stream_id} no longer exists")
        if result == "ended":
            raise StreamClosed(f"stream {self.stream_id} already ended")
        if result == "conflict":
            raise StreamClosed(f"stream {self.stream_id}: conflicting event at an existing seq")
        self.cancel_requested = result == "cancel"

    def heartbeat(self) -> bool:
        storage = self._storage
        args = [self._token, repr(storage.manager.now()), storage.abandon_ms()]
        result = storage.script("heartbeat", storage.keys(self.stream_id), args)
        return int(result) == 1
