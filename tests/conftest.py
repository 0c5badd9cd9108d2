"""Shared fixtures.

Every StreamManager backend is a plugin module in ``tests/backends/`` that
defines a fixture ``backend_<name>`` returning a factory ``make(**options)``
(options: ``ttl_seconds``, ``timeout``, ``lease_seconds``,
``heartbeat_interval``). The ``make_manager`` fixture is parametrized over all
of them, so every test that uses it runs against every backend. Backends that
need a server start it themselves, on a free port on 127.0.0.1.
"""

from __future__ import annotations

import faulthandler
import os
import pkgutil
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("flask_durable_stream.testing")  # before the kit is imported

from flask_durable_stream import InMemoryStreamManager, StreamManager  # noqa: E402
from flask_durable_stream._concurrency import Task, running_tasks  # noqa: E402
from flask_durable_stream.runner import runner_for  # noqa: E402

BACKENDS = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent / "backends")]))
pytest_plugins = [f"tests.backends.{name}" for name in BACKENDS] + ["tests.support.browser"]


#: The library's tasks already running when a test started: not that test's to answer for.
_BEFORE = pytest.StashKey["weakref.WeakSet[Any]"]()
#: How long, in all, a test's teardown waits for its tasks to end before calling them leaked.
#: Generous: on a loaded machine a task that was told to stop may take a while to get there.
LEAK_WAIT = 30.0


#: A test still running after this many seconds is stuck: it fails, with every thread's stack
#: on stderr, and the run goes on. Far above the slowest test (about a minute), so a slow
#: machine never trips it; it exists so that one hang cannot stall a whole run unexplained.
HANG_LIMIT = float(os.environ.get("DURABLE_STREAM_TEST_HANG_LIMIT", "600"))


class TestHung(Exception):
    """Raised in the main thread of a test that ran past HANG_LIMIT."""


def _hung(signum: int, frame: Any) -> None:
    sys.stderr.write(f"\n!!! test still running after {HANG_LIMIT:.0f} s; every thread's stack:\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    raise TestHung(f"still running after {HANG_LIMIT:.0f} s (stacks above, on stderr)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[Any]:
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, HANG_LIMIT)
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _impl(task: Task) -> Any:
    return task._impl  # the greenlet or thread itself: Task handles are made afresh per call


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    item.stash[_BEFORE] = weakref.WeakSet(_impl(t) for t in running_tasks())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Every greenlet/thread the library spawned during a test is gone once its fixtures are.

    A leak is reported by the test that made it, and only by that one: tasks
    that were running before the test started belong to an earlier test (which
    already failed for them), so one failure shows as one failure, not as a
    failed teardown of every test after it. A leaked greenlet is killed once
    reported; a thread cannot be, and is only left out of later tests' checks.
    """
    result = yield
    before = item.stash.get(_BEFORE, weakref.WeakSet())
    deadline = time.monotonic() + LEAK_WAIT
    leftover = []
    for task in running_tasks():
        if _impl(task) in before:
            continue
        if not task.join(max(0.0, deadline - time.monotonic())):
            leftover.append(task)
    for task in leftover:
        task.kill(timeout=1)
    assert not leftover, f"{item.nodeid} leaked library tasks: {[t.name for t in leftover]}"
    return result


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
