"""One blocking ``XREAD`` per process for all the followers of a Redis manager.

A follower that waits in a blocking ``XREAD`` of its own holds a pooled
connection for as long as it waits: 300 streams with followers needed 300
connections, and redis-py's pool (100 by default) answered "Too many
connections", even to requests that only wanted to create a stream. Here one
reader task per process and manager blocks on every watched stream at once and
hands the entries it reads to the followers waiting on them (the fan-out), so
waiting costs one connection per process however many followers wait.

A follower registers as a *waiter* at its cursor (the last seq it has) once its
own read found nothing new. The reader reads each watched stream from the
lowest cursor of its waiters; a waiter registering on a stream the running
``XREAD`` does not cover (or covers from past its cursor) interrupts it by
adding an entry to the reader's own small *poke* stream, which that ``XREAD``
also watches: no wake-up can be lost between a read and a wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .._concurrency import Task, TaskGroup
from .._retry import Backoff
from ..exceptions import StorageUnavailable
from .base import Event

log = logging.getLogger(__name__)

#: Entries one read returns per stream (a follower reads on by itself past that).
PAGE = 1000
#: Seconds a stream stays in the XREAD after its last waiter left: a follower that
#: was just handed entries comes back at once, at the seq the reader is already at.
_LINGER = 2.0
#: Longest block of one XREAD, in ms: how soon the reader notices it may stop.
_BLOCK_MS = 1000
_POKE_TTL_MS = 60_000


class Waiter:
    """One follower waiting for entries after ``cursor`` of one stream."""

    __slots__ = ("key", "cursor", "ready", "events")

    def __init__(self, key: str, cursor: int) -> None:
        self.key = key
        self.cursor = cursor
        self.ready = threading.Event()
        self.events: list[Event] = []


class SharedReader:
    """The fan-out reader of one manager in one process (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        poke_key: str,
        call: Callable[..., Any],
        to_event: Callable[[Any, Any], Event],
    ) -> None:
        self.pid = os.getpid()
        self._client = client
        self._poke_key = poke_key
        self._call = call
        self._to_event = to_event
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        self._from: dict[str, int] = {}  # stream key -> seq the next XREAD reads after
        self._linger: dict[str, float] = {}  # stream key -> monotonic time it leaves the XREAD
        self._reading: dict[str, int] = {}  # what the XREAD in flight covers
        self._poke_id = "0-0"
        self._tasks = TaskGroup()
        self._task: Task | None = None
        self._closed = False

    # -- followers -----------------------------------------------------------------
    def wait(self, key: str, cursor: int, timeout: float) -> list[Event]:
        """Entries of ``key`` after ``cursor`` (contiguous), or [] after ``timeout`` seconds.

        [] may also mean "look yourself" (the reader fell behind this waiter):
        the caller reads the stream in either case, so nothing is ever missed.
        """
        waiter = Waiter(key, cursor)
        poke = False
        with self._lock:
            if self._closed:
                raise StorageUnavailable("the Redis stream manager is closed")
            waiters = self._waiters.setdefault(key, set())
            start = min(cursor, self._from[key]) if waiters and key in self._from else cursor
            waiters.add(waiter)
            self._from[key] = start
            self._linger.pop(key, None)
            reading = self._reading.get(key)
            poke = reading is None or reading > cursor
            if self._task is None:
                self._task = self._tasks.spawn(self._run, name="durable-stream-redis-reader")
                poke = False  # it has not read yet: its first XREAD covers this waiter
        try:
            if poke:
                self._poke()
            waiter.ready.wait(timeout)
        finally:
            self._forget(waiter)
        return waiter.events

    def waiting(self) -> int:
        """How many followers wait now (what an operator or a test can watch)."""
        with self._lock:
            return sum(len(waiters) for waiters in self._waiters.values())

    def _forget(self, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(waiter.key)
            if waiters is None or waiter not in waiters:
                return
            waiters.discard(waiter)
            if waiters:
                self._from[waiter.key] = min(w.cursor for w in waiters)
            else:
                del self._waiters[waiter.key]
                self._linger[waiter.key] = time.monotonic() + _LINGER

    def _poke(self) -> None:
        """Make the XREAD in flight return now, so that the next one covers a new waiter."""
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(self._poke_key, {"p": "1"}, maxlen=8, approximate=True)
        pipe.pexpire(self._poke_key, _POKE_TTL_MS)
        self._call(pipe.execute)

    # -- the reader task ---------------------------------------------------------------
    def _run(self) -> None:
        delays = Backoff(initial=0.05, maximum=2.0).delays()
        while True:
            with self._lock:
                now = time.monotonic()
                for key in [k for k, t in self._linger.items() if t <= now]:
                    del self._linger[key]
                    self._from.pop(key, None)
                if self._closed or not self._from:
                    self._task = None
                    self._reading = {}
                    return
                self._reading = dict(self._from)
                streams = {key: f"0-{seq + 1}" for key, seq in self._from.items()}
            streams[self._poke_key] = self._poke_id
            try:
                reply = self._call(self._client.xread, streams, count=PAGE, block=_BLOCK_MS)
            except StorageUnavailable as exc:
                # Followers see the outage on their own calls (their waits time out).
                log.debug("shared Redis reader: %s", exc)
                time.sleep(next(delays))
                continue
            delays = Backoff(initial=0.05, maximum=2.0).delays()
            for raw_key, entries in reply or ():
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                if key == self._poke_key:
                    last = entries[-1][0]
                    self._poke_id = last.decode() if isinstance(last, bytes) else str(last)
                elif entries:
                    self._deliver(key, [self._to_event(i, f) for i, f in entries])

    def _deliver(self, key: str, events: list[Event]) -> None:
        first, last = events[0].seq, events[-1].seq
        woken: list[Waiter] = []
        with self._lock:
            waiters = self._waiters.get(key, set())
            for waiter in list(waiters):
                if waiter.cursor >= last:
                    continue  # it already has these
                if waiter.cursor + 1 >= first:
                    waiter.events = events[waiter.cursor + 1 - first :]
                # else: read from past its cursor (it came later): woken to read itself
                waiters.discard(waiter)
                woken.append(waiter)
            if waiters:
                self._from[key] = min(w.cursor for w in waiters)
            else:
                self._waiters.pop(key, None)
                self._from[key] = last
                self._linger.setdefault(key, time.monotonic() + _LINGER)
        for waiter in woken:
            waiter.ready.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiters = [w for ws in self._waiters.values() for w in ws]
            running = self._task is not None
        for waiter in waiters:
            waiter.ready.set()
        if running:
            try:
                self._poke()
            except StorageUnavailable:
                pass  # the XREAD returns by itself within its block time
        self._tasks.join(_BLOCK_MS / 1000 + 5)
        try:
            self._call(self._client.delete, self._poke_key)
        except StorageUnavailable:
            pass  # it expires by itself


def poke_key(prefix: str) -> str:
    """A key of this reader only (a Redis Cluster slot of its own is fine: it is read alone)."""
    return f"{prefix}:reader:{os.getpid()}:{os.urandom(6).hex()}"


__all__ = ["PAGE", "SharedReader", "Waiter", "poke_key"]
