"""Backend plugin for the conformance suite: Redis, on a real ``redis-server``.

One server for the session (``redis_server`` fixture, also used by other test
modules); each manager gets its own key prefix. Without ``redis-server`` the Redis
tests fail loudly, unless ``DURABLE_STREAM_SKIP_REDIS=1`` opts out.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flask_durable_stream import StreamManager
from tests.support.loud import missing_server_hooks
from tests.support.redis_server import SKIP_ENV, RedisServer, RedisUnavailable, find_redis_server


def _missing() -> str | None:
    try:
        find_redis_server()
    except RedisUnavailable as exc:
        return str(exc)
    return None


pytest_report_header, pytest_terminal_summary = missing_server_hooks(
    "Redis", "Redis", _missing, SKIP_ENV
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as exc:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"Redis unavailable ({SKIP_ENV}=1): {exc}")
        raise
    yield server
    server.stop()


@pytest.fixture
def backend_redis(redis_server: RedisServer) -> Iterator[Callable[..., StreamManager]]:
    from flask_durable_stream.managers.redis import RedisStreamManager

    made: list[StreamManager] = []
    prefix = f"test-{uuid.uuid4().hex[:12]}"  # every manager of one test shares its streams

    def make(**options: Any) -> StreamManager:
        manager = RedisStreamManager(url=redis_server.url, prefix=prefix, **options)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()
