"""The background sweep the in-process managers share (``managers.common.Sweep``).

RTDB's, which runs on the same class, is tested against its protocol server in
tests/test_rtdb.py; that it deletes a killed producer's stream through ``gunicorn -k
gevent`` is the chaos suite's (tests/chaos/test_kill.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flask_durable_stream import InMemoryStreamManager, SQLiteStreamManager
from flask_durable_stream._concurrency import running_tasks
from flask_durable_stream.managers.base import StreamManager

Make = Callable[..., StreamManager]


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    made: list[StreamManager] = []

    def build(**options: float) -> StreamManager:
        if request.param == "memory":
            manager: StreamManager = InMemoryStreamManager(**options)
        else:
            manager = SQLiteStreamManager(tmp_path / f"{len(made)}.db", **options)
        made.append(manager)
        return manager

    yield build
    for manager in made:
        manager.close()


def sweeps() -> list[str]:
    return [task.name for task in running_tasks() if task.name.endswith("sweep")]


def test_the_first_open_starts_one_sweep_and_zero_starts_none(make: Make) -> None:
    manager = make(ttl_seconds=30)
    assert sweeps() == []  # nothing before the first open
    manager.open("a").done(None)
    manager.open("b").done(None)
    assert len(sweeps()) == 1
    manager.close()
    assert sweeps() == []
    off = make(ttl_seconds=30, sweep_interval=0)
    off.open("a").done(None)
    assert sweeps() == []  # 0 is never, not a sweep without pause


@pytest.mark.parametrize("interval", [-1.0, float("nan")])
def test_a_sweep_interval_below_zero_is_refused(make: Make, interval: float) -> None:
    with pytest.raises(ValueError, match="sweep_interval must be 0"):
        make(sweep_interval=interval)


def test_a_forked_process_starts_its_own_sweep_at_its_first_open(make: Make) -> None:
    """A worker forked after the sweep started (``gunicorn --preload``) sweeps too: the
    parent's sweep task does not exist in the child."""
    manager = make(ttl_seconds=30)
    manager.open("parent").done(None)
    assert len(sweeps()) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            before = sweeps()
            manager.open("child").done(None)
            report = {"before": before, "after": sweeps()}
        except BaseException as exc:  # the parent's assertion says what went wrong
            report = {"error": repr(exc)}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "error" not in report, report
    assert report["before"] == []  # the parent's thread did not survive the fork
    assert len(report["after"]) == 1
    assert len(sweeps()) == 1  # the parent's own goes on
