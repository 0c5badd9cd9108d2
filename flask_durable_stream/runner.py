"""The runner: flows in library-owned greenlets, decoupled from HTTP connections.

Each started flow gets a :class:`~.run.Run` (its events, followed by live
readers with their own cursor) and, when stored, a :class:`~.writer.RunWriter`
(the ordered writer: batching, retries, heartbeats, terminal markers). The
runner keeps the registry of running flows, spawns them, runs one ticker that
makes heartbeats due, and shuts down gracefully. Storage latency never delays
live frames, and a client that goes away stops nothing. Heartbeats and retry
pauses follow the runner's :class:`~.writer.Clock`, real time unless a test
passes a fake one.

A little over ~400 lines: the module-level registry (``runner_for``, ``shutdown_all``) and the
class it registers belong together.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _logging, _responses, protocol
from ._concurrency import TaskGroup, real_lock
from ._memory import release_memory
from .exceptions import (
    FlowError,
    StoragePermanentError,
    StorageUnavailable,
    StreamClosed,
    StreamError,
)
from .flows import Flow, FlowContext, FlowMoved, call_flow
from .managers.base import StreamManager
from .metrics import NULL_OBSERVER, Observer
from .run import DEFAULT_BUFFER_LIMIT, Run
from .writer import REAL_CLOCK, Clock, RunWriter

log = logging.getLogger("flask_durable_stream")

SHUTDOWN_ERROR = {
    "status": "UNAVAILABLE",
    "message": "Server shutting down: the flow did not finish within the grace period.",
}


_RUNNERS: weakref.WeakSet[Runner] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def shutdown_all(grace: float | None = None) -> None:
    """Graceful stop of every runner in this process (see :meth:`Runner.shutdown`).

    Runs at interpreter exit (which is how a gunicorn worker ends after SIGTERM,
    SIGINT or SIGQUIT), and may be called from a server's own signal handler.
    Runners shut down concurrently, so the grace period is not multiplied.

    Then it waits, within the same bound as for storing the terminal events,
    for this process's streamed responses to end: a client following a stream
    that just ended gets its terminal frame before the server, which exits or
    kills its connections once this returns, cuts the connection.
    """
    runners = [r for r in list(_RUNNERS) if not r.stopped]
    if not runners:
        return
    group = TaskGroup()
    for runner in runners:
        group.spawn(runner.shutdown, grace, name="durable-stream-shutdown")
    group.join()
    deadline = max(r.flush_deadline for r in runners)
    if not _responses.wait_finished(deadline):
        log.warning(
            "shutting down with %d streamed response(s) still open; their clients resume"
            " from storage",
            _responses.open_count(),
        )


def _register_atexit() -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        _ATEXIT_REGISTERED = True
        atexit.register(shutdown_all)


_BY_MANAGER: weakref.WeakKeyDictionary[StreamManager, Runner] = weakref.WeakKeyDictionary()

#: Seconds a stored run's writer retries a storage outage before the stream ends DATA_LOSS.
DEFAULT_WRITE_RETRY_TIMEOUT = 300.0
DEFAULT_SHUTDOWN_GRACE = 25.0


def runner_for(manager: StreamManager | None, **options: Any) -> Runner:
    """The process's one runner for ``manager`` (a private one when there is no manager).

    Options given for a manager that already has a runner must match that
    runner's: two blueprints cannot share a manager with different retry or
    buffer settings, and silently keeping the first ones would hide it.
    """
    if manager is None:
        return Runner(None, **options)
    runner = _BY_MANAGER.get(manager)
    if runner is None or runner.closed:
        runner = _BY_MANAGER[manager] = Runner(manager, **options)
        return runner
    conflicts = {
        name: (getattr(runner, name, None), value)
        for name, value in options.items()
        if getattr(runner, name, None) != value
    }
    if conflicts:
        described = ", ".join(
            f"{k}={new!r} (runner has {old!r})" for k, (old, new) in conflicts.items()
        )
        raise ValueError(
            f"this stream manager already has a runner with other options: {described};"
            " use the same options everywhere the manager is used"
        )
    return runner


def new_stream_id() -> str:
    """32 hex digits, 128 random bits (what ``uuid4().hex`` gives, less its version bits and
    its ``UUID`` object, which cost more than the rest of a stream's id and opening)."""
    return os.urandom(16).hex()


class Runner:
    """Starts flows and owns every task they need. One per stream manager per process.

    Each stored run has a :class:`~.writer.RunWriter` whose flush task exists
    only while there is something to store; one *ticker* task per runner makes
    heartbeats due. An idle stream therefore costs no task of its own besides
    its flow. ``clock`` paces the heartbeats and retry pauses: real time, or a
    clock a test moves by hand.
    """

    def __init__(
        self,
        manager: StreamManager | None,
        *,
        write_retry_timeout: float = DEFAULT_WRITE_RETRY_TIMEOUT,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        live_buffer_bytes: int | None = DEFAULT_BUFFER_LIMIT,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        if write_retry_timeout < 0 or shutdown_grace < 0:
            raise ValueError("write_retry_timeout and shutdown_grace must be >= 0")
        if live_buffer_bytes is not None and live_buffer_bytes <= 0:
            raise ValueError("live_buffer_bytes must be > 0 (or None for no bound)")
        self.manager = manager
        self.write_retry_timeout = write_retry_timeout
        self.shutdown_grace = shutdown_grace
        self.live_buffer_bytes = live_buffer_bytes
        self.clock = clock
        self.metrics: Observer = NULL_OBSERVER  # PrometheusMetrics() records them
        self.tasks = TaskGroup()
        self._runs: dict[str, Run] = {}
        self._writers: dict[str, RunWriter] = {}
        self._lock = real_lock()  # short sections that never switch
        self._ticker: Any = None
        self._inline = bool(manager is not None and manager.append_never_blocks)
        self._idle = threading.Event()  # wakes the ticker when the last stored run ends
        self._drained = threading.Event()  # set while no run is registered
        self._drained.set()
        self.closed = False
        self._stopped: threading.Event | None = None  # created by shutdown(), set when it ends
        #: When the shutdown stops waiting for final events to be stored and frames sent.
        self.flush_deadline = 0.0
        _RUNNERS.add(self)
        _register_atexit()

    # -- starting ------------------------------------------------------------
    def start(
        self,
        name: str,
        flow: Flow,
        data: Any,
        *,
        context: dict[str, Any] | None = None,
        durable: bool = True,
        owner: str | None = None,
        live: bool = False,
        claimable: bool = False,
    ) -> Run:
        """Open the stream, then spawn the flow.

        Opening is synchronous: an id is only handed out once storage has it
        (a storage outage is the caller's :class:`~.StorageUnavailable`). With
        ``live`` a reader is attached before the flow starts (``run.live``), so
        no event can be released before the response reads it. With
        ``claimable`` (under gevent) the caller's greenlet may claim the flow
        (:meth:`.Run.claim`) until the hub next turns: the live fast path then runs
        it in its own greenlet (one greenlet per stream) or starts its task by
        switching to it (``run.run_now``), not from a hub callback behind
        every callback queued before it; unclaimed, the flow gets its task then.
        """
        if self.closed:
            raise StreamError("Server shutting down.", status="UNAVAILABLE")
        stream_id = new_stream_id()
        manager = self.manager
        stream_writer = None
        if durable and manager is not None:
            try:
                stream_writer = manager.open(stream_id, owner=owner, flow=name)
            except StreamError:
                raise
            except Exception as exc:  # unclassified: transient, like in the writer
                log.exception("opening stream %s failed", stream_id)
                raise StorageUnavailable(
                    f"The {manager.display_name} backend could not open the stream."
                ) from exc
        max_event_bytes = None  # (a manager's truth value would be its length: a lock taken)
        if stream_writer is not None and manager is not None:
            max_event_bytes = manager.max_event_bytes
        run = Run(
            stream_id,
            FlowContext(stream_id if stream_writer is not None else None, context or {}),
            buffer_limit=self.live_buffer_bytes,
            max_event_bytes=max_event_bytes,
            backend=manager.display_name if manager is not None else "storage",
        )
        if live:
            run.live = run.attach()
        writer = None
        if stream_writer is not None and manager is not None:
            stream_writer = self.metrics.storage(stream_writer, name, manager.display_name)
            writer = RunWriter(
                run,
                stream_writer,
                spawn=self._spawn_flush,
                retry_timeout=self.write_retry_timeout,
                heartbeat_interval=manager.heartbeat_interval,
                inline=self._inline,
                store_interval=manager.store_interval,
                on_finished=self._writer_finished,
                clock=self.clock.monotonic,
                sleep=self.clock.sleep,
            )
            run.on_emit = self.metrics.emitting(stream_writer, writer.on_emit)
        else:
            run.on_emit = self._forget_when_ended
        _logging.register(stream_id, name)
        self.metrics.stream_started(name)
        with self._lock:
            self._runs[stream_id] = run
            self._drained.clear()
            if writer is not None:
                self._writers[stream_id] = writer
                if self._ticker is None:
                    self._ticker = self.tasks.spawn(self._tick, name="durable-stream-heartbeat")
        if claimable and run.cooperative:
            # The live response may run the flow in its own greenlet (one greenlet per
            # stream instead of two) or start the flow's task at once (see _direct); if
            # it has not claimed it when the hub next turns, the flow gets a task then,
            # as every other flow does.
            run.pending = functools.partial(self._execute_claimed, name, run, flow, data)
            # A bound method, not a partial: a partial is called through C, and the
            # response's greenlet would keep that C frame in its saved stack.
            run.run_now = self.tasks.run_now
            import gevent

            gevent.get_hub().loop.run_callback(self._start_unclaimed, run, name)
        else:
            self.tasks.spawn(self._execute, name, run, flow, data, name=f"flow:{name}")
        return run

    def _start_unclaimed(self, run: Run, name: str) -> None:
        body = run.claim()
        if body is not None:
            self.tasks.spawn(body, name=f"flow:{name}")

    def _spawn_flush(self, flush: Any) -> None:
        self.tasks.spawn(flush, name="durable-stream-flush")

    def get(self, stream_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(stream_id)

    def writer_of(self, stream_id: str) -> RunWriter | None:
        with self._lock:
            return self._writers.get(stream_id)

    def active(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())

    def request_cancel(self, stream_id: str) -> bool:
        """Cancel a run of this process at once (others learn it on their next heartbeat)."""
        run = self.get(stream_id)
        if run is None or run.ended:
            return False
        run.ctx._request_cancel()
        return True

    # -- the flow's task -----------------------------------------------------
    def _execute_claimed(self, name: str, run: Run, flow: Flow, data: Any) -> None:
        """:meth:`_execute` in whichever greenlet claimed the run (see :meth:`Run.claim`).

        A greenlet the server kills (its graceful stop's timeout) ends the stream
        UNAVAILABLE at once, as the shutdown would, instead of leaving a run that
        nothing will finish."""
        try:
            self._execute(name, run, flow, data)
        except BaseException:
            if not run.ended:
                self._end(run, lambda: run.fail(SHUTDOWN_ERROR))
            raise

    def _execute(self, name: str, run: Run, flow: Flow, data: Any) -> None:
        self._run_flow(name, run, functools.partial(call_flow, flow, data, run.ctx))

    def _run_flow(self, name: str, run: Run, produce: Callable[[], Any]) -> None:
        """``produce()`` (the flow, or what is left of it) to the stream's end, in this
        greenlet, unless the flow moves on to a task of its own (:class:`.FlowMoved`)."""
        _logging.bind(run.stream_id, name)
        moved = False
        try:
            self._call(name, run, produce)
        except FlowMoved as move:
            # Its response's client left: the rest runs in a task of its own, in the
            # flow's own context, and the response ends now.
            moved = True
            context = contextvars.copy_context()
            self.tasks.spawn(context.run, self._run_flow, name, run, move.rest, name=f"flow:{name}")
        finally:
            if not moved:
                self.metrics.stream_ended(name, run)

    def _call(self, name: str, run: Run, produce: Callable[[], Any]) -> None:
        try:
            output = produce()
        except (StreamClosed, FlowError) as exc:
            if run.ended:
                # The stream was ended for the flow (shutdown, or storage refused an
                # event): its next chunk stopped it.
                log.info("flow %r stopped: stream %s had already ended", name, run.stream_id)
                return
            if isinstance(exc, StreamClosed):
                raise
            assert isinstance(exc, FlowError)
            body = exc.to_dict()
            if exc.details is not None:
                try:
                    protocol.encode(body)
                except (TypeError, ValueError):
                    body.pop("details")
            self._end(run, lambda: run.fail(body))
        except StoragePermanentError as exc:
            # A library error meant for clients (e.g. a chunk over the backend's limit,
            # raised at the line that emitted it): public, not redacted.
            log.error("flow %r (stream %s): %s", name, run.stream_id, exc.message)
            refused = exc.to_dict()
            self._end(run, lambda: run.fail(refused))
        except Exception:
            log.exception("flow %r failed (stream %s)", name, run.stream_id)
            self._end(run, lambda: run.fail(protocol.INTERNAL_ERROR))
        else:
            self._end(run, lambda: run.finish(output))

    @staticmethod
    def _end(run: Run, terminal: Any) -> None:
        try:
            terminal()
        except StreamClosed:
            pass  # already ended by shutdown; the flow's late result is dropped

    def _forget_when_ended(self, run: Run) -> None:
        if run.ended:
            self._forget(run.stream_id)

    def _writer_finished(self, writer: RunWriter) -> None:
        self._forget(writer.run.stream_id)

    def _tick(self) -> None:
        """Let every stored run heartbeat; ends when none is left."""
        assert self.manager is not None
        interval = self.manager.heartbeat_interval
        while True:
            self.clock.wait(self._idle, interval)
            with self._lock:
                self._idle.clear()
                writers = list(self._writers.values())
                if not writers:
                    self._ticker = None
                    return
            for writer in writers:
                if writer.heartbeat_due():
                    writer.schedule()

    def _forget(self, stream_id: str) -> None:
        _logging.forget(stream_id)
        with self._lock:
            run = self._runs.pop(stream_id, None)
            self._writers.pop(stream_id, None)
            if self._ticker is not None and not self._writers:
                self._idle.set()
            if not self._runs:
                self._drained.set()
        if run is not None and run.total_bytes >= RELEASE_AFTER:
            release_memory()

    # -- stopping ------------------------------------------------------------
    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting flows; give running ones ``grace`` seconds, then end them UNAVAILABLE.

        The UNAVAILABLE terminal event is stored, so a client that reconnects
        (to another worker, or after a restart) ends cleanly instead of waiting
        for the producer lease to expire. A second call waits for the first to
        finish: a signal handler may start the shutdown and the server's loop then
        return to interpreter exit, which must not end the process halfway.
        """
        with self._lock:
            stopped, first = self._stopped, self._stopped is None
            if first:
                stopped = self._stopped = threading.Event()
                self.closed = True
        assert stopped is not None
        if not first:
            stopped.wait()
            return
        try:
            self._shutdown(grace)
        finally:
            stopped.set()

    @property
    def stopped(self) -> bool:
        """True once :meth:`shutdown` has finished."""
        return self._stopped is not None and self._stopped.is_set()

    def _shutdown(self, grace: float | None) -> None:
        grace = self.shutdown_grace if grace is None else grace
        if self.active():
            # A warning, so that it shows without logging set up (Ctrl-C on ``flask run``).
            log.warning(
                "shutting down: waiting up to %.1fs (shutdown grace) for %d running flow(s) of"
                " stream(s) %s; any still running then ends UNAVAILABLE",
                grace,
                len(self.active()),
                ", ".join(run.stream_id for run in self.active()),
            )
        deadline = time.monotonic() + grace
        for run in self.active():
            run.wait(max(0.0, deadline - time.monotonic()))
        for run in self.active():
            if not run.ended:
                log.warning(
                    "stream %s did not finish within the grace period; ending it UNAVAILABLE",
                    run.stream_id,
                )
                run.ctx._request_cancel()
                try:
                    run.fail(SHUTDOWN_ERROR)
                except StreamClosed:
                    pass
        # Wait for the terminal events to be stored (flows that ignore the end
        # may keep running; their late output is dropped).
        self.flush_deadline = time.monotonic() + SHUTDOWN_FLUSH_WAIT
        if not self._drained.wait(SHUTDOWN_FLUSH_WAIT):
            for run in self.active():
                log.error(
                    "stream %s: its end is not stored (storage unavailable?) and the process"
                    " is exiting; readers will see it as lost after the producer lease",
                    run.stream_id,
                )


#: After the grace period, how long shutdown waits for terminal events to be stored.
SHUTDOWN_FLUSH_WAIT = 5.0
#: A run that held at least this much when it ended gives freed memory back to the OS.
RELEASE_AFTER = 8 * 1024 * 1024
