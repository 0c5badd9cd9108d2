"""flask_durable_stream.ai_sdk through Flask's test client: the UI message stream protocol,
the chat's active stream, offset resume, stop, redaction and owners.

The AI SDK's own transports against a gunicorn deployment: tests/test_ai_sdk_client.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    FlowContext,
    FlowError,
    InMemoryStreamManager,
    RequestData,
    StreamManager,
)
from flask_durable_stream.ai_sdk import chat_blueprint
from flask_durable_stream.managers.base import PRODUCER_LOST, StreamStatus
from flask_durable_stream.runner import runner_for


class Gate:
    """Holds the ``held`` flow between its chunks until the test lets it go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()


def chunks_of(body: bytes) -> list[Any]:
    """The UI chunks of an SSE body; ``"[DONE]"`` for the end marker."""
    out: list[Any] = []
    for frame in body.decode().split("\n\n"):
        if frame.startswith("data: "):
            text = frame[len("data: ") :]
            out.append(text if text == "[DONE]" else json.loads(text))
        elif frame:
            raise AssertionError(f"unexpected frame {frame!r}")
    return out


def text_of(chunks: list[Any]) -> str:
    return "".join(c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta")


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def app(memory_manager: InMemoryStreamManager, gate: Gate) -> Flask:
    def flows(data: Any, ctx: FlowContext) -> Iterator[Any]:
        kind = data.get("kind", "text")
        if kind == "text":
            yield from ["Hello", ", ", "world"]
        elif kind == "parts":
            yield {"type": "reasoning-start", "id": "r1"}
            yield {"type": "reasoning-delta", "id": "r1", "delta": "thinking"}
            yield {"type": "reasoning-end", "id": "r1"}
            yield "before"
            yield {"type": "data-weather", "data": {"city": "Oslo"}}
            yield "after"
        elif kind == "boom":
            yield "partial"
            raise KeyError("secret-token-123")
        elif kind == "public":
            yield "partial"
            raise FlowError("INVALID_ARGUMENT", "topic is required")
        elif kind == "held":
            gate.started.set()
            for word in ("one ", "two ", "three "):
                yield word
                while not gate.release.wait(0.01):  # held: until released or stopped
                    ctx.raise_if_cancelled()

    async def async_flow(data: Any) -> AsyncIterator[Any]:
        for word in ("async ", "words"):
            await asyncio.sleep(0)
            yield word
        if data.get("bad"):
            yield 42

    def context(request: RequestData) -> dict[str, Any]:
        user = request.headers.get("x-user")
        return {"owner": user} if user else {}

    app = Flask(__name__)
    bp = chat_blueprint(flows, stream_manager=memory_manager, context_provider=context)
    app.register_blueprint(bp, url_prefix="/api/chat")
    app.register_blueprint(
        chat_blueprint(async_flow, stream_manager=memory_manager, name="async_chat"),
        url_prefix="/api/async",
    )
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def body(chat_id: str | None = "c1", **fields: Any) -> dict[str, Any]:
    """What DefaultChatTransport.sendMessages posts."""
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    base = {"id": chat_id, "messages": [message], "trigger": "submit-message", "messageId": None}
    if chat_id is None:
        del base["id"]
    return {**base, **fields}


def test_text_becomes_one_text_part_between_start_and_finish(client: FlaskClient) -> None:
    response = client.post("/api/chat", json=body())
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    run_id = response.headers["x-workflow-run-id"]
    chunks = chunks_of(response.data)
    assert chunks == [
        {"type": "start", "messageId": run_id},
        {"type": "text-start", "id": "text-0"},
        {"type": "text-delta", "id": "text-0", "delta": "Hello"},
        {"type": "text-delta", "id": "text-0", "delta": ", "},
        {"type": "text-delta", "id": "text-0", "delta": "world"},
        {"type": "text-end", "id": "text-0"},
        {"type": "finish"},
        "[DONE]",
    ]


def test_chunk_dicts_pass_through_and_split_text_parts(client: FlaskClient) -> None:
    chunks = chunks_of(client.post("/api/chat", json=body(kind="parts")).data)
    assert [c if c == "[DONE]" else (c["type"], c.get("id")) for c in chunks] == [
        ("start", None),
        ("reasoning-start", "r1"),
        ("reasoning-delta", "r1"),
        ("reasoning-end", "r1"),
        ("text-start", "text-0"),
        ("text-delta", "text-0"),
        ("text-end", "text-0"),
        ("data-weather", None),
        ("text-start", "text-1"),
        ("text-delta", "text-1"),
        ("text-end", "text-1"),
        ("finish", None),
        "[DONE]",
    ]
    assert chunks[7]["data"] == {"city": "Oslo"}


def test_errors_are_redacted_error_parts(client: FlaskClient) -> None:
    secret = chunks_of(client.post("/api/chat", json=body(kind="boom")).data)
    assert secret[-3:] == [
        {"type": "error", "errorText": "Internal Error"},
        {"type": "finish", "finishReason": "error"},
        "[DONE]",
    ]
    public = chunks_of(client.post("/api/chat", json=body("c2", kind="public")).data)
    assert public[-3]["errorText"] == "topic is required"


def test_no_active_stream_is_204(client: FlaskClient) -> None:
    assert client.get("/api/chat/never-used/stream").status_code == 204
    client.post("/api/chat", json=body("done-chat")).get_data()  # runs to the end
    assert client.get("/api/chat/done-chat/stream").status_code == 204  # pointer cleared


def test_reconnect_gets_the_active_stream_from_its_start_then_live(
    client: FlaskClient, gate: Gate, memory_manager: InMemoryStreamManager
) -> None:
    live = client.post("/api/chat", json=body("c-live", kind="held"), buffered=False)
    run_id = live.headers["x-workflow-run-id"]
    assert gate.started.wait(5)
    assert memory_manager.get_pointer("ai_chat.c-live") == run_id
    resumed = client.get("/api/chat/c-live/stream", buffered=False)
    assert resumed.status_code == 200 and resumed.headers["x-workflow-run-id"] == run_id
    gate.release.set()
    replay = chunks_of(resumed.get_data())
    assert replay == chunks_of(live.get_data())
    assert text_of(replay) == "one two three "
    assert memory_manager.get_pointer("ai_chat.c-live") is None
    assert client.get("/api/chat/c-live/stream").status_code == 204


def test_start_index_returns_only_the_rest(client: FlaskClient) -> None:
    full = client.post("/api/chat", json=body(None))  # WorkflowChatTransport sends no id
    run_id = full.headers["x-workflow-run-id"]
    everything = chunks_of(full.data)
    for start in range(len(everything) - 1):
        rest = client.get(f"/api/chat/{run_id}/stream?startIndex={start}")
        assert chunks_of(rest.data) == everything[start:], start
    finished = client.get(f"/api/chat/{run_id}/stream?startIndex={len(everything) - 1}")
    assert finished.status_code == 204  # it had everything, finish included
    tail = client.get(f"/api/chat/{run_id}/stream?startIndex=-2")
    assert chunks_of(tail.data) == everything[-3:]
    assert client.get(f"/api/chat/{run_id}/stream?startIndex=x").status_code == 400


def test_start_index_at_or_past_a_failed_runs_error_gets_error_and_finish(
    client: FlaskClient,
) -> None:
    """A client asks with ``startIndex`` only while it lacks ``finish``. At or past the
    stored error's index it had chunks that storage never got under those indexes (their
    worker died before storing them): it must learn that the answer failed, not get a 204
    or a ``finish`` without its error."""
    failed = client.post("/api/chat", json=body(None, kind="boom"))
    chunks = chunks_of(failed.data)
    run_id = failed.headers["x-workflow-run-id"]
    assert [c["type"] for c in chunks[-3:-1]] == ["error", "finish"]
    error_index = len(chunks) - 3
    for start in (error_index, error_index + 1, error_index + 2, error_index + 12):
        resumed = client.get(f"/api/chat/{run_id}/stream?startIndex={start}")
        assert chunks_of(resumed.data) == chunks[-3:], start  # error, finish, [DONE]
    # Before the error, the chunks from there on, then the same end.
    assert chunks_of(client.get(f"/api/chat/{run_id}/stream?startIndex=0").data) == chunks
    # A stream that ended well has nothing after its end for anybody: 204.
    done = client.post("/api/chat", json=body(None))
    past = len(chunks_of(done.data)) + 10
    assert (
        client.get(
            f"/api/chat/{done.headers['x-workflow-run-id']}/stream?startIndex={past}"
        ).status_code
        == 204
    )


def test_a_follower_ahead_of_storage_gets_error_and_finish_once_the_producer_is_lost(
    make_manager: Callable[..., StreamManager],
) -> None:
    """The transport reconnects while the run is open, with more chunks than were stored
    (their worker sent them, then died); the run ends "Producer lost" once its lease runs
    out, the error taking an index the client had as a chunk. The client gets the error
    and finish, not a body that ends without them (every backend)."""
    manager = make_manager(timeout=30, lease_seconds=1.0)
    app = Flask(__name__)
    app.register_blueprint(
        chat_blueprint(lambda data: iter(()), stream_manager=manager), url_prefix="/api/chat"
    )
    client = app.test_client()
    for had in (2, 4):  # chunks the client had: one and three more than stored
        sid = os.urandom(16).hex()
        writer = manager.open(sid, flow="ai_chat")
        writer.write({"type": "start"})  # stored: index 0
        info = manager.info(sid)
        assert info is not None and info.status is StreamStatus.OPEN  # so it is followed
        resumed = client.get(f"/api/chat/{sid}/stream?startIndex={had}")
        assert resumed.status_code == 200
        assert chunks_of(resumed.data) == [
            {"type": "error", "errorText": PRODUCER_LOST["message"]},
            {"type": "finish", "finishReason": "error"},
            "[DONE]",
        ]


def test_stop_ends_the_answer_for_every_reader_and_keeps_it(
    client: FlaskClient, gate: Gate, memory_manager: InMemoryStreamManager
) -> None:
    live = client.post("/api/chat", json=body("c-stop", kind="held"), buffered=False)
    run_id = live.headers["x-workflow-run-id"]
    assert gate.started.wait(5)
    follower = client.get("/api/chat/c-stop/stream", buffered=False)
    stopped = client.post("/api/chat/c-stop/stop")
    assert stopped.status_code == 202
    assert stopped.get_json() == {"streamId": run_id, "status": "stopping"}
    first, second = chunks_of(live.get_data()), chunks_of(follower.get_data())
    assert first == second
    assert first[-3:] == [
        {"type": "text-end", "id": "text-0"},
        {"type": "finish", "finishReason": "other"},
        "[DONE]",
    ]
    assert text_of(first) == "one "
    assert memory_manager.get_pointer("ai_chat.c-stop") is None
    assert client.get("/api/chat/c-stop/stream").status_code == 204
    kept = client.get(f"/api/chat/{run_id}/stream")  # what was generated stays readable
    assert chunks_of(kept.data) == first
    assert client.post("/api/chat/c-stop/stop").status_code == 204  # nothing left to stop


def test_an_owned_chat_is_its_owners_only(client: FlaskClient, gate: Gate) -> None:
    alice = {"x-user": "alice"}
    live = client.post("/api/chat", json=body("c-own", kind="held"), headers=alice, buffered=False)
    assert gate.started.wait(5)
    bob = {"x-user": "bob"}
    assert client.get("/api/chat/c-own/stream", headers=bob).status_code == 403
    assert client.post("/api/chat/c-own/stop", headers=bob).status_code == 403
    taken = client.post("/api/chat", json=body("c-own"), headers=bob)
    assert taken.status_code == 403 and taken.get_json()["status"] == "PERMISSION_DENIED"
    assert client.get("/api/chat/c-own/stream", headers=alice, buffered=False).status_code == 200
    gate.release.set()
    assert text_of(chunks_of(live.get_data())) == "one two three "


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"messages": 3}', 400),
        (b'{"id": "../x", "messages": []}', 400),
        (b'{"id": 5, "messages": []}', 400),
    ],
)
def test_bad_bodies_are_400(client: FlaskClient, payload: bytes, status: int) -> None:
    response = client.post("/api/chat", data=payload, content_type="application/json")
    assert response.status_code == status
    assert response.get_json()["status"] == "INVALID_ARGUMENT"


def test_client_helper_is_served(client: FlaskClient) -> None:
    response = client.get("/api/chat/client.js")
    assert response.mimetype == "text/javascript"
    assert b"export async function stopChat" in response.data


def test_async_flows_and_chunks_that_are_neither_text_nor_parts(client: FlaskClient) -> None:
    good = chunks_of(client.post("/api/async", json=body("a1")).data)
    assert text_of(good) == "async words" and good[-2:] == [{"type": "finish"}, "[DONE]"]
    bad = chunks_of(client.post("/api/async", json=body("a2", bad=True)).data)
    assert text_of(bad) == "async words"
    assert bad[-3] == {"type": "error", "errorText": "Internal Error"}


def test_the_chat_on_every_backend(make_manager: Callable[..., StreamManager]) -> None:
    """Reconnect by chat id, resume by index and stop, with the pointer in each storage."""
    manager = make_manager()
    gate = Gate()

    def held(data: Any, ctx: FlowContext) -> Iterator[str]:
        gate.started.set()
        for word in ("one ", "two ", "three "):
            yield word
            while not gate.release.wait(0.01):
                ctx.raise_if_cancelled()

    app = Flask(__name__)
    app.register_blueprint(chat_blueprint(held, stream_manager=manager), url_prefix="/c")
    client = app.test_client()
    try:
        live = client.post("/c", json=body("b-1"), buffered=False)
        run_id = live.headers["x-workflow-run-id"]
        assert gate.started.wait(10)
        assert manager.get_pointer("ai_chat.b-1") == run_id
        follower = client.get("/c/b-1/stream", buffered=False)
        assert follower.status_code == 200
        gate.release.set()
        chunks = chunks_of(live.get_data())
        assert chunks_of(follower.get_data()) == chunks
        assert text_of(chunks) == "one two three "
        assert manager.get_pointer("ai_chat.b-1") is None
        assert client.get("/c/b-1/stream").status_code == 204
        rest = client.get(f"/c/{run_id}/stream?startIndex=3")
        assert chunks_of(rest.data) == chunks[3:]

        gate.release.clear()
        gate.started.clear()
        stopping = client.post("/c", json=body("b-2"), buffered=False)
        assert gate.started.wait(10)
        assert client.post("/c/b-2/stop").status_code == 202
        stopped = chunks_of(stopping.get_data())
        assert text_of(stopped) == "one "
        assert stopped[-2] == {"type": "finish", "finishReason": "other"}
        assert manager.get_pointer("ai_chat.b-2") is None
    finally:
        gate.release.set()
        runner_for(manager).shutdown(5)
