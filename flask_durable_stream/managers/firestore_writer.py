"""The Firestore producer: events are coalesced for ``linger`` seconds, then committed.

``append`` puts events in the writer's buffer and returns; a flusher task
(spawned through the manager's :class:`TaskGroup`, only while something is
buffered) commits the buffer ``linger`` seconds after its oldest event arrived.
Three things flush at once, in the caller: a terminal event, a buffer past
``batch_bytes``, and a previous flush that failed. Nothing is dropped on a
failure: the buffer is kept, the next ``append`` (the runner's retry of the same
events, or its next events) commits it again and raises
:class:`StorageUnavailable` until that works, and ``close()`` flushes what is
left. Retries are idempotent because batch documents are *created*: a retry
of a commit that did land fails with ALREADY_EXISTS and is reconciled by
reading back what is stored (:meth:`.FirestoreStore.append`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .._concurrency import Task, TaskGroup
from ..exceptions import StreamClosed, StreamError
from .base import Event, StreamWriter, check_event_sizes
from .firestore_io import event_bytes
from .firestore_store import FirestoreStore


@dataclass(frozen=True)
class WriterOptions:
    """What a writer takes from its manager: limits, batching, and where to spawn flushes."""

    tasks: TaskGroup
    linger: float
    batch_bytes: int
    rpc_timeout: float
    lease_seconds: float
    max_event_bytes: int | None
    backend: str


class FirestoreStreamWriter(StreamWriter):
    def __init__(self, store: FirestoreStore, stream_id: str, options: WriterOptions) -> None:
        super().__init__(stream_id)
        self._store = store
        self._options = options
        self._state = threading.Lock()  # guards the fields below; never held across an RPC
        self._commit_lock = threading.Lock()  # one commit in flight, so batches land in order
        self._buffer: list[Event] = []
        self._buffered_bytes = 0
        self._oldest_at = 0.0  # monotonic arrival time of the buffer's oldest event
        self._accepted = -1  # highest seq taken into the buffer
        self._stored = -1  # highest seq known to be committed
        self._failed: StreamError | None = None
        self._ended: str | None = None  # why this writer may no longer write
        self._flusher: Task | None = None
        self._alive_at = time.time()  # last heartbeat or commit: what subscribers' lease sees

    # -- producing -----------------------------------------------------------
    def store(self, events: Sequence[Event]) -> None:
        # Before anything is buffered: an event no document can hold is a permanent
        # error for this call, and the stream stays writable at the same seq.
        check_event_sizes(events, self._options.max_event_bytes, self._options.backend)
        self._check_lease()
        with self._state:
            self._raise_if_ended()
            for event in events:
                self._take(event)
            if events[-1].terminal and self._accepted > events[-1].seq:
                # A terminal event replacing buffered ones (the runner giving up on a
                # batch and ending the stream instead): nothing may follow it.
                del self._buffer[events[-1].seq - self._buffer[0].seq + 1 :]
                self._buffered_bytes = sum(map(event_bytes, self._buffer))
                self._accepted = events[-1].seq
            urgent = (
                events[-1].terminal
                or self._buffered_bytes >= self._options.batch_bytes
                or self._failed is not None
            )
            if not urgent and self._buffer and self._flusher is None:
                self._flusher = self._options.tasks.spawn(
                    self._linger_then_flush, name=f"durable-stream-flush-{self.stream_id}"
                )
        if urgent:
            self._flush()

    def _take(self, event: Event) -> None:
        # Called with _state held. A retry may resend events already taken: events
        # still buffered are replaced (the caller's latest word wins), stored ones skipped.
        if event.seq <= self._stored:
            return
        if event.seq <= self._accepted:
            index = event.seq - self._buffer[0].seq
            self._buffered_bytes += event_bytes(event) - event_bytes(self._buffer[index])
            self._buffer[index] = event
            return
        if event.seq != self._accepted + 1:
            raise ValueError(f"expected seq {self._accepted + 1}, got {event.seq}")
        if not self._buffer:
            self._oldest_at = time.monotonic()
        self._buffer.append(event)
        self._buffered_bytes += event_bytes(event)
        self._accepted = event.seq

    def _raise_if_ended(self) -> None:
        if self._ended is not None:
            raise StreamClosed(self._ended)

    def _check_lease(self) -> None:
        """A producer late on its heartbeats may have been declared lost: ask before writing."""
        if time.time() - self._alive_at <= self._options.lease_seconds:
            return
        if self._beat() is None:
            with self._state:
                self._ended = f"stream {self.stream_id} already ended (producer lease expired)"
            raise StreamClosed(self._ended)

    def _linger_then_flush(self) -> None:
        while True:
            with self._state:
                if not self._buffer or self._failed is not None or self._ended:
                    self._flusher = None
                    return
                wait = self._oldest_at + self._options.linger - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # cooperative under gevent
                continue
            try:
                self._flush()
            except StreamError:
                pass  # recorded in _failed / _ended; the producer's next call sees it

    def _flush(self) -> None:
        with self._commit_lock:
            with self._state:
                self._raise_if_ended()
                pending = list(self._buffer)
            if not pending:
                return
            started = time.monotonic()
            try:
                stored = self._store.append(self.stream_id, pending, self._options.batch_bytes)
            except StreamClosed as exc:
                with self._state:
                    self._ended = exc.message
                raise
            except StreamError as exc:
                with self._state:
                    self._failed = exc
                raise
            with self._state:
                done = sum(1 for e in self._buffer if e.seq <= stored)
                del self._buffer[:done]
                self._buffered_bytes = sum(map(event_bytes, self._buffer))
                self._stored = max(self._stored, stored)
                self._failed = None
                self._alive_at = time.time()
                self._oldest_at = started  # later events arrived after the commit began

    # -- liveness ------------------------------------------------------------
    def _beat(self) -> bool | None:
        """Write the heartbeat; the cancel flag, or None if the stream ended."""
        beat = self._store.heartbeat(self.stream_id, self._stored)
        if beat is None:
            return None
        cancel, self._alive_at = beat
        return cancel

    def heartbeat(self) -> bool:
        # The heartbeat first: a producer whose commits fail is still alive, and
        # readers must not declare it lost while it retries.
        state = self._beat()
        if state is None:  # ended by someone else: the producer should stop
            with self._state:
                self._ended = self._ended or f"stream {self.stream_id} already ended"
            return True
        with self._state:
            retry = bool(self._buffer) and self._failed is not None and self._ended is None
        if retry:  # a lingering flush failed and no append came since: try it again
            try:
                self._flush()
            except StreamError:
                pass  # recorded in _failed / _ended; the producer's next call sees it
        return state

    @property
    def stored_seq(self) -> int:
        return self._stored

    def close(self) -> None:
        """Flush what is buffered (raising StorageUnavailable if that fails)."""
        with self._state:
            pending = bool(self._buffer) and self._ended is None
            flusher = self._flusher
        try:
            if pending:
                self._flush()
        finally:
            if flusher is not None:
                flusher.join(self._options.linger + self._options.rpc_timeout)
