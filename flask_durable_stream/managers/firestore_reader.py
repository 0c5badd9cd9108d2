"""The Firestore subscriber: replay stored batches, then follow two listeners.

One ``on_snapshot`` listener watches the batches with ``last_seq`` past the
subscriber's cursor, another the metadata document (heartbeats, status). Their
callbacks run on the client library's own threads (greenlets once gevent has
patched ``threading``), so they only hand snapshots over through an
:class:`Inbox`; everything else happens in the subscriber's own thread or
greenlet. Events are deduplicated by seq and emitted strictly in order, so the
replay/listen boundary has no gap and no duplicate. A listener's result set
grows with every batch, so after ``reanchor_docs`` documents it is replaced by
one starting at the cursor. Both listeners are closed when the generator
finishes or is closed.

A listener whose connection fails re-opens it after a growing delay, and not at
all once it is closed (see :class:`Listener`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._concurrency import Inbox
from .._retry import Backoff
from ..exceptions import StorageUnavailable, StreamNotFound, StreamTimeout
from .base import Event, StreamStatus
from .firestore_io import events_of, seconds
from .firestore_store import FirestoreStore

log = logging.getLogger("flask_durable_stream")

#: Documents a batch listener may accumulate before it is replaced by a fresh one.
REANCHOR_DOCS = 64


#: Delays before a failed listener re-opens its stream (a reset after a quiet minute).
REOPEN_BACKOFF = Backoff(initial=0.1, maximum=5.0)
REOPEN_RESET = 60.0

#: Stored events handed to a reader at once (one HTTP write).
PAGE = 1000

#: Seconds an open stream may go without a new event before its subscriber reads the
#: stored batches once itself, in case a listener missed them (then once per period).
QUIET_READ = 5.0


def _pages(events: Iterator[Event]) -> Iterator[list[Event]]:
    """Stored events in lists of up to PAGE, ending at the terminal event."""
    page: list[Event] = []
    for event in events:
        page.append(event)
        if event.terminal or len(page) >= PAGE:
            yield page
            if event.terminal:
                return
            page = []
    if page:
        yield page


def follow(
    store: FirestoreStore, stream_id: str, meta: Any, after: int, timeout: float
) -> Iterator[list[Event]]:
    """The batches of ``stream_id`` past ``after``, live until its terminal event.

    ``meta``: its metadata document as just read (it exists and has not expired).
    """
    meta_ref = store.meta_ref(stream_id)
    cursor = after
    if meta.get("status") != StreamStatus.OPEN.value:
        # Finished: everything is stored, no listener needed.
        yield from _pages(store.stored_events(stream_id, cursor))
        return

    inbox = Inbox()
    watches: list[Listener] = []
    pending: dict[int, Event] = {}
    heartbeat_at = seconds(meta.get("heartbeatAt")) or 0.0
    written_at = 0.0  # server time of the newest batch seen: the producer was alive then
    anchored_docs = 0
    with store.producer_watches.watch(stream_id, store.lease_seconds) as watch:
        try:
            watches.append(
                Listener(meta_ref, lambda docs, changes, read_time: inbox.put(("meta", docs)))
            )
            for page in _pages(store.stored_events(stream_id, cursor)):
                yield page
                cursor = page[-1].seq
                if page[-1].terminal:
                    return
            watches.append(_listen(store, stream_id, cursor, inbox))
            last_activity = quiet_since = time.monotonic()
            status_open = True
            if watch.observe(heartbeat_at, store.now()) <= 0:  # readers before this one saw it end
                store.mark_lost(stream_id)  # the listeners then deliver the error event
            while True:
                wait = min(
                    timeout - (time.monotonic() - last_activity), store.lease_seconds / 2, 1.0
                )
                item = inbox.get(wait)
                if item is not None:
                    kind, docs = item
                    if kind == "meta":
                        if not docs or not docs[0].exists:
                            raise StreamNotFound(f"stream {stream_id} was deleted")
                        data = docs[0].to_dict()
                        beat = seconds(data.get("heartbeatAt")) or 0.0
                        if beat != heartbeat_at:
                            heartbeat_at = beat
                            last_activity = time.monotonic()
                        status_open = data.get("status") == StreamStatus.OPEN.value
                        if not status_open:  # the terminal event is stored: fetch it directly
                            for event in store.stored_events(stream_id, cursor):
                                pending[event.seq] = event
                            if not pending:
                                # Nothing stored past the cursor of an ended stream: the
                                # caller had the end, or is past it (its client had events
                                # their worker never stored). As every backend: done.
                                return
                    elif kind == "stored":  # read by this subscriber itself (below)
                        for event in docs:
                            if event.seq > cursor:
                                pending[event.seq] = event
                    else:
                        anchored_docs += len(docs)
                        for doc in docs:
                            written_at = max(written_at, doc.update_time.timestamp())
                            for event in events_of(doc.to_dict()):
                                if event.seq > cursor:
                                    pending[event.seq] = event
                    ready: list[Event] = []
                    while cursor + 1 in pending:
                        event = pending.pop(cursor + 1)
                        cursor = event.seq
                        ready.append(event)
                    if ready:
                        last_activity = quiet_since = time.monotonic()
                        yield ready
                        if ready[-1].terminal:
                            return
                    if anchored_docs >= REANCHOR_DOCS:
                        watches.pop().unsubscribe()
                        watches.append(_listen(store, stream_id, cursor, inbox))
                        anchored_docs = 0
                    continue
                if time.monotonic() - quiet_since >= QUIET_READ:
                    quiet_since = time.monotonic()
                    missed = _stored_after(store, stream_id, cursor)
                    if missed:
                        log.warning(
                            "Firestore listeners of stream %s missed stored events %d-%d;"
                            " read them, and listening anew",
                            stream_id,
                            missed[0].seq,
                            missed[-1].seq,
                        )
                        inbox.put(("stored", missed))
                        anchored_docs = (
                            REANCHOR_DOCS  # the batches' listener is replaced after them
                        )
                        continue
                if time.monotonic() - last_activity >= timeout:
                    raise StreamTimeout("Stream timed out.")
                alive_at = max(heartbeat_at, written_at)
                if status_open and watch.observe(alive_at, store.now()) <= 0:
                    store.mark_lost(stream_id)  # the listeners then deliver the error event
        finally:
            for listener in watches:
                listener.unsubscribe()


def _stored_after(store: FirestoreStore, stream_id: str, cursor: int) -> list[Event]:
    """The stored events past ``cursor``, or none while storage does not answer (the lease
    check is what reports an outage)."""
    try:
        return list(store.stored_events(stream_id, cursor))
    except StorageUnavailable:
        return []


def _listen(store: FirestoreStore, stream_id: str, cursor: int, inbox: Inbox) -> Listener:
    query = store.batches_after(stream_id, cursor)

    def on_snapshot(docs: list[Any], changes: list[Any], read_time: Any) -> None:
        inbox.put(("batches", [c.document for c in changes if c.type.name != "REMOVED"]))

    return Listener(query, on_snapshot)


class Listener:
    """``target.on_snapshot(callback)``, with the client library's re-open loop tamed.

    The library's listener re-opens a failed stream at once and forever, each
    attempt on a new thread of gRPC's, and does so even after ``unsubscribe()``
    while its consumer thread is inside that loop: with Firestore unreachable, threads
    pile up (greenlets spinning a core, under gevent) in every process that had a
    reader (``tests/test_firestore.py``, ``tests/chaos/test_storage_gone.py``). Here
    each re-open waits ``REOPEN_BACKOFF`` (interrupted by :meth:`unsubscribe`), and
    none happens once unsubscribed, so the consumer thread ends. Readers are not the ones to report
    the outage: their lease checks read storage and raise ``StorageUnavailable``.

    The library gives up for good on some errors: a stream the server cancels
    (``RST_STREAM`` with ``CANCEL``), a target the server removes. It then closes
    the listener and raises the error on a thread of its own, where nobody sees it,
    and no snapshot comes again. Here a listener so ended is replaced by a new one
    on the same target, after the same delays; its first snapshot holds everything
    the old one would have delivered, and the subscriber drops what it already has.
    """

    def __init__(self, target: Any, callback: Callable[..., None]) -> None:
        self._target = target
        self._callback = callback
        self._closed = threading.Event()
        self._lock = threading.RLock()  # unsubscribe() holds it while the watch closes
        self._failures = 0
        self._failed_at = 0.0
        self.reopened = 0
        self._watch: Any = None
        with self._lock:  # an ending that comes at once waits for self._watch
            self._watch = self._open()

    def _open(self) -> Any:
        watch = self._target.on_snapshot(self._callback)
        rpc: Any = getattr(watch, "_rpc", None)
        recover = getattr(rpc, "_should_recover", None)
        if recover is not None:  # google-cloud-firestore's Watch on api_core's ResumableBidiRpc
            rpc._should_recover = lambda exc: self._should_recover(recover, exc)
        close = watch.close
        ended = False

        def closing(reason: Any = None) -> None:
            nonlocal ended
            close()  # without the reason, which it would raise on the library's thread
            with self._lock:
                if ended or self._closed.is_set() or watch is not self._watch:
                    return  # unsubscribed, or this ending is already handled
                ended = True
            self._ended(watch, reason)

        watch.close = closing
        return watch

    def _ended(self, watch: Any, reason: Any) -> None:
        log.warning("A Firestore listener ended (%s); opening another", reason or "no reason given")
        self._pause()
        with self._lock:
            if self._closed.is_set() or watch is not self._watch:
                return
            self._watch = self._open()
            self.reopened += 1

    def _pause(self) -> None:
        """Wait before the next attempt: longer after each failure, shorter on unsubscribe."""
        now = time.monotonic()
        if now - self._failed_at > REOPEN_RESET:
            self._failures = 0
        self._failed_at = now
        self._closed.wait(REOPEN_BACKOFF.delay(self._failures))
        self._failures += 1

    def _should_recover(self, recover: Callable[[BaseException], bool], exc: BaseException) -> bool:
        if not recover(exc):
            return False
        if not self._closed.is_set():
            self._pause()
        if self._closed.is_set():  # closed before or during the wait: the thread ends
            _STOPPING.add(threading.get_ident())
            return False
        return True

    def unsubscribe(self) -> None:
        self._closed.set()
        with self._lock:
            self._watch.unsubscribe()


#: Consumer threads told to stop by a closed :class:`Listener`: the client library
#: logs their exit as an unexpected error with a traceback; it is the stop asked for.
_STOPPING: set[int] = set()


class _QuietStop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.thread in _STOPPING:
            _STOPPING.discard(record.thread)
            return False
        return True


logging.getLogger("google.api_core.bidi").addFilter(_QuietStop())
