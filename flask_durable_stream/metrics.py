"""What the runner and the views report, and Prometheus metrics built on it.

The runner and the views call a few methods of an :class:`Observer`
(``runner.metrics``). The default one does nothing and wraps nothing, so a
deployment without metrics pays nothing. :class:`PrometheusMetrics` records
into ``prometheus_client`` (``pip install flask_durable_stream[metrics]``),
which is imported only when it is built. Under gunicorn set
``PROMETHEUS_MULTIPROC_DIR`` so every worker's numbers add up (see
docs/operations.md); :func:`metrics_response` then reads them all.

Metrics (all prefixed ``durable_stream_``): ``streams_started_total{flow}``,
``streams_ended_total{flow,status}``, ``streams_open{flow}``,
``chunks_total{flow}`` (counted when a stream ends),
``subscribers{flow,mode}`` (``live``: attached to a run of this process;
``replay``: reading storage), ``reconnects_total{flow}``,
``storage_write_seconds{backend}``, ``storage_retries_total{backend}``,
``storage_lag_seconds{backend}`` (from an event's emission until storage has
it), ``data_loss_total{flow}``, ``producer_lost_total{flow,side}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import protocol
from .exceptions import StoragePermanentError, StreamClosed
from .managers.base import PRODUCER_LOST, Event, StreamWriter, close_batches

if TYPE_CHECKING:
    from .run import LiveReader, Run

EmitHook = Callable[["Run"], None]


class Observer:
    """The hooks; every method of this base class is a no-op (or returns its argument)."""

    def stream_started(self, flow: str) -> None:
        pass

    def stream_ended(self, flow: str, run: Run) -> None:
        pass

    def storage(self, writer: StreamWriter, flow: str, backend: str) -> StreamWriter:
        """The writer the runner stores a run through: wrapped to be measured, or as is."""
        return writer

    def emitting(self, writer: StreamWriter, on_emit: EmitHook) -> EmitHook:
        """The run's emit hook: wrapped to note when storage starts lagging, or as is."""
        return on_emit

    def subscriber(self, batches: Iterator[list[Event]], flow: str, mode: str) -> Iterator[Any]:
        """A reader's batches, counted while it reads (``mode`` is live or replay)."""
        return batches

    def live_subscriber(self, reader: LiveReader, flow: str) -> None:
        """A live client of a run of this process, counted from now until the run lets go
        of its ``reader`` (the response's task, or the live fast path, is done with it)."""

    def reconnect(self, flow: str) -> None:
        pass


NULL_OBSERVER = Observer()

#: Seconds, for write latency and storage lag: in-process writes are microseconds,
#: a remote store's tens of milliseconds, an outage up to the retry timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_METRICS: dict[str, Any] | None = None


def _metrics() -> dict[str, Any]:
    """The metric objects, created once per process in the default registry."""
    global _METRICS
    if _METRICS is None:
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "metrics need prometheus-client: pip install flask_durable_stream[metrics]"
            ) from exc
        p = "durable_stream_"
        _METRICS = {
            "started": Counter(p + "streams_started", "Streams started", ["flow"]),
            "ended": Counter(p + "streams_ended", "Streams ended", ["flow", "status"]),
            "open": Gauge(
                p + "streams_open", "Streams running now", ["flow"], multiprocess_mode="livesum"
            ),
            "chunks": Counter(p + "chunks", "Chunks of ended streams", ["flow"]),
            "subscribers": Gauge(
                p + "subscribers",
                "Connections reading a stream now",
                ["flow", "mode"],
                multiprocess_mode="livesum",
            ),
            "reconnects": Counter(p + "reconnects", "Reconnects to a stream", ["flow"]),
            "write": Histogram(
                p + "storage_write_seconds", "Storage append latency", ["backend"], buckets=BUCKETS
            ),
            "retries": Counter(p + "storage_retries", "Failed appends, retried", ["backend"]),
            "lag": Histogram(
                p + "storage_lag_seconds",
                "From an event's emission until storage has it",
                ["backend"],
                buckets=BUCKETS,
            ),
            "data_loss": Counter(p + "data_loss", "Streams ended DATA_LOSS", ["flow"]),
            "producer_lost": Counter(
                p + "producer_lost", "Producers declared lost", ["flow", "side"]
            ),
        }
    return _METRICS


class PrometheusMetrics(Observer):
    """Records every hook into Prometheus metrics (see the module docstring)."""

    def __init__(self) -> None:
        self.m = _metrics()

    def stream_started(self, flow: str) -> None:
        self.m["started"].labels(flow).inc()
        self.m["open"].labels(flow).inc()

    def stream_ended(self, flow: str, run: Run) -> None:
        terminal = run.terminal
        if terminal is None:
            status = "UNKNOWN"
        elif terminal.kind == protocol.DONE:
            status = "OK"
        else:
            status = str(terminal.value.get("status", "UNKNOWN"))
        self.m["ended"].labels(flow, status).inc()
        self.m["open"].labels(flow).dec()
        self.m["chunks"].labels(flow).inc(max(0, run.count - 1))

    def storage(self, writer: StreamWriter, flow: str, backend: str) -> StreamWriter:
        return _MeasuredWriter(writer, self.m, flow, backend)  # type: ignore[return-value]

    def emitting(self, writer: StreamWriter, on_emit: EmitHook) -> EmitHook:
        if not isinstance(writer, _MeasuredWriter):
            return on_emit
        measured = writer

        def note_and_emit(run: Run) -> None:
            if measured.pending_since is None:
                measured.pending_since = time.monotonic()
            on_emit(run)

        return note_and_emit

    def subscriber(self, batches: Iterator[list[Event]], flow: str, mode: str) -> Iterator[Any]:
        gauge = self.m["subscribers"].labels(flow, mode)
        lost = self.m["producer_lost"].labels(flow, "reader")

        def counted() -> Iterator[list[Event]]:
            gauge.inc()
            try:
                for batch in batches:
                    last = batch[-1] if batch else None
                    if last is not None and last.kind == protocol.ERROR:
                        if last.value.get("message") == PRODUCER_LOST["message"]:
                            lost.inc()
                    yield batch
            finally:
                gauge.dec()
                close_batches(batches)

        return counted()

    def live_subscriber(self, reader: LiveReader, flow: str) -> None:
        if reader.on_detach is None:
            gauge = self.m["subscribers"].labels(flow, "live")
            gauge.inc()
            reader.on_detach = gauge.dec

    def reconnect(self, flow: str) -> None:
        self.m["reconnects"].labels(flow).inc()


class _MeasuredWriter:
    """A :class:`StreamWriter` whose appends are timed; everything else is passed through.

    What the runner reads for every event or store is passed through by a method or
    property of its own: ``__getattr__`` runs only after the ordinary lookup has failed
    and built an ``AttributeError``, which costs more than the read.
    """

    def __init__(self, inner: StreamWriter, m: dict[str, Any], flow: str, backend: str) -> None:
        self._inner = inner
        self._flow = flow
        self._write = m["write"].labels(backend)
        self._retries = m["retries"].labels(backend)
        self._lag = m["lag"].labels(backend)
        self._data_loss = m["data_loss"].labels(flow)
        self._lost = m["producer_lost"].labels(flow, "producer")
        self.pending_since: float | None = None  # the first unstored event's emission

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def next_seq(self) -> int:
        return self._inner.next_seq

    @property
    def closed(self) -> bool:
        return self._inner.closed

    @property
    def stores_nowait(self) -> bool:
        return self._inner.stores_nowait

    def may_delay(self) -> bool:
        return self._inner.may_delay()

    def append(self, events: Sequence[Event]) -> None:
        # Events emitted while this append runs set pending_since anew: they are not in it.
        since, self.pending_since = self.pending_since, None
        started = time.monotonic()
        try:
            self._inner.append(events)
        except BaseException as exc:
            self._failed(exc, since)
            raise
        self._stored(events, started, since)

    def append_nowait(
        self, events: Sequence[Event], done: Callable[[BaseException | None], None]
    ) -> bool:
        """The inner writer's, timed from now until it answers, as :meth:`append` is."""
        since, self.pending_since = self.pending_since, None
        started = time.monotonic()

        def answered(error: BaseException | None) -> None:
            if error is None:
                self._stored(events, started, since)
            else:
                self._failed(error, since)
            done(error)

        try:
            begun = self._inner.append_nowait(events, answered)
        except BaseException:
            # Refused at once: the caller's append (measured) tries again and says why.
            self._restore(since)
            raise
        if not begun:
            self._restore(since)
        return begun

    def _restore(self, since: float | None) -> None:
        if self.pending_since is None:
            self.pending_since = since

    def _failed(self, exc: BaseException, since: float | None) -> None:
        self._restore(since)
        if isinstance(exc, StreamClosed):
            self._lost.inc()
        elif isinstance(exc, Exception) and not isinstance(exc, StoragePermanentError):
            self._retries.inc()

    def _stored(self, events: Sequence[Event], started: float, since: float | None) -> None:
        now = time.monotonic()
        self._write.observe(now - started)
        if since is not None:
            self._lag.observe(now - since)
        last = events[-1] if events else None
        if last is not None and last.kind == protocol.ERROR:
            if last.value.get("status") == "DATA_LOSS":
                self._data_loss.inc()


def metrics_response() -> tuple[bytes, str]:
    """The exposition text of this process, or of every worker in multiprocess mode."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def child_exit(server: Any, worker: Any) -> None:
    """A gunicorn hook (``from flask_durable_stream.metrics import child_exit``): drops a
    dead worker's live gauges from the multiprocess files; its counters keep counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
