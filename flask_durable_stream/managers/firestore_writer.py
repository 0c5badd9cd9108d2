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
reading back what is stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._concurrency import Task
from .._retry import Backoff
from ..exceptions import (
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
)
from .base import Event, StreamWriter, check_event_sizes, status_after
from .firestore_io import (
    COMMIT_DOCS,
    COMMIT_WIRE_BYTES,
    DOC_EVENTS,
    at,
    batch_id,
    edge,
    event_bytes,
    request_bytes,
    wire_bytes,
)

if TYPE_CHECKING:
    from .firestore import FirestoreStreamManager


class FirestoreStreamWriter(StreamWriter):
    def __init__(self, manager: FirestoreStreamManager, stream_id: str) -> None:
        super().__init__(stream_id)
        self._manager = manager
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
    def _append(self, events: Sequence[Event]) -> None:
        # Before anything is buffered: an event no document can hold is a permanent
        # error for this call, and the stream stays writable at the same seq.
        check_event_sizes(events, self._manager.max_event_bytes, self._manager.display_name)
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
                or self._buffered_bytes >= self._manager.batch_bytes
                or self._failed is not None
            )
            if not urgent and self._buffer and self._flusher is None:
                self._flusher = self._manager._tasks.spawn(
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
        if time.time() - self._alive_at <= self._manager.lease_seconds:
            return
        if self._manager._write_heartbeat(self) is None:
            with self._state:
                self._ended = f"stream {self.stream_id} already ended (producer lease expired)"
            raise StreamClosed(self._ended)

    def _linger_then_flush(self) -> None:
        while True:
            with self._state:
                if not self._buffer or self._failed is not None or self._ended:
                    self._flusher = None
                    return
                wait = self._oldest_at + self._manager.linger - time.monotonic()
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
                stored = store_events(self._manager, self.stream_id, pending)
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
    def heartbeat(self) -> bool:
        # The heartbeat first: a producer whose commits fail is still alive, and
        # readers must not declare it lost while it retries.
        state = self._manager._write_heartbeat(self)
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
                flusher.join(self._manager.linger + self._manager.rpc_timeout)


# -- storage ------------------------------------------------------------------
def store_events(manager: FirestoreStreamManager, stream_id: str, events: list[Event]) -> int:
    """Commit contiguous events as new batch documents; return the last stored seq.

    Large buffers take several commits, each under gRPC's message limit and
    Firestore's write count. Document boundaries depend only on the events, and
    documents are *created*, so a retry after any failure (even of a commit
    that landed unseen) meets ALREADY_EXISTS and is reconciled by reading back.
    """
    stored = events[0].seq - 1 if events else -1
    docs = split(events, manager.batch_bytes)
    while docs:
        count = _commit_size(docs)
        while True:
            write = _batch_write(manager, stream_id, docs[:count])
            if count == 1 or request_bytes(write) <= COMMIT_WIRE_BYTES:
                break
            count = max(1, count // 2)  # the estimate was short: never send an oversized request
        try:
            _commit(manager, write, f"append to stream {stream_id}")
            stored = docs[count - 1][0][-1].seq
            docs = docs[count:]
        except StreamExists:  # a retry of a commit that landed, or someone else wrote
            stored = _reconcile(manager, stream_id, events)
            docs = split([e for e in events if e.seq > stored], manager.batch_bytes)
        except StreamNotFound:
            raise StreamClosed(f"stream {stream_id} no longer exists") from None
    return stored


def _commit_size(docs: list[tuple[list[Event], int]]) -> int:
    """How many of ``docs`` go in the next commit (at least one)."""
    size = 0
    for count, (part, _) in enumerate(docs):
        size += sum(map(wire_bytes, part)) + 256  # the document's name and other fields
        if count and (size > COMMIT_WIRE_BYTES or count >= COMMIT_DOCS):
            return count
    return len(docs)


def _batch_write(
    manager: FirestoreStreamManager, stream_id: str, docs: list[tuple[list[Event], int]]
) -> Any:
    batches = manager._batches_ref(stream_id)
    now = manager.now()
    expires = at(now + manager.ttl_seconds + manager.max_stream_seconds)
    write = manager.client.batch()
    for part, _ in docs:
        write.create(
            batches.document(batch_id(part[0].seq)),
            {
                "first_seq": part[0].seq,
                "last_seq": part[-1].seq,
                "events": [{"seq": e.seq, "kind": e.kind, "payload": e.payload} for e in part],
                "expiresAt": expires,
            },
        )
    last = docs[-1][0][-1]
    if last.terminal:
        write.update(
            manager._meta_ref(stream_id),
            {
                "status": status_after(last).value,
                "last_seq": last.seq,
                "updatedAt": at(now),
                "heartbeatAt": at(now),
                "expiresAt": at(now + manager.ttl_seconds),
            },
        )
    return write


#: Quick retries of a commit that failed transiently (the runner retries longer).
COMMIT_ATTEMPTS = 3
_QUICK = Backoff(initial=0.05, maximum=0.5)


def _commit(manager: FirestoreStreamManager, write: Any, what: str) -> None:
    """Commit, retrying a transient failure a few times: creates are idempotent
    (a retry of a commit that did land gets ALREADY_EXISTS and is reconciled)."""
    delays = _QUICK.delays()
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            with edge(what):
                write.commit(retry=None, timeout=manager.rpc_timeout)
            return
        except StorageUnavailable:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(next(delays))


def split(events: list[Event], batch_bytes: int) -> list[tuple[list[Event], int]]:
    """Events per batch document, with each document's size.

    Greedy, so the split of a prefix is a prefix of the split: a retry with
    more events buffered recreates the same first documents.
    """
    docs: list[tuple[list[Event], int]] = []
    current: list[Event] = []
    size = 0
    for event in events:
        n = event_bytes(event)
        if current and (size + n > batch_bytes or len(current) >= DOC_EVENTS):
            docs.append((current, size))
            current, size = [], 0
        current.append(event)
        size += n
    if current:
        docs.append((current, size))
    return docs


def _reconcile(manager: FirestoreStreamManager, stream_id: str, events: list[Event]) -> int:
    """How far ``events`` are already stored, identically; StreamClosed if they differ."""
    stored = events[0].seq - 1
    mine = {e.seq: e for e in events}
    for event in manager._stored_events(stream_id, events[0].seq - 1):
        if event.seq not in mine:
            break
        if mine[event.seq] != event:
            raise StreamClosed(f"stream {stream_id} already ended")
        stored = event.seq
    if stored < events[0].seq:
        raise StreamClosed(f"stream {stream_id} already ended")
    return stored
