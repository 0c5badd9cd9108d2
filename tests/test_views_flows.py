"""A stream belongs to the flow that made it: a reconnect through another flow's endpoint
(Genkit, SSE, the AI SDK's stream) is answered as for an unknown id, so a client learns
nothing about streams of other flows. Cancelling is not a read and stays as it was."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_durable_stream import FlowContext, InMemoryStreamManager, durable_stream_blueprint
from flask_durable_stream.ai_sdk import chat_blueprint

SSE = {"Accept": "text/event-stream"}
UNKNOWN = "no-such-stream"


def story(data: Any, ctx: FlowContext) -> str:
    ctx.send_chunk("once upon a time")
    ctx.wait_cancelled(float(data.get("wait", 0)))
    return "the end"


def reply(data: Any, ctx: FlowContext) -> Any:
    yield "hello"


@pytest.fixture
def client(memory_manager: InMemoryStreamManager) -> FlaskClient:
    app = Flask(__name__)
    flows = {"story": story, "poem": story}
    app.register_blueprint(
        durable_stream_blueprint(flows, stream_manager=memory_manager), url_prefix="/flows"
    )
    app.register_blueprint(chat_blueprint(reply, stream_manager=memory_manager), url_prefix="/chat")
    return app.test_client()


def start(client: FlaskClient, wait: float = 0) -> str:
    response = client.post("/flows/story", json={"data": {"wait": wait}}, headers=SSE)
    assert response.status_code == 200
    if not wait:
        assert b"the end" in response.data  # ended: stored whole
    return str(response.headers["x-genkit-stream-id"])


def answer(response: TestResponse) -> tuple[int, bytes]:
    return response.status_code, response.data


def test_the_stream_records_its_flow(
    client: FlaskClient, memory_manager: InMemoryStreamManager
) -> None:
    info = memory_manager.info(start(client))
    assert info is not None and info.flow == "story"


def test_a_reconnect_on_another_flow_is_answered_as_an_unknown_stream(client: FlaskClient) -> None:
    sid = start(client)

    def resume(flow: str, stream_id: str) -> tuple[int, bytes]:
        headers = {**SSE, "x-genkit-stream-id": stream_id}
        return answer(client.post(f"/flows/{flow}", headers=headers))

    def events(flow: str, stream_id: str) -> tuple[int, bytes]:
        return answer(client.get(f"/flows/{flow}/events?streamId={stream_id}"))

    own = resume("story", sid)
    assert own[0] == 200 and b"once upon a time" in own[1]  # its own flow replays it
    assert resume("poem", sid) == resume("poem", UNKNOWN) == (204, b"")
    assert events("story", sid)[0] == 200
    refused = events("poem", sid)
    assert refused == events("poem", UNKNOWN)
    assert refused[0] == 404 and b"Stream not found." in refused[1]


def test_the_ai_sdk_front_does_not_serve_another_flows_stream(
    client: FlaskClient, memory_manager: InMemoryStreamManager
) -> None:
    sid = start(client, wait=30)
    stream = answer(client.get(f"/chat/{sid}/stream"))
    assert stream == answer(client.get(f"/chat/{UNKNOWN}/stream")) == (204, b"")
    client.post("/flows/story/cancel", headers={"x-genkit-stream-id": sid})

    chat = client.post("/chat", json={"id": "c1", "messages": []})
    run_id = chat.headers["x-workflow-run-id"]
    assert b"hello" in chat.data
    assert client.get(f"/chat/{run_id}/stream").status_code == 200  # its own runs it serves
