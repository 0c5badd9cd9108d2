"""The HTTP layer under bad input and storage faults, through Flask's test client."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    DurableStream,
    FlowContext,
    InMemoryStreamManager,
    StorageUnavailable,
    durable_stream_blueprint,
)
from flask_durable_stream.runner import runner_for

SSE = {"Accept": "text/event-stream"}
LIMIT = 64 * 1024


def story(data: Any, ctx: FlowContext) -> Any:
    for i in range(3):
        ctx.send_chunk(i)
    return "end"


class OutageManager(InMemoryStreamManager):
    """In-memory storage that can be made unreachable."""

    down = False

    def open(self, stream_id: str, *, owner: str | None = None, flow: str | None = None) -> Any:
        if self.down:
            raise StorageUnavailable("The test backend is unreachable (connection refused).")
        return super().open(stream_id, owner=owner, flow=flow)

    def info(self, stream_id: str) -> Any:
        if self.down:
            raise StorageUnavailable("The test backend is unreachable (connection refused).")
        return super().info(stream_id)


@pytest.fixture
def manager() -> Iterator[OutageManager]:
    manager = OutageManager()
    yield manager
    runner_for(manager).shutdown(5)
    manager.close()


@pytest.fixture
def client(manager: OutageManager) -> FlaskClient:
    app = Flask(__name__)
    bp = durable_stream_blueprint(
        {"story": story}, stream_manager=manager, max_content_length=LIMIT
    )
    app.register_blueprint(bp, url_prefix="/api")
    return app.test_client()


def post_chunked(client: FlaskClient, body: bytes) -> Any:
    """A body without Content-Length, as a server hands a ``Transfer-Encoding: chunked`` one."""
    return client.post(
        "/api/story",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked", **SSE},
        environ_base={"wsgi.input_terminated": True},
    )


def test_json_nested_too_deep_for_the_parser_is_400(client: FlaskClient) -> None:
    depth = 30_000  # under the 64 KiB limit, far over the parser's nesting limit
    body = b'{"data":' + b"[" * depth + b"]" * depth + b"}"
    response = client.post("/api/story", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json == {
        "status": "INVALID_ARGUMENT",
        "message": "Request body must be valid JSON.",
    }


def test_an_oversized_chunked_body_is_413(client: FlaskClient) -> None:
    response = post_chunked(client, b'{"data":"' + b"x" * (3 * 1024 * 1024) + b'"}')
    assert response.status_code == 413
    assert response.json == {
        "status": "RESOURCE_EXHAUSTED",
        "message": f"Request body exceeds {LIMIT} bytes.",
    }


def test_a_chunked_body_at_the_limit_is_read_whole(client: FlaskClient) -> None:
    body = b'{"data":"' + b"x" * (LIMIT - 11) + b'"}'
    assert len(body) == LIMIT
    response = post_chunked(client, body)
    assert response.status_code == 200
    assert response.data.endswith(b'data: {"result":"end"}\n\n')


@pytest.mark.parametrize("raw", ["+1", " 1", "1 ", "01", "1e3", "-1", "0x1", "1.0", "١"])
def test_event_ids_must_be_canonical(client: FlaskClient, raw: str) -> None:
    sid = client.post("/api/story", json={"data": 1}, headers=SSE).headers["x-genkit-stream-id"]
    for query, headers in ((f"&after={raw}", {}), ("", {"Last-Event-ID": raw})):
        response = client.get(f"/api/story/events?streamId={sid}{query}", headers=headers)
        assert response.status_code == 400, (raw, query)
        assert response.json is not None and response.json["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("raw", "first"), [("0", 1), ("2", 3)])
def test_canonical_event_ids_resume_after_them(client: FlaskClient, raw: str, first: int) -> None:
    sid = client.post("/api/story", json={"data": 1}, headers=SSE).headers["x-genkit-stream-id"]
    text = client.get(f"/api/story/events?streamId={sid}&after={raw}").data.decode()
    assert text.split("id: ")[1].startswith(str(first))


def test_storage_down_is_503_and_recovers_by_itself(
    client: FlaskClient, manager: OutageManager
) -> None:
    manager.down = True
    plain = client.post("/api/story", json={"data": 1})  # needs no storage: unaffected
    assert plain.status_code == 200 and plain.json == {"result": "end"}
    for response in (
        client.post("/api/story", json={"data": 1}, headers=SSE),
        client.post("/api/story", json={}, headers={"x-genkit-stream-id": "abc", **SSE}),
        client.get("/api/story/events?streamId=abc"),
    ):
        assert response.status_code == 503
        assert response.json == {
            "status": "UNAVAILABLE",
            "message": "The test backend is unreachable (connection refused).",
        }
        assert response.headers["Retry-After"] == "1"
    manager.down = False
    response = client.post("/api/story", json={"data": 1}, headers=SSE)
    assert response.status_code == 200 and response.data.endswith(b'{"result":"end"}\n\n')


def test_misconfiguration_fails_at_init_app_naming_the_setting(monkeypatch: Any) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    monkeypatch.delenv("GCLOUD_PROJECT", raising=False)
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    for config, setting in (
        ({"DURABLE_STREAM_BACKEND": "carrier-pigeon"}, "DURABLE_STREAM_BACKEND"),
        (  # no project and, here, no credentials: either is named
            {"DURABLE_STREAM_BACKEND": "firestore"},
            "DURABLE_STREAM_FIRESTORE_PROJECT|GOOGLE_APPLICATION_CREDENTIALS",
        ),
        ({"DURABLE_STREAM_BACKEND": "redis"}, "DURABLE_STREAM_REDIS_URL"),
    ):
        app = Flask(__name__)
        app.config.update(config)
        with pytest.raises(ValueError, match=setting):
            DurableStream(app, flows={"story": story})


def test_the_live_buffer_is_configurable() -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_LIVE_BUFFER_BYTES"] = 4096
    DurableStream(app, flows={"story": story})
    state = app.extensions["durable_stream"]
    try:
        assert state.runner.live_buffer_bytes == 4096
    finally:
        state.runner.shutdown(1)
        state.manager.close()
