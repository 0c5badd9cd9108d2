"""Under gevent's monkey patching (as in gunicorn -k gevent), in a subprocess."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.support.servers import PYTHON, ROOT


def run_check(module: str, *args: str) -> Any:
    """Run ``tests.support.<module> [args]`` in a patched subprocess; its last line is a
    JSON report."""
    proc = subprocess.run(
        [PYTHON, "-m", f"tests.support.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_all_flow_shapes_run_concurrently_without_blocking_the_hub() -> None:
    report = run_check("gevent_flows_check")
    chunks = [str(i) for i in range(10)]
    for n, (a, ag, sg) in enumerate(zip(*[iter(report["stored"])] * 3, strict=True)):
        assert a == chunks + [str(n)]
        assert ag == chunks + ["null"]
        assert sg == chunks + [str(n)]
    order: list[str] = report["order"]
    flows = {entry.split(":")[0] for entry in order if entry != "tick"}
    assert len(flows) == 90
    first = {f: order.index(f"{f}:0") for f in flows}
    last = {f: order.index(f"{f}:9") for f in flows}
    # Concurrent, not one after another: every flow had started before any had finished.
    assert max(first.values()) < min(last.values())
    # Awaits never blocked the hub: its ticker kept running while the async flows were
    # between their first and last chunks.
    async_span = order[
        min(first[f] for f in flows if f.startswith("async")) : max(
            last[f] for f in flows if f.startswith("async")
        )
    ]
    assert async_span.count("tick") >= 5
    assert report["leftover_tasks"] == []


def test_an_sse_reader_that_leaves_releases_its_subscription() -> None:
    report = run_check("gevent_sse_check")
    assert report["keepalives"] >= 3  # a silent stream still sends comments
    assert report["connected"] == 1  # one subscription task while the reader is there
    assert report["after"] == 0  # and none once it left, though the stream stays silent
    assert report["terminal"] == '"cancelled"'


def test_sqlite_stores_a_running_flow_without_a_task_per_batch_and_retries_through_one() -> None:
    report = run_check("gevent_sqlite_store_check")
    working, failing = report["working"], report["failing"]
    assert working["equal"]  # every stream stored whole, in order
    assert working["flush_tasks"] == 0  # 20 streams x 31 events, none through a task
    assert failing["faults_injected"] == 60  # 3 failed appends per stream
    assert failing["equal"]  # retried until stored: nothing lost, nothing twice
    assert 20 <= failing["flush_tasks"] <= 60  # the retries went through the flush task
    # With the Prometheus metrics on, the same: their measuring wrapper keeps the way
    # without a task, and every append is timed (its write and its events' lag) once.
    measured, measured_failing = report["measured"], report["measured_failing"]
    assert measured["equal"]
    assert measured["flush_tasks"] == 0
    assert working["counted"] == {
        "write_seconds_count": 0,
        "lag_seconds_count": 0,
        "retries_total": 0,
    }
    assert measured["counted"]["write_seconds_count"] == measured["appends"] > 0
    assert measured["counted"]["lag_seconds_count"] == measured["appends"]
    assert measured["counted"]["retries_total"] == 0
    assert measured_failing["equal"]
    assert 20 <= measured_failing["flush_tasks"] <= 60
    # Each failed append counted once as a retry, whichever way it went: the injected
    # faults, and the appends of other streams that were in the same request.
    assert measured_failing["faults_injected"] == 60
    assert measured_failing["counted"]["retries_total"] == measured_failing["failed"] >= 60
    assert measured_failing["counted"]["write_seconds_count"] == measured_failing["appends"]
    # Ten streams that append in the same turn of the hub's loop: one request to the
    # writer thread and one transaction for their chunks, one for their ends; each
    # stream answered on its own.
    together = report["together"]
    assert together["answers"] == ["None"] * 20
    assert (together["requests"], together["transactions"], together["operations"]) == (2, 2, 20)
    assert together["stored"] == [[["chunk", "a chunk"], ["done", "the end"]]] * 10


def test_a_paced_chunk_is_sent_and_stored_before_the_hubs_queued_callbacks_run() -> None:
    report = run_check("gevent_burst_send_check")
    # Each chunk of a flow that sleeps between chunks was at the client, and stored, by
    # the time send_chunk returned, though the hub's callback queue was never empty.
    assert report["paced"] == [{"at_client": True, "stored": True}] * 5
    burst = report["burst"]
    # A burst: its first event at once, the other 49 in one write once the flow yielded.
    assert burst["first"] == ['data: {"message":0}\n\n']
    assert burst["rest_before_yield"] == 0
    assert (burst["rest_writes"], burst["rest_frames"]) == (1, 49)
    assert burst["last"] == ['data: {"result":"end"}\n\n']
    assert burst["sent_equals_stored"]  # every frame once, in order, equal to storage
    # The same with events held for the store timer: the rest in one write, after the yield.
    assert report["held"] == {"before_yield": 0, "rest_writes": 1}


def test_held_events_reach_every_reader_of_the_in_memory_manager() -> None:
    report = run_check("gevent_store_interval_check")
    # A paced chunk is held back (store_interval), and a read of the manager stores it first.
    assert report["held"] == [[0, 1, 1], [1, 2, 2]]
    # One store queued per stream: the one the read came before takes the next chunk too.
    assert report["queued"] == [1, 1]
    # Once a subscriber waits on the stream, each chunk is stored as it comes, and the
    # subscriber gets every event after its cursor once, in order.
    follower = report["follower"]
    assert follower["kept_at_emit"] == [3, 4]
    assert follower["got"] == [[2, "chunk", '"c"'], [3, "chunk", '"d"'], [4, "done", '"end"']]
    # The end is stored at once, with the chunk held before it, and the stored stream no
    # longer refers to its run (it stays until its TTL; the run must not).
    assert report["end"] == {"held_chunk": 0, "kept": 2, "status": "done", "run_let_go": True}
    # A flow far ahead of storage does not wait for the timer: its memory check stores.
    assert report["big"] >= 6
    # Nobody reading: the process's timer stores what was held.
    assert report["timer"] == [0, 1]
    # The timer fired once, when that store was due: an idle worker is not woken every step.
    assert report["timer_runs"] == 1
    assert "must be >= 0 seconds" in report["invalid"]


def test_held_events_reach_every_reader_of_the_sqlite_manager() -> None:
    report = run_check("gevent_sqlite_store_interval_check")
    # Paced chunks are held back (store_interval): not in the file, which is what other
    # processes read, and not in what the manager reports.
    assert report["held"] == [[0, -1], [0, -1]]
    # A follower of this process has them stored as it starts (not at the 30 s timer),
    # then gets each chunk as it comes and the end: every event once, in order.
    follower = report["follower"]
    assert follower["had_two"] == 2
    assert follower["in_file_after_two"] == 2
    assert follower["got"] == [
        [0, "chunk", '"a"'],
        [1, "chunk", '"b"'],
        [2, "chunk", '"c"'],
        [3, "chunk", '"d"'],
        [4, "done", '"end"'],
    ]
    # Five held chunks and the end: the stream's open and one append, not six.
    assert report["appends"] == 2
    # The end is stored at once, with the chunk held before it.
    assert report["end"] == {"in_file": 2, "status": "done"}
    # Nobody reading: the process's timer stores what was held.
    assert report["timer"] == [0, 1]
    assert "DURABLE_STREAM_SQLITE_STORE_INTERVAL" in report["invalid"]


@pytest.mark.parametrize("mode", ["own task", "in-response", "detached"])
def test_a_live_streams_flow_starts_before_the_hubs_queued_callbacks_run(mode: str) -> None:
    report = run_check("gevent_flow_start_check", mode)
    # No queued callback ran between the view's return and the flow's first line (by a
    # hub callback, the flow would have started behind the 20 queued ahead of it).
    assert report["callbacks_between"] == [0] * 5
    # By default each flow still runs in a task of its own; with the setting, in the
    # response's greenlet.
    assert report["own_task"] == [mode != "in-response"] * 5
    assert report["bodies_ok"]  # every frame once, in order, and equal to a replay
    # On gevent's WSGIServer too, a detached response's connection is the sink's.
    assert report["detached"] == (5 if mode == "detached" else 0)


def test_a_live_streams_flow_runs_in_its_responses_greenlet_and_stays_decoupled() -> None:
    report = run_check("gevent_response_flow_check")
    # A fresh context, as in a greenlet of its own: nothing the request set leaks in.
    assert report["context"] == "unset"
    # Where the fast path cannot serve the response, nobody claims the flow: it runs in a
    # task of its own, and the stream is whole.
    assert report["unclaimed"] == (
        'data: {"message":"unset"}\n\ndata: {"message":true}\n\ndata: {"result":"ok"}\n\n'
    )
    # One greenlet per open live stream (the response's), which runs the flow.
    assert report["in_response_greenlet"] is True
    assert report["greenlets_per_stream"] == 1.0
    # Its client gone, the flow goes on to its end in that greenlet and is stored whole.
    whole = [["chunk", "start"], ["chunk", 0], ["chunk", 1], ["chunk", 2], ["done", "done"]]
    assert report["after_disconnect"] == [whole] * 11
    # A generator flow moves to a task of its own at its first chunk after its client
    # left, so that its response (and the server's request) ends then; it is stored whole.
    # With its client there it never moves.
    ended = {"own_task": True, "response_ended": True}
    generator = [["chunk", "start"], *(["chunk", i] for i in range(10)), ["done", ended]]
    assert report["generator_after_disconnect"] == [generator] * 3
    assert report["generator_connected"] == ["done", {"own_task": False, "response_ended": False}]
    # An async flow's relay moves the same way; the flow itself goes on in the asyncio thread.
    relayed = [["chunk", "start"], *(["chunk", i] for i in range(10)), ["done", None]]
    assert report["async_after_disconnect"] == [relayed] * 3
    assert report["moves"] == 6  # the three generators and the three async flows
    # The server killing that greenlet (its graceful stop's timeout) ends the stream
    # UNAVAILABLE at once: stored, not left open until the producer lease runs out.
    assert [kind for kind, _ in report["killed"]] == ["error"] * 3
    assert {body["status"] for _, body in report["killed"]} == {"UNAVAILABLE"}


@pytest.mark.parametrize("fault", ["none", "after", "taking"])
def test_a_server_not_as_the_live_fast_path_expects_still_gets_whole_streams(fault: str) -> None:
    report = run_check("gevent_take_over_fault_check", fault)
    assert report["body_ok"]  # whole, and equal to its replay from storage
    # Served on after its stream, unless how to do so could not be learnt: then it closes.
    assert report["second"] == (fault != "after")
    # The warm-up's, the stream's and the second request's streams (no second when the
    # connection closes after the stream); none when the take-over itself failed.
    assert report["detached"] == {"none": 3, "after": 2, "taking": 0}[fault]
    assert report["taken_left"] == 0
    assert report["fds"] == 0  # the sink's duplicate of each connection is closed
    expected = {
        "none": [],
        "after": ["Cannot serve this connection on after its stream; it will close"] * 2,
        "taking": ["Cannot take this live stream's connection over"] * 3,
    }
    assert report["logged"] == expected[fault]
