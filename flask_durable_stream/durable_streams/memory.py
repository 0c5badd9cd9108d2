"""Durable Streams in this process's memory (one worker; development and tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from .store import DSStore, Meta, Txn, Wakeups, take

_T = TypeVar("_T")


class _MemoryTxn(Txn):
    def __init__(self, store: MemoryDSStore) -> None:
        self._store = store
        self.touched: set[str] = set()

    def get(self, path: str) -> Meta | None:
        meta = self._store._meta.get(path)
        return meta.copy() if meta is not None else None

    def put(self, path: str, meta: Meta) -> None:
        self._store._meta[path] = meta.copy()
        self.touched.add(path)

    def append(self, path: str, first: int, records: Sequence[bytes]) -> None:
        own = self._store._records.setdefault(path, [])
        del own[first:]
        own.extend(records)
        self.touched.add(path)

    def drop(self, path: str) -> None:
        self._store._meta.pop(path, None)
        self._store._records.pop(path, None)
        self.touched.add(path)


class MemoryDSStore(DSStore):
    """A dict of metadata and a list of records per stream, behind one lock.

    A transaction runs whole under the lock and never waits on I/O, so it is
    atomic for every greenlet and thread of the process. Changes are copied
    in and out, so a function that raises half-way leaves nothing behind only
    if it raises before its first ``put``: the engine validates first and
    writes last.
    """

    remote = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.wakeups = Wakeups()
        self._meta: dict[str, Meta] = {}
        self._records: dict[str, list[bytes]] = {}

    def transact(self, fn: Callable[[Txn], _T]) -> _T:
        with self._lock:
            txn = _MemoryTxn(self)
            result = fn(txn)
        if txn.touched:
            self.wakeups.wake(txn.touched)
        return result

    def get(self, path: str) -> Meta | None:
        with self._lock:
            meta = self._meta.get(path)
            return meta.copy() if meta is not None else None

    def records(self, path: str, start: int, end: int, max_bytes: int) -> list[bytes]:
        with self._lock:
            return take(self._records.get(path, [])[start:end], max_bytes)

    def paths(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._meta))

    def wait(self, path: str, tail: int, closed: bool, timeout: float) -> None:
        # Hands no metadata to the reader it wakes: reading it again is a dict lookup.
        deadline = time.monotonic() + timeout
        woken = self.wakeups.register(path)  # before the first look: no write is missed
        try:
            while True:
                with self._lock:
                    meta = self._meta.get(path)
                    if meta is None or meta.tail > tail or meta.closed != closed or meta.deleted:
                        return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not woken.wait(remaining):
                    return
                woken.clear()
        finally:
            self.wakeups.unregister(path, woken)
