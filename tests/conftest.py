"""Shared fixtures.

Every StreamManager backend is a plugin module in ``tests/backends/`` that
defines a fixture ``backend_<name>`` returning a factory ``make(**options)``
(options: ``ttl_seconds``, ``timeout``, ``lease_seconds``,
``heartbeat_interval``). The ``make_manager`` fixture is parametrized over all
of them, so every test that uses it runs against every backend. Backends that
need a server start it themselves, on a free port on 127.0.0.1.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("flask_durable_stream.testing")  # before the kit is imported

from flask_durable_stream import InMemoryStreamManager, StreamManager  # noqa: E402
from flask_durable_stream._concurrency import running_tasks  # noqa: E402
from flask_durable_stream.runner import runner_for  # noqa: E402

BACKENDS = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "backends")]))
pytest_plugins = [f"tests.backends.{name}" for name in BACKENDS]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Every greenlet/thread the library spawned during a test is gone once its fixtures are."""
    yield
    leftover = [t for t in running_tasks() if t.alive and not t.join(5)]
    assert not leftover, f"{item.nodeid} leaked library tasks: {[t.name for t in leftover]}"


@pytest.fixture(params=BACKENDS)
def make_manager(request: pytest.FixtureRequest) -> Callable[..., StreamManager]:
    factory: Callable[..., StreamManager] = request.getfixturevalue(f"backend_{request.param}")
    return factory


@pytest.fixture
def manager(make_manager: Callable[..., StreamManager]) -> StreamManager:
    return make_manager()


@pytest.fixture
def memory_manager() -> Iterator[InMemoryStreamManager]:
    """An in-memory manager whose runner is shut down after the test."""
    manager = InMemoryStreamManager()
    yield manager
    runner_for(manager).shutdown(5)
    manager.close()
