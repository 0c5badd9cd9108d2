"""The run: bounded memory for slow readers, event size limits at emit time, runner options."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from flask_durable_stream import EventTooLarge, FlowContext, FlowError, InMemoryStreamManager
from flask_durable_stream.flows import fit_error
from flask_durable_stream.run import RELEASE_MIN_EVENTS, Run
from flask_durable_stream.runner import Runner, runner_for

KIB = 1024


def test_a_reader_that_stops_reading_is_dropped_and_its_events_released() -> None:
    run = Run("s", FlowContext("s"), buffer_limit=256 * KIB, reader_grace=0.05)
    run.expect_storage()
    dropped: list[bool] = []
    stuck = run.batches(on_drop=lambda: dropped.append(True))
    run.emit_chunk('"first"')
    assert next(stuck)[0].seq == 0  # then its client stops reading
    chunk = '"' + "x" * 1022 + '"'  # 1 KiB
    for _ in range(4096):  # 4 MiB, stored as it goes; the reader never asks for more
        run.emit_chunk(chunk)
        run.mark_stored(run.count)
    assert dropped == [True]  # its connection is closed once, past the bound
    assert run.held_bytes <= 256 * KIB + 128 * KIB  # the bound, plus one release step
    assert list(stuck) == []  # the dropped reader's response ends (no terminal frame)


def test_events_not_yet_stored_are_kept_whatever_their_size() -> None:
    run = Run("s", FlowContext("s"), buffer_limit=64 * KIB)
    run.expect_storage()
    for _ in range(512):
        run.emit_chunk('"' + "x" * 1022 + '"')
    assert run.held_bytes == 512 * KIB  # storage is behind: nothing may be dropped
    run.mark_stored(run.count)
    run.release()
    assert run.held_bytes < 64 * KIB


def test_a_reader_that_keeps_up_is_never_dropped() -> None:
    run = Run("s", FlowContext("s"), buffer_limit=64 * KIB)
    dropped: list[bool] = []
    reader = run.batches(on_drop=lambda: dropped.append(True))
    received = 0
    for _ in range(2048):
        run.emit_chunk('"' + "y" * 510 + '"')
        received += len(next(reader))
    run.finish(None)
    received += sum(len(b) for b in reader)
    assert received == 2049 and dropped == []
    assert run.held_bytes < 64 * KIB + 64 * KIB


def test_a_short_stream_of_small_chunks_lets_stored_and_sent_events_go_as_it_runs() -> None:
    run = Run("s", FlowContext("s"))
    run.expect_storage()
    reader = run.batches()
    for n in range(200):  # an LLM's stream: small chunks, each sent and stored
        run.emit_chunk(f'"token {n}"')
        assert [e.seq for e in next(reader)] == [n]
        run.mark_stored(run.count)
        assert len(run.events) <= 2 * RELEASE_MIN_EVENTS
    run.finish("end")
    assert [e.payload for e in next(reader)] == ['"end"']


def test_events_a_reader_or_storage_still_needs_are_kept_however_many() -> None:
    run = Run("s", FlowContext("s"))
    run.expect_storage()
    behind = run.attach()  # a live reader that has taken nothing yet
    for n in range(100):
        run.emit_chunk(f'"token {n}"')
        run.mark_stored(run.count)
    assert len(run.events) == 100  # all stored, all kept for the reader
    assert [e.seq for e in run.read(behind, None)] == list(range(100))
    run.emit_chunk('"token 100"')
    run.mark_stored(run.count)
    assert [e.seq for e in run.events] == [100]  # the reader has not taken this one yet
    for n in range(101, 200):  # storage stops taking events; the reader keeps up
        run.emit_chunk(f'"token {n}"')
        run.read(behind, None)
    assert [e.seq for e in run.events if e.seq > 100] == list(range(101, 200))  # for storage
    run.mark_stored(run.count)
    assert run.events == []


class LimitedManager(InMemoryStreamManager):
    backend_name = "Firestore"
    max_event_bytes = 1_046_528


@pytest.fixture
def limited() -> Iterator[Runner]:
    manager = LimitedManager()
    runner = Runner(manager)
    yield runner
    runner.shutdown(5)
    manager.close()


def stored_and_live(runner: Runner, flow: Any) -> tuple[list[Any], Any]:
    run = runner.start("f", flow, None)
    assert run.wait(10) is not None
    assert runner.tasks.join(10)
    assert runner.manager is not None
    stored = list(runner.manager.subscribe(run.stream_id))
    assert run.terminal is not None and stored[-1] == run.terminal  # the same end for all
    return stored, run.terminal.value


def test_an_oversized_chunk_raises_at_the_line_that_emitted_it(limited: Runner) -> None:
    seen: list[str] = []

    def flow(data: Any, ctx: FlowContext) -> Any:
        ctx.send_chunk("small")
        try:
            ctx.send_chunk("x" * 2_097_199)  # 2,097,201 bytes of JSON
        except EventTooLarge as exc:
            seen.append(exc.message)
            raise
        return "unreachable"

    stored, terminal = stored_and_live(limited, flow)
    message = "Chunk 1 is 2,097,201 bytes; the Firestore backend stores at most 1,046,528"
    assert seen == [message]
    assert terminal == {"status": "RESOURCE_EXHAUSTED", "message": message}
    assert [e.kind for e in stored] == ["chunk", "error"]


def test_a_flow_may_catch_the_size_error_and_go_on(limited: Runner) -> None:
    def flow(data: Any, ctx: FlowContext) -> Any:
        try:
            ctx.send_chunk("é" * 600_000)  # 600,000 characters, 1,200,002 bytes
        except EventTooLarge as exc:
            ctx.send_chunk({"skipped": exc.size})
        return "ok"

    stored, terminal = stored_and_live(limited, flow)
    assert stored[0].value == {"skipped": 1_200_002} and terminal == "ok"


def test_an_oversized_output_ends_resource_exhausted(limited: Runner) -> None:
    stored, terminal = stored_and_live(limited, lambda data: "o" * 5 * 1024 * 1024)
    assert terminal == {
        "status": "RESOURCE_EXHAUSTED",
        "message": "Output is 5,242,882 bytes; the Firestore backend stores at most 1,046,528",
    }


def test_an_oversized_error_is_cut_to_fit(limited: Runner) -> None:
    def flow(data: Any) -> Any:
        raise FlowError("INVALID_ARGUMENT", "m" * 2_000_000, details={"big": "d" * 100})

    stored, terminal = stored_and_live(limited, flow)
    assert terminal["status"] == "INVALID_ARGUMENT" and "details" not in terminal
    assert terminal["message"].startswith("mmm") and terminal["message"].endswith("…")
    assert len(stored[-1].payload.encode()) <= 1_046_528


def test_fit_error_keeps_a_body_that_fits() -> None:
    body = {"status": "INTERNAL", "message": "short", "details": [1]}
    assert fit_error(body, 100) is body and fit_error(body, None) is body


def test_runner_for_refuses_conflicting_options() -> None:
    manager = InMemoryStreamManager()
    try:
        runner = runner_for(manager, write_retry_timeout=60.0)
        assert runner_for(manager) is runner  # no options: the existing runner
        assert runner_for(manager, write_retry_timeout=60.0) is runner
        with pytest.raises(ValueError, match="write_retry_timeout=5.0"):
            runner_for(manager, write_retry_timeout=5.0)
        runner.shutdown(1)
    finally:
        manager.close()


def test_defaults_retry_storage_for_minutes() -> None:
    runner = Runner(None)
    assert runner.write_retry_timeout == 300.0 and runner.live_buffer_bytes == 2 * 1024 * 1024
    runner.shutdown(0)


def test_a_flow_far_ahead_of_working_storage_waits_for_it() -> None:
    from flask_durable_stream.run import STORAGE_BACKLOG_BYTES

    run = Run("s", FlowContext("s"), buffer_limit=None)
    run.expect_storage()
    waiting, done = threading.Event(), threading.Event()
    progress = run._progress = threading.Event()  # made here to watch it: the flow uses it
    real_wait = progress.wait

    def wait(timeout: float | None = None) -> bool:
        waiting.set()  # the flow is about to wait for storage
        return real_wait(timeout)

    progress.wait = wait  # type: ignore[method-assign]
    chunk = '"' + "x" * (64 * KIB - 2) + '"'

    def flow() -> None:
        for _ in range(512):  # 32 MiB, four times the backlog bound
            run.emit_chunk(chunk)
        done.set()
        waiting.set()

    thread = threading.Thread(target=flow)
    thread.start()
    waits = 0
    while True:
        assert waiting.wait(30)
        waiting.clear()
        if done.is_set():
            break
        waits += 1
        backlog = run.storage_backlog()
        assert STORAGE_BACKLOG_BYTES < backlog <= STORAGE_BACKLOG_BYTES + 640 * KIB
        run.mark_stored(run.count)  # storage catches up; the flow goes on
    thread.join()
    assert waits >= 3


def test_a_flow_does_not_wait_for_failing_storage() -> None:
    run = Run("s", FlowContext("s"), buffer_limit=None)
    run.expect_storage()
    run.storage_failing = True  # the writer is retrying: events wait in memory instead
    for _ in range(256):
        run.emit_chunk('"' + "x" * (64 * KIB - 2) + '"')
    assert run.storage_backlog() == 16 * 1024 * KIB


def test_a_terminal_event_never_waits_for_storage() -> None:
    """The writer ends a run from its own task (abort): waiting for itself would never end."""
    run = Run("s", FlowContext("s"), buffer_limit=None)
    run.expect_storage()
    run.storage_failing = True
    for _ in range(160):  # 10 MiB not stored
        run.emit_chunk('"' + "x" * (64 * KIB - 2) + '"')
    run.storage_failing = False  # the writer is about to end the run itself
    ended = threading.Thread(target=run.abort, args=({"status": "DATA_LOSS", "message": "m"},))
    ended.start()
    ended.join(30)
    assert not ended.is_alive() and run.ended
