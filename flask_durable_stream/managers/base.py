"""The StreamManager contract, defined once for every backend.

What backends share besides the contract (the common options, the size check,
the producer-lease rule) is in :mod:`.common` and importable from here too.

A *stream* is an append-only sequence of events numbered 0, 1, 2, ...: any
number of ``chunk`` events followed by exactly one terminal event (``done`` or
``error``) carrying the last sequence number. Payloads are JSON text, encoded
once by the producer, so every backend stores and replays the same bytes.

Producer side: :meth:`StreamManager.open` returns a :class:`StreamWriter`.
Its :meth:`~StreamWriter.append` checks the batch and hands it to
:meth:`~StreamWriter.store`, the one write a backend implements; ``store``
must be idempotent per sequence number, because the runner retries a failed
append with the same events. ``write``/``done``/``error`` are
conveniences on top of it.

Consumer side: :meth:`StreamManager.subscribe` yields the stored events with
``seq > after``, then the live ones, then exactly one terminal event, with no
gap and no duplicate at the boundary. A subscriber that sees neither an event
nor a producer heartbeat for ``timeout`` seconds gets :class:`StreamTimeout`; a
subscriber of an open stream whose producer heartbeat is older than
``lease_seconds`` gets a terminal ``UNAVAILABLE`` error event, stored so every
other reader sees the same thing. When to call a producer lost is one rule for
every backend, :class:`ProducerWatch`: a reader declares it only after it has
itself seen the heartbeat unchanged for a whole lease, so a reader that arrives
just as storage comes back from an outage (every heartbeat stale, the producer
alive and retrying) does not end a live stream.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

from .. import protocol
from ..exceptions import StorageUnavailable, StreamClosed
from .common import CommonOptions as CommonOptions
from .common import ProducerWatch as ProducerWatch
from .common import ProducerWatches as ProducerWatches
from .common import check_event_sizes as check_event_sizes
from .common import check_store_interval as check_store_interval
from .common import common_options as common_options
from .common import event_size_error as event_size_error
from .common import payload_bytes as payload_bytes
from .common import required_setting as required_setting

if TYPE_CHECKING:
    from flask import Flask

    from ..durable_streams.store import DSStore

#: Stream ids travel in a header and end up in keys and paths: keep them boring.
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

_M = TypeVar("_M", bound="StreamManager")
_seq_of = operator.itemgetter(0)
#: ``new_tuple(Event, (seq, kind, payload))``: an Event without the Python-level ``__new__``
#: a NamedTuple has (also over many rows, with ``map``).
new_tuple = tuple.__new__

PRODUCER_LOST = {"status": "UNAVAILABLE", "message": "Producer lost: the flow's worker stopped."}


def valid_stream_id(stream_id: str) -> bool:
    return bool(STREAM_ID_RE.match(stream_id)) and ".." not in stream_id


def check_pointer_key(key: str) -> str:
    """A pointer key, checked like a stream id (it ends up in keys and paths too)."""
    if not valid_stream_id(key):
        raise ValueError(f"invalid pointer key {key!r}: 1-128 characters of [A-Za-z0-9_.-]")
    return key


class StreamStatus(str, enum.Enum):
    OPEN = "open"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


class Event(NamedTuple):
    """One stored event. ``payload`` is compact JSON text.

    A tuple, because a long stream creates many of them on the hot path.
    """

    seq: int
    kind: str  # protocol.CHUNK | protocol.DONE | protocol.ERROR
    payload: str

    @property
    def terminal(self) -> bool:
        return self.kind != protocol.CHUNK

    @property
    def value(self) -> Any:
        return json.loads(self.payload)


def status_after(event: Event) -> StreamStatus:
    """The stream status a terminal event leads to."""
    if event.kind == protocol.DONE:
        return StreamStatus.DONE
    if event.kind == protocol.ERROR and event.value.get("status") == "CANCELLED":
        return StreamStatus.CANCELLED
    return StreamStatus.ERROR


@dataclass(slots=True)
class StreamInfo:
    """What an operator (or the cancel endpoint) can learn about a stream without reading it."""

    stream_id: str
    status: StreamStatus
    created_at: float
    updated_at: float
    last_seq: int = -1
    owner: str | None = None
    cancel_requested: bool = False
    heartbeat_at: float | None = None
    expires_at: float | None = None
    flow: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status.value}


class StreamWriter:
    """The producer's handle on one stream. Not shared between producers."""

    #: Whether every stored append also does a heartbeat's work: refreshes the
    #: producer's lease and reads the stream's cancel flag into
    #: :attr:`cancel_requested`. The runner then heartbeats only a stream whose
    #: flow has been quiet for a while, instead of every stream every interval.
    append_beats: ClassVar[bool] = False

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.next_seq = 0
        self.closed = False
        #: The stream's cancel flag as the last stored append read it (``append_beats``).
        self.cancel_requested = False

    @property
    def stores_nowait(self) -> bool:
        """Whether :meth:`append_nowait` can store here: the backend implements
        :meth:`store_nowait` (else the runner's flush task stores, and waits)."""
        return type(self).store_nowait is not StreamWriter.store_nowait

    def may_delay(self) -> bool:
        """Whether the runner may hold this stream's events back now (the manager's
        ``store_interval``): no reader of the manager waits on the stream. False
        unless a backend says so."""
        return False

    def delaying(self, store_now: Callable[[], None]) -> None:
        """The runner may hold this stream's events back: ``store_now`` stores them at
        once. A backend that says :meth:`may_delay` calls it before each read of the
        stream, so no reader misses an event emitted before it read."""

    # -- the primitive -------------------------------------------------------
    def append(self, events: Sequence[Event]) -> None:
        """Store ``events`` (contiguous, starting at :attr:`next_seq`) in order.

        On failure nothing of the writer's state changes, so the caller may
        retry with the same events; backends make that retry idempotent.

        Failures follow the storage fault model (:mod:`..exceptions`):
        :class:`~.StorageUnavailable` when the same call may succeed later
        (retried), :class:`~.StoragePermanentError` (e.g. :class:`~.EventTooLarge`)
        when it never can (the stream ends with that error). Both messages reach
        clients (a 503 body, a terminal error): they name the backend and the
        problem, never a file path, host or credential.
        """
        if not events:
            return
        if self.closed:
            raise StreamClosed(f"stream {self.stream_id} already ended")
        self._check(events)
        self.store(events)
        self._moved_past(events)

    def append_nowait(
        self, events: Sequence[Event], done: Callable[[BaseException | None], None]
    ) -> bool:
        """Start :meth:`append` and return at once, where the backend can; False where not.

        ``done(error)`` is called later, under gevent in the caller's hub, with
        None once the events are stored (:attr:`next_seq` has moved past them
        first) or with the error :meth:`append` would have raised (nothing of
        the writer's state changed). No other append may start before it is
        called. A writer that cannot answer this way (the default) returns
        False and nothing is started.
        """
        if not events or self.closed:
            return False  # the caller's append says what these mean
        self._check(events)

        def stored(error: BaseException | None) -> None:
            if error is None:
                self._moved_past(events)
            done(error)

        return self.store_nowait(events, stored)

    def store_nowait(
        self, events: Sequence[Event], done: Callable[[BaseException | None], None]
    ) -> bool:
        """The backend's side of :meth:`append_nowait`: False (the default) if it cannot."""
        return False

    def _moved_past(self, events: Sequence[Event]) -> None:
        last = events[-1]
        self.next_seq = last.seq + 1
        self.closed = last.kind != protocol.CHUNK  # ``terminal``, without a property's call

    def _check(self, events: Sequence[Event]) -> None:
        first = self.next_seq
        if len(events) == 1:  # an LLM-paced stream's every batch
            if events[0].seq != first:
                raise ValueError(f"events must be contiguous from seq {first}")
            return
        # Checked with C-level loops: this runs for every batch of a long stream.
        if list(map(_seq_of, events)) != list(range(first, first + len(events))):
            raise ValueError(f"events must be contiguous from seq {first}")
        if len(events) > 1 and set(map(protocol.kind_of, events[:-1])) != {protocol.CHUNK}:
            raise StreamClosed("no event may follow a terminal event")

    def store(self, events: Sequence[Event]) -> None:
        """The backend's write: persist ``events``, already checked by :meth:`append`.

        Storing the same events again (a retry after a failure that reached
        storage) must leave exactly one copy of each sequence number.
        """
        raise NotImplementedError

    def heartbeat(self) -> bool:
        """Tell subscribers the producer is alive; return True if cancel was requested."""
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (connections, listeners). Does not end the stream."""

    # -- conveniences --------------------------------------------------------
    def write(self, chunk: Any) -> Event:
        return self._one(protocol.CHUNK, protocol.encode(chunk))

    def done(self, output: Any = None) -> Event:
        return self._one(protocol.DONE, protocol.encode(output))

    def error(self, err: BaseException | dict[str, Any]) -> Event:
        body = err if isinstance(err, dict) else protocol.error_body(err)
        return self._one(protocol.ERROR, protocol.encode(body))

    def _one(self, kind: str, payload: str) -> Event:
        event = Event(self.next_seq, kind, payload)
        self.append([event])
        return event


def close_batches(batches: Iterable[Any]) -> None:
    """Close what :meth:`StreamManager.subscribe_batches` returned, if it can be closed:
    a backend's subscription (a generator) lets go of its listeners and its lease watch
    now, not when the collector finds it."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


class StreamManager:
    """Where streams live. Subclasses implement the methods that raise NotImplementedError.

    ``timeout``: seconds a subscriber waits with neither an event nor a
    heartbeat before :class:`StreamTimeout` (Genkit's default, 60).
    ``ttl_seconds``: how long a finished stream stays replayable.
    ``lease_seconds``: how old a producer heartbeat may get before an open
    stream is declared lost. ``heartbeat_interval``: how often the runner
    refreshes it (must be well under the lease).
    """

    timeout: float = 60.0
    ttl_seconds: float = 300.0
    lease_seconds: float = 10.0
    heartbeat_interval: float = 2.0
    #: True for in-process storage whose ``append`` returns in microseconds and
    #: never waits on I/O: the runner then stores events from the emitting task
    #: instead of starting a flush task per batch.
    append_never_blocks: bool = False
    #: Under gevent, with ``append_never_blocks`` or a writer that stores without a
    #: waiting task (:meth:`StreamWriter.store_nowait`): how long (seconds) the runner
    #: may hold a paced stream's events before it stores them, in one append, while
    #: no reader of this manager in this process waits on the stream
    #: (:meth:`StreamWriter.may_delay`). A reader of this process that comes has them
    #: stored first (:meth:`StreamWriter.delaying`), so it misses nothing; readers of
    #: other processes see them up to this much later. 0 stores each event as it comes.
    store_interval: float = 0.0
    #: The largest event (its JSON payload, in UTF-8 bytes) this backend can
    #: store, or None for no limit. The flow's ``send_chunk`` checks it, so a
    #: chunk that could never be stored raises :class:`~.EventTooLarge` at the
    #: line that emitted it; ``append`` raises the same error for any event
    #: over it (the output, an error body), never a transient one.
    max_event_bytes: int | None = None
    #: The backend's name in client-facing messages ("the SQLite backend stores at
    #: most ..."). Never a path or host. Defaults to the class name without
    #: ``StreamManager``.
    backend_name: str = ""
    #: The storage clock (epoch seconds) behind :meth:`now`: heartbeats, expiry and
    #: ``gc`` all read it, so tests replace it on one manager to move time on
    #: without sleeping (``flask_durable_stream.testing.ManualClock``).
    clock: Callable[[], float] = time.time
    #: The app config keys this backend reads, with their defaults; the extension
    #: sets them on the app (``setdefault``) before it calls :meth:`from_config`.
    config_defaults: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def from_config(cls: type[_M], config: Mapping[str, Any], app: Flask) -> _M:
        """The manager ``DURABLE_STREAM_BACKEND`` selects, built from the app's config.

        A configuration that can never work raises ``ValueError`` naming the
        setting to fix; storage that is only unreachable for now must not
        raise (requests get 503 until it is back). The default passes
        :func:`common_options`.
        """
        return cls(**common_options(config))

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        ttl_seconds: float = 300.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
    ) -> None:
        if timeout <= 0 or ttl_seconds < 0 or lease_seconds <= 0:
            raise ValueError("timeout and lease_seconds must be > 0, ttl_seconds >= 0")
        self.timeout = timeout
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = (
            heartbeat_interval if heartbeat_interval is not None else min(2.0, lease_seconds / 5)
        )
        #: What this process's readers saw of each producer, reader to reader.
        self.producer_watches = ProducerWatches()

    @property
    def display_name(self) -> str:
        """:attr:`backend_name`, or the class name without ``StreamManager``."""
        return self.backend_name or type(self).__name__.removesuffix("StreamManager") or "storage"

    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        """Create a stream; :class:`StreamExists` (ALREADY_EXISTS) if the id is taken.

        ``owner`` and ``flow`` (the name of the flow that produces it) are kept
        with the stream and come back in :class:`StreamInfo`.
        """
        raise NotImplementedError

    def subscribe(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[Event]:
        """Events with ``seq > after``, then live ones, ending with one terminal event.

        Raises :class:`StreamNotFound` (before yielding anything) for an
        unknown or expired id, :class:`StreamTimeout` on inactivity.
        A backend implements this or :meth:`subscribe_batches` (better); each
        has a default in terms of the other.
        """
        batches = self.subscribe_batches(stream_id, after, timeout=timeout)
        return (event for batch in batches for event in batch)

    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        """:meth:`subscribe`, grouped: each list is everything available at that moment.

        The HTTP layer sends a batch in one write, which is what makes replays
        fast. Backends that read in pages implement this; the default wraps
        :meth:`subscribe` one event at a time.
        """
        if type(self).subscribe is StreamManager.subscribe:
            raise NotImplementedError("a StreamManager implements subscribe_batches or subscribe")
        events = self.subscribe(stream_id, after, timeout=timeout)
        return ([event] for event in events)

    def info(self, stream_id: str) -> StreamInfo | None:
        """Metadata of a live or finished (not expired) stream, or None."""
        raise NotImplementedError

    def request_cancel(self, stream_id: str) -> bool:
        """Raise the cancel flag. True if the stream is open, False if it already ended.

        :class:`StreamNotFound` for an unknown id. The producer sees the flag on
        its next heartbeat.
        """
        raise NotImplementedError

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        """Newest first, for operators."""
        raise NotImplementedError

    def gc(self, now: float | None = None) -> int:
        """Delete finished streams whose TTL has passed; return how many.

        Open streams whose producer lease has expired (the producer died and
        nobody was reading) are ended or expired too, so they cannot pile up.
        """
        raise NotImplementedError

    # -- pointers: a name that points at a stream (e.g. a chat's active stream) -------
    def set_pointer(self, key: str, stream_id: str) -> None:
        """Point ``key`` at ``stream_id``, replacing what it pointed at.

        Pointers let any worker find "the current stream" of something that
        outlives one stream (a chat). ``key`` follows the stream id rules
        (:func:`valid_stream_id`), so every backend can use it in a path.
        """
        raise NotImplementedError

    def get_pointer(self, key: str) -> str | None:
        """The stream id ``key`` points at, or None.

        The stream may have ended or expired meanwhile: callers check
        :meth:`info`, since a producer that died cannot clear its pointer.
        """
        raise NotImplementedError

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        """Remove ``key`` only if it still points at ``stream_id``; True if it did.

        Conditional, so a stream that ends late never clears the pointer a
        newer stream of the same key has set.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work and release connections."""

    def check(self) -> None:
        """Raise unless storage is reachable and writable now: a readiness probe.

        Writes a tiny probe stream (id ``_ready.<random>``, one terminal event)
        and reads it back through :meth:`info`; the probe expires with the TTL
        like any stream. Backends override it only where a cheaper call proves
        the same.
        """
        stream_id = f"_ready.{uuid.uuid4().hex}"
        writer = self.open(stream_id)
        try:
            writer.done(True)
        finally:
            writer.close()
        info = self.info(stream_id)
        if info is None or info.status is not StreamStatus.DONE:
            raise StorageUnavailable("The readiness probe was written but not read back.")

    def durable_streams_store(self) -> DSStore:
        """This backend's store for Durable Streams (:mod:`..durable_streams`), made once.

        Backends that cannot keep byte streams raise NotImplementedError.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not support Durable Streams; "
            "use the memory, SQLite or Redis manager (see docs/durable-streams.md)"
        )

    def now(self) -> float:
        return self.clock()

    def expiry(self, now: float | None = None) -> float:
        return (self.now() if now is None else now) + self.ttl_seconds

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
