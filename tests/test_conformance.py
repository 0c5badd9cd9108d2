"""The StreamManager contract. Every backend in tests/backends/ must pass all of it.

Includes Genkit's own manager cases (replay identical to live, subscribe in
progress, unknown id, duplicate chunks kept, error stored, late subscriber,
5 concurrent subscribers x 10 chunks, TTL of finished streams only).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flask_durable_stream import (
    Event,
    EventTooLarge,
    FlowError,
    StorageUnavailable,
    StreamClosed,
    StreamExists,
    StreamManager,
    StreamNotFound,
    StreamStatus,
    StreamTimeout,
)
from flask_durable_stream.managers.base import StreamWriter

MakeManager = Callable[..., StreamManager]


def new_id() -> str:
    return uuid.uuid4().hex


def collect(events: Iterator[Event]) -> list[tuple[int, str, str]]:
    return [(e.seq, e.kind, e.payload) for e in events]


def produce(writer: StreamWriter, chunks: list[object], output: object, delay: float = 0.0) -> None:
    for chunk in chunks:
        if delay:
            time.sleep(delay)
        writer.write(chunk)
    writer.done(output)


def in_thread(fn: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def test_sequence_numbers_and_replay_after_completion(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    produce(writer, [{"n": 1}, "two", 3, None, [4]], {"text": "done"})
    events = collect(manager.subscribe(sid))
    assert events == [
        (0, "chunk", '{"n":1}'),
        (1, "chunk", '"two"'),
        (2, "chunk", "3"),
        (3, "chunk", "null"),
        (4, "chunk", "[4]"),
        (5, "done", '{"text":"done"}'),
    ]
    assert collect(manager.subscribe(sid)) == events  # a second replay is identical


def test_subscribe_in_progress_gets_everything_once(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    writer.write("early-0")
    writer.write("early-1")
    sub = manager.subscribe(sid)
    thread = in_thread(produce, writer, [f"late-{i}" for i in range(8)], "out", 0.02)
    events = collect(sub)
    thread.join(5)
    assert [e[0] for e in events] == list(range(11))
    assert [e[2] for e in events[:2]] == ['"early-0"', '"early-1"']
    assert events[-1] == (10, "done", '"out"')


def test_unknown_id_is_not_found(manager: StreamManager) -> None:
    with pytest.raises(StreamNotFound) as info:
        manager.subscribe(new_id())
    assert info.value.status == "NOT_FOUND"
    assert manager.info(new_id()) is None
    with pytest.raises(StreamNotFound):
        manager.request_cancel(new_id())


def test_open_existing_id_is_already_exists(manager: StreamManager) -> None:
    sid = new_id()
    manager.open(sid)
    with pytest.raises(StreamExists) as info:
        manager.open(sid)
    assert info.value.status == "ALREADY_EXISTS"


def test_duplicate_chunks_are_kept(manager: StreamManager) -> None:
    sid = new_id()
    produce(manager.open(sid), ["same", "same", "same"], "same")
    assert [e.payload for e in manager.subscribe(sid)] == ['"same"'] * 4


def test_error_is_stored_and_replayed(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    writer.write("partial")
    writer.error(FlowError("INVALID_ARGUMENT", "bad topic"))
    events = collect(manager.subscribe(sid))
    assert events == [
        (0, "chunk", '"partial"'),
        (1, "error", '{"status":"INVALID_ARGUMENT","message":"bad topic"}'),
    ]
    info = manager.info(sid)
    assert info is not None and info.status is StreamStatus.ERROR


def test_non_public_errors_are_redacted_before_storage(manager: StreamManager) -> None:
    sid = new_id()
    manager.open(sid).error(RuntimeError("password=hunter2"))
    (event,) = list(manager.subscribe(sid))
    assert event.payload == '{"status":"INTERNAL","message":"Internal Error"}'
    assert "hunter2" not in repr(manager.info(sid))


def test_writes_after_terminal_event_fail(manager: StreamManager) -> None:
    for finish in ("done", "error"):
        writer = manager.open(new_id())
        writer.write(1)
        writer.done(2) if finish == "done" else writer.error(FlowError("ABORTED", "x"))
        with pytest.raises(StreamClosed) as info:
            writer.write(3)
        assert info.value.status == "FAILED_PRECONDITION"
        with pytest.raises(StreamClosed):
            writer.done(4)
        with pytest.raises(StreamClosed):
            writer.error(FlowError("ABORTED", "again"))


def test_append_requires_contiguous_sequence(manager: StreamManager) -> None:
    writer = manager.open(new_id())
    with pytest.raises(ValueError):
        writer.append([Event(1, "chunk", "1")])
    with pytest.raises(StreamClosed):
        writer.append([Event(0, "done", "1"), Event(1, "chunk", "2")])


def test_backend_append_is_idempotent_per_seq(manager: StreamManager) -> None:
    """The runner retries a failed append with the same events: no duplicates."""
    sid = new_id()
    writer = manager.open(sid)
    batch = [Event(0, "chunk", '"a"'), Event(1, "chunk", '"b"')]
    writer._append(batch)  # a first attempt that reached storage but reported failure
    writer.append(batch)  # the retry
    writer.done("end")
    assert [e.seq for e in manager.subscribe(sid)] == [0, 1, 2]


def test_subscribe_after_offset(manager: StreamManager) -> None:
    sid = new_id()
    produce(manager.open(sid), list(range(6)), "end")
    assert [e.seq for e in manager.subscribe(sid, after=3)] == [4, 5, 6]
    assert [e.seq for e in manager.subscribe(sid, after=-1)] == list(range(7))
    assert list(manager.subscribe(sid, after=6)) == []  # already has the terminal event


def test_subscribe_after_offset_of_live_stream(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    for i in range(4):
        writer.write(i)
    sub = manager.subscribe(sid, after=1)
    thread = in_thread(produce, writer, [4, 5], "end", 0.02)
    assert [e.seq for e in sub] == [2, 3, 4, 5, 6]
    thread.join(5)


def test_late_subscriber_sees_identical_sequence(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    early = manager.subscribe(sid)
    thread = in_thread(produce, writer, [f"c{i}" for i in range(10)], {"ok": True}, 0.01)
    live = collect(early)
    thread.join(5)
    late = collect(manager.subscribe(sid))
    assert live == late and len(live) == 11


def test_five_concurrent_subscribers_ten_chunks(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    results: list[list[tuple[int, str, str]]] = [[] for _ in range(5)]

    def read(i: int) -> None:
        results[i] = collect(manager.subscribe(sid))

    readers = [in_thread(read, i) for i in range(5)]
    produce(writer, [f"chunk-{i}" for i in range(10)], "final", 0.01)
    for r in readers:
        r.join(10)
    expected = [(i, "chunk", f'"chunk-{i}"') for i in range(10)] + [(10, "done", '"final"')]
    assert results == [expected] * 5


def test_slow_subscriber_does_not_block_producer(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    writer.write(0)
    slow = manager.subscribe(sid)
    first = next(slow)  # then stops reading while the producer goes on
    produce(writer, list(range(1, 300)), "end")
    rest = list(slow)
    assert [first.seq] + [e.seq for e in rest] == list(range(301))


def test_unicode_and_large_payloads_round_trip(manager: StreamManager) -> None:
    sid = new_id()
    big = "x" * 200_000
    produce(manager.open(sid), ["héllo ✓ 🚀", {"k": big}, "\n\n data: fake\n\n"], "日本")
    payloads = [e.payload for e in manager.subscribe(sid)]
    assert payloads == [
        '"héllo ✓ 🚀"',
        '{"k":"' + big + '"}',
        '"\\n\\n data: fake\\n\\n"',
        '"日本"',
    ]


def test_info_tracks_status_and_sequence(manager: StreamManager) -> None:
    sid = new_id()
    before = time.time()
    writer = manager.open(sid, owner="user-1")
    info = manager.info(sid)
    assert info is not None
    assert info.status is StreamStatus.OPEN and info.last_seq == -1 and info.owner == "user-1"
    assert before - 1 <= info.created_at <= time.time() + 1
    writer.write("a")
    writer.done("b")
    info = manager.info(sid)
    assert info is not None
    assert info.status is StreamStatus.DONE and info.last_seq == 1
    assert info.updated_at >= info.created_at
    assert sid in [i.stream_id for i in manager.list_streams()]


def test_cancelled_terminal_sets_cancelled_status(manager: StreamManager) -> None:
    sid = new_id()
    manager.open(sid).error(FlowError("CANCELLED", "Cancelled by client."))
    info = manager.info(sid)
    assert info is not None and info.status is StreamStatus.CANCELLED


def test_cancel_flag_reaches_producer(manager: StreamManager) -> None:
    sid = new_id()
    writer = manager.open(sid)
    assert writer.heartbeat() is False
    assert manager.request_cancel(sid) is True
    assert writer.heartbeat() is True
    info = manager.info(sid)
    assert info is not None and info.cancel_requested
    writer.done(None)
    assert manager.request_cancel(sid) is False  # already finished


def test_finished_streams_expire_open_ones_do_not(make_manager: MakeManager) -> None:
    manager = make_manager(ttl_seconds=0.5)
    finished, still_open = new_id(), new_id()
    produce(manager.open(finished), ["a"], "b")
    writer = manager.open(still_open)
    writer.write("a")
    time.sleep(0.8)
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


def test_gc_removes_expired_streams(make_manager: MakeManager) -> None:
    manager = make_manager(ttl_seconds=0.2)
    finished = [new_id() for _ in range(3)]
    for sid in finished:
        produce(manager.open(sid), [], None)
    still_open = new_id()
    manager.open(still_open).heartbeat()
    time.sleep(0.4)
    manager.gc()  # backends with an in-process sweep may have removed them already
    listed = {i.stream_id for i in manager.list_streams(limit=1000)}
    assert not listed & set(finished)
    assert still_open in listed
    assert manager.gc() == 0


def test_subscriber_times_out_without_events_or_heartbeats(make_manager: MakeManager) -> None:
    manager = make_manager(timeout=0.5, lease_seconds=30)
    sid = new_id()
    manager.open(sid).write("only")
    sub = manager.subscribe(sid)
    assert next(sub).seq == 0
    started = time.monotonic()
    with pytest.raises(StreamTimeout) as info:
        next(sub)
    assert info.value.status == "DEADLINE_EXCEEDED"
    assert 0.4 <= time.monotonic() - started < 5


def test_heartbeats_keep_a_quiet_stream_alive(make_manager: MakeManager) -> None:
    manager = make_manager(timeout=0.6, lease_seconds=30)
    sid = new_id()
    writer = manager.open(sid)
    stop = threading.Event()

    def beat() -> None:
        for _ in range(15):  # 1.5 s of silence, heartbeats only
            if stop.wait(0.1):
                return
            writer.heartbeat()
        writer.done("finally")

    thread = in_thread(beat)
    events = collect(manager.subscribe(sid))
    stop.set()
    thread.join(5)
    assert events == [(0, "done", '"finally"')]


def test_dead_producer_lease_ends_stream_for_everyone(make_manager: MakeManager) -> None:
    manager = make_manager(timeout=30, lease_seconds=0.6, heartbeat_interval=0.1)
    sid = new_id()
    writer = manager.open(sid)
    writer.write("before the crash")  # then the producer vanishes without a terminal event
    started = time.monotonic()
    events = collect(manager.subscribe(sid))
    assert time.monotonic() - started < 0.6 + 3
    assert events[0] == (0, "chunk", '"before the crash"')
    assert events[1][:2] == (1, "error")
    assert '"UNAVAILABLE"' in events[1][2]
    assert collect(manager.subscribe(sid)) == events
    info = manager.info(sid)
    assert info is not None and info.status is StreamStatus.ERROR
    with pytest.raises(StreamClosed):  # a producer that comes back cannot append
        writer.write("after the lease")


def test_abandoned_open_streams_go_away(make_manager: MakeManager) -> None:
    """A producer that died with nobody reading must not leave its stream behind forever."""
    manager = make_manager(lease_seconds=0.3, ttl_seconds=0.3)
    abandoned, alive = new_id(), new_id()
    manager.open(abandoned).write("last words")
    writer = manager.open(alive)
    deadline = time.monotonic() + 10
    while manager.info(abandoned) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        writer.heartbeat()
        manager.gc()
    assert manager.info(abandoned) is None
    with pytest.raises(StreamNotFound):
        manager.subscribe(abandoned)
    info = manager.info(alive)  # a producer that keeps beating keeps its stream
    assert info is not None and info.status is StreamStatus.OPEN


# -- the storage fault model ----------------------------------------------------------------------


def test_an_event_over_max_event_bytes_is_too_large_and_the_stream_goes_on(
    manager: StreamManager,
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


def runner_like_batches(events: list[Event]) -> Iterator[list[Event]]:
    """Batches of the sizes a runner hands over when a fast flow outpaces storage."""
    sizes = [1, 3, 64, 1000, 7, 5000, 256, 20_000]
    start = 0
    for i in range(len(events)):
        if start >= len(events):
            return
        end = min(len(events), start + sizes[i % len(sizes)])
        yield events[start:end]
        start = end


@pytest.mark.parametrize(("chunks", "size"), [(10_000, 1024), (100_000, 16)])
def test_a_large_fast_stream_replays_byte_for_byte(
    manager: StreamManager, chunks: int, size: int
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


def test_a_retried_append_after_a_transient_failure_is_idempotent(manager: StreamManager) -> None:
    """The append reached storage but the caller saw an error: the retry stores nothing twice."""
    sid = new_id()
    writer = manager.open(sid)
    writer.write("first")
    original = writer._append
    failures = []

    def lands_then_fails(events: Any) -> None:
        original(events)
        if not failures:
            failures.append(len(events))
            raise StorageUnavailable("connection reset after the write")

    writer._append = lands_then_fails  # type: ignore[method-assign]
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
