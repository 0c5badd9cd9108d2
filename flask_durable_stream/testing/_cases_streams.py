"""Contract cases: writing, replaying and following one stream.

Includes Genkit's own manager cases (replay identical to live, subscribe in
progress, unknown id, duplicate chunks kept, error stored, late subscriber,
5 concurrent subscribers x 10 chunks).
"""

from __future__ import annotations

import time

import pytest

from ..exceptions import FlowError, StreamClosed, StreamExists, StreamNotFound
from ..managers.base import Event, StreamManager, StreamStatus
from ._support import collect, in_thread, new_id, produce


class StreamCases:
    def test_sequence_numbers_and_replay_after_completion(self, manager: StreamManager) -> None:
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

    def test_subscribe_in_progress_gets_everything_once(self, manager: StreamManager) -> None:
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

    def test_unknown_id_is_not_found(self, manager: StreamManager) -> None:
        with pytest.raises(StreamNotFound) as info:
            manager.subscribe(new_id())
        assert info.value.status == "NOT_FOUND"
        assert manager.info(new_id()) is None
        with pytest.raises(StreamNotFound):
            manager.request_cancel(new_id())

    def test_open_existing_id_is_already_exists(self, manager: StreamManager) -> None:
        sid = new_id()
        manager.open(sid)
        with pytest.raises(StreamExists) as info:
            manager.open(sid)
        assert info.value.status == "ALREADY_EXISTS"

    def test_duplicate_chunks_are_kept(self, manager: StreamManager) -> None:
        sid = new_id()
        produce(manager.open(sid), ["same", "same", "same"], "same")
        assert [e.payload for e in manager.subscribe(sid)] == ['"same"'] * 4

    def test_error_is_stored_and_replayed(self, manager: StreamManager) -> None:
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

    def test_non_public_errors_are_redacted_before_storage(self, manager: StreamManager) -> None:
        sid = new_id()
        manager.open(sid).error(RuntimeError("password=hunter2"))
        (event,) = list(manager.subscribe(sid))
        assert event.payload == '{"status":"INTERNAL","message":"Internal Error"}'
        assert "hunter2" not in repr(manager.info(sid))

    def test_writes_after_terminal_event_fail(self, manager: StreamManager) -> None:
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

    def test_append_requires_contiguous_sequence(self, manager: StreamManager) -> None:
        writer = manager.open(new_id())
        with pytest.raises(ValueError):
            writer.append([Event(1, "chunk", "1")])
        with pytest.raises(StreamClosed):
            writer.append([Event(0, "done", "1"), Event(1, "chunk", "2")])

    def test_store_is_idempotent_per_seq(self, manager: StreamManager) -> None:
        """The runner retries a failed append with the same events: no duplicates."""
        sid = new_id()
        writer = manager.open(sid)
        batch = [Event(0, "chunk", '"a"'), Event(1, "chunk", '"b"')]
        writer.store(batch)  # a first attempt that reached storage but reported failure
        writer.append(batch)  # the retry
        writer.done("end")
        assert [e.seq for e in manager.subscribe(sid)] == [0, 1, 2]

    def test_subscribe_after_offset(self, manager: StreamManager) -> None:
        sid = new_id()
        produce(manager.open(sid), list(range(6)), "end")
        assert [e.seq for e in manager.subscribe(sid, after=3)] == [4, 5, 6]
        assert [e.seq for e in manager.subscribe(sid, after=-1)] == list(range(7))
        assert list(manager.subscribe(sid, after=6)) == []  # already has the terminal event

    def test_subscribe_after_offset_of_live_stream(self, manager: StreamManager) -> None:
        sid = new_id()
        writer = manager.open(sid)
        for i in range(4):
            writer.write(i)
        sub = manager.subscribe(sid, after=1)
        thread = in_thread(produce, writer, [4, 5], "end", 0.02)
        assert [e.seq for e in sub] == [2, 3, 4, 5, 6]
        thread.join(5)

    def test_late_subscriber_sees_identical_sequence(self, manager: StreamManager) -> None:
        sid = new_id()
        writer = manager.open(sid)
        early = manager.subscribe(sid)
        thread = in_thread(produce, writer, [f"c{i}" for i in range(10)], {"ok": True}, 0.01)
        live = collect(early)
        thread.join(5)
        late = collect(manager.subscribe(sid))
        assert live == late and len(live) == 11

    def test_five_concurrent_subscribers_ten_chunks(self, manager: StreamManager) -> None:
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

    def test_slow_subscriber_does_not_block_producer(self, manager: StreamManager) -> None:
        sid = new_id()
        writer = manager.open(sid)
        writer.write(0)
        slow = manager.subscribe(sid)
        first = next(slow)  # then stops reading while the producer goes on
        produce(writer, list(range(1, 300)), "end")
        rest = list(slow)
        assert [first.seq] + [e.seq for e in rest] == list(range(301))

    def test_unicode_and_large_payloads_round_trip(self, manager: StreamManager) -> None:
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

    def test_info_tracks_status_and_sequence(self, manager: StreamManager) -> None:
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

    def test_the_flow_name_is_kept_with_the_stream(self, manager: StreamManager) -> None:
        named, unnamed = new_id(), new_id()
        writer = manager.open(named, owner="u", flow="f")
        produce(manager.open(unnamed), [], None)
        info = manager.info(named)
        assert info is not None and info.flow == "f" and info.owner == "u"
        unnamed_info = manager.info(unnamed)
        assert unnamed_info is not None and unnamed_info.flow is None
        listed = {i.stream_id: i.flow for i in manager.list_streams(limit=1000)}
        assert listed[named] == "f" and listed[unnamed] is None
        assert manager.request_cancel(named) is True
        writer.heartbeat()
        produce(writer, ["a"], "b")  # kept through heartbeats, cancel and the terminal event
        info = manager.info(named)
        assert info is not None and info.flow == "f" and info.status is StreamStatus.DONE
        assert info.to_dict()["flow"] == "f"

    def test_cancelled_terminal_sets_cancelled_status(self, manager: StreamManager) -> None:
        sid = new_id()
        manager.open(sid).error(FlowError("CANCELLED", "Cancelled by client."))
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.CANCELLED

    def test_cancel_flag_reaches_producer(self, manager: StreamManager) -> None:
        sid = new_id()
        writer = manager.open(sid)
        assert writer.heartbeat() is False
        assert manager.request_cancel(sid) is True
        assert writer.heartbeat() is True
        info = manager.info(sid)
        assert info is not None and info.cancel_requested
        writer.done(None)
        assert manager.request_cancel(sid) is False  # already finished

    def test_an_append_that_beats_carries_the_cancel_flag_back(
        self, manager: StreamManager
    ) -> None:
        sid = new_id()
        writer = manager.open(sid)
        writer.write("a")
        assert writer.cancel_requested is False
        assert manager.request_cancel(sid) is True
        writer.write("b")
        # Where appends do a heartbeat's work the producer learns of it from its append;
        # elsewhere from its next heartbeat, and the attribute stays unset.
        assert writer.cancel_requested is writer.append_beats
        assert writer.heartbeat() is True
