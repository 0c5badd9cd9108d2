"""In-memory specifics beyond the conformance suite."""

from __future__ import annotations

import time

from flask_durable_stream import InMemoryStreamManager


def test_sweep_runs_without_new_streams_being_opened() -> None:
    with InMemoryStreamManager(ttl_seconds=0.1, sweep_interval=0.05) as manager:
        writer = manager.open("s1")
        writer.done("x")
        assert len(manager) == 1
        deadline = time.monotonic() + 3
        while len(manager) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(manager) == 0  # removed by the sweep, not by gc() or open()


def test_gc_counts_what_it_removed() -> None:
    with InMemoryStreamManager(ttl_seconds=0.1, sweep_interval=60) as manager:
        for i in range(3):
            manager.open(f"s{i}").done(None)
        manager.open("open")
        time.sleep(0.2)
        assert manager.gc() == 3
        assert len(manager) == 1
