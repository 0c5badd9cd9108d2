"""The per-run writer alone: a faulty manager, a fake clock and a fake sleep (no real waiting)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from flask_durable_stream import (
    EventTooLarge,
    FlowContext,
    InMemoryStreamManager,
    StorageUnavailable,
    StreamClosed,
)
from flask_durable_stream._retry import Backoff
from flask_durable_stream.managers.base import Event
from flask_durable_stream.run import Run
from flask_durable_stream.writer import RunWriter


class FakeTime:
    """A clock that moves only when the writer sleeps; ``at(t, fn)`` runs ``fn`` at t."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._alarms: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
        due = [a for a in self._alarms if a[0] <= self.now]
        self._alarms = [a for a in self._alarms if a[0] > self.now]
        for _, action in due:
            action()

    def at(self, elapsed: float, action: Callable[[], None]) -> None:
        self._alarms.append((self.now + elapsed, action))


class FaultyManager(InMemoryStreamManager):
    """In-memory storage that can be down, down for appends only, or refuse big events.

    Records every call, in order, so tests can see what the writer did during an outage.
    """

    backend_name = "Test"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = False  # every call fails (storage unreachable)
        self.appends_down = False  # appends fail, heartbeats work (a locked table)
        self.refuse_over: int | None = None  # longer chunks are refused for good
        self.calls: list[str] = []

    def _append(self, stream: Any, events: Any) -> bool:
        kinds = ",".join(e.kind for e in events)
        if self.down or self.appends_down:
            self.calls.append(f"append-failed[{kinds}]")
            raise StorageUnavailable("storage unreachable")
        if self.refuse_over is not None:
            for event in events:
                if event.kind == "chunk" and len(event.payload) > self.refuse_over:
                    self.calls.append(f"append-refused[{kinds}]")
                    raise EventTooLarge(
                        f"event {event.seq} is too large", size=len(event.payload), limit=1
                    )
        self.calls.append(f"append[{kinds}]")
        return super()._append(stream, events)

    def _heartbeat(self, stream: Any) -> bool:
        if self.down:
            self.calls.append("heartbeat-failed")
            raise StorageUnavailable("storage unreachable")
        self.calls.append("heartbeat")
        return super()._heartbeat(stream)


class Harness:
    """A run, its writer over a FaultyManager, and flush tasks run by hand."""

    def __init__(self, *, retry_timeout: float = 300.0, backoff: Backoff | None = None) -> None:
        self.time = FakeTime()
        self.manager = FaultyManager(heartbeat_interval=2.0, lease_seconds=10.0)
        self.run = Run("s1", FlowContext("s1"), max_event_bytes=None, backend="Test")
        self.tasks: list[Callable[[], None]] = []
        self.finished: list[RunWriter] = []
        options: dict[str, Any] = {} if backoff is None else {"backoff": backoff}
        self.writer = RunWriter(
            self.run,
            self.manager.open("s1"),
            spawn=self.tasks.append,
            retry_timeout=retry_timeout,
            heartbeat_interval=2.0,
            clock=self.time.clock,
            sleep=self.time.sleep,
            on_finished=self.finished.append,
            **options,
        )
        self.run.on_emit = self.writer.on_emit

    def run_tasks(self) -> None:
        while self.tasks:
            self.tasks.pop(0)()

    def stored(self) -> list[Event]:
        return [e for e in self.manager.subscribe("s1", timeout=1)]

    def emit(self, *chunks: str, output: Any = "out") -> list[Event]:
        for chunk in chunks:
            self.run.emit_chunk(chunk)
        self.run.finish(output)
        return self.run.events

    def close(self) -> None:
        self.manager.close()


@pytest.fixture
def harness() -> Any:
    h = Harness()
    yield h
    h.close()


def test_a_transient_outage_loses_nothing_and_heartbeats_continue(harness: Harness) -> None:
    harness.manager.down = True
    harness.time.at(120, lambda: setattr(harness.manager, "down", False))  # 2 minutes down
    live = harness.emit('"a"', '"b"', '"c"')
    harness.run_tasks()
    assert harness.stored() == live  # byte for byte, in order, nothing lost
    assert harness.finished == [harness.writer] and not harness.run.durable_failed
    calls = harness.manager.calls
    during = calls[: calls.index("append[chunk,chunk,chunk,done]")]
    # The producer kept trying to heartbeat through the outage, and refreshed the lease
    # as soon as storage was back, before anything else.
    assert during.count("heartbeat-failed") >= 120 / 2.0 / 2
    assert during[-1] == "heartbeat"
    assert all(0 <= d <= 2.0 for d in harness.time.sleeps)


def test_heartbeats_succeed_while_appends_are_retried(harness: Harness) -> None:
    """A locked table: appends fail, heartbeats work, so readers keep seeing a live producer."""
    harness.manager.appends_down = True
    harness.time.at(60, lambda: setattr(harness.manager, "appends_down", False))
    live = harness.emit('"x"')
    harness.run_tasks()
    assert harness.stored() == live
    assert harness.writer.heartbeats >= 60 / 2.0 / 2  # at least one per interval's half


def test_a_flow_that_keeps_emitting_needs_no_heartbeats_and_learns_of_cancel(
    harness: Harness,
) -> None:
    """The in-memory writer's appends do a heartbeat's work (``append_beats``): a run that
    stores an event at least every interval's half sends no heartbeat of its own, and a
    cancel request reaches its flow with the next append."""
    run = harness.run
    assert harness.writer.heartbeat_due() is False
    for _ in range(20):  # 18 s, an event every 0.9 s
        harness.time.now += 0.9
        run.emit_chunk('"x"')
        harness.run_tasks()
        assert harness.writer.heartbeat_due() is False
    assert "heartbeat" not in harness.manager.calls
    assert harness.manager.calls.count("append[chunk]") == 20
    assert not run.ctx.cancelled
    assert harness.manager.request_cancel("s1") is True
    run.emit_chunk('"y"')
    harness.run_tasks()
    assert run.ctx.cancelled
    harness.time.now += 1.0  # quiet for an interval's half: the heartbeat is due again
    assert harness.writer.heartbeat_due() is True
    harness.writer.schedule()
    harness.run_tasks()
    assert harness.manager.calls[-1] == "heartbeat"


def test_a_permanent_error_ends_the_stream_at_once_for_every_reader(harness: Harness) -> None:
    harness.manager.refuse_over = 10
    run = harness.run
    run.emit_chunk('"ok"')
    run.emit_chunk('"' + "x" * 50 + '"')  # refused by storage: never stored, never retried
    run.emit_chunk('"after"')
    harness.run_tasks()
    stored = harness.stored()
    assert [(e.seq, e.kind) for e in stored] == [(0, "chunk"), (1, "error")]
    assert stored[0].payload == '"ok"'
    assert stored[1].value == {"status": "RESOURCE_EXHAUSTED", "message": "event 1 is too large"}
    assert harness.time.sleeps == []  # no backoff: a permanent error is not retried
    # The run ends with the same terminal frame for its live readers, and the flow is told to stop.
    assert run.ended and run.terminal is not None
    assert run.terminal.payload == stored[1].payload
    assert run.ctx.cancelled
    assert harness.finished == [harness.writer]


def test_storage_down_past_the_timeout_ends_data_loss_and_the_marker_is_retried(
    caplog: Any,
) -> None:
    h = Harness(retry_timeout=30.0)
    try:
        h.manager.down = True
        h.time.at(90, lambda: setattr(h.manager, "down", False))  # back long after the timeout
        caplog.set_level(logging.WARNING, "flask_durable_stream")
        live = h.emit('"a"', '"b"')
        h.run_tasks()
        assert [e.payload for e in live] == ['"a"', '"b"', '"out"']  # the live run is whole
        assert h.run.durable_failed
        stored = h.stored()
        assert [(e.seq, e.kind) for e in stored] == [(0, "error")]
        assert stored[0].value["status"] == "DATA_LOSS"
        marker_attempts = [c for c in h.manager.calls if c == "append-failed[error]"]
        assert len(marker_attempts) > 1  # retried, not tried once while storage was down
        assert h.manager.calls[-1] == "append[error]"
        assert "giving up" in caplog.text
        assert "retrying until it is or the process exits" in caplog.text
        assert h.finished == [h.writer]
    finally:
        h.close()


def test_retries_use_the_jittered_backoff_helper(harness: Harness) -> None:
    assert isinstance(harness.writer.backoff, Backoff) and harness.writer.backoff.jitter
    harness.manager.down = True
    harness.time.at(60, lambda: setattr(harness.manager, "down", False))
    harness.emit('"a"')
    harness.run_tasks()
    sleeps = harness.time.sleeps
    caps = [harness.writer.backoff.cap(i) for i in range(len(sleeps))]
    assert all(0 <= s <= c for s, c in zip(sleeps, caps, strict=True))
    assert any(s != c for s, c in zip(sleeps, caps, strict=True))  # drawn below the cap


def test_a_batch_with_one_refused_event_stores_the_events_before_it(harness: Harness) -> None:
    harness.manager.refuse_over = 10
    harness.manager.down = True  # everything piles up into one batch
    for chunk in ['"c0"', '"c1"', '"c2"', '"' + "y" * 40 + '"', '"c4"']:
        harness.run.emit_chunk(chunk)
    harness.time.at(5, lambda: setattr(harness.manager, "down", False))
    harness.run_tasks()
    stored = harness.stored()
    assert [e.payload for e in stored[:3]] == ['"c0"', '"c1"', '"c2"']
    assert [(e.seq, e.kind) for e in stored[3:]] == [(3, "error")]


def test_a_stream_ended_elsewhere_stops_the_flow(harness: Harness) -> None:
    def closed_append(events: Any) -> None:
        raise StreamClosed("stream s1 already ended")

    harness.writer.writer.store = closed_append  # type: ignore[method-assign]
    harness.emit('"a"')
    harness.run_tasks()
    assert harness.run.durable_failed and harness.run.ctx.cancelled
    assert harness.finished == [harness.writer]


def test_heartbeats_carry_a_cancel_request_back(harness: Harness) -> None:
    harness.run.emit_chunk('"a"')
    harness.run_tasks()
    harness.manager.request_cancel("s1")
    harness.time.sleep(2.0)
    harness.writer.schedule()
    harness.run_tasks()
    assert harness.run.ctx.cancelled
