"""``POST <flow>/cancel``: stopping a flow from any client, in any process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    FlowContext,
    FlowError,
    InMemoryStreamManager,
    RequestData,
    SQLiteStreamManager,
    StreamManager,
    StreamStatus,
    durable_stream_blueprint,
    protocol,
)
from flask_durable_stream.runner import runner_for
from tests.support.waiting import PATIENCE

SSE = {"Accept": "text/event-stream"}
CANCELLED = {"status": "CANCELLED", "message": "Cancelled by client."}


class Probe:
    """What the flows did, for the test to check."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cleaned_up = threading.Event()


def make_flows(probe: Probe) -> dict[str, Any]:
    def ticker(data: Any, ctx: FlowContext) -> Any:
        # Never looks at ctx.cancelled, like most LLM loops: send_chunk stops it.
        try:
            for i in range(100_000):
                ctx.send_chunk(i)
                probe.started.set()
                time.sleep(0.005)
            return "never"
        finally:
            probe.cleaned_up.set()

    def generator(data: Any) -> Iterator[int]:
        try:
            for i in range(100_000):
                yield i
                probe.started.set()
                time.sleep(0.005)
        finally:
            probe.cleaned_up.set()  # the generator is closed, not left suspended

    def quick(data: Any) -> str:
        return "done"

    return {"ticker": ticker, "generator": generator, "quick": quick}


def deny_bearer_nope(req: RequestData) -> dict[str, Any]:
    if req.headers.get("authorization") == "Bearer nope":
        raise FlowError("PERMISSION_DENIED", "not allowed")
    return {}


def make_app(manager: StreamManager, probe: Probe) -> Flask:
    app = Flask(__name__)
    app.register_blueprint(
        durable_stream_blueprint(
            make_flows(probe), stream_manager=manager, context_provider=deny_bearer_nope
        ),
        url_prefix="/api",
    )
    return app


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def manager(memory_manager: InMemoryStreamManager) -> InMemoryStreamManager:
    return memory_manager


@pytest.fixture
def app(manager: InMemoryStreamManager, probe: Probe) -> Flask:
    return make_app(manager, probe)


def frames(data: bytes) -> list[tuple[str, Any]]:
    events, rest = protocol.parse_frames(data.decode())
    assert rest == ""
    return events


def cancel(client: FlaskClient, stream_id: str, **headers: str) -> Any:
    return client.post("/api/ticker/cancel", headers={"x-genkit-stream-id": stream_id, **headers})


@pytest.mark.parametrize("flow", ["ticker", "generator"])
def test_cancel_stops_a_flow_that_never_checks(
    client: FlaskClient, manager: InMemoryStreamManager, probe: Probe, flow: str
) -> None:
    live = client.post(f"/api/{flow}", json={"data": {}}, headers=SSE)
    sid = live.headers["x-genkit-stream-id"]
    assert probe.started.wait(PATIENCE)
    assert not probe.cleaned_up.is_set()

    response = cancel(client, sid)
    assert response.status_code == 202
    assert response.get_json() == {"streamId": sid, "status": "cancelling"}

    events = frames(live.data)  # the live stream ends by itself, with the cancel
    assert events[-1] == ("error", CANCELLED)
    assert events[:-1] and {kind for kind, _ in events[:-1]} == {"chunk"}
    assert probe.cleaned_up.wait(PATIENCE)
    info = manager.info(sid)
    assert info is not None and info.status is StreamStatus.CANCELLED
    replay = client.post(f"/api/{flow}", json={}, headers={**SSE, "x-genkit-stream-id": sid})
    assert replay.data == live.data


def test_cancelling_an_ended_stream_is_409_with_its_status(client: FlaskClient) -> None:
    done = client.post("/api/quick", json={"data": {}}, headers=SSE)
    assert frames(done.data)[-1] == ("done", "done")
    response = cancel(client, done.headers["x-genkit-stream-id"])
    assert response.status_code == 409
    assert response.get_json() == {
        "status": "FAILED_PRECONDITION",
        "message": "Stream already ended.",
        "streamStatus": "done",
    }


def test_cancelling_twice_is_202_then_409(client: FlaskClient, probe: Probe) -> None:
    live = client.post("/api/ticker", json={"data": {}}, headers=SSE)
    sid = live.headers["x-genkit-stream-id"]
    assert probe.started.wait(PATIENCE)
    assert cancel(client, sid).status_code == 202
    assert frames(live.data)[-1] == ("error", CANCELLED)
    again = cancel(client, sid)
    assert again.status_code == 409
    assert again.get_json()["streamStatus"] == "cancelled"


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, None, 400, "INVALID_ARGUMENT"),  # no stream id
        ({"x-genkit-stream-id": "../etc"}, None, 400, "INVALID_ARGUMENT"),
        ({"x-genkit-stream-id": "a" * 129}, None, 400, "INVALID_ARGUMENT"),
        ({"x-genkit-stream-id": "unknown-id"}, None, 404, "NOT_FOUND"),
        ({"x-genkit-stream-id": "unknown-id"}, b"{not json", 400, "INVALID_ARGUMENT"),
        (
            {"x-genkit-stream-id": "unknown-id", "Authorization": "Bearer nope"},
            None,
            403,
            "PERMISSION_DENIED",
        ),
    ],
)
def test_bad_cancel_requests_get_json_errors(
    client: FlaskClient, headers: dict[str, str], body: bytes | None, status: int, code: str
) -> None:
    response = client.post(
        "/api/ticker/cancel", headers=headers, data=body, content_type="application/json"
    )
    assert response.status_code == status
    assert response.get_json()["status"] == code


def test_the_context_provider_can_refuse_a_cancel(
    client: FlaskClient, manager: InMemoryStreamManager, probe: Probe
) -> None:
    live = client.post("/api/ticker", json={"data": {}}, headers=SSE)
    sid = live.headers["x-genkit-stream-id"]
    assert probe.started.wait(PATIENCE)
    refused = cancel(client, sid, Authorization="Bearer nope")
    assert refused.status_code == 403
    info = manager.info(sid)  # refused before anything was asked of the flow or storage
    assert info is not None and not info.cancel_requested
    run = runner_for(manager).get(sid)
    assert run is not None and not run.ctx.cancelled and not run.ended
    assert not probe.cleaned_up.is_set()  # still running
    assert cancel(client, sid).status_code == 202
    assert frames(live.data)[-1] == ("error", CANCELLED)


def test_cancel_reaches_a_flow_running_in_another_process(tmp_path: Path) -> None:
    # Two managers on one SQLite file, each with its own runner and app, stand for
    # two gunicorn workers: the cancel lands on the worker that does not run the flow.
    path = tmp_path / "streams.db"
    probe = Probe()
    producer = SQLiteStreamManager(path, heartbeat_interval=0.05)
    other = SQLiteStreamManager(path)
    try:
        runs_it = make_app(producer, probe).test_client()
        cancels_it = make_app(other, Probe()).test_client()
        live = runs_it.post("/api/ticker", json={"data": {}}, headers=SSE)
        sid = live.headers["x-genkit-stream-id"]
        assert probe.started.wait(PATIENCE)

        response = cancels_it.post("/api/ticker/cancel", headers={"x-genkit-stream-id": sid})
        assert response.status_code == 202
        assert runner_for(other).get(sid) is None  # not this worker's flow

        assert frames(live.data)[-1] == ("error", CANCELLED)  # at the producer's next heartbeat
        assert probe.cleaned_up.wait(PATIENCE)
        replay = cancels_it.post("/api/ticker", json={}, headers={**SSE, "x-genkit-stream-id": sid})
        assert replay.data == live.data
    finally:
        for manager in (producer, other):
            runner_for(manager).shutdown(5)
            manager.close()
