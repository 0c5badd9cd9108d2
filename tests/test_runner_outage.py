"""The runner through storage outages, with a reader following along.

The outage test runs on a stepped clock shared by the storage and the runner: time moves
only when the test says so, and at every step the test checks what readers would see. A
loaded machine can make it slower, never make it fail.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from flask_durable_stream import (
    FlowContext,
    InMemoryStreamManager,
    StorageUnavailable,
    StreamError,
)
from flask_durable_stream.managers.base import Event, StreamStatus
from flask_durable_stream.runner import Runner
from flask_durable_stream.writer import DEFAULT_BACKOFF
from tests.support.fake_clock import SteppedClock
from tests.support.waiting import PATIENCE

LEASE = 3.0
HEARTBEAT = 1.0
STEP = 0.25  # the writer heartbeats every half interval while it retries
OUTAGE = 4 * LEASE


class LockedStorage(InMemoryStreamManager):
    """Appends fail while ``locked`` (a locked table); heartbeats keep working."""

    def __init__(self) -> None:
        super().__init__(lease_seconds=LEASE, heartbeat_interval=HEARTBEAT, timeout=PATIENCE)
        self.locked = False
        self.failed_appends = 0
        self.open_fails: Exception | None = None

    def open(self, stream_id: str, *, owner: str | None = None, flow: str | None = None) -> Any:
        if self.open_fails is not None:
            raise self.open_fails
        return super().open(stream_id, owner=owner, flow=flow)

    def _append(self, stream: Any, events: Any) -> None:
        if self.locked:
            self.failed_appends += 1
            raise StorageUnavailable("The test backend is locked.")
        super()._append(stream, events)


@pytest.fixture
def storage() -> Iterator[LockedStorage]:
    manager = LockedStorage()
    yield manager
    manager.close()


def test_a_reader_never_sees_a_retrying_producer_as_lost(storage: LockedStorage) -> None:
    clock = SteppedClock()
    storage.clock = clock
    runner = Runner(storage, write_retry_timeout=10 * OUTAGE, clock=clock)
    gate = threading.Event()

    def flow(data: Any, ctx: FlowContext) -> Any:
        ctx.send_chunk("before")
        gate.wait()
        for i in range(5):
            ctx.send_chunk(i)
        return "end"

    followed: list[Event] = []
    try:
        run = runner.start("f", flow, None)
        sid = run.stream_id
        first = next(iter(storage.subscribe(sid)))
        assert first.payload == '"before"'
        storage.locked = True
        gate.set()  # the rest is emitted while storage refuses appends
        assert run.wait(PATIENCE) is not None  # the live run ended; storage has only "before"
        reader = threading.Thread(target=lambda: followed.extend(storage.subscribe(sid)))
        reader.start()
        clock.settle(2)  # the ticker, and the flush task pausing between retries
        for _ in range(int(OUTAGE / STEP)):  # four leases of outage
            now = clock.advance(STEP)
            clock.settle(2)
            storage.gc()  # the sweep ends streams whose producer missed its lease
            info = storage.info(sid)
            assert info is not None and info.status is StreamStatus.OPEN
            assert info.heartbeat_at is not None
            assert now - info.heartbeat_at <= HEARTBEAT  # heartbeats go on while retrying
        assert storage.failed_appends > 1
        storage.locked = False
        clock.advance(DEFAULT_BACKOFF.maximum)  # past the longest pause: the writer retries
        assert runner.tasks.join(PATIENCE)
        stored = list(storage.subscribe(sid))
        reader.join(PATIENCE)
        assert [e.payload for e in stored] == ['"before"', "0", "1", "2", "3", "4", '"end"']
        assert followed == stored  # the follower saw the whole stream, not "Producer lost"
    finally:
        gate.set()
        storage.locked = False
        clock.run_free()
        runner.shutdown(5)


def test_an_unclassified_failure_to_open_is_unavailable(storage: LockedStorage) -> None:
    runner = Runner(storage)
    try:
        storage.open_fails = OSError("disk I/O error")
        with pytest.raises(StorageUnavailable) as failed:
            runner.start("f", lambda data: data, None)
        assert failed.value.message == "The in-memory backend could not open the stream."
        storage.open_fails = StreamError("The test backend is full.", status="RESOURCE_EXHAUSTED")
        with pytest.raises(StreamError) as refused:
            runner.start("f", lambda data: data, None)
        assert refused.value.status == "RESOURCE_EXHAUSTED"
        storage.open_fails = None
        run = runner.start("f", lambda data: data, 7)  # it recovers by itself
        terminal = run.wait(PATIENCE)
        assert terminal is not None and terminal.payload == "7"
    finally:
        runner.shutdown(5)
