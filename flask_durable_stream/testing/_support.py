"""Helpers the contract cases share: a manual clock, a producer, a reader thread."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

from ..managers.base import Event, StreamManager, StreamWriter

#: ``make(**options)``: a fresh manager; every call within one test shares storage.
MakeManager = Callable[..., StreamManager]


class ManualClock:
    """A storage clock that moves only when told: TTL and lease cases without sleeps.

    Starts at the real time, so values stored before it was installed still
    compare sensibly.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now


def new_id() -> str:
    return uuid.uuid4().hex


def collect(events: Iterator[Event]) -> list[tuple[int, str, str]]:
    return [(e.seq, e.kind, e.payload) for e in events]


def produce(writer: StreamWriter, chunks: list[object], output: object, delay: float = 0.0) -> None:
    """Write ``chunks`` then ``output``; ``delay`` spaces them so readers catch up live."""
    for chunk in chunks:
        if delay:
            time.sleep(delay)
        writer.write(chunk)
    writer.done(output)


def in_thread(fn: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def runner_like_batches(events: list[Event]) -> Iterator[list[Event]]:
    """Batches of the sizes a runner hands over when a fast flow outpaces storage."""
    sizes = [1, 3, 64, 1000, 7, 5000, 256, 20_000]
    start = 0
    for i in range(len(events)):
        if start >= len(events):
            return
        end = min(len(events), start + sizes[i % len(sizes)])
        yield events[start:end]
        start = end
