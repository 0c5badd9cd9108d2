"""Every shared backend behind a real `gunicorn -k gevent -w 2`: a client drops mid-stream and
reconnects, possibly to the other worker. The process runs monkey-patched, so this also proves
the Firestore client (grpc), the RTDB reader and redis-py cooperate with gevent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import servers
from tests.support.client import post_stream

N = 25


@pytest.fixture(scope="module", params=["sqlite", "firestore", "rtdb", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    backend = request.param
    env: dict[str, str] = {"FLASK_DURABLE_STREAM_BACKEND": backend}
    if backend == "sqlite":
        env.update(servers.sqlite_env(tmp_path_factory))
    elif backend == "firestore":
        emulator: Any = request.getfixturevalue("firestore_emulator")
        env.update(
            FIRESTORE_EMULATOR_HOST=emulator.host,
            FLASK_DURABLE_STREAM_FIRESTORE_PROJECT=emulator.project,
            FLASK_DURABLE_STREAM_FIRESTORE_COLLECTION=f"server-{uuid.uuid4().hex[:8]}",
        )
    elif backend == "redis":
        redis: Any = request.getfixturevalue("redis_server")
        env.update(
            FLASK_DURABLE_STREAM_REDIS_URL=redis.url,
            FLASK_DURABLE_STREAM_REDIS_PREFIX=f"server-{uuid.uuid4().hex[:8]}",
        )
    else:
        rtdb: Any = request.getfixturevalue("rtdb_server")
        env.update(
            FIREBASE_DATABASE_EMULATOR_HOST=f"{rtdb.host}:{rtdb.port}",
            FLASK_DURABLE_STREAM_RTDB_URL=rtdb.database_url,
            FLASK_DURABLE_STREAM_RTDB_PREFIX=f"server-{uuid.uuid4().hex[:8]}",
        )
    server = servers.gunicorn("example_app:create_app()", workers=2, env=env)
    yield server
    output = server.stop()
    expected = output.count("RuntimeError: the flow hit an internal problem")
    assert output.count("Traceback") == expected, output


@pytest.mark.parametrize("k", [1, 12])
def test_reconnect_mid_stream_gets_every_chunk_once(server: servers.Server, k: int) -> None:
    first = post_stream(
        server.url, "/flows/story", {"data": {"chunks": N, "delay": 0.02}}, stop_after=k
    )
    assert first.status == 200 and first.stream_id
    again = post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id)
    assert again.status == 200
    assert [c["index"] for c in again.chunks] == list(range(N))
    assert again.terminal is not None and again.terminal[0] == "done"
    replay = post_stream(server.url, "/flows/story", {}, stream_id=first.stream_id)
    assert replay.raw == again.raw


def test_error_replayed_identically(server: servers.Server) -> None:
    live = post_stream(server.url, "/flows/throwy", {"data": {"count": 2}})
    assert live.events[-1] == ("error", {"status": "INTERNAL", "message": "Internal Error"})
    replay = post_stream(server.url, "/flows/throwy", {}, stream_id=live.stream_id)
    assert replay.raw == live.raw


def test_unknown_stream_is_204(server: servers.Server) -> None:
    assert post_stream(server.url, "/flows/story", {}, stream_id=uuid.uuid4().hex).status == 204
