"""Flow shapes and the runner, without HTTP (threads: this process is not monkey-patched)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from functools import partial
from typing import Any

import pydantic
import pytest

from flask_durable_stream import FlowContext, InMemoryStreamManager, StreamError
from flask_durable_stream.managers.base import Event, StreamStatus
from flask_durable_stream.runner import Runner
from flask_durable_stream.writer import DEFAULT_BACKOFF
from tests.support.fake_clock import SteppedClock
from tests.support.waiting import PATIENCE, wait_for


@pytest.fixture
def runner() -> Iterator[Runner]:
    manager = InMemoryStreamManager()
    runner = Runner(manager, write_retry_timeout=0.5)
    yield runner
    runner.shutdown(5)
    manager.close()


def run_to_end(runner: Runner, flow: Any, data: Any = None) -> list[tuple[str, str]]:
    run = runner.start("f", flow, data, live=True)
    live = [(e.kind, e.payload) for batch in run.batches(reader=run.live) for e in batch]
    assert run.wait(PATIENCE) is not None
    assert runner.tasks.join(PATIENCE)
    stored = [(e.kind, e.payload) for e in runner.manager.subscribe(run.stream_id)]  # type: ignore[union-attr]
    assert stored == live  # storage matches the live stream
    return stored


def gen_flow(data: Any) -> Generator[Any, None, str]:
    yield 1
    yield 2
    return "out"


def ctx_flow(data: Any, ctx: FlowContext) -> Any:
    ctx.send_chunk({"a": data})
    return [data]


async def async_flow(data: Any, ctx: FlowContext) -> Any:
    await asyncio.sleep(0.01)
    ctx.send_chunk("a")
    await asyncio.sleep(0.01)
    return {"async": True}


async def async_gen_flow(data: Any, ctx: FlowContext) -> AsyncIterator[Any]:
    for i in range(3):
        await asyncio.sleep(0.005)
        yield i
    ctx.output = "set by ctx"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Model(pydantic.BaseModel):
    name: str
    tags: list[str]


def typed_flow(data: Any) -> Generator[Any, None, Point]:
    yield Point(1, 2)
    yield Model(name="m", tags=["t"])
    return Point(3, 4)


@pytest.mark.parametrize(
    ("flow", "expected"),
    [
        (gen_flow, [("chunk", "1"), ("chunk", "2"), ("done", '"out"')]),
        (ctx_flow, [("chunk", '{"a":7}'), ("done", "[7]")]),
        (async_flow, [("chunk", '"a"'), ("done", '{"async":true}')]),
        (
            async_gen_flow,
            [("chunk", "0"), ("chunk", "1"), ("chunk", "2"), ("done", '"set by ctx"')],
        ),
        (lambda data: data * 2, [("done", "14")]),
        (
            typed_flow,
            [
                ("chunk", '{"x":1,"y":2}'),
                ("chunk", '{"name":"m","tags":["t"]}'),
                ("done", '{"x":3,"y":4}'),
            ],
        ),
    ],
    ids=["generator", "context", "async", "async-generator", "plain", "dataclass-pydantic"],
)
def test_flow_shapes(runner: Runner, flow: Any, expected: list[tuple[str, str]]) -> None:
    assert run_to_end(runner, flow, 7) == expected


def test_non_serializable_output_is_internal(runner: Runner) -> None:
    assert run_to_end(runner, lambda data: object()) == [
        ("error", '{"status":"INTERNAL","message":"Internal Error"}')
    ]


def test_flow_keeps_running_without_readers(runner: Runner) -> None:
    """Nobody reads the run; the flow still completes and storage has everything."""

    def slow(data: Any, ctx: FlowContext) -> Any:
        for i in range(5):
            time.sleep(0.01)
            ctx.send_chunk(i)
        return "done"

    assert len(run_to_end(runner, slow)) == 6


def test_cancel_reaches_the_flow_through_the_manager() -> None:
    """A cancel stored by another process reaches the flow with the runner's next heartbeat."""
    clock = SteppedClock()
    manager = InMemoryStreamManager(heartbeat_interval=1.0)
    manager.clock = clock
    runner = Runner(manager, clock=clock)
    started = threading.Event()

    def patient(data: Any, ctx: FlowContext) -> Any:
        started.set()
        ctx.wait_cancelled()
        ctx.raise_if_cancelled()

    try:
        run = runner.start("patient", patient, None)
        assert started.wait(PATIENCE)
        clock.settle(1)  # the ticker waits for the first interval
        assert manager.request_cancel(run.stream_id)
        assert not run.ctx.cancelled  # this process learns it from storage, when it heartbeats
        clock.advance(manager.heartbeat_interval)
        terminal = run.wait(PATIENCE)
        assert (
            terminal is not None
            and terminal.payload == '{"status":"CANCELLED","message":"Cancelled by client."}'
        )
        assert runner.tasks.join(PATIENCE)
        info = manager.info(run.stream_id)
        assert info is not None and info.status.value == "cancelled"
    finally:
        clock.run_free()  # shutdown cancels the flow if the test failed before it ended
        runner.shutdown(5)
        manager.close()


def test_generator_flow_is_closed_on_cancel(runner: Runner) -> None:
    closed = threading.Event()

    def endless(data: Any) -> Iterator[int]:
        try:
            i = 0
            while True:
                time.sleep(0.005)
                yield i
                i += 1
        finally:
            closed.set()

    run = runner.start("endless", endless, None)
    wait_for(lambda: run.count > 0, "the first chunk")
    assert runner.request_cancel(run.stream_id)
    terminal = run.wait(PATIENCE)
    assert terminal is not None and '"CANCELLED"' in terminal.payload
    assert closed.wait(PATIENCE)


class FlakyManager(InMemoryStreamManager):
    """Fails the first ``failures`` appends, or all of them when ``failures`` < 0."""

    def __init__(self, failures: int, **options: Any) -> None:
        super().__init__(**options)
        self.failures = failures
        self.attempts = 0
        self.data_loss_tried = threading.Event()

    def _append(self, stream: Any, events: Any) -> None:
        self.attempts += 1
        if '"DATA_LOSS"' in events[-1].payload:
            self.data_loss_tried.set()
        if self.failures < 0 or self.attempts <= self.failures:
            from flask_durable_stream import StorageUnavailable

            raise StorageUnavailable("disk on fire")
        super()._append(stream, events)


def test_transient_storage_failures_are_retried_without_loss(caplog: Any) -> None:
    manager = FlakyManager(failures=3)
    runner = Runner(manager)
    try:
        run = runner.start("gen", gen_flow, None)
        assert run.wait(PATIENCE) is not None
        assert runner.tasks.join(PATIENCE)
        assert [e.payload for e in manager.subscribe(run.stream_id)] == ["1", "2", '"out"']
        assert manager.attempts >= 4 and "retrying" in caplog.text
    finally:
        runner.shutdown(1)
        manager.close()


def test_storage_down_ends_readers_and_spares_the_live_client() -> None:
    clock = SteppedClock()
    manager = FlakyManager(failures=-1, heartbeat_interval=1.0)
    manager.clock = clock
    runner = Runner(manager, write_retry_timeout=30, clock=clock)
    try:
        run = runner.start("gen", gen_flow, None)
        live = [e for batch in run.batches() for e in batch]
        assert [e.payload for e in live] == ["1", "2", '"out"']  # the live client is unaffected
        clock.settle(2)  # the ticker, and the writer pausing between retries
        assert not run.durable_failed and not manager.data_loss_tried.is_set()
        clock.advance(runner.write_retry_timeout)
        clock.settle(2)  # the writer gave up, and now retries the DATA_LOSS marker
        assert run.durable_failed and manager.data_loss_tried.is_set()
        manager.failures = 0  # storage is back: the marker lands, readers get a clear end
        clock.advance(DEFAULT_BACKOFF.maximum)
        assert runner.tasks.join(PATIENCE)
        events = list(manager.subscribe(run.stream_id))
        assert [e.kind for e in events] == ["error"]
        assert events[0].value["status"] == "DATA_LOSS"
    finally:
        manager.failures = 0
        clock.run_free()
        runner.shutdown(5)
        manager.close()


def test_shutdown_ends_unfinished_flows_unavailable() -> None:
    manager = InMemoryStreamManager()
    runner = Runner(manager)
    gate = threading.Event()
    try:
        run = runner.start("stuck", lambda data: gate.wait(), None)
        runner.shutdown(0.2)
        assert [e.kind for e in manager.subscribe(run.stream_id)] == ["error"]
        assert '"UNAVAILABLE"' in run.events[-1].payload
        with pytest.raises(StreamError) as refused:  # new flows are refused after shutdown
            runner.start("late", gen_flow, None)
        assert refused.value.status == "UNAVAILABLE"
    finally:
        gate.set()
        runner.tasks.join(PATIENCE)
        manager.close()


def test_quiet_flow_is_kept_alive_by_the_runners_heartbeats() -> None:
    """Silent for many leases, yet alive: storage and its readers never count it as lost.

    On a stepped clock: at each heartbeat interval the runner's ticker must refresh the
    lease, whatever the machine's load; the sweep that ends abandoned streams runs at every
    step and must leave it alone.
    """
    clock = SteppedClock()
    manager = InMemoryStreamManager(lease_seconds=3.0, heartbeat_interval=1.0, timeout=PATIENCE)
    manager.clock = clock
    runner = Runner(manager, clock=clock)
    speak = threading.Event()
    followed: list[Event] = []

    def quiet(data: Any) -> Any:
        speak.wait()
        return "still here"

    try:
        run = runner.start("quiet", quiet, None)
        sid = run.stream_id
        reader = threading.Thread(target=lambda: followed.extend(manager.subscribe(sid)))
        reader.start()
        clock.settle(1)  # the ticker waits for the first interval
        for _ in range(20):  # 20 s of silence: more than six leases
            now = clock.advance(manager.heartbeat_interval)
            wait_for(partial(beat_at, manager, sid, now), "the ticker's heartbeat")
            clock.settle(1)
            manager.gc()  # the sweep ends streams whose producer missed its lease
            info = manager.info(sid)
            assert info is not None and info.status is StreamStatus.OPEN
        speak.set()
        reader.join(PATIENCE)
        assert [(e.kind, e.payload) for e in followed] == [("done", '"still here"')]
    finally:
        speak.set()
        clock.run_free()
        runner.shutdown(5)
        manager.close()


def beat_at(manager: InMemoryStreamManager, stream_id: str, when: float) -> bool:
    info = manager.info(stream_id)
    return info is not None and info.heartbeat_at == when


def test_a_flow_still_emitting_after_shutdown_stops_quietly(caplog: Any) -> None:
    caplog.set_level(logging.INFO, "flask_durable_stream")
    manager = InMemoryStreamManager()
    runner = Runner(manager)
    emitted_after_end = threading.Event()

    def stubborn(data: Any, ctx: FlowContext) -> Any:
        while not ctx.cancelled:
            ctx.send_chunk("tick")
            time.sleep(0.01)
        emitted_after_end.set()
        ctx.send_chunk("one more, after the end")  # raises StreamClosed inside the flow
        return "never stored"

    try:
        run = runner.start("stubborn", stubborn, None)
        wait_for(lambda: run.count > 0, "the first chunk")
        runner.shutdown(0.1)
        assert emitted_after_end.wait(PATIENCE)
        assert runner.tasks.join(PATIENCE)
        events = list(manager.subscribe(run.stream_id))
        assert events[-1].value["status"] == "UNAVAILABLE"
        assert "Traceback" not in caplog.text and "failed" not in caplog.text
        assert "had already ended" in caplog.text
    finally:
        manager.close()
