"""New connections wait their turn while a gevent worker is busy with its running streams.

A gevent server takes in up to 100 new connections per turn of the hub's loop,
and each new request runs until its response is under way (parsing, Flask's
dispatch, opening the stream, starting the flow) before the loop's timers run
again. When a thousand clients connect at once, every running stream's next
chunk waits behind those requests: tens of milliseconds per turn, turn after
turn, until the storm is over. :class:`Admission` puts a bound on that: while
connections are waiting, one turn of the loop (its timers, its sockets, and the
new connections it lets in) lasts about ``turn`` seconds.

gunicorn's gevent workers get it from :func:`flask_durable_stream.gunicorn.post_worker_init`
(``admission=``); see docs/performance.md, "Admission of new connections".
"""

from __future__ import annotations

import collections
import time
from typing import Any

#: How long one turn of the hub's loop may last while connections wait to start
#: (the running streams' due chunks included). Measured in docs/performance.md.
DEFAULT_TURN = 0.002


class Admission:
    """First come, first served admission of new connections, at most ``turn`` seconds a turn.

    :meth:`admit` is called in a new connection's greenlet before it reads its
    request. When nobody waits, the first connection of a turn of the hub's
    loop starts at once, and so do the next ones while that turn has spent
    less than ``turn`` seconds on them. Past that, a connection waits, behind
    every connection that waits already. Waiting connections are let in by a
    timer that runs in the next turn after every timer that was already due
    (the running streams' next chunks), oldest first, while that turn has
    lasted less than ``turn`` seconds (counted from the end of the last
    admission, so a turn busy with running streams lets fewer in), and always
    at least one, so new streams keep starting on a saturated worker.

    Not thread-safe: one instance per hub, used from that hub's greenlets. An
    idle worker pays two clock reads per connection.
    """

    def __init__(self, turn: float = DEFAULT_TURN) -> None:
        if turn < 0:
            raise ValueError(f"turn must be at least 0, got {turn}")
        self.turn = turn
        #: Connections that had to wait, since this was made.
        self.waited = 0
        self._waiting: collections.deque[Any] = collections.deque()
        self._hub: Any = None
        self._loop: Any = None
        self._current: Any = None  # gevent.getcurrent, imported with the hub (after patching)
        self._timer: Any = None
        self._iteration = -1  # the loop iteration whose admissions _started counts from
        self._started = 0.0
        self._last_end: float | None = None  # when the last admission by the timer ended

    @property
    def waiting(self) -> int:
        """Connections waiting now."""
        return len(self._waiting)

    def admit(self) -> None:
        """Return once this connection may start (at once, unless the loop is busy)."""
        if self._hub is None:
            import gevent

            self._hub = gevent.get_hub()
            self._loop = self._hub.loop
            self._current = gevent.getcurrent
        if not self._waiting:
            iteration = self._loop.iteration
            if iteration != self._iteration:
                self._iteration = iteration
                self._started = time.perf_counter()
                return
            if time.perf_counter() - self._started < self.turn:
                return
        current = self._current()
        self._waiting.append(current)
        self.waited += 1
        if self._timer is None:
            self._arm()
        try:
            self._hub.switch()
        except BaseException:  # killed while waiting (a server's stop): not to be let in
            try:
                self._waiting.remove(current)
            except ValueError:
                pass
            raise

    def _arm(self) -> None:
        # With the loop's time brought up to now, this zero timer is due after every
        # timer already due: the running streams' chunks go first.
        self._timer = self._loop.timer(0.0)
        self._timer.start(self._let_in, update=True)

    def _let_in(self) -> None:
        self._timer.close()
        self._timer = None
        start = time.perf_counter()
        self._iteration = self._loop.iteration
        self._started = start
        allowance = self.turn
        if self._last_end is not None:
            allowance -= start - self._last_end  # what this turn spent before us
        waiting = self._waiting
        while waiting:
            # Runs the connection until it first yields back to the hub (usually with its
            # response under way); then the next one.
            waiting.popleft().switch()
            if time.perf_counter() - start >= allowance:
                break
        if waiting:
            self._last_end = time.perf_counter()
            self._arm()
        else:
            self._last_end = None
