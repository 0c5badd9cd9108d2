"""The runner: flows in library-owned greenlets, decoupled from HTTP connections.

Each started flow gets a :class:`Run`: an append-only list of events that the
flow fills and any number of live readers follow with their own cursor (the
HTTP response that started it is just one of them). Events reach the
StreamManager through one ordered writer per run: a short-lived *flush* task
(never two at once for a run) that copies new events in batches, retries failed
writes with backoff and refreshes the producer heartbeat, which carries the
cancel flag back. Storage latency therefore never delays live frames, and a
client that goes away stops nothing.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

from . import protocol
from ._concurrency import TaskGroup, gevent_patched
from .exceptions import FlowError, StreamClosed, StreamError
from .flows import Flow, FlowContext, call_flow
from .managers.base import Event, StreamManager, StreamWriter

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
    """
    runners = [r for r in list(_RUNNERS) if not r.stopped]
    if not runners:
        return
    group = TaskGroup()
    for runner in runners:
        group.spawn(runner.shutdown, grace, name="durable-stream-shutdown")
    group.join()


def _register_atexit() -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        _ATEXIT_REGISTERED = True
        atexit.register(shutdown_all)


_BY_MANAGER: weakref.WeakKeyDictionary[StreamManager, Runner] = weakref.WeakKeyDictionary()


def runner_for(manager: StreamManager | None, **options: Any) -> Runner:
    """The process's one runner for ``manager`` (a private one when there is no manager)."""
    if manager is None:
        return Runner(None, **options)
    runner = _BY_MANAGER.get(manager)
    if runner is None or runner.closed:
        runner = _BY_MANAGER[manager] = Runner(manager, **options)
    return runner


def new_stream_id() -> str:
    return uuid.uuid4().hex


class Run:
    """One execution of a flow, as seen by the process that runs it.

    Emitting is the hot path (once per chunk): an append to a list and, only
    when somebody is waiting, a wake-up. Readers keep their own cursor. Under
    gevent greenlets never preempt each other, so no lock is needed; with real
    threads (``flask run``) a plain lock keeps sequence numbers unique.
    """

    def __init__(self, stream_id: str, ctx: FlowContext) -> None:
        self.stream_id = stream_id
        self.ctx = ctx
        self.events: list[Event] = []
        self.ended = False
        self.durable_failed = False
        self.writer: StreamWriter | None = None
        self.flushing = False  # a flush task is running for this run
        self.heartbeat_due = False
        self.on_emit: Any = None  # called after every event, by the runner
        self._waiters: list[threading.Event] = []
        # Greenlets of one hub (no preemption), or real threads: decided once per run.
        self.cooperative = gevent_patched()
        self._lock = None if self.cooperative else threading.Lock()
        ctx._emit = self.emit_chunk

    def _emit(self, kind: str, payload: str) -> None:
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if self.ended:
                raise StreamClosed(f"stream {self.stream_id} already ended")
            events = self.events
            events.append(Event(len(events), kind, payload))
            if kind != protocol.CHUNK:
                self.ended = True
        finally:
            if lock is not None:
                lock.release()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.set()
        if self.on_emit is not None:
            self.on_emit(self)

    def wait_for(self, count: int, timeout: float | None = None) -> bool:
        """Block until more than ``count`` events exist (or timeout); True if they do.

        Returns at once when the run has ended, whatever the count.
        """
        if len(self.events) > count or self.ended:
            return len(self.events) > count
        waiter = threading.Event()
        self._waiters.append(waiter)
        if len(self.events) > count or self.ended:  # emitted while we registered
            return len(self.events) > count
        waiter.wait(timeout)
        return len(self.events) > count

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
        self._emit(protocol.DONE, payload)

    def fail(self, body: dict[str, Any]) -> None:
        self._emit(protocol.ERROR, protocol.encode(body))

    def batches(self, after: int = -1) -> Iterator[list[Event]]:
        """Everything after ``after`` as it arrives: all that is ready at once, never held back."""
        cursor = after + 1
        while True:
            if not self.wait_for(cursor, None):
                return  # ended, and the caller already has the terminal event
            batch = self.events[cursor:]
            cursor += len(batch)
            yield batch
            if batch[-1].terminal:
                return

    def wait(self, timeout: float | None = None) -> Event | None:
        """Block until the terminal event (or timeout); return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.wait_for(len(self.events), remaining)
        return self.events[-1]


class Runner:
    """Starts flows and owns every task they need. One per stream manager per process.

    Storage writes happen in short-lived *flush* tasks: at most one per run at a
    time (so writes stay in order), started when events arrive and ended when
    storage has caught up. One *ticker* task per runner marks heartbeats due.
    An idle stream therefore costs no task of its own besides its flow.
    """

    def __init__(
        self,
        manager: StreamManager | None,
        *,
        write_retry_timeout: float = 30.0,
        shutdown_grace: float = 25.0,
    ) -> None:
        self.manager = manager
        self.write_retry_timeout = write_retry_timeout
        self.shutdown_grace = shutdown_grace
        self.tasks = TaskGroup()
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._ticker: Any = None
        self._inline = bool(manager is not None and manager.append_never_blocks)
        self._idle = threading.Event()  # wakes the ticker when the last stored run ends
        self.closed = False
        self._stopped: threading.Event | None = None  # created by shutdown(), set when it ends
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
    ) -> Run:
        """Open the stream, then spawn the flow.

        Opening is synchronous: an id is only handed out once storage has it.
        """
        if self.closed:
            raise StreamError("Server shutting down.", status="UNAVAILABLE")
        stream_id = new_stream_id()
        writer = None
        if durable and self.manager is not None:
            writer = self.manager.open(stream_id, owner=owner)
        run = Run(stream_id, FlowContext(stream_id if writer else None, context or {}))
        run.writer = writer
        run.on_emit = self._on_emit
        with self._lock:
            self._runs[stream_id] = run
            if writer is not None and self._ticker is None:
                self._ticker = self.tasks.spawn(self._tick, name="durable-stream-heartbeat")
        self.tasks.spawn(self._execute, name, run, flow, data, name=f"flow:{name}")
        return run

    def get(self, stream_id: str) -> Run | None:
        with self._lock:
            return self._runs.get(stream_id)

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
    def _execute(self, name: str, run: Run, flow: Flow, data: Any) -> None:
        try:
            output = call_flow(flow, data, run.ctx)
        except (StreamClosed, FlowError) as exc:
            if run.ended:
                # The stream was ended for the flow (shutdown): its next chunk stopped it.
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

    def _on_emit(self, run: Run) -> None:
        writer = run.writer
        if writer is None:
            if run.ended:
                self._forget(run)
            return
        if self._inline:
            # The manager's append never blocks (in-process storage): no task is
            # needed. Under gevent a hub callback stores everything emitted until
            # the flow yields, in one append; with threads it happens right here.
            if not run.flushing:
                run.flushing = True
                if run.cooperative:
                    import gevent

                    gevent.get_hub().loop.run_callback(self._store_inline, run)
                else:
                    self._store_inline(run)
            return
        self._schedule_flush(run)

    def _store_inline(self, run: Run) -> None:
        writer = run.writer
        assert writer is not None
        run.flushing = False
        batch = run.events[writer.next_seq :]
        if not batch:
            return
        try:
            writer.append(batch)
        except Exception:
            self._schedule_flush(run)  # a flush task retries with backoff, away from the flow
        else:
            if batch[-1].terminal:
                self._close(run, writer)

    def _schedule_flush(self, run: Run) -> None:
        lock = run._lock
        if lock is not None:
            with lock:
                if run.flushing:
                    return
                run.flushing = True
        else:
            if run.flushing:
                return
            run.flushing = True
        self.tasks.spawn(self._flush, run, name="durable-stream-flush")

    def _flush(self, run: Run) -> None:
        """Copy the run's new events to storage, in order, then heartbeat if due."""
        writer = run.writer
        assert writer is not None
        finished = False
        try:
            while not finished:
                batch = run.events[writer.next_seq :]
                if batch:
                    stored = self._append(run, writer, batch)
                    finished = not stored or batch[-1].terminal
                if not finished and run.heartbeat_due:
                    run.heartbeat_due = False
                    self._heartbeat(run, writer)
                if not finished and len(run.events) <= writer.next_seq:
                    break
        finally:
            if finished:
                self._close(run, writer)
        run.flushing = False
        # An event emitted between the last look and clearing the flag needs a flush.
        if not finished and len(run.events) > writer.next_seq:
            self._schedule_flush(run)

    def _close(self, run: Run, writer: StreamWriter) -> None:
        try:
            writer.close()
        except Exception:  # pragma: no cover - close must not mask the outcome
            log.exception("closing the writer of stream %s failed", run.stream_id)
        self._forget(run)

    def _tick(self) -> None:
        """Mark heartbeats due for every stored run; ends when none is left."""
        assert self.manager is not None
        interval = self.manager.heartbeat_interval
        while True:
            self._idle.wait(interval)
            with self._lock:
                self._idle.clear()
                runs = [r for r in self._runs.values() if r.writer is not None]
                if not runs:
                    self._ticker = None
                    return
            for run in runs:
                run.heartbeat_due = True
                self._schedule_flush(run)

    def _append(self, run: Run, writer: StreamWriter, batch: list[Event]) -> bool:
        """Store ``batch``, retrying with backoff. False when storage stayed down."""
        delay, first_failure = 0.05, None
        while True:
            try:
                writer.append(batch)
                return True
            except StreamClosed:
                # Another process declared this producer lost (its lease expired):
                # nothing more can be stored, so stop spending work on the flow.
                log.error(
                    "stream %s was ended in storage (lease expired?); %d events not stored;"
                    " cancelling the flow",
                    run.stream_id,
                    len(batch),
                )
                run.durable_failed = True
                run.ctx._request_cancel()
                return False
            except Exception as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.write_retry_timeout:
                    log.error(
                        "giving up storing stream %s after %.1fs: %s",
                        run.stream_id,
                        now - first_failure,
                        exc,
                    )
                    run.durable_failed = True
                    self._store_data_loss(writer)
                    return False
                log.warning(
                    "storing stream %s failed (%s); retrying in %.2fs", run.stream_id, exc, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @staticmethod
    def _store_data_loss(writer: StreamWriter) -> None:
        # Best effort: readers of storage then end with a clear error instead of
        # waiting for the lease to expire.
        body = {"status": "DATA_LOSS", "message": "Storage failed; the stream is incomplete."}
        try:
            writer.error(body)
        except Exception:
            pass

    def _heartbeat(self, run: Run, writer: StreamWriter) -> None:
        try:
            if writer.heartbeat():
                run.ctx._request_cancel()
        except Exception as exc:
            log.warning("heartbeat of stream %s failed: %s", run.stream_id, exc)

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._runs.pop(run.stream_id, None)
            if self._ticker is not None and not any(
                r.writer is not None for r in self._runs.values()
            ):
                self._idle.set()

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
        flush_deadline = time.monotonic() + 5.0
        while self.active() and time.monotonic() < flush_deadline:
            time.sleep(0.02)
