"""Contract cases: expiry, heartbeats, producer loss, the storage fault model, shared storage.

TTL and abandoned-stream cases run on a :class:`ManualClock`; the cases about
a reader's own patience (timeouts, the producer lease a reader measures
itself) wait on real time, bounded by a short lease or timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import pytest

from ..exceptions import (
    EventTooLarge,
    StorageUnavailable,
    StreamClosed,
    StreamNotFound,
    StreamTimeout,
)
from ..managers.base import Event, StreamManager, StreamStatus
from ._support import (
    MakeManager,
    ManualClock,
    collect,
    in_thread,
    new_id,
    produce,
    runner_like_batches,
)


class LifecycleCases:
    shares_storage: ClassVar[bool]

    def use_clock(self, manager: StreamManager, clock: ManualClock) -> None:
        raise NotImplementedError  # StreamManagerContract defines it

    # -- expiry, on the clock ---------------------------------------------------------------------

    def test_finished_streams_expire_open_ones_do_not(
        self, make_manager: MakeManager, clock: ManualClock
    ) -> None:
        manager = make_manager(ttl_seconds=30, lease_seconds=120)
        self.use_clock(manager, clock)
        finished, still_open = new_id(), new_id()
        produce(manager.open(finished), ["a"], "b")
        writer = manager.open(still_open)
        writer.write("a")
        clock.advance(31)
        writer.heartbeat()
        manager.gc()
        with pytest.raises(StreamNotFound):
            manager.subscribe(finished)
        assert manager.info(finished) is None
        info = manager.info(still_open)
        assert info is not None and info.status is StreamStatus.OPEN
        writer.done("late")
        assert [e.seq for e in manager.subscribe(still_open)] == [0, 1]
        manager.open(finished)  # an expired id is free again

    def test_a_finished_stream_stays_until_its_ttl(
        self, make_manager: MakeManager, clock: ManualClock
    ) -> None:
        manager = make_manager(ttl_seconds=30, lease_seconds=120)
        self.use_clock(manager, clock)
        sid = new_id()
        produce(manager.open(sid), ["a"], "b")
        clock.advance(29)
        assert manager.gc() == 0
        assert [e.seq for e in manager.subscribe(sid)] == [0, 1]

    def test_gc_removes_expired_streams(
        self, make_manager: MakeManager, clock: ManualClock
    ) -> None:
        manager = make_manager(ttl_seconds=30, lease_seconds=120)
        self.use_clock(manager, clock)
        finished = [new_id() for _ in range(3)]
        for sid in finished:
            produce(manager.open(sid), [], None)
        still_open = new_id()
        writer = manager.open(still_open)
        clock.advance(31)
        writer.heartbeat()
        manager.gc()
        listed = {i.stream_id for i in manager.list_streams(limit=1000)}
        assert not listed & set(finished)
        assert still_open in listed
        assert manager.gc() == 0

    def test_gc_takes_the_time_to_expire_at(self, make_manager: MakeManager) -> None:
        manager = make_manager(ttl_seconds=30, lease_seconds=3600)
        sid = new_id()
        produce(manager.open(sid), [], None)
        assert manager.gc(now=manager.now() + 10) == 0
        assert manager.info(sid) is not None
        assert manager.gc(now=manager.now() + 31) == 1
        assert manager.info(sid) is None

    def test_abandoned_open_streams_go_away(
        self, make_manager: MakeManager, clock: ManualClock
    ) -> None:
        """A producer that died with nobody reading must not leave its stream behind forever."""
        manager = make_manager(lease_seconds=5, ttl_seconds=5)
        self.use_clock(manager, clock)
        abandoned, alive = new_id(), new_id()
        manager.open(abandoned).write("last words")
        writer = manager.open(alive)
        for _ in range(6):  # ended once its lease is over, removed once its TTL is too
            if manager.info(abandoned) is None:
                break
            clock.advance(3)
            writer.heartbeat()
            manager.gc()
        assert manager.info(abandoned) is None
        with pytest.raises(StreamNotFound):
            manager.subscribe(abandoned)
        info = manager.info(alive)  # a producer that keeps beating keeps its stream
        assert info is not None and info.status is StreamStatus.OPEN

    def test_a_producer_that_keeps_appending_keeps_its_lease(
        self, make_manager: MakeManager, clock: ManualClock
    ) -> None:
        """Where appends do a heartbeat's work (``append_beats``), appends alone keep the
        lease; elsewhere the producer heartbeats between them, as the runner does."""
        manager = make_manager(lease_seconds=5, ttl_seconds=5)
        self.use_clock(manager, clock)
        sid = new_id()
        writer = manager.open(sid)
        for n in range(6):  # 18 s, more than three leases
            clock.advance(3)
            if not writer.append_beats:
                writer.heartbeat()
            writer.write(n)
            manager.gc()
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.OPEN

    # -- a reader's own patience, in real time ----------------------------------------------------

    def test_subscriber_times_out_without_events_or_heartbeats(
        self, make_manager: MakeManager
    ) -> None:
        manager = make_manager(timeout=0.5, lease_seconds=30)
        sid = new_id()
        manager.open(sid).write("only")
        # Reading from after the stored event, the first wait is the silent one: how fast a busy
        # backend delivers "only" cannot eat into the 0.5 s.
        sub = manager.subscribe(sid, after=0)
        started = time.monotonic()
        with pytest.raises(StreamTimeout) as info:
            next(sub)
        assert info.value.status == "DEADLINE_EXCEEDED"
        assert 0.4 <= time.monotonic() - started

    def test_heartbeats_keep_a_quiet_stream_alive(self, make_manager: MakeManager) -> None:
        # Beats every 0.1 s against a 1.5 s timeout: a busy machine has 15 beats of slack, and the
        # 3 s of silence is twice the timeout, so the stream only survives because of the beats.
        manager = make_manager(timeout=1.5, lease_seconds=30)
        sid = new_id()
        writer = manager.open(sid)
        stop = threading.Event()

        def beat() -> None:
            for _ in range(30):  # 3 s of silence, heartbeats only
                if stop.wait(0.1):
                    return
                writer.heartbeat()
            writer.done("finally")

        thread = in_thread(beat)
        events = collect(manager.subscribe(sid))
        stop.set()
        thread.join(5)
        assert events == [(0, "done", '"finally"')]

    def test_dead_producer_lease_ends_stream_for_everyone(self, make_manager: MakeManager) -> None:
        """The lost stream's error goes right after its own last event, whatever other
        streams of the same storage hold (here one that is further along)."""
        manager = make_manager(timeout=30, lease_seconds=0.6, heartbeat_interval=0.1)
        further = manager.open(new_id())
        for n in range(3):
            further.write(n)
        sid = new_id()
        writer = manager.open(sid)
        writer.write("before the crash")  # then the producer vanishes without a terminal event
        events = collect(manager.subscribe(sid))  # ends within the lease, not the 30 s timeout
        assert events[0] == (0, "chunk", '"before the crash"')
        assert events[1][:2] == (1, "error")
        assert '"UNAVAILABLE"' in events[1][2]
        assert collect(manager.subscribe(sid)) == events
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.ERROR and info.last_seq == 1
        with pytest.raises(StreamClosed):  # a producer that comes back cannot append
            writer.write("after the lease")

    def test_readers_one_after_another_judge_the_lease_together(
        self, make_manager: MakeManager
    ) -> None:
        """Readers that each give up before a lease has passed (a Durable Streams client's
        long-polls, shorter than the lease), one right after another in the same process:
        the stream still ends "Producer lost", as for one reader that stayed a lease."""
        manager = make_manager(timeout=0.2, lease_seconds=1.0, heartbeat_interval=0.1)
        sid = new_id()
        writer = manager.open(sid)
        writer.write("before the crash")  # then the producer vanishes without a terminal event
        gave_up = 0
        events: list[tuple[int, str, str]] = []
        while not events and gave_up < 50:  # 10 s of readers: ten leases
            try:
                events = collect(manager.subscribe(sid, after=0))
            except StreamTimeout:
                gave_up += 1
        assert gave_up >= 1, "a single reader saw the lease end: the case proves nothing"
        assert len(events) == 1 and events[0][:2] == (1, "error"), (gave_up, events)
        assert '"UNAVAILABLE"' in events[0][2]
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.ERROR

    def test_a_subscription_goes_on_with_the_managers_watch_of_the_stream(
        self, make_manager: MakeManager
    ) -> None:
        """The watches of ``manager.producer_watches`` are the ones its subscriptions go on
        with: a front that polls ``info`` (Durable Streams flow streams without gevent) judges
        the lease, and then a subscription ends the stream at its first look, not after a
        lease of its own."""
        manager = make_manager(timeout=30, lease_seconds=4.0, heartbeat_interval=0.1)
        sid = new_id()
        writer = manager.open(sid)
        writer.write("before the crash")  # then the producer vanishes without a terminal event
        watch = manager.producer_watches.watch(sid, manager.lease_seconds)
        while True:
            info = manager.info(sid)
            assert info is not None and info.status is StreamStatus.OPEN
            left = watch.observe(info.heartbeat_at, manager.now())
            if left <= 0:
                break
            time.sleep(min(left, 0.2))
        watch.end()
        started = time.monotonic()
        events = collect(manager.subscribe(sid, after=0))
        took = time.monotonic() - started
        assert len(events) == 1 and events[0][:2] == (1, "error"), events
        # A watch of its own could not call the producer lost before a whole lease.
        assert took < manager.lease_seconds, f"the subscription took {took:.1f} s"

    def test_a_reader_past_the_stored_end_of_a_lost_stream_ends_with_it(
        self, make_manager: MakeManager
    ) -> None:
        """A reader can be ahead of storage: its client had events that their worker sent
        and never stored. Once the producer's lease runs out the follow marks the stream
        lost (the error takes the next stored seq, one the client had as a chunk) and
        ends, within the lease, not the timeout, without an event (the fronts then send
        the stored error: the reader may also yield it)."""
        manager = make_manager(timeout=30, lease_seconds=0.6, heartbeat_interval=0.1)
        sid = new_id()
        writer = manager.open(sid)
        writer.write("stored")  # seq 0; the client also had 1, 2 and 3
        events = collect(manager.subscribe(sid, after=3))
        assert all(kind == "error" for _, kind, _ in events), events
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.ERROR and info.last_seq == 1
        assert collect(manager.subscribe(sid, after=0))[0][:2] == (1, "error")

    # -- the storage fault model ------------------------------------------------------------------

    def test_an_event_over_max_event_bytes_is_too_large_and_the_stream_goes_on(
        self, manager: StreamManager
    ) -> None:
        """Checked by append itself, whatever the limit (lowered here to keep the test small)."""
        manager.max_event_bytes = 4096
        sid = new_id()
        writer = manager.open(sid)
        writer.write("before")
        with pytest.raises(EventTooLarge) as info:
            writer.append([Event(1, "chunk", '"ok"'), Event(2, "chunk", '"' + "é" * 2048 + '"')])
        assert info.value.status == "RESOURCE_EXHAUSTED"
        assert (info.value.size, info.value.limit) == (4098, 4096)  # UTF-8 bytes, not characters
        assert info.value.message.startswith("Chunk 2 is 4,098 bytes; the ")
        assert info.value.message.endswith(" backend stores at most 4,096")
        assert writer.next_seq == 1  # nothing of the batch was taken: the same seq is free
        writer.write("x" * 4094)  # exactly the limit is fine
        with pytest.raises(EventTooLarge, match="^Output is "):
            writer.done("y" * 4095)
        writer.done("end")
        assert collect(manager.subscribe(sid)) == [
            (0, "chunk", '"before"'),
            (1, "chunk", '"' + "x" * 4094 + '"'),
            (2, "done", '"end"'),
        ]

    @pytest.mark.parametrize(("chunks", "size"), [(10_000, 1024), (100_000, 16)])
    def test_a_large_fast_stream_replays_byte_for_byte(
        self, manager: StreamManager, chunks: int, size: int
    ) -> None:
        sid = new_id()
        writer = manager.open(sid)
        events = [Event(seq, "chunk", f'"{seq:0{size - 2}d}"') for seq in range(chunks)]
        events.append(Event(chunks, "done", f'{{"chunks":{chunks}}}'))
        for batch in runner_like_batches(events):
            writer.append(batch)
        writer.close()
        assert list(manager.subscribe(sid)) == events
        assert list(manager.subscribe(sid, after=chunks - 2)) == events[-2:]

    def test_a_retried_append_after_a_transient_failure_is_idempotent(
        self, manager: StreamManager
    ) -> None:
        """The append reached storage but the caller saw an error: the retry stores it once."""
        sid = new_id()
        writer = manager.open(sid)
        writer.write("first")
        original = writer.store
        failures: list[int] = []

        def lands_then_fails(events: Any) -> None:
            original(events)
            if not failures:
                failures.append(len(events))
                raise StorageUnavailable("connection reset after the write")

        writer.store = lands_then_fails  # type: ignore[method-assign]
        batch = [Event(seq, "chunk", f'"b{seq}"') for seq in range(1, 6)]
        with pytest.raises(StorageUnavailable):
            writer.append(batch)
        assert writer.next_seq == 1  # nothing of the writer's state moved
        writer.append(batch)  # the runner's retry, the same events
        writer.append([Event(6, "chunk", '"after"')])
        writer.done("end")
        writer.close()
        assert collect(manager.subscribe(sid)) == [
            (0, "chunk", '"first"'),
            *[(seq, "chunk", f'"b{seq}"') for seq in range(1, 6)],
            (6, "chunk", '"after"'),
            (7, "done", '"end"'),
        ]

    # -- two managers on the same storage (two processes) -----------------------------------------

    def test_a_second_manager_follows_cancels_and_replays(self, make_manager: MakeManager) -> None:
        if not self.shares_storage:
            pytest.skip("this backend's managers do not share storage (shares_storage = False)")
        producer, reader = make_manager(), make_manager()
        sid = new_id()
        writer = producer.open(sid, owner="u", flow="story")
        writer.write("one")
        live = reader.subscribe(sid)
        assert next(live).payload == '"one"'
        assert reader.request_cancel(sid) is True
        assert writer.heartbeat() is True
        thread = in_thread(produce, writer, ["two"], "end", 0.02)
        assert [e.seq for e in live] == [1, 2]
        thread.join(5)
        assert collect(reader.subscribe(sid)) == collect(producer.subscribe(sid))
        info = reader.info(sid)
        assert info is not None and info.status is StreamStatus.DONE
        assert (info.owner, info.flow) == ("u", "story")
