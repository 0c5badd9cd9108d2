"""Readiness: ``ext.ready()`` and ``GET <prefix>/_ready``, with storage up, down and stopping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_durable_stream import DurableStream
from flask_durable_stream.managers.base import StreamStatus
from tests.support.redis_server import SKIP_ENV, RedisServer, RedisUnavailable
from tests.support.servers import free_port

APPS: list[Flask] = []


def make_app(**config: object) -> tuple[Flask, DurableStream]:
    app = Flask(__name__)
    app.config.update(config)
    ext = DurableStream(app, flows={"echo": lambda data: data})
    APPS.append(app)
    return app, ext


@pytest.fixture(autouse=True)
def close_apps() -> Iterator[None]:
    yield
    while APPS:
        state = APPS.pop().extensions["durable_stream"]
        state.runner.shutdown(5)
        state.manager.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path)
    except RedisUnavailable as exc:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"Redis unavailable ({SKIP_ENV}=1): {exc}")
        raise
    yield server
    server.stop()


def test_memory_backend_is_ready() -> None:
    app, ext = make_app(DURABLE_STREAM_READY_ENDPOINT=True)
    with app.app_context():
        assert ext.ready()
    r = app.test_client().get("/flows/_ready")
    assert r.status_code == 200 and r.get_json() == {"status": "ready", "backend": "in-memory"}
    # The probe really went through storage: a finished probe stream is there.
    probes = app.extensions["durable_stream"].manager.list_streams()
    assert any(i.stream_id.startswith("_ready.") and i.status is StreamStatus.DONE for i in probes)


def test_the_endpoint_is_off_unless_configured() -> None:
    app, _ = make_app()
    assert app.test_client().get("/flows/_ready").status_code in (404, 405)


def test_redis_up_then_down(redis: RedisServer) -> None:
    app, ext = make_app(
        DURABLE_STREAM_READY_ENDPOINT=True,
        DURABLE_STREAM_BACKEND="redis",
        DURABLE_STREAM_REDIS_URL=redis.url,
    )
    client = app.test_client()
    assert ext.ready(app)
    assert client.get("/flows/_ready").status_code == 200

    redis.stop()
    readiness = ext.ready(app)
    assert not readiness and readiness.error == "UNAVAILABLE"
    r = client.get("/flows/_ready")
    assert r.status_code == 503
    assert r.get_json() == {
        "status": "unavailable",
        "backend": "Redis",
        "error": "UNAVAILABLE",
    }
    assert str(redis.port) not in r.get_data(as_text=True)  # no host or port for the prober


def test_redis_that_never_came_up_is_not_ready() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app, ext = make_app(
        DURABLE_STREAM_READY_ENDPOINT=True,
        DURABLE_STREAM_BACKEND="redis",
        DURABLE_STREAM_REDIS_URL=url,
    )
    assert app.test_client().get("/flows/_ready").status_code == 503
    assert not ext.ready(app)


def test_a_worker_that_is_shutting_down_is_not_ready() -> None:
    app, ext = make_app(DURABLE_STREAM_READY_ENDPOINT=True)
    app.extensions["durable_stream"].runner.shutdown(1)
    r = app.test_client().get("/flows/_ready")
    assert r.status_code == 503 and r.get_json()["error"] == "SHUTTING_DOWN"
