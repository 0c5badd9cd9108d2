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
import os
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_durable_stream import SQLiteStreamManager, protocol
from tests.support import servers
from tests.support.chaos import wait_until
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
        # events held up to 100 ms (store_interval); a resume here has them stored first
        "sqlite, store interval",
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
    server = start(request.param, tmp_path)
    yield server
    server.stop()


def start(
    param: str, tmp_path: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> servers.Server:
    env = dict(env or {})
    mode, _, worker = param.partition(", -k ")
    if mode.startswith("sqlite"):
        env["DISCONNECT_APP_SQLITE"] = str(tmp_path / "streams.db")
    if mode.endswith("store interval"):
        env["DISCONNECT_APP_SQLITE_STORE_INTERVAL"] = "0.1"
    if mode.endswith("flow in response"):
        env["DISCONNECT_APP_FLOW_IN_RESPONSE"] = "1"
    if mode.endswith("detached response"):
        env["DISCONNECT_APP_DETACH_RESPONSE"] = "1"
    worker_class = ["-k", WORKERS[worker]] if worker else []
    return servers.gunicorn(APP, env=env, extra=[*worker_class, *extra])


def offers(server: servers.Server) -> int:
    return int(requests.get(f"{server.url}/stats", timeout=30).json()["offers"])


def in_response(server: servers.Server) -> int:
    """``gated`` flows run so far in their response's greenlet (one greenlet per stream)."""
    return int(requests.get(f"{server.url}/stats", timeout=30).json()["in_response"])


def stats(server: servers.Server) -> dict[str, int]:
    return dict(requests.get(f"{server.url}/stats", timeout=30).json())


def sent_apart(server: servers.Server) -> list[str]:
    """SQLite: the streams whose appends a failed check sent one by one, out of requests
    that carried several streams' appends."""
    return list(requests.get(f"{server.url}/apart", timeout=30).json()["streams"])


def detached(server: servers.Server) -> bool:
    return server.env.get("DISCONNECT_APP_DETACH_RESPONSE") == "1"


def worker_class(server: servers.Server) -> str:
    args = list(server.proc.args)
    return str(args[len(args) - args[::-1].index("-k")])  # after the last -k


#: A detached response under gunicorn's ``gevent`` worker, and under one of gevent's handler.
DETACHED = ["memory, detached response", "memory, detached response, -k PyWSGIWorker"]
LIVE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


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


def test_a_resume_in_the_producing_worker_has_the_held_events_stored_at_once(
    tmp_path: Path,
) -> None:
    """SQLite holding a stream's events for 30 s (DURABLE_STREAM_SQLITE_STORE_INTERVAL) and
    heartbeats a minute apart: nothing but the resume itself can store the chunks before the
    gate within the resumed reader's 10 s socket timeout."""
    env = {"DISCONNECT_APP_SQLITE_STORE_INTERVAL": "30", "DISCONNECT_APP_SQLITE_HEARTBEAT": "60"}
    server = start("sqlite", tmp_path, env=env)
    try:
        key = uuid.uuid4().hex
        body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
        live = post_stream(server.url, "/flows/gated", body, stop_after=BEFORE)
        assert live.stream_id is not None
        conn, response = open_live(server, "/flows/gated", {}, stream_id=live.stream_id)
        assert conn.sock is not None
        conn.sock.settimeout(10)
        raw = read_frames(response, BEFORE, 65536)  # held, and stored for this reader
        open_gate(server, key)
        raw += read_to_end(conn, response)
        assert whole_frames(raw) == expected_events()
    finally:
        server.stop()


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
    if detached(server):  # the connection goes on, the sink's: its next request is answered
        sock = conn.sock
        conn.request("GET", "/stats")
        assert conn.getresponse().read()
        assert conn.sock is sock
    conn.close()
    raw += rest
    events = whole_frames(raw)
    assert events == expected_events()
    assert offers(server) >= first + AFTER  # the frames after the gate took the fast path
    replay = post_stream(server.url, "/flows/gated", {}, stream_id=stream_id)
    assert replay.raw == raw


@pytest.mark.parametrize("mode", ["sqlite", "sqlite, store interval"])
def test_streams_stored_together_are_each_whole_whether_their_client_stayed_or_left(
    mode: str, tmp_path: Path
) -> None:
    """Eight SQLite streams whose flows go on at the same moment (one gate) and stay paced
    together, so their appends reach the writer thread in shared requests; four clients
    left before the gate. Every stream is stored whole and equal to what a staying client
    got live."""
    server = start(mode, tmp_path)
    try:
        key = uuid.uuid4().hex
        body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
        left = [post_stream(server.url, "/flows/gated", body, stop_after=BEFORE) for _ in range(4)]
        staying = [open_live(server, "/flows/gated", body) for _ in range(4)]
        raws = [read_frames(response, BEFORE, 65536) for _, response in staying]
        before = stats(server)["together"]
        open_gate(server, key)
        raws = [raw + read_to_end(conn, r) for raw, (conn, r) in zip(raws, staying, strict=True)]
        for raw, (_, response) in zip(raws, staying, strict=True):
            assert whole_frames(raw) == expected_events()
            stream_id = response.getheader(protocol.STREAM_ID_HEADER)
            assert post_stream(server.url, "/flows/gated", {}, stream_id=stream_id).raw == raw
        for live in left:
            replay = post_stream(server.url, "/flows/gated", {}, stream_id=live.stream_id)
            assert replay.events == expected_events()
        assert stats(server)["together"] > before  # the shared requests did carry them
    finally:
        server.stop()


def test_a_stream_cancelled_by_another_process_sends_the_shared_appends_one_by_one(
    tmp_path: Path,
) -> None:
    """Eight SQLite streams emit each chunk in the same turn of the hub's loop (``lockstep``),
    so their appends share the writer's requests; four clients left after the first chunk.
    Another process (this test, as another worker would) raises one stream's cancel flag
    in the file. That stream's next append fails the joint append's checks, so the shared
    request's appends all run one by one: the cancelled stream stores its chunk and gets
    the flag, its flow stops at its next chunk, and every stream is stored whole and equal
    to what a staying client got live."""
    server = start("sqlite", tmp_path)
    try:
        key, steps = uuid.uuid4().hex, 4
        body = {"data": {"key": key, "steps": steps}}
        calls = [open_live(server, "/flows/lockstep", body) for _ in range(8)]
        ids = [response.getheader(protocol.STREAM_ID_HEADER) for _, response in calls]
        open_gate(server, f"{key}-0")
        raws = [read_frames(response, 1, 1) for _, response in calls]
        for conn, response in calls[4:]:
            response.close()
            conn.close()  # these flows go on without their clients
        staying, cancelled = calls[:4], ids[0]
        with SQLiteStreamManager(server.env["DISCONNECT_APP_SQLITE"]) as elsewhere:
            assert elsewhere.request_cancel(cancelled)
        assert sent_apart(server) == []
        open_gate(server, f"{key}-1")
        wait_until(
            lambda: requests.get(f"{server.url}/cancelled/{cancelled}", timeout=30).json()[
                "cancelled"
            ],
            60,
            "the cancel flag reaching the flow",
        )
        # Its append shared a request with the other staying streams' at least (a flow
        # whose client left may take a turn of its own for the send that finds it gone),
        # and that request went one by one.
        apart = sent_apart(server)
        assert cancelled in apart and set(ids[:4]) <= set(apart), apart
        for i in range(2, steps):
            open_gate(server, f"{key}-{i}")
        raws = [
            raw + read_to_end(conn, response)
            for raw, (conn, response) in zip(raws[:4], staying, strict=True)
        ]
        whole = [("chunk", i) for i in range(steps)] + [("done", "done")]
        cancel = {"status": "CANCELLED", "message": "Cancelled by client."}
        assert whole_frames(raws[0]) == [("chunk", 0), ("chunk", 1), ("error", cancel)]
        for raw in raws[1:]:
            assert whole_frames(raw) == whole
        for stream_id, raw in zip(ids[:4], raws, strict=True):
            assert post_stream(server.url, "/flows/lockstep", {}, stream_id=stream_id).raw == raw
        for stream_id in ids[4:]:
            replay = post_stream(server.url, "/flows/lockstep", {}, stream_id=stream_id)
            assert replay.events == whole
    finally:
        server.stop()


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


def read_response(
    reader: Any, status_line: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 response from ``reader`` (a socket's ``makefile("rb")``), after its status
    line when that was read already: its status and body (chunked, or of a length); its
    headers (lowercase names) go to ``headers``."""
    status_line = status_line or reader.readline()
    headers = {} if headers is None else headers
    while (line := reader.readline()) != b"\r\n":
        assert line, "the connection closed within a response's head"
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") != "chunked":
        return int(status_line.split()[1]), reader.read(int(headers["content-length"]))
    body = b""
    while size := int(reader.readline(), 16):
        body += reader.read(size)
        assert reader.read(2) == b"\r\n"
    assert reader.read(2) == b"\r\n"
    return int(status_line.split()[1]), body


def live_request(key: str, before: int, after: int, close: bool = False) -> bytes:
    body = json.dumps({"data": {"before": before, "after": after, "key": key}}).encode()
    return (
        b"POST /flows/gated HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\n%s\r\n%s"
        % (len(body), b"Connection: close\r\n" if close else b"", body)
    )


@pytest.mark.parametrize(
    "server",
    [
        "memory, detached response",
        "sqlite, detached response",
        "memory, detached response, -k PyWSGIWorker",
    ],
    indirect=True,
)
def test_a_detached_stream_s_connection_serves_the_requests_after_it(
    server: servers.Server,
) -> None:
    """A detached response's connection is kept alive: the requests that follow its stream
    on it are answered there, also when the client sent them before the stream ended (read
    ahead by the server), and a second stream on it is detached in turn."""
    stats_request = b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        reader = sock.makefile("rb")
        for n in range(2):
            key = uuid.uuid4().hex
            # The next request comes with the stream's: the server reads it along.
            sock.sendall(live_request(key, BEFORE, AFTER) + stats_request)
            # The response is detached once its headers are out: the flow waits at its gate.
            status_line = reader.readline()
            open_gate(server, key)
            status, body = read_response(reader, status_line)
            assert status == 200
            assert whole_frames(body) == expected_events()
            headers: dict[str, str] = {}
            status, answer = read_response(reader, None, headers)
            assert status == 200
            assert json.loads(answer)["detached"] >= n + 1
            if worker_class(server) == "gevent":  # gunicorn's own handler serves it again
                assert headers["server"].startswith("gunicorn")
    assert stats(server)["detached"] >= 2


@pytest.mark.parametrize("mode", DETACHED)
def test_a_stopping_worker_answers_a_request_in_flight_after_a_detached_stream(
    mode: str,
) -> None:
    """A graceful stop lets the request in flight on a connection served on after a
    detached stream end (answered, then the connection closed): under ``-k gevent`` no
    server's pool counts that connection, under the pywsgi workers the server's does."""
    server = start(mode, Path())
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            reader = sock.makefile("rb")
            key = uuid.uuid4().hex
            sock.sendall(live_request(key, 1, 1))
            status_line = reader.readline()  # its headers are out: it is detached
            open_gate(server, key)
            status, body = read_response(reader, status_line)
            assert whole_frames(body)[-1] == ("done", "done")
            wait = f"GET /wait/never-{key}?timeout=5 HTTP/1.1\r\nHost: t\r\n\r\n"
            sock.sendall(wait.encode())
            for _ in range(600):  # until the request waits (5 s) on the connection served on
                if stats(server)["waiting"]:
                    break
                time.sleep(0.05)
            os.kill(server.proc.pid, signal.SIGTERM)
            status, answer = read_response(reader)
            assert (status, json.loads(answer)) == (200, {"open": False})
            assert reader.read(1) == b""
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("mode", DETACHED)
@pytest.mark.parametrize("streams", [1, 2], ids=["first request", "served on"])
def test_a_detached_stream_that_asked_for_the_close_gets_it(streams: int, mode: str) -> None:
    """A client that says ``Connection: close`` (on a connection's first request, or on one
    served on after a detached stream) has its connection closed after the stream."""
    # Kept alive, the connection would stay open past the socket's timeout.
    server = start(mode, Path(), ("--keep-alive", "120"))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            reader = sock.makefile("rb")
            for n in range(streams):
                key = uuid.uuid4().hex
                sock.sendall(live_request(key, 1, 1, close=n == streams - 1))
                status_line = reader.readline()
                open_gate(server, key)
                status, body = read_response(reader, status_line)
                assert whole_frames(body)[-1] == ("done", "done")
            assert reader.read(1) == b""
        assert stats(server)["detached"] == streams
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["memory", "memory, detached response"])
def test_the_metrics_count_a_live_client_while_the_fast_path_serves_it(
    mode: str, tmp_path: Path
) -> None:
    """The live fast path serves a client before the body's first step, and a detached
    response's after its request ended: the ``subscribers{mode="live"}`` gauge counts the
    client all that time, and not after."""
    server = start(mode, tmp_path, env={"DISCONNECT_APP_METRICS": "1"})
    try:
        key = uuid.uuid4().hex
        conn, response = open_live(
            server, "/flows/gated", {"data": {"before": 1, "after": 1, "key": key}}
        )
        read_frames(response, 1, 65536)
        assert stats(server)["live_subscribers"] == 1  # the flow waits at its gate
        open_gate(server, key)
        assert whole_frames(response.read())[-1] == ("done", "done")
        conn.close()
        for _ in range(600):  # the server lets go of the reader right after the last frame
            if stats(server)["live_subscribers"] == 0:
                break
            time.sleep(0.05)
        assert stats(server)["live_subscribers"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["memory", "memory, detached response"])
def test_a_live_stream_over_tls_is_written_through_the_tls_socket(
    mode: str, tmp_path: Path
) -> None:
    """gunicorn with ``--certfile``: the live fast path writes to the OS socket, under the
    TLS layer, so it must leave such a connection to the server: every frame reaches the
    client decrypted, equal to the replay, and the connection is not taken over."""
    certfile, keyfile = servers.self_signed(tmp_path)
    server = start(mode, tmp_path, ("--certfile", certfile, "--keyfile", keyfile))
    try:
        context = ssl.create_default_context(cafile=certfile)
        context.check_hostname = False
        key = uuid.uuid4().hex
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=60, context=context)
        body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
        conn.request("POST", "/flows/gated", body=json.dumps(body), headers=LIVE)
        response = conn.getresponse()
        stream_id = response.getheader(protocol.STREAM_ID_HEADER)
        raw = read_frames(response, BEFORE, 65536)
        https = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=60, context=context)
        https.request("POST", f"/gate/{key}")
        assert https.getresponse().status == 200
        raw += response.read()
        assert whole_frames(raw) == expected_events()
        conn.request("GET", "/stats")
        assert json.loads(conn.getresponse().read())["detached"] == 0
        conn.request(
            "POST",
            "/flows/gated",
            body="{}",
            headers={**LIVE, protocol.STREAM_ID_HEADER: stream_id},
        )
        assert conn.getresponse().read() == raw
        conn.close()
        https.close()
    finally:
        server.stop()


@pytest.mark.parametrize("mode", DETACHED)
def test_no_more_connections_are_taken_over_than_the_server_serves_at_once(mode: str) -> None:
    """With ``--worker-connections 2``, two live streams are taken over; a third keeps its
    request (which the server counts), and every one is whole. Once they are over, the
    next stream is taken over again."""
    server = start(mode, Path(), ("--worker-connections", "2"))
    try:
        keys = [uuid.uuid4().hex for _ in range(4)]
        body = {"before": 1, "after": 2}
        expected = [("chunk", 0), ("chunk", 1), ("chunk", 2), ("done", "done")]
        live = []
        for key in keys[:3]:
            conn, response = open_live(server, "/flows/gated", {"data": {**body, "key": key}})
            live.append((conn, response, read_frames(response, 1, 65536)))  # at its gate
        assert (stats(server)["detached"], stats(server)["open_bodies"]) == (2, 1)
        for key, (conn, response, first) in zip(keys, live, strict=False):
            open_gate(server, key)
            assert whole_frames(first + response.read()) == expected
            conn.close()
        for _ in range(600):  # the server sees the closes
            if stats(server)["taken"] == 0:
                break
            time.sleep(0.05)
        conn, response = open_live(server, "/flows/gated", {"data": {**body, "key": keys[3]}})
        first = read_frames(response, 1, 65536)
        assert stats(server)["detached"] == 3
        open_gate(server, keys[3])
        assert whole_frames(first + response.read()) == expected
        conn.close()
    finally:
        server.stop()
