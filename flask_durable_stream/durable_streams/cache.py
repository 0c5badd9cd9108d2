"""A per-process cache of records: a record never changes once stored.

Keys are ``(stream generation, record number)``: a stream deleted and created
again at the same URL has a new generation, so no entry can outlive what it
describes; entries of deleted streams simply age out. Bounded in bytes, least
recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

from .._concurrency import real_lock


class RecordCache:
    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = real_lock()  # short sections that never switch

    def get(self, gen: str, start: int, end: int, max_bytes: int) -> list[bytes]:
        """Cached records from ``start`` on, up to the first one missing."""
        out: list[bytes] = []
        size = 0
        with self._lock:
            entries = self._entries
            for index in range(start, end):
                record = entries.get((gen, index))
                if record is None or (out and size + len(record) > max_bytes):
                    break
                entries.move_to_end((gen, index))
                out.append(record)
                size += len(record)
        return out

    def put(self, gen: str, start: int, records: list[bytes]) -> None:
        with self._lock:
            for index, record in enumerate(records, start):
                if len(record) > self.max_bytes // 4 or (gen, index) in self._entries:
                    continue
                self._entries[(gen, index)] = record
                self._size += len(record)
            while self._size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._size -= len(old)
