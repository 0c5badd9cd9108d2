"""``GET <flow>/events``: the stream as standard Server-Sent Events, resumable by event id."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    FlowContext,
    FlowError,
    InMemoryStreamManager,
    RequestData,
    durable_stream_blueprint,
)
from flask_durable_stream.managers.base import PRODUCER_LOST, StreamStatus
from flask_durable_stream.sse import SSEDecoder
from flask_durable_stream.testing import MakeManager
from tests.support import servers

SSE = {"Accept": "text/event-stream"}


def parse_sse(text: str) -> list[dict[str, Any]]:
    """SSE messages as dicts: ``id``, ``event`` (default ``message``), ``data`` (JSON); comments
    as ``{"comment": ...}``, ``retry`` as ``{"retry": ms}``, in stream order, through the
    package's own decoder. Every message must be complete."""
    assert text == "" or text.endswith("\n\n"), repr(text[-40:])
    messages: list[dict[str, Any]] = []
    decoder = SSEDecoder(
        on_comment=lambda comment: messages.append({"comment": comment}),
        on_retry=lambda ms: messages.append({"retry": ms}),
    )
    for event in decoder.feed(text):
        message: dict[str, Any] = {"event": event.event, "data": event.json()}
        if event.id:  # the end's is "<seq>-end", the others' the seq
            message["id"] = int(event.id) if event.id.isdigit() else event.id
        messages.append(message)
    return messages


def story(data: Any, ctx: FlowContext) -> Any:
    for i in range(int(data.get("n", 3))):
        ctx.send_chunk({"i": i})
        time.sleep(float(data.get("delay", 0)))
    return {"n": data.get("n", 3)}


def boom(data: Any) -> Iterator[Any]:
    yield "one"
    raise KeyError("secret-token-123")


def provider(req: RequestData) -> dict[str, Any]:
    if req.headers.get("authorization") == "Bearer nope":
        raise FlowError("PERMISSION_DENIED", "not allowed")
    return {}


@pytest.fixture
def manager(memory_manager: InMemoryStreamManager) -> InMemoryStreamManager:
    return memory_manager


@pytest.fixture
def app(manager: InMemoryStreamManager) -> Flask:
    app = Flask(__name__)
    bp = durable_stream_blueprint(
        {"story": story, "boom": boom}, stream_manager=manager, context_provider=provider
    )
    app.register_blueprint(bp, url_prefix="/api")
    return app


def start_flow(client: FlaskClient, path: str, **data: Any) -> str:
    response = client.post(path, json={"data": data}, headers=SSE)
    response.close()
    return str(response.headers["x-genkit-stream-id"])


def start(client: FlaskClient, flow: str = "story", **data: Any) -> str:
    return start_flow(client, f"/api/{flow}", **data)


def ids(body: bytes) -> list[int]:
    return [m["id"] for m in parse_sse(body.decode()) if "id" in m]


def events(client: FlaskClient, sid: str, **kwargs: Any) -> Any:
    return client.get(f"/api/story/events?streamId={sid}", **kwargs)


def test_a_stream_as_server_sent_events(client: FlaskClient) -> None:
    sid = start(client, n=3, delay=0.01)  # followed while it runs, then the end
    response = events(client, sid)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.data.decode() == (
        "retry: 1000\n\n"
        'id: 0\ndata: {"i":0}\n\n'
        'id: 1\ndata: {"i":1}\n\n'
        'id: 2\ndata: {"i":2}\n\n'
        'id: 3-end\nevent: result\ndata: {"n":3}\n\n'
    )


def test_resume_after_an_id_from_the_query_or_last_event_id(client: FlaskClient) -> None:
    sid = start(client, n=4)
    assert ids(events(client, sid).data) == [0, 1, 2, 3, "4-end"]
    assert ids(client.get(f"/api/story/events?streamId={sid}&after=1").data) == [2, 3, "4-end"]
    # EventSource keeps its first URL and adds the header: the header is newer and wins.
    resumed = client.get(
        f"/api/story/events?streamId={sid}&after=0", headers={"Last-Event-ID": "3"}
    )
    assert parse_sse(resumed.data.decode()) == [
        {"retry": 1000},
        {"id": "4-end", "event": "result", "data": {"n": 4}},
    ]


def test_nothing_after_the_end_is_204_which_stops_eventsource(client: FlaskClient) -> None:
    sid = start(client, n=2)
    assert parse_sse(events(client, sid).data.decode())[-1]["event"] == "result"
    for had in ("2-end", "2"):  # the end's id; or the seq of a stream that ended well
        done = events(client, sid, headers={"Last-Event-ID": had})
        assert done.status_code == 204 and done.data == b""


def test_a_client_at_or_past_a_failed_streams_stored_end_gets_that_end_not_a_204(
    client: FlaskClient, manager: InMemoryStreamManager
) -> None:
    """Its Last-Event-ID is a chunk's at or past the stored end: the client had events that
    storage never got (their producer died before storing them), and the stored failure
    took the first of their seqs. It must learn how the stream ended, not get a 204 that
    stops EventSource as if all were well."""
    sid = os.urandom(16).hex()
    writer = manager.open(sid, flow="story")
    for i in range(3):
        writer.write({"i": i})
    writer.error(PRODUCER_LOST)  # as a reader ends a stream whose producer's lease ran out
    for last_seen in ("3", "4", "30"):
        response = events(client, sid, headers={"Last-Event-ID": last_seen})
        assert response.status_code == 200
        assert parse_sse(response.data.decode()) == [
            {"retry": 1000},
            {"id": "3-end", "event": "failure", "data": PRODUCER_LOST},
        ]
    # A client that has the end (its id says so) gets the 204.
    assert events(client, sid, headers={"Last-Event-ID": "3-end"}).status_code == 204
    assert client.get(f"/api/story/events?streamId={sid}&after=3-end").status_code == 204


def test_a_follower_ahead_of_storage_gets_the_failure_once_the_producer_is_lost(
    make_manager: MakeManager,
) -> None:
    """A client reconnects while its stream is open, with ids its worker sent but never
    stored; that worker is gone, so the stream ends "Producer lost" once its lease runs
    out, the error taking a seq the client had as a chunk. The follow then has nothing
    after the client's cursor: the client gets the stored failure, not a quiet end (every
    backend)."""
    manager = make_manager(timeout=30, lease_seconds=1.0)
    app = Flask(__name__)
    app.register_blueprint(
        durable_stream_blueprint({"story": story}, stream_manager=manager), url_prefix="/api"
    )
    client = app.test_client()
    for had in (1, 3):  # one event, and three, ahead of storage
        sid = os.urandom(16).hex()
        writer = manager.open(sid, flow="story")
        writer.write({"i": 0})  # stored: seq 0; the client also had 1..``had``
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.OPEN  # so it is followed
        response = events(client, sid, headers={"Last-Event-ID": str(had)})
        assert response.status_code == 200
        assert parse_sse(response.data.decode()) == [
            {"retry": 1000},
            {"id": "1-end", "event": "failure", "data": PRODUCER_LOST},
        ]
        assert events(client, sid, headers={"Last-Event-ID": "1-end"}).status_code == 204


def test_errors_are_failure_events_redacted_like_the_post_endpoint(client: FlaskClient) -> None:
    sid = start(client, "boom")
    messages = parse_sse(client.get(f"/api/boom/events?streamId={sid}").data.decode())
    assert messages == [
        {"retry": 1000},
        {"id": 0, "event": "message", "data": "one"},
        {
            "id": "1-end",
            "event": "failure",
            "data": {"status": "INTERNAL", "message": "Internal Error"},
        },
    ]


@pytest.mark.parametrize(
    ("query", "headers", "status", "code"),
    [
        ("", {}, 400, "INVALID_ARGUMENT"),
        ("?streamId=..%2Fetc", {}, 400, "INVALID_ARGUMENT"),
        ("?streamId=" + "a" * 129, {}, 400, "INVALID_ARGUMENT"),
        ("?streamId=unknown", {}, 404, "NOT_FOUND"),
        ("?streamId=unknown&after=abc", {}, 400, "INVALID_ARGUMENT"),
        ("?streamId=unknown&after=-2", {}, 400, "INVALID_ARGUMENT"),
        ("?streamId=unknown", {"Last-Event-ID": "1e3"}, 400, "INVALID_ARGUMENT"),
        ("?streamId=unknown", {"Authorization": "Bearer nope"}, 403, "PERMISSION_DENIED"),
    ],
)
def test_bad_requests_get_json_errors(
    client: FlaskClient, query: str, headers: dict[str, str], status: int, code: str
) -> None:
    response = client.get(f"/api/story/events{query}", headers=headers)
    assert response.status_code == status
    assert response.get_json()["status"] == code


# -- a real gevent server: keep-alives, connection lifetime, resume ------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    env = {
        **servers.sqlite_env(tmp_path_factory, "sse"),
        "FLASK_DURABLE_STREAM_KEEPALIVE_INTERVAL": "0.1",
        "FLASK_DURABLE_STREAM_SSE_LIFETIME": "0.5",
    }
    server = servers.example_app(env)
    yield server
    server.stop()


def read_until_closed(server: servers.Server, path: str, headers: dict[str, str]) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body.decode()


def test_keepalives_lifetime_and_resume_on_a_real_server(server: servers.Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/flows/story",
        body=json.dumps({"data": {"chunks": 200, "delay": 0.3}}),
        headers={"Content-Type": "application/json", **SSE},
    )
    live = conn.getresponse()
    sid = live.getheader("x-genkit-stream-id")
    assert sid
    # The flow is running once its first live chunk arrived: only then follow it over SSE.
    first_frame = live.readline()
    assert first_frame.startswith(b'data: {"message":'), first_frame
    path = f"/flows/story/events?streamId={sid}"
    received: list[dict[str, Any]] = []
    connections, keepalives, last_id, cancelled = 0, 0, None, False
    while not received or received[-1]["event"] == "message":
        headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        status, text = read_until_closed(server, path, headers)
        assert status == 200
        connections += 1
        for message in parse_sse(text):
            if "comment" in message:
                keepalives += 1
            elif "id" in message:
                received.append(message)
                last_id = message["id"]
        if not cancelled and connections >= 2 and keepalives >= 1:
            # The server closed a connection of an open stream and the client resumed:
            # stop the flow so that the next connection reads the stream's end.
            cancel = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            cancel.request("POST", "/flows/story/cancel", headers={"x-genkit-stream-id": sid})
            assert cancel.getresponse().status == 202
            cancel.close()
            cancelled = True
    live_frames = first_frame + live.read()
    conn.close()
    # The client resumed by event id and got every event exactly once, in order, then the end.
    assert cancelled and connections >= 3
    chunks, end = received[:-1], received[-1]
    assert [m["id"] for m in chunks] == list(range(len(chunks)))
    assert end["id"] == f"{len(chunks)}-end"
    assert [m["event"] for m in chunks] == ["message"] * len(chunks)
    assert [m["data"]["index"] for m in chunks] == list(range(len(chunks)))
    assert end["event"] == "failure" and end["data"]["status"] == "CANCELLED"
    assert live_frames.count(b'data: {"message":') == len(chunks)
    assert live_frames.endswith(b'"status":"CANCELLED","message":"Cancelled by client."}}\n\n')
    status, text = read_until_closed(server, path, {"Last-Event-ID": str(last_id)})
    assert (status, text) == (204, "")


def test_a_failed_connection_is_a_comment_then_close_not_the_streams_end(
    manager: InMemoryStreamManager,
) -> None:
    def silent(data: Any, ctx: FlowContext) -> str:
        ctx.send_chunk("hello")
        ctx.wait_cancelled(30)
        return "bye"

    app = Flask(__name__)
    bp = durable_stream_blueprint({"silent": silent}, stream_manager=manager, subscribe_timeout=0.3)
    app.register_blueprint(bp)
    client = app.test_client()
    sid = start_flow(client, "/silent")
    text = client.get(f"/silent/events?streamId={sid}").data.decode()
    messages = parse_sse(text)
    assert messages[:2] == [{"retry": 1000}, {"id": 0, "event": "message", "data": "hello"}]
    assert messages[2:] == [
        {"comment": 'failure {"status":"DEADLINE_EXCEEDED","message":"Stream timed out."}'}
    ]
    assert "event:" not in text  # no result or failure: a client resumes after seq 0
    assert bp.runner.request_cancel(sid)
