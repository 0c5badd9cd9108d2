"""Defaults of the StreamManager base class, for third-party backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flask_durable_stream import Event, StreamManager


class OnlySubscribe(StreamManager):
    def subscribe(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[Event]:
        return iter([Event(0, "chunk", "1"), Event(1, "done", "2")])


class OnlyBatches(StreamManager):
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        return iter([[Event(0, "chunk", "1"), Event(1, "done", "2")]])


def test_either_subscribe_method_gives_the_other() -> None:
    assert [len(b) for b in OnlySubscribe().subscribe_batches("s")] == [1, 1]
    assert [e.seq for e in OnlyBatches().subscribe("s")] == [0, 1]


def test_a_manager_with_neither_says_so() -> None:
    with pytest.raises(NotImplementedError, match="subscribe_batches or subscribe"):
        StreamManager().subscribe("s")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        StreamManager(lease_seconds=0)
    assert StreamManager(lease_seconds=5).heartbeat_interval == 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stale_heartbeat_at_arrival_is_not_a_lost_producer() -> None:
    """Storage just came back after a long outage: the heartbeat is old, the producer alive."""
    from flask_durable_stream.managers.base import ProducerWatch

    clock = Clock()
    watch = ProducerWatch(10.0, clock=clock)
    stored_now = 5000.0
    assert watch.observe(stored_now - 60, stored_now) == pytest.approx(10.0)  # a full lease
    clock.now, stored_now = 3.0, stored_now + 3
    assert watch.observe(stored_now - 63, stored_now) > 0  # same value: still waiting
    clock.now, stored_now = 4.0, stored_now + 1
    assert watch.observe(stored_now, stored_now) == pytest.approx(10.0)  # it heartbeat: alive


def test_a_killed_producer_is_lost_one_lease_after_the_reader_arrives() -> None:
    from flask_durable_stream.managers.base import ProducerWatch

    clock = Clock()
    watch = ProducerWatch(10.0, clock=clock)
    beat = 100.0  # the last heartbeat, 1 s before the kill; the reader arrives at the kill
    assert watch.observe(beat, beat + 1) == pytest.approx(10.0)
    clock.now = 9.9
    assert watch.observe(beat, beat + 10.9) > 0
    clock.now = 10.0
    assert watch.observe(beat, beat + 11.0) <= 0  # lost within the lease of its arrival


def test_a_readers_own_storage_failure_restarts_its_lease() -> None:
    from flask_durable_stream.managers.base import ProducerWatch

    clock = Clock()
    watch = ProducerWatch(10.0, clock=clock)
    watch.observe(0.0, 1.0)
    clock.now = 9.0
    watch.storage_failed()  # the producer could not heartbeat through that either
    clock.now = 12.0
    assert watch.observe(0.0, 13.0) == pytest.approx(10.0)
    clock.now = 22.0
    assert watch.observe(0.0, 23.0) <= 0


def test_display_name_defaults_to_the_class_name() -> None:
    class ExampleStreamManager(StreamManager):
        pass

    class Named(StreamManager):
        backend_name = "Firestore"

    assert ExampleStreamManager().display_name == "Example"
    assert Named().display_name == "Firestore"
