"""Against real servers on free ports: gevent's WSGIServer, gunicorn's gevent worker, `flask run`.

Clients really drop their sockets mid-stream; flows must not notice.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from functools import partial

import pytest

from flask_durable_stream import SQLiteStreamManager, StreamStatus, protocol
from tests.support import servers
from tests.support.client import StreamCall, post_stream
from tests.support.waiting import PATIENCE, wait_for

SQLITE_PATH = "FLASK_DURABLE_STREAM_SQLITE_PATH"
CANCELLED = {"status": "CANCELLED", "message": "Cancelled by client."}

N = 30
STORY = {"data": {"chunks": N, "delay": 0.01}}


@pytest.fixture(scope="module", params=["pywsgi", "gunicorn-gevent", "flask-run"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    env = servers.sqlite_env(tmp_path_factory)
    if request.param == "pywsgi":
        server = servers.example_app(env)
    elif request.param == "gunicorn-gevent":
        server = servers.gunicorn("example_app:create_app()", workers=1, env=env)
    else:
        port = servers.free_port()
        server = servers.Server(
            [str(servers.BIN / "flask"), "--app", "example_app", "run", "--port", str(port)],
            port,
            env,
        )
    yield server
    output = server.stop()
    # The only traceback a server may log is the one the throwy flow raises on purpose.
    expected = output.count("RuntimeError: the flow hit an internal problem")
    assert output.count("Traceback") == expected, output


def indexes(call: StreamCall) -> list[int]:
    return [c["index"] for c in call.chunks]


@pytest.mark.parametrize("k", [1, 7, 29])
def test_disconnect_then_reconnect_gets_everything_once(server: servers.Server, k: int) -> None:
    first = post_stream(server.url, "/flows/story", STORY, stop_after=k)
    assert first.status == 200 and first.stream_id
    assert indexes(first)[:k] == list(range(k))
    again = post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id)
    assert again.status == 200
    assert indexes(again) == list(range(N))
    assert again.terminal is not None and again.terminal[0] == "done"
    assert again.terminal[1]["words"] == N


def test_flow_finishes_with_nobody_listening(server: servers.Server) -> None:
    first = post_stream(
        server.url, "/flows/story", {"data": {"chunks": 10, "delay": 0.02}}, stop_after=1
    )
    assert first.stream_id
    with SQLiteStreamManager(server.env[SQLITE_PATH]) as storage:  # the server's own file
        wait_for(partial(ended, storage, first.stream_id), "the flow to end with nobody listening")
    again = post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id)
    assert indexes(again) == list(range(10)) and again.terminal is not None


def ended(storage: SQLiteStreamManager, stream_id: str) -> bool:
    info = storage.info(stream_id)
    return info is not None and info.status is not StreamStatus.OPEN


def test_concurrent_and_late_subscribers_see_identical_bytes(server: servers.Server) -> None:
    first = post_stream(server.url, "/flows/story", STORY, stop_after=1)
    calls: list[StreamCall] = []

    def follow() -> None:
        calls.append(post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id))

    readers = [threading.Thread(target=follow) for _ in range(2)]
    for r in readers:
        r.start()
    for r in readers:
        r.join(PATIENCE)
    late = post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id)
    assert len(calls) == 2
    assert calls[0].raw == calls[1].raw == late.raw
    assert indexes(late) == list(range(N))


def test_error_frames_identical_live_and_replayed(server: servers.Server) -> None:
    live = post_stream(server.url, "/flows/throwy", {"data": {"count": 3}})
    assert live.events[-1] == ("error", {"status": "INTERNAL", "message": "Internal Error"})
    assert [c["count"] for c in live.chunks] == [0, 1, 2]
    replay = post_stream(server.url, "/flows/throwy", {}, stream_id=live.stream_id)
    assert replay.raw == live.raw
    assert b"never sent" not in live.raw


def test_headers_arrive_before_a_slow_first_chunk(server: servers.Server) -> None:
    """The first chunk comes after 5 s; the headers must not wait for it.

    The client cancels the flow as soon as it has the headers. Headers sent before the
    chunk leave a stream without a chunk; headers held back until the first chunk let
    that chunk through. A machine that stalls the client for the whole 5 s between the
    headers and the cancel can also let it through, so such a run is tried again: the
    bug shows in every attempt.
    """
    attempts = []
    for _ in range(3):
        stream_id = start_slow_story(server)
        response = post_stream(
            server.url, "/flows/story/cancel", {}, stream_id=stream_id, timeout=PATIENCE
        )
        assert response.status in (202, 409)  # 409: the flow had already ended
        again = post_stream(server.url, "/flows/story", {}, stream_id=stream_id)
        attempts.append(indexes(again))
        if again.chunks == []:
            assert again.terminal == ("error", CANCELLED)
            return
    raise AssertionError(f"the first chunk came before the headers every time: {attempts}")


def start_slow_story(server: servers.Server) -> str:
    """Start a story whose first chunk comes after 5 s; return its id once headers are in."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=PATIENCE)
    conn.request(
        "POST",
        "/flows/story",
        body=json.dumps({"data": {"chunks": 1, "delay": 5}}),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    try:
        response = conn.getresponse()
        assert response.status == 200
        stream_id = response.getheader(protocol.STREAM_ID_HEADER)
        assert stream_id
        return stream_id
    finally:
        conn.close()


def test_a_lone_surrogate_in_the_input_is_streamed_and_stored(server: servers.Server) -> None:
    """``"\\ud800"`` is valid JSON for a string no UTF-8 text can carry raw: the chunks with it
    go out and into storage (SQLite here) as escapes, and the stream is stored to its end."""
    body = {"data": {"topic": "pip \ud800", "chunks": 40, "delay": 0.001}}
    live = post_stream(server.url, "/flows/story", body)
    assert live.status == 200 and live.stream_id
    assert live.terminal is not None and live.terminal[0] == "done"
    assert any("\ud800" in chunk["text"] for chunk in live.chunks)
    again = post_stream(server.url, "/flows/story", {}, stream_id=live.stream_id)
    assert (again.chunks, again.terminal) == (live.chunks, live.terminal)


def dechunked(body: bytes) -> bytes:
    """A chunked HTTP body's data."""
    data = bytearray()
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return bytes(data)
        data += body[:n]
        assert body[n : n + 2] == b"\r\n"
        body = body[n + 2 :]


def test_an_http_1_0_client_gets_the_stream_unchunked_to_its_close(
    server: servers.Server, request: pytest.FixtureRequest
) -> None:
    """A client (or a proxy: nginx's default ``proxy_http_version``) that speaks HTTP/1.0
    gets the frames as they are, no chunked framing, and the close ends the body; what it
    got equals the stored stream. (Werkzeug's development server, ``flask run``, answers
    HTTP/1.0 with a chunked body all the same; that much is checked there too.)"""
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"data": {"chunks": 12, "delay": 0.005}}).encode()
    head = (
        f"POST /flows/story HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=PATIENCE) as sock:
        sock.sendall(head + body)
        while data := sock.recv(65536):
            received += data
    status_and_headers, _, raw = bytes(received).partition(b"\r\n\r\n")
    lines = status_and_headers.decode().split("\r\n")
    assert lines[0].split(" ")[1] == "200", lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if request.node.callspec.params["server"] == "flask-run":
        assert headers.get("transfer-encoding") == "chunked"
        raw = dechunked(raw)
    else:  # gevent's servers, and the live fast path's own writes
        assert "transfer-encoding" not in headers
    events, rest = protocol.parse_frames(raw.decode())
    assert rest == ""
    assert [e[1]["index"] for e in events[:-1]] == list(range(12))
    assert events[-1][0] == "done"
    again = post_stream(
        server.url, "/flows/story", {}, stream_id=headers[protocol.STREAM_ID_HEADER]
    )
    assert again.raw == raw  # byte for byte what storage has


def test_unknown_stream_and_bad_input_over_the_wire(server: servers.Server) -> None:
    assert post_stream(server.url, "/flows/story", {}, stream_id="f" * 32).status == 204
    host, port = server.url.removeprefix("http://").split(":")
    for body, status in [(b"{oops", 400), (b"[]", 400), (b'{"x":1}', 400)]:
        conn = http.client.HTTPConnection(host, int(port), timeout=PATIENCE)
        conn.request(
            "POST",
            "/flows/story",
            body=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        response = conn.getresponse()
        assert response.status == status
        assert json.loads(response.read())["status"] == "INVALID_ARGUMENT"
        conn.close()


def test_oversized_body_over_the_wire_is_413(server: servers.Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=PATIENCE)
    body = b'{"data":"' + b"x" * (10 * 1024 * 1024) + b'"}'
    try:
        conn.request("POST", "/flows/echo", body=body, headers={"Content-Type": "application/json"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the upload ends
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["status"] == "RESOURCE_EXHAUSTED"
    conn.close()


def test_ctrl_c_on_flask_run_says_what_it_waits_for(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import signal

    port = servers.free_port()
    env = {**servers.sqlite_env(tmp_path_factory), "FLASK_DURABLE_STREAM_SHUTDOWN_GRACE": "0.5"}
    server = servers.Server(
        [str(servers.BIN / "flask"), "--app", "example_app", "run", "--port", str(port)],
        port,
        env,
    )
    try:
        running = post_stream(
            server.url, "/flows/story", {"data": {"chunks": 200, "delay": 0.2}}, stop_after=1
        )
        assert running.stream_id and [c["index"] for c in running.chunks][:1] == [0]
    finally:
        output = server.stop(signal.SIGINT)
    assert "waiting up to 0.5s (shutdown grace) for 1 running flow(s)" in output, output
    assert running.stream_id in output
