"""Waiting on conditions, never on sleeps: a slow machine makes a test slower, not red."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Real seconds a condition may take before the test fails: only a hang gets there.
PATIENCE = 60.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    """Wait in real time until ``condition()`` holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.002)
