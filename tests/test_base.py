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


def test_readers_one_after_another_go_on_with_the_same_watch() -> None:
    from flask_durable_stream.managers.base import ProducerWatches

    clock = Clock()
    watches = ProducerWatches(clock=clock)
    first = watches.watch("s", 10.0)
    assert first.observe(100.0, 101.0) == pytest.approx(10.0)  # its last heartbeat
    clock.now = 2.0
    first.end()  # a long-poll's end, 2 s in
    clock.now = 2.1  # the next long-poll, right after: within the gap (1 s at a 10 s lease)
    second = watches.watch("s", 10.0)
    clock.now = 10.0
    assert second.observe(100.0, 110.0) == pytest.approx(0.0)  # 10 s since the first saw it
    another = watches.watch("other", 10.0)  # another stream's reader starts its own lease
    assert another.observe(100.0, 110.0) == pytest.approx(10.0)


def test_a_reader_after_a_gap_or_a_storage_failure_starts_its_own_lease() -> None:
    from flask_durable_stream.managers.base import ProducerWatches

    clock = Clock()
    watches = ProducerWatches(clock=clock)
    first = watches.watch("s", 10.0)
    first.observe(100.0, 101.0)
    clock.now = 2.0
    first.end()
    clock.now = 3.5  # nobody watched for 1.5 s: storage may have been down meanwhile
    late = watches.watch("s", 10.0)
    assert late.observe(100.0, 111.0) == pytest.approx(10.0)
    clock.now = 4.0
    late.end(failed=True)  # its storage calls failed: nothing to go on with
    clock.now = 4.1
    after_failure = watches.watch("s", 10.0)
    assert after_failure.observe(100.0, 112.0) == pytest.approx(10.0)
    after_failure.end()
    clock.now = 4.2
    after_a_new_heartbeat = watches.watch("s", 10.0)
    assert after_a_new_heartbeat.observe(111.0, 112.0) == pytest.approx(10.0)


def test_what_readers_leave_is_bounded() -> None:
    from flask_durable_stream.managers.base import ProducerWatches

    clock = Clock()
    watches = ProducerWatches(clock=clock, limit=4)
    for n in range(4):
        watch = watches.watch(f"old-{n}", 10.0)
        watch.observe(100.0, 101.0)
        watch.end()
    clock.now = 5.0  # every one of them past its gap
    for n in range(3):
        watch = watches.watch(f"new-{n}", 10.0)
        watch.observe(100.0, 106.0)
        watch.end()
    assert len(watches._left) == 3  # the stale ones went when the limit was reached
