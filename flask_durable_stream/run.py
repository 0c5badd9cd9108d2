"""A run: one execution of a flow, as seen by the process that runs it.

The flow appends events; live readers (the HTTP response that started the run)
follow them with their own cursor, and the run's writer copies them to storage.
Memory is bounded by what still has a use: an event is dropped once storage
has it and every attached live reader has passed it. A live reader that falls
more than ``buffer_limit`` bytes behind and takes nothing for ``reader_grace``
seconds (a client that stopped reading) is detached and its connection closed,
so one silent client cannot make the process hold a whole long stream; it can
reconnect and replay from storage. One that still reads makes the flow wait.
Events not yet stored are kept: storage that is down is retried for
``write_retry_timeout`` with the events in memory. Storage that works but is
slower than the flow makes the flow wait once it is ``STORAGE_BACKLOG_BYTES``
ahead, so a fast flow cannot pile up a long stream in memory either.

At ~510 lines this module is over the project's ~400: :class:`Run` is one lock-free state
machine (events, cursors, memory bounds, waiting) whose methods read each other's invariants;
split across modules it would be harder to check, not easier. The live fast path's side of it
(the sink handed each event, the deferred burst callback, detaching a reader) is here for the
same reason; the sink itself is in :mod:`._direct`.
"""

from __future__ import annotations

import bisect
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import protocol
from ._concurrency import gevent_patched
from .exceptions import StreamClosed
from .flows import FlowContext, fit_error
from .managers.base import Event, new_tuple
from .managers.common import event_size_error

if TYPE_CHECKING:
    from ._direct import DirectSink

log = logging.getLogger("flask_durable_stream")

#: Default bound on how far (bytes of event payloads) a live reader may lag behind.
DEFAULT_BUFFER_LIMIT = 2 * 1024 * 1024
#: A reader takes at most this many payload bytes in one batch (one socket write).
READ_BATCH_BYTES = 256 * 1024
#: Seconds a live reader past the buffer bound may go without taking events before it is
#: dropped (a reader that keeps taking them makes the flow wait instead). Counted from the
#: moment it fell behind, never from its last batch: a reader that was idle because the
#: flow was quiet is not a slow reader. Generous, because a loaded machine may not
#: schedule a healthy reader for a while, and the flow waits meanwhile (memory stays bounded).
READER_GRACE = 5.0
#: A flow this far ahead of working storage waits for it (not while storage is failing).
STORAGE_BACKLOG_BYTES = 8 * 1024 * 1024
#: Events are released in steps of at least this many payload bytes, or of events, once
#: stored: a stream of small chunks (an LLM's) lets its stored and sent events go as it
#: runs instead of holding them all to its end (some 150 bytes each beyond the payload).
RELEASE_MIN_BYTES = 64 * 1024
RELEASE_MIN_EVENTS = 4
#: Sequence numbers below this are "stored" for a run that has no storage.
_EVERYTHING = sys.maxsize


class LiveReader:
    """A live reader's cursor. ``dropped`` once it fell too far behind."""

    __slots__ = ("cursor", "dropped", "on_drop", "on_detach", "moved_at", "behind_since")

    def __init__(self, cursor: int, on_drop: Callable[[], None] | None) -> None:
        self.cursor = cursor
        self.dropped = False
        self.on_drop = on_drop
        #: Called once, when the run lets go of this reader (:meth:`Run.detach`).
        self.on_detach: Callable[[], None] | None = None
        self.moved_at = time.monotonic()
        self.behind_since: float | None = None  # when it was first seen past the bound

    def stalled_since(self, now: float) -> float:
        """Since when this reader (past the bound) has taken nothing."""
        if self.behind_since is None:
            self.behind_since = now
        return max(self.moved_at, self.behind_since)


class Run:
    """The events of one run, in a window that starts at the oldest one still needed.

    Emitting is the hot path (once per chunk): an append and, only when somebody
    is waiting, a wake-up. Under gevent greenlets never preempt each other, so no
    lock is needed; with real threads (``flask run``) a plain lock keeps sequence
    numbers unique. Slots and Events made only when a flow has to wait: a worker
    holds thousands of runs at once.
    """

    __slots__ = (
        "stream_id", "ctx", "ended", "durable_failed", "terminal", "on_emit", "live", "sink",
        "_deferred", "_turn", "_loop", "buffer_limit", "reader_grace", "_reader_progress",
        "_pacing", "max_event_bytes", "backend", "_events", "_ends", "_base", "count",
        "total_bytes", "_trimmed_bytes", "_stored", "storage_failing", "_progress", "_readers",
        "_waiters", "_check_at", "cooperative", "_lock", "pending", "run_now", "store_held",
        "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        stream_id: str,
        ctx: FlowContext,
        *,
        buffer_limit: int | None = DEFAULT_BUFFER_LIMIT,
        max_event_bytes: int | None = None,
        backend: str = "storage",
        reader_grace: float = READER_GRACE,
    ) -> None:
        self.stream_id = stream_id
        self.ctx = ctx
        self.ended = False
        self.durable_failed = False
        self.terminal: Event | None = None
        self.on_emit: Callable[[Run], None] | None = None  # called after every event
        self.live: LiveReader | None = None  # the reader attached when the run started
        self.sink: DirectSink | None = None  # the live reader's fast path (see _direct)
        #: The flow, while nobody has started it yet (see :meth:`claim`).
        self.pending: Callable[[], None] | None = None
        #: With ``pending``: starts a claimed flow in a task of its own at once (see _direct).
        self.run_now: Callable[[Callable[[], None]], None] | None = None
        #: Stores at once the events the writer holds back, if any (see RunWriter).
        self.store_held: Callable[[], None] | None = None
        self._deferred: list[Callable[[], None]] = []
        self._turn = 0.0  # the loop's time at the last action run at once (see defer)
        self._loop: Any = None  # the hub's loop, once an action was deferred
        self.buffer_limit = buffer_limit
        self.reader_grace = reader_grace
        # A reader took a batch (wakes a pacing flow); made when a flow first paces.
        self._reader_progress: threading.Event | None = None
        self._pacing = False
        self.max_event_bytes = max_event_bytes
        self.backend = backend
        self._events: list[Event] = []
        self._ends: list[int] = []  # cumulative payload bytes at the end of each event
        self._base = 0  # seq of _events[0]
        #: Events emitted so far (the next event's seq), and their payload bytes: plain
        #: attributes, not properties, read for every event; only the run sets them.
        self.count = 0
        self.total_bytes = 0
        self._trimmed_bytes = 0  # payload bytes before _base
        self._stored = _EVERYTHING  # events below this seq are in storage (or need none)
        self.storage_failing = False  # set by the writer while it retries
        # Storage took more events (wakes a waiting flow); made when a flow first waits.
        self._progress: threading.Event | None = None
        self._readers: list[LiveReader] = []
        self._waiters: list[threading.Event] = []
        self._check_at = self._check_step()
        # Greenlets of one hub (no preemption), or real threads: decided once per run.
        self.cooperative = gevent_patched()
        self._lock = None if self.cooperative else threading.Lock()
        # emit_chunk without its own call: this is every chunk's path.
        ctx._emit = functools.partial(self._emit, protocol.CHUNK)
        ctx._max_event_bytes = max_event_bytes
        ctx._backend = backend

    # -- the producer side -----------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events held now: all of them until storage and readers let some go."""
        return list(self._events)

    @property
    def held_bytes(self) -> int:
        """Payload bytes this run keeps in memory now."""
        return self.total_bytes - self._trimmed_bytes

    def _emit(self, kind: str, payload: str) -> None:
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if self.ended:
                raise StreamClosed(f"stream {self.stream_id} already ended")
            seq = self.count
            event = new_tuple(Event, (seq, kind, payload))
            self._events.append(event)
            self.total_bytes += len(payload)
            self._ends.append(self.total_bytes)
            self.count = seq + 1
            if kind != protocol.CHUNK:
                self.ended = True
                self.terminal = event
        finally:
            if lock is not None:
                lock.release()
        sink = self.sink
        if sink is not None and sink.armed:  # the live reader is caught up (see _direct)
            sink.emitted(event)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.set()
        if self.on_emit is not None:
            self.on_emit(self)
        if self.total_bytes >= self._check_at and kind == protocol.CHUNK:
            # Last: readers and the writer must know of this event before the flow
            # waits for them. Only the flow's own chunks may wait: a terminal event can
            # come from the writer's task (abort) or a shutdown, never waiting on itself.
            self._check_memory()

    def claim(self) -> Callable[[], None] | None:
        """The flow's body, to run in the calling greenlet, if it has not started yet.

        A live response claims it (see _direct) and runs the flow in its own
        greenlet; unclaimed, the runner starts it in one of its own at the hub's
        next turn. Either way it runs exactly once.
        """
        body, self.pending = self.pending, None
        return body

    def defer(self, action: Callable[[], None]) -> None:
        """Under gevent, ``action`` (sending, storing) for the event just emitted: at once
        for the first event of a turn of the hub's loop, else once the emitting task
        yields, when one hub callback does the work of the rest of the burst.

        An LLM-paced flow emits one event per turn (it sleeps between two), and a hub
        callback waits behind every callback queued before it: while a worker takes a
        storm of new requests, each a greenlet started by a callback, that can be long.
        A flow that emits many events without yielding still costs one action for all
        but the first.
        """
        deferred = self._deferred
        if not deferred:
            loop = self._loop
            if loop is None:
                import gevent

                loop = self._loop = gevent.get_hub().loop
            now = loop.now()
            if now != self._turn:
                self._turn = now
                try:
                    action()
                except Exception:  # pragma: no cover - as in _run_deferred
                    log.exception("stream %s: an action failed", self.stream_id)
                return
            loop.run_callback(self._run_deferred)
        deferred.append(action)

    def after_yield(self, action: Callable[[], None]) -> None:
        """Under gevent, ``action`` once the emitting task yields: in the one hub callback
        that runs the burst's deferred actions (see :meth:`defer`), never at once."""
        deferred = self._deferred
        if not deferred:
            loop = self._loop
            if loop is None:
                import gevent

                loop = self._loop = gevent.get_hub().loop
            loop.run_callback(self._run_deferred)
        deferred.append(action)

    def _run_deferred(self) -> None:
        actions, self._deferred = self._deferred, []
        for action in actions:
            try:
                action()
            except Exception:  # pragma: no cover - one action's bug must not skip the store
                log.exception("stream %s: a deferred action failed", self.stream_id)

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
        too_large = event_size_error("Output", payload, self.max_event_bytes, self.backend)
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
        if RELEASE_MIN_EVENTS <= next_seq - self._base and next_seq != _EVERYTHING:
            self._release()
        progress = self._progress
        if progress is not None:
            progress.set()

    def storage_backlog(self) -> int:
        """Payload bytes emitted but not yet stored."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if self._stored == _EVERYTHING:
                return 0
            return self.total_bytes - self._bytes_before(min(self._stored, self.count))
        finally:
            if lock is not None:
                lock.release()

    def _wait_for_storage(self) -> None:
        """Make the flow wait while it is far ahead of storage that is working.

        While storage is failing the events wait in memory instead (the live
        readers keep getting them); the writer gives up after its retry timeout.
        """
        waited = False
        while not self.storage_failing and self.storage_backlog() > STORAGE_BACKLOG_BYTES:
            progress = self._progress
            if progress is None:
                progress = self._progress = threading.Event()
            progress.clear()
            if self.storage_backlog() <= STORAGE_BACKLOG_BYTES:
                break
            progress.wait(1.0)  # re-checks storage_failing at least once a second
            waited = True
        if waited:
            self.release()

    def release_storage(self) -> None:
        """Storage will take no more events of this run: keep none for it."""
        self.mark_stored(_EVERYTHING)
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
            if max_bytes is None or start >= len(self._ends) - 1:  # all, or one at most
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
        return self.total_bytes + max(limit // 4, 64 * 1024)

    def _check_memory(self) -> None:
        """Every few hundred KiB emitted: release, pace or drop readers, wait for storage."""
        can_wait = _may_block(self.cooperative)
        if self.store_held is not None:
            self.store_held()  # up to an interval of a fast flow's output
        self.release()
        if self._readers and self.buffer_limit is not None:
            self._keep_pace(self.buffer_limit, can_wait)
        if can_wait:
            self._wait_for_storage()

    def release(self) -> None:
        """Drop the events that storage has and every live reader has passed."""
        self._check_at = self._check_step()
        self._release()

    def _release(self) -> None:
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            low = min([self._stored, self.count, *(r.cursor for r in self._readers)])
            cut = low - self._base
            # Tiny releases are not worth a list copy each: events go in steps.
            if cut > 0 and (
                cut >= RELEASE_MIN_EVENTS
                or self._ends[cut - 1] - self._trimmed_bytes >= RELEASE_MIN_BYTES
            ):
                self._trimmed_bytes = self._ends[cut - 1]
                del self._events[:cut]
                del self._ends[:cut]
                self._base = low
        finally:
            if lock is not None:
                lock.release()

    def _keep_pace(self, limit: int, can_wait: bool) -> None:
        """Readers more than ``limit`` behind get ``reader_grace`` seconds to move; else dropped.

        A reader that moves (a client that reads, just slower than the flow) makes
        the flow wait for it; one that does not (a client that stopped reading,
        its task blocked on a full socket) is detached and its connection closed.
        """
        while True:
            now = time.monotonic()
            slow = []
            for reader in self._readers:
                if self.total_bytes - self._bytes_before(reader.cursor) > limit:
                    slow.append(reader)
                else:
                    reader.behind_since = None
            if not slow:
                return
            stuck = [r for r in slow if now - r.stalled_since(now) >= self.reader_grace]
            if stuck:
                self._drop(stuck, limit)
                continue
            if not can_wait:
                return
            progress = self._reader_progress
            if progress is None:
                progress = self._reader_progress = threading.Event()
            self._pacing = True
            progress.clear()
            first = min(r.stalled_since(now) for r in slow)
            progress.wait(first + self.reader_grace - now)
            self._pacing = False

    def _drop(self, readers: list[LiveReader], limit: int) -> None:
        for reader in readers:
            reader.dropped = True
            self._readers.remove(reader)
            log.warning(
                "stream %s: a live client stopped reading %d bytes behind; closing its"
                " connection (it can resume from storage)",
                self.stream_id,
                limit,
            )
            if reader.on_drop is not None:
                try:
                    reader.on_drop()
                except Exception:  # pragma: no cover - closing must not hurt the flow
                    log.exception("closing a slow reader's connection failed")
        self.release()

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
        if self.count > count or self.ended:
            return self.count > count
        waiter = threading.Event()
        self._waiters.append(waiter)
        if self.count > count or self.ended:  # emitted while we registered
            return self.count > count
        waiter.wait(timeout)
        return self.count > count

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
        sink = self.sink
        if sink is None or not sink.owns_connection:  # else the sink cuts its own connection
            reader.on_drop = on_drop
        try:
            if sink is not None and sink.reader is reader:  # the live fast path (see _direct)
                if not sink.serve():
                    if sink.owns_connection:  # the sink sends the rest, and lets go of it
                        reader = None
                    return  # the client went away, or the sink took it over; the flow goes on
            while not reader.dropped:
                if not self.wait_for(reader.cursor, None):
                    return  # ended, and the caller already has the terminal event
                if reader.dropped:
                    return
                try:
                    batch = self.read(reader, READ_BATCH_BYTES)
                except LookupError:  # dropped (by another thread) and released meanwhile
                    if reader.dropped:
                        return
                    raise
                yield batch
                if batch[-1].terminal:
                    return
        finally:
            if reader is not None:
                self.detach(reader)

    def read(self, reader: LiveReader, max_bytes: int | None) -> list[Event]:
        """The events at ``reader``'s cursor (up to ``max_bytes``; None: all of them), moving
        the cursor past them."""
        batch = self.since(reader.cursor, max_bytes)
        self.passed(reader, len(batch))
        return batch

    def passed(self, reader: LiveReader, taken: int) -> None:
        """``reader`` took the ``taken`` events at its cursor: move the cursor past them."""
        reader.cursor += taken
        reader.moved_at = time.monotonic()
        if self._pacing:  # see reader_moved
            self.reader_moved()

    def reader_moved(self) -> None:
        """A live reader took events: a flow waiting for it goes on."""
        progress = self._reader_progress
        if self._pacing and progress is not None:
            progress.set()

    def detach(self, reader: LiveReader) -> None:
        """Keep nothing more for ``reader`` (its client is gone)."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if reader in self._readers:
                self._readers.remove(reader)
        finally:
            if lock is not None:
                lock.release()
        hook, reader.on_detach = reader.on_detach, None
        if hook is not None:
            hook()

    def wait(self, timeout: float | None = None) -> Event | None:
        """Block until the terminal event (or timeout); return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.wait_for(self.count, remaining)
        return self.terminal


def _may_block(cooperative: bool) -> bool:
    """False in gevent's hub, where nothing may wait (every emitter is a greenlet now)."""
    if not cooperative:
        return True
    import gevent

    return gevent.getcurrent() is not gevent.get_hub()


__all__ = ["DEFAULT_BUFFER_LIMIT", "LiveReader", "Run"]
