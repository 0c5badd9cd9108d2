"""A run: one execution of a flow, as seen by the process that runs it.

The flow appends events; live readers (the HTTP response that started the run)
follow them with their own cursor, and the run's writer copies them to storage.
Memory is bounded by what still has a use: an event is dropped once storage
has it and every attached live reader has passed it. A live reader that falls
more than ``buffer_limit`` bytes behind (a client that stopped reading) is
detached and its connection closed, so one silent client cannot make the
process hold a whole long stream; it can reconnect and replay from storage.
Events not yet stored are kept whatever their size: storage that is down is
retried for ``write_retry_timeout`` with the events in memory.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import protocol
from ._concurrency import gevent_patched
from .exceptions import StreamClosed
from .flows import FlowContext, size_error
from .managers.base import Event

log = logging.getLogger("flask_durable_stream")

#: Default bound on how far (bytes of event payloads) a live reader may lag behind.
DEFAULT_BUFFER_LIMIT = 2 * 1024 * 1024
#: A reader takes at most this many payload bytes in one batch (one socket write).
READ_BATCH_BYTES = 256 * 1024
#: Events are released in steps of at least this many payload bytes.
RELEASE_MIN_BYTES = 64 * 1024
#: Sequence numbers below this are "stored" for a run that has no storage.
_EVERYTHING = sys.maxsize


class LiveReader:
    """A live reader's cursor. ``dropped`` once it fell too far behind."""

    __slots__ = ("cursor", "dropped", "on_drop")

    def __init__(self, cursor: int, on_drop: Callable[[], None] | None) -> None:
        self.cursor = cursor
        self.dropped = False
        self.on_drop = on_drop


class Run:
    """The events of one run, in a window that starts at the oldest one still needed.

    Emitting is the hot path (once per chunk): an append and, only when somebody
    is waiting, a wake-up. Under gevent greenlets never preempt each other, so no
    lock is needed; with real threads (``flask run``) a plain lock keeps sequence
    numbers unique.
    """

    def __init__(
        self,
        stream_id: str,
        ctx: FlowContext,
        *,
        buffer_limit: int | None = DEFAULT_BUFFER_LIMIT,
        max_event_bytes: int | None = None,
        backend: str = "storage",
    ) -> None:
        self.stream_id = stream_id
        self.ctx = ctx
        self.ended = False
        self.durable_failed = False
        self.terminal: Event | None = None
        self.on_emit: Callable[[Run], None] | None = None  # called after every event
        self.live: LiveReader | None = None  # the reader attached when the run started
        self.buffer_limit = buffer_limit
        self.max_event_bytes = max_event_bytes
        self.backend = backend
        self._events: list[Event] = []
        self._ends: list[int] = []  # cumulative payload bytes at the end of each event
        self._base = 0  # seq of _events[0]
        self._count = 0  # events emitted
        self._total = 0  # payload bytes emitted
        self._trimmed_bytes = 0  # payload bytes before _base
        self._stored = _EVERYTHING  # events below this seq are in storage (or need none)
        self._readers: list[LiveReader] = []
        self._waiters: list[threading.Event] = []
        self._check_at = self._check_step()
        # Greenlets of one hub (no preemption), or real threads: decided once per run.
        self.cooperative = gevent_patched()
        self._lock = None if self.cooperative else threading.Lock()
        ctx._emit = self.emit_chunk
        ctx._max_event_bytes = max_event_bytes
        ctx._backend = backend

    # -- the producer side -----------------------------------------------------
    @property
    def count(self) -> int:
        """Events emitted so far (the next event's seq)."""
        return self._count

    @property
    def events(self) -> list[Event]:
        """The events held now: all of them until storage and readers let some go."""
        return list(self._events)

    @property
    def total_bytes(self) -> int:
        """Payload bytes emitted so far."""
        return self._total

    @property
    def held_bytes(self) -> int:
        """Payload bytes this run keeps in memory now."""
        return self._total - self._trimmed_bytes

    def _emit(self, kind: str, payload: str) -> None:
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if self.ended:
                raise StreamClosed(f"stream {self.stream_id} already ended")
            seq = self._count
            event = Event(seq, kind, payload)
            self._events.append(event)
            self._total += len(payload)
            self._ends.append(self._total)
            self._count = seq + 1
            if kind != protocol.CHUNK:
                self.ended = True
                self.terminal = event
        finally:
            if lock is not None:
                lock.release()
        if self._total >= self._check_at:
            self.release()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.set()
        if self.on_emit is not None:
            self.on_emit(self)

    def emit_chunk(self, payload: str) -> None:
        self._emit(protocol.CHUNK, payload)

    def finish(self, output: Any) -> None:
        try:
            payload = protocol.encode(output)
        except (TypeError, ValueError):
            log.exception(
                "flow %s returned an output that is not JSON-serializable", self.stream_id
            )
            self.fail(protocol.INTERNAL_ERROR)
            return
        too_large = size_error("Output", payload, self.max_event_bytes, self.backend)
        if too_large is not None:
            log.error("stream %s: %s", self.stream_id, too_large.message)
            self.fail(too_large.to_dict())
            return
        self._emit(protocol.DONE, payload)

    def fail(self, body: dict[str, Any]) -> None:
        self._emit(protocol.ERROR, protocol.encode(fit_error(body, self.max_event_bytes)))

    def abort(self, body: dict[str, Any]) -> bool:
        """End the run with ``body`` (storage refused an event) and stop the flow.

        False if the run had already ended.
        """
        self.ctx._request_cancel()
        try:
            self.fail(body)
        except StreamClosed:
            return False
        return True

    # -- storage ---------------------------------------------------------------
    def expect_storage(self) -> None:
        """Keep every event until :meth:`mark_stored` says storage has it."""
        self._stored = 0

    def mark_stored(self, next_seq: int) -> None:
        """Storage has every event below ``next_seq`` (``sys.maxsize``: needs none)."""
        self._stored = next_seq

    def release_storage(self) -> None:
        """Storage will take no more events of this run: keep none for it."""
        self._stored = _EVERYTHING
        self.release()

    def since(self, seq: int, max_bytes: int | None = None) -> list[Event]:
        """Events from ``seq`` on, at most ``max_bytes`` of payload (at least one event)."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            start = seq - self._base
            if start < 0:
                raise LookupError(f"event {seq} of stream {self.stream_id} was released")
            if max_bytes is None or start >= len(self._ends):
                return self._events[start:]
            floor = self._ends[start - 1] if start else self._trimmed_bytes
            stop = bisect.bisect_right(self._ends, floor + max_bytes, lo=start)
            return self._events[start : max(stop, start + 1)]
        finally:
            if lock is not None:
                lock.release()

    # -- memory ----------------------------------------------------------------
    def _check_step(self) -> int:
        limit = self.buffer_limit or DEFAULT_BUFFER_LIMIT
        return self._total + max(limit // 4, 64 * 1024)

    def release(self) -> None:
        """Detach readers that lag more than the limit; drop events nobody needs any more."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            self._check_at = self._check_step()
            dropped = self._drop_slow_readers()
            low = min([self._stored, self._count, *(r.cursor for r in self._readers)])
            cut = low - self._base
            # Small releases are not worth a list copy: a short run keeps its events.
            if cut > 0 and self._ends[cut - 1] - self._trimmed_bytes >= RELEASE_MIN_BYTES:
                self._trimmed_bytes = self._ends[cut - 1]
                del self._events[:cut]
                del self._ends[:cut]
                self._base = low
        finally:
            if lock is not None:
                lock.release()
        for reader in dropped:
            if reader.on_drop is not None:
                try:
                    reader.on_drop()
                except Exception:  # pragma: no cover - closing must not hurt the flow
                    log.exception("closing a slow reader's connection failed")

    def _drop_slow_readers(self) -> list[LiveReader]:
        limit = self.buffer_limit
        if limit is None or not self._readers:
            return []
        slow = [r for r in self._readers if self._total - self._bytes_before(r.cursor) > limit]
        for reader in slow:
            reader.dropped = True
            self._readers.remove(reader)
            log.warning(
                "stream %s: a live reader fell more than %d bytes behind; closing its"
                " connection (it can resume from storage)",
                self.stream_id,
                limit,
            )
        return slow

    def _bytes_before(self, seq: int) -> int:
        index = seq - self._base
        if index <= 0:
            return self._trimmed_bytes
        return self._ends[min(index, len(self._ends)) - 1]

    # -- the reader side -------------------------------------------------------
    def wait_for(self, count: int, timeout: float | None = None) -> bool:
        """Block until more than ``count`` events exist (or timeout); True if they do.

        Returns at once when the run has ended, whatever the count.
        """
        if self._count > count or self.ended:
            return self._count > count
        waiter = threading.Event()
        self._waiters.append(waiter)
        if self._count > count or self.ended:  # emitted while we registered
            return self._count > count
        waiter.wait(timeout)
        return self._count > count

    def attach(self, after: int = -1) -> LiveReader:
        """A live reader from ``after + 1`` on: events it has not read are kept for it."""
        reader = LiveReader(after + 1, None)
        if reader.cursor < self._base:
            raise LookupError(f"events of stream {self.stream_id} were released")
        self._readers.append(reader)
        return reader

    def batches(
        self,
        after: int = -1,
        *,
        reader: LiveReader | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> Iterator[list[Event]]:
        """Everything after ``after`` as it arrives: all that is ready, in bounded batches.

        ``reader`` is one from :meth:`attach` (taken when the run started, so no
        event can be released before the reader arrives). Ends without a terminal
        event when the reader fell too far behind, after ``on_drop`` was called to
        close its connection.
        """
        if reader is None:
            reader = self.attach(after)
        reader.on_drop = on_drop
        try:
            while not reader.dropped:
                if not self.wait_for(reader.cursor, None):
                    return  # ended, and the caller already has the terminal event
                if reader.dropped:
                    return
                batch = self.since(reader.cursor, READ_BATCH_BYTES)
                reader.cursor += len(batch)
                yield batch
                if batch[-1].terminal:
                    return
        finally:
            if reader in self._readers:
                self._readers.remove(reader)

    def wait(self, timeout: float | None = None) -> Event | None:
        """Block until the terminal event (or timeout); return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.wait_for(self._count, remaining)
        return self.terminal


_malloc_trim: Any = None


def release_memory() -> None:
    """Ask glibc to give freed heap memory back to the OS (a no-op elsewhere).

    CPython frees a long stream's events, but glibc keeps the freed pages of
    its arenas for reuse, so the worker's RSS would stay at its peak after one
    large run. ``malloc_trim(0)`` returns them; it costs a few milliseconds on
    a large heap, so the runner calls it only after a run of several MiB ends.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_trim = libc.malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _malloc_trim:
        _malloc_trim(0)


def fit_error(body: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """``body``, made small enough to store: without ``details``, then with a shorter message."""
    if limit is None or len(protocol.encode(body).encode()) <= limit:
        return body
    body = {k: v for k, v in body.items() if k != "details"}
    message = str(body.get("message", ""))
    while len(protocol.encode(body).encode()) > limit and message:
        excess = len(protocol.encode(body).encode()) - limit
        message = message[: max(0, len(message) - max(excess, 16) - 1)]
        body["message"] = message + "…" if message else ""
    return body


__all__ = ["DEFAULT_BUFFER_LIMIT", "LiveReader", "Run", "fit_error", "release_memory"]
