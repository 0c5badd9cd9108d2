"""The runner through storage outages, with a reader following along (threads, real clock).

Every wait is on a condition (an event set by the storage double), never a sleep; the lease is
short so that the outages outlast it several times over.
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
from flask_durable_stream.managers.base import Event
from flask_durable_stream.runner import Runner

LEASE = 3.0  # generous: a loaded machine may stall a thread for a while (30 heartbeats)
BEATS_DURING_OUTAGE = 130  # one per 0.05-0.1 s: more than two leases


class LockedStorage(InMemoryStreamManager):
    """Appends fail while ``locked`` (a locked table); heartbeats keep working.

    ``outage_beats`` is set once that many heartbeats landed during the outage.
    """

    def __init__(self) -> None:
        super().__init__(lease_seconds=LEASE, heartbeat_interval=0.1, timeout=30)
        self.locked = False
        self.failed_appends = 0
        self.beats_while_locked = 0
        self.outage_beats = threading.Event()
        self.open_fails: Exception | None = None

    def open(self, stream_id: str, *, owner: str | None = None) -> Any:
        if self.open_fails is not None:
            raise self.open_fails
        return super().open(stream_id, owner=owner)

    def _append(self, stream: Any, events: Any) -> None:
        if self.locked:
            self.failed_appends += 1
            raise StorageUnavailable("The test backend is locked.")
        super()._append(stream, events)

    def _heartbeat(self, stream: Any) -> bool:
        cancel = super()._heartbeat(stream)
        if self.locked:
            self.beats_while_locked += 1
            if self.beats_while_locked >= BEATS_DURING_OUTAGE:
                self.outage_beats.set()
        return cancel


@pytest.fixture
def storage() -> Iterator[LockedStorage]:
    manager = LockedStorage()
    yield manager
    manager.close()


def test_a_reader_never_sees_a_retrying_producer_as_lost(storage: LockedStorage) -> None:
    runner = Runner(storage, write_retry_timeout=60)
    gate = threading.Event()

    def flow(data: Any, ctx: FlowContext) -> Any:
        ctx.send_chunk("before")
        gate.wait(30)
        for i in range(5):
            ctx.send_chunk(i)
        return "end"

    try:
        run = runner.start("f", flow, None)
        first = next(iter(storage.subscribe(run.stream_id)))
        assert first.payload == '"before"'
        storage.locked = True
        gate.set()  # the rest is emitted while storage refuses appends
        followed: list[Event] = []
        reader = threading.Thread(
            target=lambda: followed.extend(storage.subscribe(run.stream_id, timeout=30))
        )
        reader.start()
        assert storage.outage_beats.wait(30)  # several leases of outage, heartbeats going on
        assert storage.failed_appends > 0
        assert run.wait(10) is not None
        storage.locked = False
        reader.join(30)
        assert runner.tasks.join(10)
        stored = list(storage.subscribe(run.stream_id))
        assert [e.payload for e in stored] == ['"before"', "0", "1", "2", "3", "4", '"end"']
        assert followed == stored  # the follower saw the whole stream, not "Producer lost"
    finally:
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
        terminal = run.wait(10)
        assert terminal is not None and terminal.payload == "7"
    finally:
        runner.shutdown(5)
