"""A client that goes away stops nothing, whichever path its frames took.

Under ``gunicorn -k gevent -w 1``, with the in-memory and the SQLite manager: while a
live client keeps up, the flow's task writes its frames itself (the live fast path);
otherwise the response's task does. Either way a stream whose client disconnected must
still run to its end and be stored whole, and a client that stays gets every frame once,
in order, equal to storage. Nothing here depends on timing: the flow waits at a gate the
test opens.
"""

from __future__ import annotations

import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_durable_stream import protocol
from tests.support import servers
from tests.support.client import post_stream

APP = "tests.support.disconnect_app:create_app()"
BEFORE, AFTER = 5, 200
WORKERS = {
    "gevent_pywsgi": "gevent_pywsgi",
    "PyWSGIWorker": "flask_durable_stream.gunicorn_worker.PyWSGIWorker",
}


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "memory, flow in response",
        "sqlite, flow in response",
        "memory, detached response",
        "sqlite, detached response",
        # gevent's own WSGI server under gunicorn: the same fast path (its handler's socket)
        "memory, -k gevent_pywsgi",
        "sqlite, -k PyWSGIWorker",
        "memory, flow in response, -k PyWSGIWorker",
        "memory, detached response, -k PyWSGIWorker",
    ]
)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[servers.Server]:
    env = {}
    mode, _, worker = request.param.partition(", -k ")
    if mode.startswith("sqlite"):
        env["DISCONNECT_APP_SQLITE"] = str(tmp_path / "streams.db")
    if mode.endswith("flow in response"):
        env["DISCONNECT_APP_FLOW_IN_RESPONSE"] = "1"
    if mode.endswith("detached response"):
        env["DISCONNECT_APP_DETACH_RESPONSE"] = "1"
    extra = ["-k", WORKERS[worker]] if worker else []
    server = servers.gunicorn(APP, env=env, extra=extra)
    yield server
    server.stop()


def offers(server: servers.Server) -> int:
    return int(requests.get(f"{server.url}/stats", timeout=30).json()["offers"])


def in_response(server: servers.Server) -> int:
    """``gated`` flows run so far in their response's greenlet (one greenlet per stream)."""
    return int(requests.get(f"{server.url}/stats", timeout=30).json()["in_response"])


def stats(server: servers.Server) -> dict[str, int]:
    return dict(requests.get(f"{server.url}/stats", timeout=30).json())


def detached(server: servers.Server) -> bool:
    return server.env.get("DISCONNECT_APP_DETACH_RESPONSE") == "1"


def open_live(
    server: servers.Server,
    path: str,
    body: Any,
    sock: socket.socket | None = None,
    stream_id: str | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Start a flow (or resume ``stream_id``) and return its streamed response once the
    headers are in (over ``sock``, a connected socket, when given)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    if sock is not None:
        conn.sock = sock
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if stream_id is not None:
        headers[protocol.STREAM_ID_HEADER] = stream_id
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    return conn, conn.getresponse()


def read_frames(response: http.client.HTTPResponse, count: int, size: int) -> bytes:
    """Read (``size`` bytes at a time) until ``count`` whole frames are in."""
    raw = b""
    while raw.count(b"\n\n") < count:
        piece = response.read1(size)
        assert piece, "the stream ended early"
        raw += piece
    return raw


def read_to_end(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> bytes:
    """The rest of the response, then the connection closed."""
    rest = response.read()
    conn.close()
    return rest


def whole_frames(raw: bytes) -> list[tuple[str, Any]]:
    """The events of ``raw``, which must end with a whole frame."""
    events, rest = protocol.parse_frames(raw.decode())
    assert rest == ""
    return events


def open_gate(server: servers.Server, key: str) -> None:
    requests.post(f"{server.url}/gate/{key}", timeout=30).raise_for_status()


def expected_events() -> list[tuple[str, object]]:
    return [("chunk", i) for i in range(BEFORE + AFTER)] + [("done", "done")]


def test_a_disconnected_client_stops_nothing_and_the_stream_is_stored_whole(
    server: servers.Server,
) -> None:
    key = uuid.uuid4().hex
    body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
    first, alone, taken = offers(server), in_response(server), stats(server)["detached"]
    live = post_stream(server.url, "/flows/gated", body, stop_after=BEFORE)
    assert live.chunks == list(range(BEFORE))
    assert live.stream_id is not None
    # With the setting, the flow runs in the greenlet of the response whose client just
    # went away; without it, in a task of its own.
    flow_in_response = server.env.get("DISCONNECT_APP_FLOW_IN_RESPONSE") == "1"
    assert in_response(server) == alone + int(flow_in_response)
    # A detached response's connection was the sink's from its headers on.
    assert stats(server)["detached"] == taken + int(detached(server))
    open_gate(server, key)  # the flow goes on after its client is gone
    replay = post_stream(server.url, "/flows/gated", {}, stream_id=live.stream_id, timeout=60)
    assert replay.events == expected_events()
    again = post_stream(server.url, "/flows/gated", {}, stream_id=live.stream_id)
    assert again.raw == replay.raw
    # The first frame after the gate found the response caught up: the fast path took it.
    assert offers(server) > first


def test_a_generator_flow_whose_client_left_ends_in_a_task_of_its_own_and_is_stored_whole(
    server: servers.Server,
) -> None:
    """With the setting a generator flow starts in its response's greenlet and moves to a
    task of its own once its client has gone (so the server's request ends); without it,
    it runs in its own task from the start. Either way every event is stored."""
    key = uuid.uuid4().hex
    body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
    live = post_stream(server.url, "/flows/generator", body, stop_after=BEFORE)
    assert live.chunks == list(range(BEFORE))
    assert live.stream_id is not None
    open_gate(server, key)
    replay = post_stream(server.url, "/flows/generator", {}, stream_id=live.stream_id, timeout=60)
    assert replay.events == [("chunk", i) for i in range(BEFORE + AFTER)] + [("done", True)]


def test_a_reader_that_resumes_while_the_flow_waits_follows_it_to_the_end(
    server: servers.Server,
) -> None:
    """The storage's own wake-up: the resumed reader has every stored event before the gate
    opens, so the rest can only reach it by waiting on the manager for the flow's appends."""
    key = uuid.uuid4().hex
    body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
    live = post_stream(server.url, "/flows/gated", body, stop_after=BEFORE)
    assert live.stream_id is not None
    conn, response = open_live(server, "/flows/gated", {}, stream_id=live.stream_id)
    raw = read_frames(response, BEFORE, 65536)  # all there is: the flow waits at its gate
    open_gate(server, key)
    raw += read_to_end(conn, response)
    events = whole_frames(raw)
    assert events == expected_events()


def test_a_client_that_stays_gets_every_frame_once_in_order_and_equal_to_storage(
    server: servers.Server,
) -> None:
    key = uuid.uuid4().hex
    body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
    first = offers(server)
    conn, response = open_live(server, "/flows/gated", body)
    stream_id = response.getheader(protocol.STREAM_ID_HEADER)
    raw = read_frames(response, BEFORE, 65536)  # every chunk before the gate, while connected
    # The flow waits at its gate. A detached response's request has ended (the body the
    # server iterated is done; the sink writes the rest), any other's is still open.
    assert stats(server)["open_bodies"] == (0 if detached(server) else 1)
    open_gate(server, key)
    rest = response.read()  # to the chunked body's end
    if detached(server):  # then the sink closes the connection, whose request ended before
        assert conn.sock is not None
        conn.sock.settimeout(60)
        assert conn.sock.recv(1) == b""
    conn.close()
    raw += rest
    events = whole_frames(raw)
    assert events == expected_events()
    assert offers(server) >= first + AFTER  # the frames after the gate took the fast path
    replay = post_stream(server.url, "/flows/gated", {}, stream_id=stream_id)
    assert replay.raw == raw


def test_a_client_that_falls_behind_gets_the_rest_from_the_run_in_order(
    server: servers.Server,
) -> None:
    key = uuid.uuid4().hex
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    conn, response = open_live(server, "/flows/fill", {"data": {"after": AFTER, "key": key}}, sock)
    stream_id = response.getheader(protocol.STREAM_ID_HEADER)
    raw = read_frames(response, 1, 1)  # the first frame, and not a byte more
    open_gate(server, "go-" + key)
    # Not reading: the flow fills the socket, then emits AFTER chunks the socket cannot take.
    wait = requests.get(f"{server.url}/wait/full-{key}", timeout=150).json()
    assert wait == {"open": True}
    raw += read_to_end(conn, response)
    events = whole_frames(raw)
    filled = events[-1][1]
    assert isinstance(filled, int) and filled >= 1
    fill = [("chunk", "x" * 16384)] * filled
    after = [("chunk", i) for i in range(AFTER)]
    assert events == [("chunk", "start"), *fill, *after, ("done", filled)]
    replay = post_stream(server.url, "/flows/fill", {}, stream_id=stream_id, timeout=60)
    assert replay.raw == raw
