"""One backoff policy for every retry loop in the package.

Exponential backoff with *full jitter* (each delay drawn uniformly from
``[0, min(maximum, initial * multiplier**attempt)]``): many workers that lost
the same storage at the same moment then spread their retries instead of
hammering it in step when it comes back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts. ``initial`` is the cap of the first delay."""

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError("need 0 < initial <= maximum and multiplier >= 1")

    def cap(self, attempt: int) -> float:
        """The largest delay after failed attempt number ``attempt`` (0-based)."""
        # min() before the power would overflow for very long outages.
        if attempt > 64:
            return self.maximum
        return min(self.maximum, self.initial * self.multiplier**attempt)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        cap = self.cap(attempt)
        if not self.jitter:
            return cap
        return (rng or random).uniform(0.0, cap)

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """An endless iterator of delays: one per failed attempt."""
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1
