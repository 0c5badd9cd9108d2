"""A hub whose callback queue is never empty: what a worker taking a storm of new requests
has queued (each a greenlet started by a callback). For the patched checks of
tests/test_gevent.py."""

from __future__ import annotations

import gevent


def busy_hub(counted: list[int]) -> list[bool]:
    """Keep 20 callbacks queued (each adds 1 to ``counted[0]``) until the returned flag is
    set: a callback queues 20 of them and itself again."""
    stop = [False]
    loop = gevent.get_hub().loop

    def count() -> None:
        counted[0] += 1

    def refill() -> None:
        if stop[0]:
            return
        for _ in range(20):
            loop.run_callback(count)
        loop.run_callback(refill)

    loop.run_callback(refill)
    return stop
