"""Owned streams: a context provider that names an ``owner`` keeps the stream to that owner."""

from __future__ import annotations

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

SSE = {"Accept": "text/event-stream"}
USERS = {"Bearer alice-token": "alice", "Bearer bob-token": "bob"}


def provider(req: RequestData) -> dict[str, Any]:
    auth = req.headers.get("authorization")
    if auth is None:
        return {}  # anonymous: streams without an owner
    if auth == "Bearer broken":
        return {"owner": 42}  # a provider bug, not the client's
    if auth not in USERS:
        raise FlowError("UNAUTHENTICATED", "unknown token")
    return {"owner": USERS[auth]}


def chat(data: Any, ctx: FlowContext) -> Any:
    ctx.send_chunk(f"hello {ctx.context.get('owner', 'stranger')}")
    ctx.wait_cancelled(float(data.get("wait", 0)))
    return "bye"


@pytest.fixture
def manager(memory_manager: InMemoryStreamManager) -> InMemoryStreamManager:
    return memory_manager


@pytest.fixture
def app(manager: InMemoryStreamManager) -> Flask:
    app = Flask(__name__)
    bp = durable_stream_blueprint({"chat": chat}, stream_manager=manager, context_provider=provider)
    app.register_blueprint(bp, url_prefix="/api")
    return app


def auth(user: str | None) -> dict[str, str]:
    token = {"alice": "Bearer alice-token", "bob": "Bearer bob-token", None: None}[user]
    return {} if token is None else {"Authorization": token}


def start(client: FlaskClient, user: str | None, wait: float = 0) -> tuple[str, bytes]:
    response = client.post(
        "/api/chat", json={"data": {"wait": wait}}, headers={**SSE, **auth(user)}
    )
    sid = response.headers["x-genkit-stream-id"]
    return sid, b"" if wait else response.data


def test_the_owner_is_stored_and_only_the_owner_reads(
    client: FlaskClient, manager: InMemoryStreamManager
) -> None:
    sid, live = start(client, "alice")
    info = manager.info(sid)
    assert info is not None and info.owner == "alice"
    replay = client.post("/api/chat", headers={**SSE, **auth("alice"), "x-genkit-stream-id": sid})
    assert replay.status_code == 200 and replay.data == live
    assert client.get(f"/api/chat/events?streamId={sid}", headers=auth("alice")).status_code == 200
    for user in ("bob", None):
        for response in (
            client.post("/api/chat", headers={**SSE, **auth(user), "x-genkit-stream-id": sid}),
            client.get(f"/api/chat/events?streamId={sid}", headers=auth(user)),
            client.post("/api/chat/cancel", headers={**auth(user), "x-genkit-stream-id": sid}),
        ):
            assert response.status_code == 403
            assert response.get_json() == {
                "status": "PERMISSION_DENIED",
                "message": "This stream belongs to another user.",
            }


def test_only_the_owner_cancels(client: FlaskClient, manager: InMemoryStreamManager) -> None:
    sid, _ = start(client, "alice", wait=30)
    refused = client.post("/api/chat/cancel", headers={**auth("bob"), "x-genkit-stream-id": sid})
    assert refused.status_code == 403
    info = manager.info(sid)
    assert info is not None and not info.cancel_requested
    accepted = client.post("/api/chat/cancel", headers={**auth("alice"), "x-genkit-stream-id": sid})
    assert accepted.status_code == 202


def test_streams_without_an_owner_are_open_to_whoever_has_the_id(
    client: FlaskClient, manager: InMemoryStreamManager
) -> None:
    sid, live = start(client, None)
    info = manager.info(sid)
    assert info is not None and info.owner is None
    for user in ("bob", None):
        replay = client.post("/api/chat", headers={**SSE, **auth(user), "x-genkit-stream-id": sid})
        assert replay.status_code == 200 and replay.data == live


def test_a_provider_that_returns_a_bad_owner_is_a_redacted_500(client: FlaskClient) -> None:
    response = client.post(
        "/api/chat", json={"data": {}}, headers={**SSE, "Authorization": "Bearer broken"}
    )
    assert response.status_code == 500
    assert response.get_json() == {"status": "INTERNAL", "message": "Internal Error"}
