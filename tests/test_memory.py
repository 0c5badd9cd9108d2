"""In-memory specifics beyond the conformance suite."""

from __future__ import annotations

import threading

import pytest

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


def test_payloads_of_any_text_come_back_as_stored_from_any_offset() -> None:
    from flask_durable_stream.exceptions import StreamClosed
    from flask_durable_stream.managers.base import Event

    with InMemoryStreamManager() as manager:
        writer = manager.open("s1")
        for chunk in ["plain", "héllo wörld", "日本語", {"emoji": "🙂"}, "", "ascii again"]:
            writer.write(chunk)
        writer.done({"ok": True})
        stored = list(manager.subscribe("s1"))
        assert [e.value for e in stored] == [
            *["plain", "héllo wörld", "日本語", {"emoji": "🙂"}, "", "ascii again"],
            {"ok": True},
        ]
        assert [e.kind for e in stored] == ["chunk"] * 6 + ["done"]
        for after in range(-1, 7):  # a reader resuming at any seq gets the same events
            assert list(manager.subscribe("s1", after)) == stored[after + 1 :]
        retry = manager._streams["s1"]
        with retry.lock:  # a retry is recognised event by event, kind included
            assert all(retry.has(e) for e in stored)
            assert not retry.has(Event(1, "chunk", '"hello world"'))
            assert not retry.has(Event(6, "chunk", stored[6].payload))
        late = manager.open("s2")
        late.write("日本")
        again = Event(0, "chunk", '"日本"')
        manager._append(manager._streams["s2"], [again])  # a retry of what is stored: a no-op
        with pytest.raises(StreamClosed):  # a different event at a stored seq
            manager._append(manager._streams["s2"], [Event(0, "chunk", '"other"')])
        late.done(None)
        assert [e.value for e in manager.subscribe("s2")] == ["日本", None]
