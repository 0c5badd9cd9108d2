"""In-process stream storage: the default for development and the test helper.

Streams live in a dict guarded by a lock; each stream has its own lock, and a
condition variable that wakes its subscribers once one waits. Subscribers keep
a cursor into the append-only event list, so a slow subscriber never makes the
producer wait and never loses events. Finished streams expire ``ttl_seconds``
after their terminal event; a background sweep removes them whether or not new
streams are opened. Streams are not shared across processes: with several workers use the
SQLite manager (one host) or a networked backend.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .. import protocol
from .._concurrency import TaskGroup, real_lock
from ..exceptions import StreamClosed, StreamExists, StreamNotFound, StreamTimeout
from .base import (
    PRODUCER_LOST,
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
    check_event_sizes,
    check_pointer_key,
    check_store_interval,
    common_options,
    new_tuple,
    status_after,
)
from .common import Sweep, check_sweep_interval

if TYPE_CHECKING:
    from flask import Flask

    from ..durable_streams.store import DSStore

#: ``store_interval``'s default: under gevent a paced stream's events are stored in
#: one append at most this long after the first of them (see docs/performance.md).
STORE_INTERVAL = 0.1

_OPEN = StreamStatus.OPEN  # a module global: an enum member's lookup costs a call
_CHUNK = protocol.CHUNK


class _Stream:
    """One stream's events and metadata, guarded by ``lock``.

    The events are kept as their payloads alone, one after the other in one
    buffer of UTF-8 (``data``, with each one's end in ``ends``): an event's seq
    is its index, and only the last one can be terminal, so its kind is kept
    once (``last_kind``). A stored token-sized event then costs its bytes and
    an offset, where a ``str`` and a list slot would be some 60 bytes more and
    an :class:`Event` tuple with its seq some 100 more, per event, for the
    stream's whole life; the events are made again only for a reader that asks
    (a replay).

    The condition its followers wait on exists only once one waits: most
    streams are only ever read live (from the run), and a condition is seven
    objects the cyclic garbage collector tracks, per stream, for its lifetime.
    Until then the runner may hold the stream's events back (``store_interval``);
    ``unstored`` stores them at once, and every read calls it first.
    """

    __slots__ = ("data", "ends", "last_kind", "info", "lock", "_cond", "unstored")

    def __init__(self, info: StreamInfo) -> None:
        self.data = bytearray()
        self.ends = array.array("Q")
        self.last_kind = protocol.CHUNK
        self.info = info
        # Never taken twice, and nothing under it waits or switches (a follower's wait
        # releases it): a native lock, also under gevent, whose own lock is Python code
        # (this one is taken for every stored batch).
        self.lock = real_lock()
        self._cond: threading.Condition | None = None
        self.unstored: Callable[[], None] | None = None

    @property
    def count(self) -> int:
        """With ``lock`` held: the events stored."""
        return len(self.ends)

    def add(self, events: Sequence[Event]) -> None:
        """With ``lock`` held: store ``events`` (the next ones, in order) and wake the
        followers waiting (they run once the lock is released)."""
        data, ends = self.data, self.ends
        for event in events:
            data += event.payload.encode()
            ends.append(len(data))
        self.last_kind = events[-1].kind
        if self._cond is not None:
            self._cond.notify_all()

    def _payload(self, seq: int) -> str:
        start = self.ends[seq - 1] if seq else 0
        return self.data[start : self.ends[seq]].decode()

    def has(self, event: Event) -> bool:
        """With ``lock`` held: whether ``event`` is stored, as it is."""
        seq = event.seq
        if seq >= len(self.ends) or self._payload(seq) != event.payload:
            return False
        last = seq == len(self.ends) - 1
        return event.kind == (self.last_kind if last else protocol.CHUNK)

    def since(self, start: int) -> list[Event]:
        """With ``lock`` held: the events from seq ``start`` on.

        A replay makes every event of a stream again: when each character is one byte
        (ASCII, which JSON text mostly is), the payloads are decoded in one piece and the
        text cut at their ends, else each is decoded; the tuples are made in C."""
        data, ends = self.data, self.ends
        count = len(ends)
        if start >= count:
            return []
        first = ends[start - 1] if start > 0 else 0
        bounds = ends[start:]
        pairs = zip(itertools.chain((first,), bounds[:-1]), bounds, strict=True)
        piece = data[first : bounds[-1]]
        text = piece.decode()
        if len(text) == len(piece):  # the byte offsets are the text's
            payloads = [text[a - first : b - first] for a, b in pairs]
        else:
            payloads = [data[a:b].decode() for a, b in pairs]
        rows = zip(range(start, count), itertools.repeat(protocol.CHUNK), payloads, strict=False)
        events: list[Event] = list(map(new_tuple, itertools.repeat(Event), rows))
        if self.last_kind != protocol.CHUNK:
            events[-1] = events[-1]._replace(kind=self.last_kind)
        return events

    def wait(self, timeout: float) -> None:
        """With ``lock`` held: wait for :meth:`notify` (or ``timeout``)."""
        if self._cond is None:
            self._cond = threading.Condition(self.lock)
        self._cond.wait(timeout)

    def notify(self) -> None:
        """With ``lock`` held: wake every follower waiting."""
        if self._cond is not None:
            self._cond.notify_all()


class InMemoryStreamManager(StreamManager):
    """Keeps streams in this process's memory. Greenlet- and thread-safe.

    ``store_interval`` (seconds, ``DURABLE_STREAM_MEMORY_STORE_INTERVAL``): under
    gevent, while no reader of this manager waits on a stream, the runner stores
    its events in one append at most this long after the first of them, instead
    of one append per event. Nothing is less durable for it (the events and the
    manager live and die with the same process), and no reader sees less: each
    read of a stream has what its run emitted stored first, and once a reader
    waits on the stream every event is stored as it comes. 0 stores every event
    as it comes.
    """

    append_never_blocks = True
    backend_name = "in-memory"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_MEMORY_STORE_INTERVAL": STORE_INTERVAL
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> InMemoryStreamManager:
        """``DURABLE_STREAM_MEMORY_STORE_INTERVAL`` and the common options."""
        return cls(
            store_interval=float(config["DURABLE_STREAM_MEMORY_STORE_INTERVAL"]),
            **common_options(config),
        )

    def __init__(
        self,
        ttl_seconds: float = 300.0,
        *,
        timeout: float = 60.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
        sweep_interval: float | None = None,
        store_interval: float = STORE_INTERVAL,
    ) -> None:
        self.store_interval = check_store_interval(
            store_interval, "DURABLE_STREAM_MEMORY_STORE_INTERVAL"
        )
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        #: Seconds between two runs of :meth:`gc` in the background; 0: never.
        self.sweep_interval = check_sweep_interval(
            sweep_interval, max(0.05, min(30.0, ttl_seconds / 2))
        )
        self._lock = real_lock()  # never held across a switch (see _Stream)
        self._streams: dict[str, _Stream] = {}
        self._pointers: dict[str, str] = {}
        self._tasks = TaskGroup()
        self._stopping = threading.Event()
        self._sweep = Sweep(self._stopping, name="durable-stream-sweep")

    # -- producer ------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        now = self.now()
        with self._lock:
            existing = self._streams.get(stream_id)
            if existing is not None and not self._expired(existing, now):
                raise StreamExists(f"stream {stream_id} already exists")
            info = StreamInfo(
                stream_id, StreamStatus.OPEN, now, now, owner=owner, heartbeat_at=now, flow=flow
            )
            stream = self._streams[stream_id] = _Stream(info)
            self._sweep.start(self._tasks.spawn, self.gc, self.sweep_interval)
        return _MemoryWriter(self, stream)

    def _append(self, stream: _Stream, events: Sequence[Event]) -> bool:
        """Store ``events``; the stream's cancel flag (an append is also a heartbeat).

        Every stored batch of every stream comes here: written for the usual case
        (the next events of an open stream), with the lock taken without ``with``
        and module globals instead of an enum lookup, each a call less.
        """
        lock = stream.lock
        lock.acquire()
        try:
            info = stream.info
            stored = len(stream.ends)  # stream.count, without the property's call
            if events[0].seq != stored or info.status is not _OPEN:
                if events[-1].seq < stored and all(map(stream.has, events)):
                    info.heartbeat_at = self.now()
                    return info.cancel_requested  # a retry of events that did reach storage
                if info.status is not _OPEN or events[0].seq < stored:
                    raise StreamClosed(f"stream {info.stream_id} already ended")
            stream.add(events)
            last = events[-1]
            now = self.now()
            info.updated_at = info.heartbeat_at = now
            info.last_seq = last.seq
            if last.kind != _CHUNK:
                info.status = status_after(last)
                info.expires_at = now + self.ttl_seconds
                stream.unstored = None  # nothing more to hold: let the run go
            return info.cancel_requested
        finally:
            lock.release()

    def _heartbeat(self, stream: _Stream) -> bool:
        with stream.lock:
            stream.info.heartbeat_at = self.now()
            stream.notify()
            return stream.info.cancel_requested

    # -- consumer ------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        stream = self._get(stream_id)
        return self._follow(stream, after, self.timeout if timeout is None else timeout)

    @staticmethod
    def _catch_up(stream: _Stream) -> None:
        """Store what the stream's run holds back (``store_interval``), before a read.

        Never with the stream's lock held: the store takes it."""
        unstored = stream.unstored
        if unstored is not None:
            unstored()

    def _follow(self, stream: _Stream, after: int, timeout: float) -> Iterator[list[Event]]:
        cursor = max(after + 1, 0)
        last_activity = time.monotonic()
        seen_heartbeat = stream.info.heartbeat_at
        with self.producer_watches.watch(stream.info.stream_id, self.lease_seconds) as watch:
            while True:
                self._catch_up(stream)
                with stream.lock:
                    while stream.count <= cursor:
                        info = stream.info
                        if info.status is not StreamStatus.OPEN:
                            return  # the caller already has the terminal event
                        if info.heartbeat_at != seen_heartbeat:
                            seen_heartbeat = info.heartbeat_at
                            last_activity = time.monotonic()
                        lease_left = watch.observe(info.heartbeat_at, self.now())
                        if lease_left <= 0:
                            self._mark_lost(stream)
                            continue
                        remaining = timeout - (time.monotonic() - last_activity)
                        if remaining <= 0:
                            raise StreamTimeout("Stream timed out.")
                        stream.wait(min(remaining, lease_left + 0.001))
                    batch = stream.since(cursor)
                last_activity = time.monotonic()
                yield batch
                if batch[-1].terminal:
                    return
                cursor += len(batch)

    def _mark_lost(self, stream: _Stream) -> None:
        # Called with stream.lock held; the producer is gone, so nobody else appends.
        seq = stream.count
        stream.add([Event(seq, protocol.ERROR, protocol.encode(PRODUCER_LOST))])
        now = self.now()
        stream.info.status = StreamStatus.ERROR
        stream.info.last_seq = seq
        stream.info.updated_at = now
        stream.info.expires_at = now + self.ttl_seconds
        stream.unstored = None

    # -- metadata ------------------------------------------------------------
    def info(self, stream_id: str) -> StreamInfo | None:
        try:
            stream = self._get(stream_id)
        except StreamNotFound:
            return None
        with stream.lock:
            return dataclasses.replace(stream.info)  # a copy: the stored one keeps changing

    def request_cancel(self, stream_id: str) -> bool:
        stream = self._get(stream_id)
        with stream.lock:
            if stream.info.status is not StreamStatus.OPEN:
                return False
            stream.info.cancel_requested = True
            stream.info.updated_at = self.now()
            stream.notify()
            return True

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        with self._lock:
            ids = list(self._streams)
        infos = [i for i in map(self.info, ids) if i is not None]
        infos.sort(key=lambda i: i.created_at, reverse=True)
        return infos[:limit]

    def _get(self, stream_id: str) -> _Stream:
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None or self._expired(stream, self.now()):
            raise StreamNotFound(f"stream {stream_id} not found")
        self._catch_up(stream)
        return stream

    @staticmethod
    def _expired(stream: _Stream, now: float) -> bool:
        expires = stream.info.expires_at
        return expires is not None and expires <= now

    # -- expiry --------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        now = self.now() if now is None else now
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:  # producers gone with nobody reading: end them, to expire later
            with stream.lock:
                info = stream.info
                if (
                    info.status is StreamStatus.OPEN
                    and info.heartbeat_at is not None
                    and now - info.heartbeat_at > self.lease_seconds
                ):
                    self._mark_lost(stream)
        with self._lock:
            dead = [sid for sid, s in self._streams.items() if self._expired(s, now)]
            for sid in dead:
                del self._streams[sid]
        return len(dead)

    def set_pointer(self, key: str, stream_id: str) -> None:
        with self._lock:
            self._pointers[check_pointer_key(key)] = stream_id

    def get_pointer(self, key: str) -> str | None:
        with self._lock:
            return self._pointers.get(check_pointer_key(key))

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        with self._lock:
            if self._pointers.get(check_pointer_key(key)) != stream_id:
                return False
            del self._pointers[key]
            return True

    def close(self) -> None:
        self._stopping.set()
        self._tasks.join(5)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def durable_streams_store(self) -> DSStore:
        """Durable Streams kept next to this manager's streams (see docs/durable-streams.md)."""
        store: DSStore | None = getattr(self, "_ds_store", None)
        if store is None:
            from ..durable_streams.memory import MemoryDSStore

            store = self._ds_store = MemoryDSStore()
        return store


class _MemoryWriter(StreamWriter):
    append_beats = True

    def __init__(self, manager: InMemoryStreamManager, stream: _Stream) -> None:
        super().__init__(stream.info.stream_id)
        self._manager = manager
        self._stream = stream

    def store(self, events: Sequence[Event]) -> None:
        manager = self._manager
        if manager.max_event_bytes is not None:
            check_event_sizes(events, manager.max_event_bytes, manager.display_name)
        self.cancel_requested = manager._append(self._stream, events)

    def heartbeat(self) -> bool:
        return self._manager._heartbeat(self._stream)

    def may_delay(self) -> bool:
        return self._stream._cond is None  # no follower has waited on the stream

    def delaying(self, store_now: Callable[[], None]) -> None:
        self._stream.unstored = store_now
