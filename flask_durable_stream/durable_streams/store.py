"""The storage contract for Durable Streams: stream metadata plus numbered records.

A Durable Stream is kept as one metadata document (:class:`Meta`) and the
stream's own *records*, numbered from ``meta.base``: one record per append (a
byte string; in JSON mode the compact JSON array of that append's messages).
A fork stores only its own records; those below ``base`` are read from the
source, following the fork chain. Offsets name record boundaries, so a record
is never split by a reader.

Every write goes through :meth:`DSStore.transact`: the protocol logic (in
:mod:`.engine`) runs once against a :class:`Txn` and the backend makes it
atomic: a lock in memory, ``BEGIN IMMEDIATE`` in SQLite, ``WATCH``/``MULTI``
in Redis (rerunning the function when a watched key moved). Because the logic
lives in one place, every backend answers the protocol the same way.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .._concurrency import real_lock

_T = TypeVar("_T")


@dataclass(slots=True)
class Meta:
    """Everything the protocol knows about one stream, stored as one JSON document."""

    gen: str  # unique per created stream: ETags and readers never mix two lives of one URL
    content_type: str
    created: float
    touched: float  # last read or write, for the sliding TTL
    tail: int = 0  # number of records, inherited ones included
    base: int = 0  # records below this index come from ``fork_of``
    closed: bool = False
    ttl: int | None = None
    expires_at: str | None = None  # as the client sent it (echoed by HEAD)
    expires_ts: float | None = None
    fork_of: str | None = None
    fork_offset: int | None = None
    fork_sub: int = 0
    stream_seq: str | None = None
    producers: dict[str, list[int]] = field(default_factory=dict)  # id -> [epoch, last seq]
    closed_by: list[Any] | None = None  # [producer id, epoch, seq] of the closing append
    refs: int = 0  # forks that read from this stream
    deleted: bool = False  # soft-deleted: kept for its forks, gone for everybody else
    owner: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies recursively, on every append's path.
        data = {name: getattr(self, name) for name in _FIELDS}
        data["producers"] = {k: list(v) for k, v in self.producers.items()}
        data["closed_by"] = list(self.closed_by) if self.closed_by is not None else None
        return data

    def copy(self) -> Meta:
        return Meta(**self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Meta:
        return cls(**data)

    def expired(self, now: float) -> bool:
        if self.expires_ts is not None and now >= self.expires_ts:
            return True
        return self.ttl is not None and now >= self.touched + self.ttl


_FIELDS = tuple(f.name for f in fields(Meta))


class Txn:
    """One atomic unit of work. Reads see this transaction's own writes."""

    def get(self, path: str) -> Meta | None:
        raise NotImplementedError

    def put(self, path: str, meta: Meta) -> None:
        raise NotImplementedError

    def append(self, path: str, first: int, records: Sequence[bytes]) -> None:
        """Store ``records`` as own records ``first``, ``first + 1``, ... (numbered from base)."""
        raise NotImplementedError

    def drop(self, path: str) -> None:
        """Remove the stream's metadata and records."""
        raise NotImplementedError


class DSStore:
    """Where Durable Streams live. One instance per process, shared by its requests.

    ``records(path, start, end)`` returns own records with relative numbers in
    ``[start, end)``, at most ``max_bytes`` of them (always at least one).
    ``wait(path, tail, closed, timeout)`` returns when the stream's tail
    passed ``tail``, its closed flag differs from ``closed``, it is gone, or
    ``timeout`` elapsed. It returns the stream's metadata as a write of this
    process committed it, when that write woke the reader (a read of storage
    saved on the long-poll's path), else None; callers read the metadata
    afterwards unless given, so a spurious wake-up is harmless.
    """

    #: True when reads leave the process (worth caching records in front of them).
    remote: bool = True
    #: Live readers of this process, woken by this process's writes.
    wakeups: Wakeups

    def transact(self, fn: Callable[[Txn], _T]) -> _T:
        raise NotImplementedError

    def get(self, path: str) -> Meta | None:
        raise NotImplementedError

    def records(self, path: str, start: int, end: int, max_bytes: int) -> list[bytes]:
        raise NotImplementedError

    def wait(self, path: str, tail: int, closed: bool, timeout: float) -> Meta | None:
        raise NotImplementedError

    def paths(self) -> Iterator[str]:
        """Every stream's path (for the expiry sweep), in no particular order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""

    def now(self) -> float:
        return time.time()


_gevent_sleep: Callable[[float], None] | None = None  # once time is patched (for good)


def yield_to_greenlets() -> None:
    """Under gevent (``time`` patched), let the other runnable greenlets run first.

    Threads need no such turn (they run meanwhile) and a real ``sleep(0)``
    would hand the CPU to other processes, so elsewhere this does nothing.
    """
    global _gevent_sleep
    if _gevent_sleep is not None:
        _gevent_sleep(0)
        return
    if "gevent.monkey" not in sys.modules:
        return
    from gevent import monkey, sleep

    if monkey.is_module_patched("time"):
        _gevent_sleep = sleep
        sleep(0)


class Wakeups:
    """Per-stream wake-ups for the live readers of one process.

    A reader registers before it checks the stream and waits on its own event;
    a write that committed sets the events of the streams it touched. Readers
    in this process are so woken at once, without polling, and only those of
    the streams that changed. (Other processes' writes are found by each
    store's own means: polling in SQLite and Redis.) A write may hand each
    reader it wakes the metadata it committed (``wake(paths, metas)``), which
    :meth:`unregister` gives back: the reader need not read it again. A wake-up
    without metadata drops what an earlier one handed over, so a reader never
    gets metadata older than a write it was woken by.
    """

    def __init__(self) -> None:
        self._lock = real_lock()  # short sections that never switch
        self._events: dict[str, set[threading.Event]] = {}
        self._metas: dict[threading.Event, Meta] = {}

    def register(self, path: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(path, set()).add(event)
        return event

    def unregister(self, path: str, event: threading.Event) -> Meta | None:
        """Stop waking ``event``; the metadata the write that woke it handed over, if any."""
        with self._lock:
            events = self._events.get(path)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[path]
            return self._metas.pop(event, None) if self._metas else None

    def wake(self, paths: Iterable[str], metas: dict[str, Meta] | None = None) -> None:
        with self._lock:
            woken = [(path, e) for path in paths for e in self._events.get(path, ())]
            handed: set[str] = set()
            for path, event in woken:
                meta = metas.get(path) if metas is not None else None
                if meta is not None:  # each reader its own
                    self._metas[event] = meta.copy() if path in handed else meta
                    handed.add(path)
                elif self._metas:
                    self._metas.pop(event, None)
        for _, event in woken:
            event.set()

    def waiting(self, path: str) -> bool:
        """Whether a reader of ``path`` is registered (woken or not, it has not answered yet)."""
        return path in self._events


class PolledStore(DSStore):
    """A store shared by processes: live readers poll :meth:`state` for other processes' writes.

    Writes of this process wake the reader at once (:class:`Wakeups`); other
    processes' writes are found by polling: every ``poll_interval[0]`` for the
    first ``fast_poll_seconds`` of a wait (a live reader is usually back
    within milliseconds of its last answer), then backing off to
    ``poll_interval[1]``. While the process hears the others' writes
    (:meth:`hears_others`), polling is only a safety net (for a wake-up that
    was lost): from ``heard_poll_interval[0]``, doubling up to
    ``heard_poll_interval[1]``.
    """

    poll_interval: tuple[float, float] = (0.002, 0.05)
    fast_poll_seconds: float = 0.25
    heard_poll_interval: tuple[float, float] = (0.05, 0.5)

    def listen(self) -> None:
        """Before a reader's first look: a store that can hear other processes' writes starts to."""

    def hears_others(self) -> bool:
        """Whether other processes' writes wake this process's readers (after :meth:`listen`)."""
        return False

    def state(self, path: str) -> tuple[int, bool] | None:
        """The stream's (tail, closed), None if there is no such stream: one cheap read."""
        raise NotImplementedError

    def wait(self, path: str, tail: int, closed: bool, timeout: float) -> Meta | None:
        deadline = time.monotonic() + timeout
        self.listen()
        woken = self.wakeups.register(path)  # before the first look: no write is missed
        try:
            self._wait(path, tail, closed, deadline, woken)
        finally:
            given = self.wakeups.unregister(path, woken)
        return given

    def _wait(
        self, path: str, tail: int, closed: bool, deadline: float, woken: threading.Event
    ) -> None:
        if self.hears_others():
            fast_until, (delay, longest) = 0.0, self.heard_poll_interval
        else:
            fast_until = time.monotonic() + self.fast_poll_seconds
            delay, longest = self.poll_interval
        while True:
            now = self.state(path)
            if now is None or now[0] > tail or now[1] != closed:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if woken.wait(min(delay, remaining)):
                return  # a write of this process
            if time.monotonic() > fast_until:  # quiet for a while: back off
                delay = min(delay * 2, longest)


def take(records: Sequence[bytes], max_bytes: int) -> list[bytes]:
    """The longest prefix of ``records`` within ``max_bytes`` (at least one record)."""
    out: list[bytes] = []
    size = 0
    for record in records:
        if out and size + len(record) > max_bytes:
            break
        out.append(record)
        size += len(record)
    return out
