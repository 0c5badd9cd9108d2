"""Flow streams read as Durable Streams, by the official clients, while the flow runs.

A real ``gunicorn -k gevent`` with two workers on SQLite, then on Redis, serves the flows and the
Durable Streams prefix from the same manager, so the flow may run in one worker
while a client reads it through the other. The ``echo`` flow waits for a gate
file before each chunk: the test decides when the flow moves, never a sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_durable_stream import protocol
from flask_durable_stream.durable_streams.request import format_offset, parse_offset
from tests.support import servers
from tests.support.client import post_stream
from tests.support.ds import long_poll_to_the_end, sse_events
from tests.test_durable_streams_suite import DS, ds_server, ensure_node_modules

STREAM_URL_HEADER = "durable-stream-url"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def flow_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    server = ds_server(request.param, tmp_path_factory.mktemp("ds-flows"), redis, workers=2)
    yield server
    server.stop()


def start_flow(server: servers.Server, flow: str, data: dict[str, Any]) -> tuple[str, str]:
    """Start a flow, take its stream id and Durable Stream URL, and hang up at once."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        f"/flows/{flow}",
        body=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    response = conn.getresponse()
    headers = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    assert STREAM_URL_HEADER in headers["access-control-expose-headers"].lower()
    return headers[protocol.STREAM_ID_HEADER], headers[STREAM_URL_HEADER]


def genkit_messages(server: servers.Server, flow: str, stream_id: str) -> list[Any]:
    """What the Genkit endpoint sends for the finished stream, as Durable Stream messages."""
    call = post_stream(server.url, f"/flows/{flow}", {"data": {}}, stream_id=stream_id)
    key = {protocol.CHUNK: "message", protocol.DONE: "result", protocol.ERROR: "error"}
    return [{key[kind]: value} for kind, value in call.events]


def ended(messages: list[Any]) -> bool:
    """The last message of a flow stream is its result or error.

    The Python client (0.1.0) does not stop at ``Stream-Closed``; an application
    knows its last message, and so does this test.
    """
    return bool(messages) and ("result" in messages[-1] or "error" in messages[-1])


def open_gates(gate: Path, indices: range) -> None:
    for i in indices:
        Path(f"{gate}.{i}").touch()


def test_stream_url_is_advertised(flow_server: servers.Server, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    stream_id, url = start_flow(flow_server, "echo", {"chunks": 1, "gate": str(gate)})
    assert url == f"{flow_server.url}/ds/{stream_id}"
    open_gates(gate, range(1))


@pytest.mark.parametrize("live", ["long-poll", "sse"])
def test_python_client_reads_a_running_flow_and_resumes(
    flow_server: servers.Server, tmp_path: Path, live: str
) -> None:
    from durable_streams import stream

    gate = tmp_path / "gate"
    stream_id, url = start_flow(flow_server, "echo", {"chunks": 6, "gate": str(gate)})
    open_gates(gate, range(2))
    # iter_events gives each batch with the offset after it: the client's checkpoint.
    first: list[Any] = []
    with stream(url, offset="-1", live=live) as res:  # type: ignore[arg-type]
        for event in res.iter_events("json_batches"):
            first.extend(event.data)
            offset = event.next_offset
            if len(first) >= 2:
                break
    # The connection is gone; the flow goes on without any reader.
    open_gates(gate, range(2, 4))
    rest: list[Any] = []
    with stream(url, offset=offset, live=live) as res:  # type: ignore[arg-type]
        for event in res.iter_events("json_batches"):
            rest.extend(event.data)
            if len(first) + len(rest) == 4:
                open_gates(gate, range(4, 6))  # the reader follows the flow live
            if ended(rest):
                break
    assert requests.head(url, timeout=30).headers["Stream-Closed"] == "true"
    expected = genkit_messages(flow_server, "echo", stream_id)
    assert first + rest == expected
    assert expected == [{"message": {"i": i}} for i in range(6)] + [{"result": {"done": 6}}]


@pytest.mark.parametrize("live", ["long-poll", "sse"])
def test_typescript_client_reads_a_running_flow_and_resumes(
    flow_server: servers.Server, tmp_path: Path, live: str
) -> None:
    ensure_node_modules()
    gate = tmp_path / "gate"
    stream_id, url = start_flow(flow_server, "echo", {"chunks": 6, "gate": str(gate)})
    open_gates(gate, range(2))
    first = _node_read(url, "-1", live, stop_after=2)
    assert not first["closed"]
    reader = subprocess.Popen(
        ["node", "flow_reader.mjs", url, first["offset"], live, "0"],
        cwd=DS,
        stdout=subprocess.PIPE,
        text=True,
    )
    open_gates(gate, range(2, 6))
    out, _ = reader.communicate(timeout=120)
    rest = json.loads(out)
    assert rest["closed"] and reader.returncode == 0
    expected = genkit_messages(flow_server, "echo", stream_id)
    assert first["items"] + rest["items"] == expected
    assert len(expected) == 7


def _node_read(url: str, offset: str, live: str, *, stop_after: int) -> dict[str, Any]:
    proc = subprocess.run(
        ["node", "flow_reader.mjs", url, offset, live, str(stop_after)],
        cwd=DS,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("public", [True, False])
def test_a_failed_flow_ends_with_the_same_error_as_on_the_genkit_endpoint(
    flow_server: servers.Server, public: bool
) -> None:
    from durable_streams import stream

    stream_id, url = start_flow(flow_server, "fail", {"public": public})
    messages: list[Any] = []
    with stream(url, offset="-1", live="long-poll") as res:
        for batch in res.iter_json_batches():
            messages.extend(batch)
            if ended(messages):
                break
    assert messages == genkit_messages(flow_server, "fail", stream_id)
    error = (
        {"status": "INVALID_ARGUMENT", "message": "bad input"}
        if public
        else {"status": "INTERNAL", "message": "Internal Error"}
    )
    assert messages == [{"message": {"i": 0}}, {"error": error}]
    # An offset past the stored end (a client that had events storage never got, their
    # worker gone first) reads the stored end again: how the stream ended, not nothing.
    tail = parse_offset(requests.head(url, timeout=30).headers["Stream-Next-Offset"])
    past = requests.get(url, params={"offset": format_offset(tail + 3)}, timeout=30)
    assert past.status_code == 200
    assert past.json() == [{"error": error}]
    assert past.headers["Stream-Closed"] == "true"
    assert parse_offset(past.headers["Stream-Next-Offset"]) == tail
    # The offset given out past the end says it includes the end: nothing more there. The
    # offset of the stored end without that mark (a client that counted the messages it had
    # live, the last of them never stored) reads the stored end again, catching up and
    # through an SSE connection (the manager's push, under gevent).
    end_offset = format_offset(tail, end=True)
    assert past.headers["Stream-Next-Offset"] == end_offset
    done = requests.get(url, params={"offset": end_offset}, timeout=30)
    assert done.json() == [] and done.headers["Stream-Closed"] == "true"
    at_end = requests.get(url, params={"offset": format_offset(tail)}, timeout=30)
    assert at_end.json() == [{"error": error}]
    assert at_end.headers["Stream-Next-Offset"] == end_offset
    sse = requests.get(url, params={"offset": format_offset(tail), "live": "sse"}, timeout=30)
    assert list(sse_events(sse.text.splitlines())) == [
        ("data", [{"error": error}]),
        ("control", {"streamNextOffset": end_offset, "streamClosed": True, "upToDate": True}),
    ]


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def unpolled_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    """Flow streams whose live readers poll once an hour: only the manager's push can
    answer them in time (the long-poll itself waits up to two minutes)."""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    workers = 1 if request.param == "memory" else 2  # memory is one process's
    env = {"DS_FLOW_POLL": "3600", "DS_LONG_POLL_TIMEOUT": "120"}
    server = ds_server(
        request.param, tmp_path_factory.mktemp("ds-push"), redis, workers=workers, env=env
    )
    yield server
    server.stop()


def test_live_reads_of_a_running_flow_are_pushed_not_polled(
    unpolled_server: servers.Server, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    stream_id, url = start_flow(unpolled_server, "echo", {"chunks": 2, "gate": str(gate)})
    head = requests.head(url, timeout=30)
    assert head.status_code == 200 and "Stream-Closed" not in head.headers
    offset = head.headers["Stream-Next-Offset"]
    # A long-poll at the tail, waiting for chunk 0 (the flow waits for its gate).
    answer: list[requests.Response] = []
    poll = threading.Thread(
        target=lambda: answer.append(
            requests.get(url, params={"offset": offset, "live": "long-poll"}, timeout=60)
        )
    )
    poll.start()
    time.sleep(0.5)  # the long-poll reaches its wait (if not, it finds the chunk at once)
    open_gates(gate, range(1))
    poll.join(60)
    assert answer and answer[0].status_code == 200, answer
    assert answer[0].json() == [{"message": {"i": 0}}]
    offset = answer[0].headers["Stream-Next-Offset"]
    # SSE from there: one subscription follows the rest of the flow.
    with requests.get(
        url, params={"offset": offset, "live": "sse"}, stream=True, timeout=60
    ) as sse:
        assert sse.status_code == 200
        data: list[Any] = []
        controls: list[dict[str, Any]] = []
        for event, value in sse_events(sse.iter_lines(decode_unicode=True)):
            if event != "control":
                data.extend(value)
                continue
            controls.append(value)
            if len(controls) == 1:  # the catch-up's control event: now the flow moves
                open_gates(gate, range(1, 2))
            if value.get("streamClosed"):
                break
    assert data == [{"message": {"i": 1}}, {"result": {"done": 2}}]
    assert controls[-1]["streamClosed"] is True
    assert data == genkit_messages(unpolled_server, "echo", stream_id)[1:]


def test_without_gevent_long_polls_of_a_killed_flow_end_it_producer_lost(
    tmp_path: Path,
) -> None:
    """Through gunicorn's threaded worker (``-k gthread``: no gevent, so a live read polls
    the manager's ``info``), two workers on SQLite, both killed while a flow runs: a client
    long-polling on one connection, each long-poll shorter than the lease, gets what was
    stored and then "Producer lost", not 204s for ever."""
    from flask_durable_stream.managers.base import PRODUCER_LOST
    from tests.support.chaos import worker_pids

    env = {"DS_LEASE": "2", "DS_LONG_POLL_TIMEOUT": "0.5"}
    server = ds_server("sqlite", tmp_path, workers=2, worker_class="gthread", env=env)
    try:
        _, url = start_flow(server, "paced", {"chunks": 400, "delay": 0.05})
        first = requests.get(url, params={"offset": "-1", "live": "long-poll"}, timeout=30)
        assert first.status_code == 200, first.text  # the flow runs and stores
        for pid in worker_pids(server):
            os.kill(pid, signal.SIGKILL)
        later, _ = long_poll_to_the_end(url, first.headers["Stream-Next-Offset"], 60)
        messages = first.json() + later
        chunks = messages[:-1]
        assert messages[-1:] == [{"error": PRODUCER_LOST}], messages[-3:]
        assert all("message" in m for m in chunks) and chunks
        assert [m["message"]["i"] for m in chunks] == list(range(len(chunks)))
    finally:
        server.stop()
