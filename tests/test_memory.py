"""In-memory specifics beyond the conformance suite."""

from __future__ import annotations

import threading

from flask_durable_stream import InMemoryStreamManager
from flask_durable_stream.testing import ManualClock


def test_sweep_runs_without_new_streams_being_opened() -> None:
    clock = ManualClock()
    with InMemoryStreamManager(ttl_seconds=30, sweep_interval=0.05) as manager:
        manager.clock = clock
        writer = manager.open("s1")
        writer.done("x")
        assert len(manager) == 1
        clock.advance(31)  # expired now; nothing else happens to the manager
        pause = threading.Event()  # never set: a bounded poll of the condition below
        for _ in range(600):  # the sweep wakes every 0.05 s of real time
            if not len(manager) or pause.wait(0.05):
                break
        assert len(manager) == 0  # removed by the sweep, not by gc() or open()


def test_gc_counts_what_it_removed() -> None:
    clock = ManualClock()
    with InMemoryStreamManager(ttl_seconds=30, sweep_interval=3600) as manager:
        manager.clock = clock
        for i in range(3):
            manager.open(f"s{i}").done(None)
        writer = manager.open("open")
        clock.advance(31)
        writer.heartbeat()  # its producer is alive: it stays
        assert manager.gc() == 3
        assert len(manager) == 1
