"""What every backend shares besides the contract in :mod:`.base`.

The options built from the app config, the one size check (the storage side's
``append`` and the flow's ``send_chunk`` both raise its error, so the message
is the same wherever an event is too large), and the one rule for calling a
producer lost. It imports nothing of the contract at run time, so the emitting
side (:mod:`..flows`) can use it without importing a backend.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from .. import protocol
from .._concurrency import real_lock
from ..exceptions import EventTooLarge, StorageUnavailable

if TYPE_CHECKING:
    from .base import Event

_WHAT = {protocol.CHUNK: "Chunk {seq}", protocol.DONE: "Output", protocol.ERROR: "Error"}


class CommonOptions(TypedDict):
    ttl_seconds: float
    timeout: float
    lease_seconds: float


def common_options(config: Mapping[str, Any]) -> CommonOptions:
    """The options every backend takes, from ``DURABLE_STREAM_TTL``, ``_TIMEOUT`` and ``_LEASE``."""
    return {
        "ttl_seconds": float(config.get("DURABLE_STREAM_TTL", 300.0)),
        "timeout": float(config.get("DURABLE_STREAM_TIMEOUT", 60.0)),
        "lease_seconds": float(config.get("DURABLE_STREAM_LEASE", 10.0)),
    }


def check_store_interval(seconds: float, setting: str) -> float:
    """``seconds`` if it can be a ``store_interval``, else the ``ValueError`` naming ``setting``."""
    if not seconds >= 0:  # NaN too
        raise ValueError(f"store_interval ({setting}) must be >= 0 seconds, got {seconds!r}")
    return seconds


def check_sweep_interval(seconds: float | None, default: float) -> float:
    """``seconds`` (``default`` for None) if it can be a ``sweep_interval``: 0 (never) or more."""
    seconds = default if seconds is None else seconds
    if not seconds >= 0:  # NaN too
        raise ValueError(f"sweep_interval must be 0 (off) or more seconds, got {seconds!r}")
    return seconds


#: This process's id, kept up to date in a forked child: read on every ``open``.
_PROCESS = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))


class Sweep:
    """A manager's ``gc()`` in the background, every ``interval`` seconds (0: never), in
    each process from its first :meth:`start` (a manager calls it from ``open``) until
    ``stopping`` is set. A process that only reads or runs a command sweeps nothing, and
    one forked after a sweep started (gunicorn's workers, ``--preload``) starts its own.
    An error of a ``transient`` kind (storage busy or down) is left for the next round.
    """

    def __init__(
        self,
        stopping: threading.Event,
        *,
        name: str,
        transient: tuple[type[BaseException], ...] = (StorageUnavailable,),
    ) -> None:
        self._stopping = stopping
        self._name = name
        self._transient = transient
        self._pid = 0  # the process whose sweep runs
        self._lock = real_lock()  # never held across a switch: spawning does not switch

    def start(self, spawn: Callable[..., Any], gc: Callable[[], object], interval: float) -> None:
        """Start the sweep of this process with ``spawn`` (a task group's), unless it runs."""
        if interval and self._pid != _PROCESS[0]:
            with self._lock:
                if self._pid != _PROCESS[0] and not self._stopping.is_set():
                    self._pid = _PROCESS[0]
                    spawn(self._run, gc, interval, name=self._name)

    def _run(self, gc: Callable[[], object], interval: float) -> None:
        while not self._stopping.wait(interval):
            try:
                gc()
            except self._transient:
                pass  # the next round tries again


def required_setting(config: Mapping[str, Any], key: str, backend: str) -> Any:
    """``config[key]``, or the ``ValueError`` ``from_config`` raises when it is not set."""
    value = config.get(key)
    if not value:
        raise ValueError(f"DURABLE_STREAM_BACKEND={backend!r} needs {key}")
    return value


def payload_bytes(payload: str) -> int:
    return len(payload.encode("utf-8", "surrogatepass"))


def event_size_error(
    what: str, payload: str, limit: int | None, backend: str
) -> EventTooLarge | None:
    """The error for ``payload`` over ``limit`` UTF-8 bytes, or None when it fits.

    ``what`` names the event for the client ("Chunk 3", "Output").
    """
    if limit is None or len(payload) <= limit // 4:  # too short to be over, even in UTF-8
        return None
    size = payload_bytes(payload)
    if size <= limit:
        return None
    return EventTooLarge(
        f"{what} is {size:,} bytes; the {backend} backend stores at most {limit:,}",
        size=size,
        limit=limit,
    )


def check_event_sizes(events: Sequence[Event], limit: int | None, backend: str) -> None:
    """Raise :class:`EventTooLarge` for the first event whose payload is over ``limit`` bytes.

    Backends call it before any write, so an event that can never be stored is
    a permanent error at once instead of a write retried until the lease ends.
    """
    if limit is None:
        return
    quick = limit // 4
    for event in events:
        if len(event.payload) <= quick:
            continue
        what = _WHAT.get(event.kind, "Event {seq}").format(seq=event.seq)
        error = event_size_error(what, event.payload, limit, backend)
        if error is not None:
            raise error


class ProducerWatch:
    """A reader's judgement of whether a stream's producer is gone: the one rule for every backend.

    The producer refreshes its heartbeat every ``heartbeat_interval`` and keeps
    doing so while it retries a failed write, so a heartbeat that stops changing
    means the producer is gone, *unless storage itself was down*: then nobody
    could write, and the stored heartbeat is stale although the producer is
    alive. So the lease is measured on the reader's own clock, from the first
    moment the reader saw the current heartbeat value, and it restarts whenever
    the reader's own storage calls fail. The producer is lost when both hold:
    the reader saw no change for ``lease_seconds``, and the stored heartbeat is
    older than ``lease_seconds`` by the storage clock.

    That keeps ``kill -9`` detection within a lease for a reader that arrives
    right after the kill (it sees the last heartbeat at once), and gives a
    producer that comes back with storage a whole lease to heartbeat.

    Backends use it inside ``subscribe``::

        watch = ProducerWatch(self.lease_seconds)
        ...  # each successful read of the stream's metadata:
        left = watch.observe(heartbeat_at, self.now())
        if left <= 0: mark the stream lost (conditionally: heartbeat unchanged)
        else: wait at most ``left`` before looking again
        ...  # a read or write of storage failed (StorageUnavailable):
        watch.storage_failed()
    """

    __slots__ = ("lease_seconds", "_clock", "_beat", "_since", "_key", "_watches")

    def __init__(
        self, lease_seconds: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._beat: float | None = None
        self._since: float | None = None
        self._key = ""
        self._watches: ProducerWatches | None = None

    def observe(self, heartbeat_at: float | None, now: float) -> float:
        """Seconds left before the producer counts as lost (<= 0: lost now).

        ``heartbeat_at`` is the stored heartbeat (storage clock), ``now`` the
        storage clock now (``manager.now()``). ``None`` (no heartbeat stored)
        never counts as lost.
        """
        seen = self._clock()
        if heartbeat_at != self._beat or self._since is None:
            self._beat, self._since = heartbeat_at, seen
        if heartbeat_at is None:
            return self.lease_seconds
        own = self._since + self.lease_seconds - seen
        stored = heartbeat_at + self.lease_seconds - now
        return max(own, stored)

    def storage_failed(self) -> None:
        """A storage call of this reader failed: the producer may have failed too; start over."""
        self._since = None

    def end(self, *, failed: bool = False) -> None:
        """The reader stops watching (``failed``: because a storage call failed). A watch from
        :meth:`ProducerWatches.watch` leaves what it saw to the stream's next reader."""
        if self._watches is not None:
            self._watches.ended(self, failed)

    def __enter__(self) -> ProducerWatch:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        """:meth:`end` as the reader stops: failed when a storage call's error ended it."""
        self.end(failed=isinstance(exc, StorageUnavailable))


class ProducerWatches:
    """What this process's readers saw of each stream's heartbeat, joined up reader to reader.

    A reader that starts within a short gap of the previous reader of the same stream
    ending goes on with that reader's watch instead of starting a lease of its own. So
    readers that each stay less than a lease, one after another (a Durable Streams client's
    long-polls, shorter than the lease), still see a producer lost, a lease after the first
    of them saw its last heartbeat. The rule of :class:`ProducerWatch` holds across them:
    somebody in this process watched the whole lease with no gap longer than a single reader
    leaves between its own looks (``gap``, by default the shorter of 1 s and a quarter of the
    lease), and a reader whose storage calls failed leaves nothing to go on with.
    """

    __slots__ = ("gap", "limit", "_clock", "_left")

    def __init__(
        self,
        *,
        gap: float | None = None,
        limit: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gap = gap
        self.limit = limit
        self._clock = clock
        #: stream id -> (heartbeat seen, seen unchanged since, a next reader starts by then)
        self._left: dict[str, tuple[float | None, float, float]] = {}

    def watch(self, stream_id: str, lease_seconds: float) -> ProducerWatch:
        """A new reader's watch of ``stream_id``, used as a context manager around the reading
        (or the reader calls its ``end()`` when it stops)."""
        watch = ProducerWatch(lease_seconds, clock=self._clock)
        watch._key, watch._watches = stream_id, self
        left = self._left.pop(stream_id, None)
        if left is not None and self._clock() <= left[2]:
            watch._beat, watch._since = left[0], left[1]
        return watch

    def ended(self, watch: ProducerWatch, failed: bool) -> None:
        key = watch._key
        if failed or watch._since is None:
            self._left.pop(key, None)
            return
        now = self._clock()
        if len(self._left) >= self.limit:  # drop what no reader can go on with any more
            stale = [k for k, left in list(self._left.items()) if now > left[2]]
            for k in stale or list(self._left)[: self.limit // 2]:
                del self._left[k]
        gap = min(1.0, watch.lease_seconds / 4) if self.gap is None else self.gap
        self._left[key] = (watch._beat, watch._since, now + gap)
