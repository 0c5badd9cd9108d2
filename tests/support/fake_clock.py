"""A clock the test moves by hand, shared by a manager and its runner.

Heartbeat, lease and retry cases then assert what happens at each moment
instead of hoping a loaded machine schedules a thread within a lease: the
runner's sleeps and waits end only when :meth:`SteppedClock.advance` passes
their deadline, and the storage clock (``manager.clock``) reads the same time.
The test waits on conditions (:meth:`SteppedClock.settle`, ``waiting.wait_for``)
with generous real deadlines that only a broken runner reaches.
"""

from __future__ import annotations

import threading
import time

from tests.support.waiting import PATIENCE

#: How often a waiter on the clock looks at its event (threading.Event cannot notify us).
EVENT_POLL = 0.01


class SteppedClock:
    """Storage clock (call it) and runner clock (``monotonic``/``sleep``/``wait``) in one.

    Starts at a round number, so that steps of halves and quarters stay exact.
    """

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._now = start
        self._cond = threading.Condition()
        self._deadlines: dict[int, float] = {}  # blocked callers, by token
        self._next_token = 0
        self._free = False

    # -- read by the manager (storage clock) and the runner ------------------------------
    def __call__(self) -> float:
        with self._cond:
            return self._now

    def monotonic(self) -> float:
        return self()

    # -- the runner's waiting ------------------------------------------------------------
    def sleep(self, seconds: float) -> None:
        self.wait(threading.Event(), seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        with self._cond:
            free = self._free
            if free:
                self._now += timeout
        if free:  # a short real pause, so that a retry loop does not spin
            return event.wait(EVENT_POLL)
        with self._cond:
            deadline = self._now + timeout
            token = self._next_token
            self._next_token += 1
            self._deadlines[token] = deadline
            self._cond.notify_all()
            try:
                while not event.is_set() and self._now < deadline and not self._free:
                    self._cond.wait(EVENT_POLL)
            finally:
                del self._deadlines[token]
                self._cond.notify_all()
            return event.is_set()

    # -- driven by the test --------------------------------------------------------------
    def advance(self, seconds: float) -> float:
        """Move time on; every sleep or wait whose deadline is reached returns."""
        with self._cond:
            self._now += seconds
            self._cond.notify_all()
            return self._now

    def settle(self, blocked: int, timeout: float = PATIENCE) -> None:
        """Wait until exactly ``blocked`` callers wait on this clock, none of them due.

        After :meth:`advance`, that means every task the step woke has done its
        work and is waiting for a later moment again.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (
                len(self._deadlines) == blocked
                and all(d > self._now for d in self._deadlines.values())
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {blocked} task(s) to wait on the clock;"
                        f" waiting: {sorted(d - self._now for d in self._deadlines.values())}"
                    )
                self._cond.wait(min(left, 0.05))

    def run_free(self) -> None:
        """From now on every sleep and wait returns at once, moving time on by itself.

        For a test's cleanup: whatever state a failure left, the runner's tasks
        finish instead of waiting forever for a step that never comes.
        """
        with self._cond:
            self._free = True
            self._cond.notify_all()
