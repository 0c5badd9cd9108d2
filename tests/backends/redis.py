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
from tests.support.redis_server import SKIP_ENV, RedisServer, RedisUnavailable, find_redis_server


def _warning() -> str | None:
    try:
        find_redis_server()
    except RedisUnavailable as exc:
        action = (
            "SKIPPED" if os.environ.get(SKIP_ENV) == "1" else f"FAIL (set {SKIP_ENV}=1 to skip)"
        )
        return f"!!! Redis unavailable: {exc}. Redis tests will {action} !!!"
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    return _warning() if config.get_verbosity() >= 0 else None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    warning = _warning() if config.get_verbosity() < 0 else None  # -q hides the header
    if warning:
        terminalreporter.write_line(warning, red=True, bold=True)


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
