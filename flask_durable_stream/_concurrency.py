"""Greenlets under gevent, threads otherwise: one small seam for the whole package.

Production runs under gevent's monkey patching (gunicorn ``-k gevent``), where
the library's background work runs in greenlets. Under ``flask run`` (no
patching) the same work runs in daemon threads, so flows still outlive their
requests and a blocking flow does not stall the others. Primitives are taken
from :mod:`threading` at call time: once gevent has patched it they are
cooperative, before that they are real.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any


def gevent_patched() -> bool:
    """True when gevent has monkey-patched :mod:`threading` in this process."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a hard dependency
        return False
    return bool(monkey.is_module_patched("threading"))


class Task:
    """A handle on one greenlet or thread started by :class:`TaskGroup`."""

    __slots__ = ("_impl", "name")

    def __init__(self, impl: Any, name: str) -> None:
        self._impl = impl
        self.name = name

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the task; return True when it has finished."""
        try:
            self._impl.join(timeout)
        except RuntimeError:  # a thread whose spawn() has not called start() yet
            time.sleep(0.001)
        return not self.alive

    @property
    def alive(self) -> bool:
        impl = self._impl
        if hasattr(impl, "dead"):
            return not impl.dead
        return bool(impl.is_alive())


_GROUPS: weakref.WeakSet[TaskGroup] = weakref.WeakSet()


def running_tasks() -> list[Task]:
    """Every task still running in any group: the leak check of the test suite."""
    return [task for group in list(_GROUPS) for task in group.tasks() if task.alive]


class TaskGroup:
    """Tracks every greenlet/thread the library spawns so none can leak unseen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: set[Task] = set()
        _GROUPS.add(self)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "durable-stream") -> Task:
        task: Task

        def run() -> None:
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._tasks.discard(task)

        if gevent_patched():
            import gevent

            impl: Any = gevent.Greenlet(run)
            task = Task(impl, name)
            with self._lock:
                self._tasks.add(task)
            impl.start()
        else:
            impl = threading.Thread(target=run, name=name, daemon=True)
            task = Task(impl, name)
            with self._lock:
                self._tasks.add(task)
            impl.start()
        return task

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every task (including ones spawned meanwhile) has finished.

        Returns True if all did within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tasks = self.tasks()
            if not tasks:
                return True
            for task in tasks:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                task.join(remaining)
            if deadline is not None and time.monotonic() >= deadline:
                return len(self) == 0


def sleep(seconds: float) -> None:
    time.sleep(seconds)  # cooperative once gevent has patched time
