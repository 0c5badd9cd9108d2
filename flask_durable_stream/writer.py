"""The ordered writer of one run: the run's events to storage, in order, whatever storage does.

One :class:`RunWriter` per stored run. It copies new events in batches from a
*flush* task (never two at once for a run, so writes stay in order) and keeps
the producer's heartbeat fresh, which also carries a cancel request back from
other processes (where the writer's appends do a heartbeat's work, only a quiet
run sends heartbeats of its own). Storage faults follow the model in :mod:`.exceptions`:

* transient (:class:`~.StorageUnavailable`, or any exception it does not know):
  the same batch is retried with :class:`~._retry.Backoff` (full jitter) for up
  to ``retry_timeout`` seconds of continuous failure, heartbeating between
  attempts so readers do not declare a live producer lost. The events wait in
  memory, so an outage shorter than that loses nothing.
* permanent (:class:`~.StoragePermanentError`, e.g. :class:`~.EventTooLarge`):
  never retried. The batch is split to store every event before the rejected
  one, then the stream ends with that error (its status and message, a library
  error meant for clients) in storage and in the run, and the flow is stopped.
* past ``retry_timeout``: the stream ends ``DATA_LOSS``. That marker, like every
  terminal marker the writer adds, is retried until stored or the process exits.

It needs only a :class:`~.run.Run` and a :class:`~.StreamWriter`, so it can be
tested alone with a faulty manager, a fake clock and a fake sleep. The runner
takes the same seam as one :class:`Clock`, so heartbeat and retry timing can be
driven step by step in tests instead of waited for on a busy machine.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from . import protocol
from ._concurrency import Later
from ._concurrency import sleep as _sleep
from ._retry import Backoff
from .exceptions import StoragePermanentError, StreamClosed
from .flows import fit_error
from .managers.base import Event, StreamWriter
from .run import Run

log = logging.getLogger("flask_durable_stream")

#: A batch carries at most this many payload bytes (backends split further if they must).
BATCH_BYTES = 1024 * 1024
#: While storage fails, say so this often (at ERROR level for a terminal marker).
LOUD_EVERY = 30.0

DEFAULT_BACKOFF = Backoff(initial=0.05, maximum=2.0)


class Outcome(enum.Enum):
    STORED = "stored"
    CLOSED = "closed"  # another process ended the stream (our lease expired)
    PERMANENT = "permanent"  # storage refused an event for good
    TIMED_OUT = "timed out"  # storage stayed down for retry_timeout


class Clock(Protocol):
    """The time the runner and its writers pace heartbeats and retries by (monotonic seconds)."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """``event.wait(timeout)``, with ``timeout`` measured on this clock."""
        ...


class RealClock:
    """The process's own time: what every runner uses unless a test gives another clock."""

    #: The builtin itself: a writer reads it for every stored batch.
    monotonic = staticmethod(time.monotonic)

    def sleep(self, seconds: float) -> None:
        _sleep(seconds)  # looked up at call time: cooperative once gevent has patched time

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)


REAL_CLOCK = RealClock()


def data_loss_body(seconds: float) -> dict[str, Any]:
    return {
        "status": "DATA_LOSS",
        "message": f"Storage failed for {seconds:.0f} s; the stream is incomplete.",
    }


class RunWriter:
    """Stores one run's events in order; see the module docstring for the fault model.

    ``spawn(fn)`` starts ``fn`` as a task (a greenlet or thread); ``clock`` and
    ``sleep`` are seams for tests. ``on_finished`` is called once, when nothing
    more will be stored.
    """

    def __init__(
        self,
        run: Run,
        writer: StreamWriter,
        *,
        spawn: Callable[[Callable[[], None]], Any],
        retry_timeout: float,
        heartbeat_interval: float,
        inline: bool = False,
        store_interval: float = 0.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        on_finished: Callable[[RunWriter], None] | None = None,
    ) -> None:
        self.run = run
        self.writer = writer
        self.retry_timeout = retry_timeout
        self.heartbeat_interval = heartbeat_interval
        self.backoff = backoff
        self.finished = False
        self.heartbeats = 0  # successful heartbeats, for operators and tests
        self._spawn = spawn
        self._inline = inline
        self._clock = clock
        # Looked up at call time, never bound at import: a module imported before
        # gevent patches time (gunicorn.conf.py) would otherwise block the whole worker.
        self._sleep = sleep if sleep is not None else _sleep
        self._on_finished = on_finished
        # Whether the writer can store without a task waiting (see _store_nowait).
        self._nowait = run.cooperative and writer.stores_nowait
        self._flushing = False
        self._flag_lock = None if run.cooperative else threading.Lock()
        # Under gevent, storage that never blocks or answers through the hub (SQLite):
        # a paced flow's events wait up to store_interval, for every stream in one
        # timer (see on_emit and store_held).
        self._later: Later | None = None
        self._held = False  # events wait for _later's store
        self._queued = False  # _later has this writer's store queued (one at most)
        if (inline or self._nowait) and run.cooperative and store_interval > 0:
            self._later = Later.of(store_interval)
            writer.delaying(self.store_held)
            run.store_held = self.store_held
        self._beat_at = clock()  # opening the stream stored a heartbeat
        self._beat_failed = False
        self._failing_since: float | None = None
        self._rejected: StoragePermanentError | None = None
        run.expect_storage()

    # -- scheduling ------------------------------------------------------------
    def on_emit(self, run: Run) -> None:
        """After each event: store it, from the emitting task for in-process storage."""
        if not self._inline:
            if self._nowait:
                if self._later is not None and not run.ended and self.writer.may_delay():
                    self._hold()  # the timer's store, or the answer in flight, takes it
                elif self._claim():
                    run.defer(self._store_nowait)  # once the flow yields: the whole burst
                return
            self.schedule()
            return
        # The manager's append never blocks (in-process storage): no task is needed.
        # Under gevent a hub callback stores everything emitted until the flow
        # yields, in one append, or the process's timer (store_interval) what the
        # flow emits until it fires; with threads it happens right here. While a store
        # is due (held for the timer, or deferred), it takes this event too: no claim.
        if not self._flushing and self._claim():
            if not run.cooperative:
                self._store_inline()
            elif self._later is not None and not run.ended and self.writer.may_delay():
                self._hold()
            else:
                run.defer(self._store_inline)  # with the burst's live send, if any
        elif self._held and run.ended:  # the end is stored at once, with what was held
            run.defer(self._store_inline)

    def _hold(self) -> None:
        self._held = True
        if not self._queued:  # else the store already queued takes these too
            self._queued = True
            assert self._later is not None
            self._later.add(self._store_queued)

    def _store_queued(self) -> None:
        # A read or the stream's end may have stored what was held before the timer
        # came: then this store has nothing to do, or takes what was held since,
        # earlier than its own interval, never later.
        self._queued = False
        self.store_held()

    def store_held(self) -> None:
        """Store at once what waits for the timer (``store_interval``): before a read of
        the manager, and before the run waits for storage."""
        if not self._held:
            return
        if self._inline:
            self._store_inline()
        elif self._claim():
            self._store_nowait()
        else:  # an append is in flight: its answer stores them at once, not the timer
            self._held = False

    def schedule(self) -> None:
        """Start a flush task unless one is running (it will see the new events)."""
        if self._claim():
            self._spawn(self.flush)

    def _claim(self) -> bool:
        if self.finished or self._flushing:
            return False
        lock = self._flag_lock
        if lock is None:
            self._flushing = True
            return True
        with lock:
            if self._flushing:
                return False
            self._flushing = True
            return True

    def _store_inline(self) -> None:
        self._flushing = self._held = False
        batch = self._unstored(None)
        if not batch or self.finished:
            return
        try:
            self.writer.append(batch)
        except Exception:
            self.schedule()  # a flush task retries with backoff, away from the flow
            return
        self._appended()
        self.run.mark_stored(self.writer.next_seq)
        if self.writer.closed:  # it stored the terminal event
            self._finish()

    def _store_nowait(self) -> None:
        """Under gevent, the usual store of a backend that answers through the hub.

        The run's new events go to storage with no task waiting for them; the
        answer (:meth:`_stored_nowait`) sends what came meanwhile. Anything but a
        plain success (an error, a heartbeat due) hands over to the flush task,
        which retries from the same events and owns the fault model.
        """
        self._held = False  # this append takes them
        batch = [] if self.finished else self._unstored(BATCH_BYTES)
        if not batch:
            self._flushing = False
            return
        try:
            started = self.writer.append_nowait(batch, self._stored_nowait)
        except Exception:  # refused at once (a size limit, a closed writer): the task says why
            started = False
        if not started:
            self._flushing = False
            self.schedule()

    def _stored_nowait(self, error: BaseException | None) -> None:
        if error is None and not self.finished:
            self._failing_since = None
            self._appended()
            self.run.mark_stored(self.writer.next_seq)
            if self.writer.closed:
                self._flushing = False
                self._finish()
                return
        more = self.run.count > self.writer.next_seq
        if error is None and more and not self.heartbeat_due():
            if self._queued and self._held and not self.run.ended:
                self._flushing = False  # held: the timer's store takes them (store_interval)
                return
            self._store_nowait()  # what the flow emitted meanwhile, still without a task
            return
        self._flushing = False
        if not self.finished and (error is not None or more or self.heartbeat_due()):
            self.schedule()  # the flush task retries, heartbeats, stores the rest

    def _unstored(self, max_bytes: int | None) -> list[Event]:
        """The run's events storage does not have yet (up to ``max_bytes``; None: all)."""
        next_seq = self.writer.next_seq
        return self.run.since(next_seq, max_bytes) if self.run.count > next_seq else []

    # -- the flush task --------------------------------------------------------
    def flush(self) -> None:
        """Copy the run's new events to storage, in order, and heartbeat when due."""
        try:
            self._drain()
        finally:
            self._flushing = False
        # An event emitted between the last look and clearing the flag needs a flush.
        if not self.finished and self.run.count > self.writer.next_seq:
            self.schedule()

    def _drain(self) -> None:
        while not self.finished:
            batch = self._unstored(BATCH_BYTES)
            if batch:
                outcome = self._store_splitting(batch)
                if outcome is Outcome.STORED:
                    self.run.mark_stored(self.writer.next_seq)
                    if self.writer.closed:
                        self._finish()
                        return
                elif outcome is Outcome.CLOSED:
                    self._closed_elsewhere()
                    return
                elif outcome is Outcome.PERMANENT:
                    self._reject()
                    return
                else:
                    self._give_up()
                    return
            self._heartbeat_if_due()
            if self.run.count <= self.writer.next_seq:
                return

    def _store_splitting(self, batch: Sequence[Event]) -> Outcome:
        """Store ``batch``; on a permanent refusal, store what precedes the refused event."""
        outcome = self._store(batch, self.retry_timeout)
        if outcome is not Outcome.PERMANENT or len(batch) == 1:
            return outcome
        middle = len(batch) // 2
        outcome = self._store_splitting(batch[:middle])
        if outcome is not Outcome.STORED:
            return outcome
        self.run.mark_stored(self.writer.next_seq)
        return self._store_splitting(batch[middle:])

    def _store(self, events: Sequence[Event], timeout: float | None) -> Outcome:
        """Append ``events``, retrying transient failures; ``timeout`` None retries forever."""
        delays = self.backoff.delays()
        loud_at = 0.0
        while True:
            try:
                self.writer.append(events)
            except StreamClosed:
                return Outcome.CLOSED
            except StoragePermanentError as exc:
                self._rejected = exc
                return Outcome.PERMANENT
            except Exception as exc:  # transient, known or not: retried
                self.run.storage_failing = True
                now = self._clock()
                if self._failing_since is None:
                    self._failing_since = now
                failing = now - self._failing_since
                if timeout is not None and failing >= timeout:
                    log.error(
                        "stream %s: storage failed for %.0f s (%s); giving up",
                        self.run.stream_id,
                        failing,
                        exc,
                    )
                    return Outcome.TIMED_OUT
                if now >= loud_at:  # the first failure, then every LOUD_EVERY seconds
                    loud_at = now + LOUD_EVERY
                    if timeout is None:
                        log.error(
                            "stream %s: its terminal marker is not stored after %.0f s (%s);"
                            " retrying until it is or the process exits",
                            self.run.stream_id,
                            failing,
                            exc,
                        )
                    else:
                        log.warning(
                            "stream %s: storing %d event(s) failing for %.0f s (%s);"
                            " retrying for up to %.0f s",
                            self.run.stream_id,
                            len(events),
                            failing,
                            exc,
                            timeout,
                        )
                self._pause(next(delays))
                if self._beat_failed:  # storage may be back: refresh the lease first
                    self._heartbeat_if_due(force=True)
                continue
            self._failing_since = None
            self.run.storage_failing = False
            self._appended()
            return Outcome.STORED

    # -- heartbeats ------------------------------------------------------------
    def _next_beat(self) -> float:
        # Half an interval: the ticker's period and this check never quite line up.
        return self._beat_at + self.heartbeat_interval / 2

    def heartbeat_due(self) -> bool:
        # Compared with the same sum _pause sleeps towards: with a difference
        # instead, rounding can leave "not due" and "0 s to wait" at once (a spin).
        return self._clock() >= self._next_beat()

    def _pause(self, seconds: float) -> None:
        """Sleep between retries, heartbeating on time however long the backoff delay."""
        end = self._clock() + seconds
        while True:
            self._heartbeat_if_due()
            now = self._clock()
            if now >= end:
                return
            self._sleep(min(end - now, self._next_beat() - now))

    def _appended(self) -> None:
        """An append was stored: where the writer's appends beat, a heartbeat. Timed from
        its answer, a little after storage took it: the lease (many intervals) has room."""
        writer = self.writer
        if writer.append_beats:
            self._beat_at = self._clock()
            self._beat_failed = False
            if writer.cancel_requested:
                self.run.ctx._request_cancel()

    def _heartbeat_if_due(self, *, force: bool = False) -> None:
        if not force and not self.heartbeat_due():
            return
        self._beat_at = self._clock()  # attempts, failed or not, are paced alike
        try:
            cancel = self.writer.heartbeat()
        except Exception as exc:  # storage down: the retry loop says so; try again soon
            self._beat_failed = True
            log.debug("heartbeat of stream %s failed: %s", self.run.stream_id, exc)
            return
        self._beat_failed = False
        self.heartbeats += 1
        if cancel:
            self.run.ctx._request_cancel()

    # -- endings ---------------------------------------------------------------
    def _closed_elsewhere(self) -> None:
        # Another process declared this producer lost (its lease expired): nothing
        # more can be stored, so stop spending work on the flow.
        log.error(
            "stream %s was ended in storage (producer declared lost); cancelling the flow",
            self.run.stream_id,
        )
        self.run.durable_failed = True
        self.run.ctx._request_cancel()
        self._finish()

    def _reject(self) -> None:
        exc = self._rejected
        assert exc is not None
        body = fit_error(exc.to_dict(), self.writer_limit)
        log.error(
            "stream %s: storage refused event %d for good: %s; ending the stream",
            self.run.stream_id,
            self.writer.next_seq,
            exc.message,
        )
        if not self.run.abort(body):
            log.error(
                "stream %s had already ended in this process; its stored end is the error",
                self.run.stream_id,
            )
        self._store_marker(body)

    def _give_up(self) -> None:
        self.run.durable_failed = True
        self.run.release_storage()  # the live readers still get everything
        self._store_marker(data_loss_body(self.retry_timeout))

    @property
    def writer_limit(self) -> int | None:
        return self.run.max_event_bytes

    def _store_marker(self, body: dict[str, Any]) -> None:
        """Store a terminal error after the stored events, retrying until it is stored."""
        event = Event(self.writer.next_seq, protocol.ERROR, protocol.encode(body))
        outcome = self._store([event], None)
        if outcome is Outcome.STORED:
            log.info("stream %s ended %s in storage", self.run.stream_id, body["status"])
        else:
            log.error(
                "stream %s: its %s marker could not be stored (%s)",
                self.run.stream_id,
                body["status"],
                outcome.value,
            )
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.run.release_storage()
        try:
            self.writer.close()
        except Exception:  # pragma: no cover - close must not mask the outcome
            log.exception("closing the writer of stream %s failed", self.run.stream_id)
        if self._on_finished is not None:
            self._on_finished(self)
