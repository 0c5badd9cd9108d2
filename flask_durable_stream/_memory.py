"""Giving freed memory back to the operating system after large runs."""

from __future__ import annotations

import sys
from typing import Any

_malloc_trim: Any = None


def release_memory() -> None:
    """Ask glibc to give freed heap memory back to the OS (a no-op elsewhere).

    CPython frees a long stream's events, but glibc keeps the freed pages of
    its arenas for reuse, so the worker's RSS would stay at its peak after one
    large run. ``malloc_trim(0)`` returns them; it costs a few milliseconds on
    a large heap, so the runner calls it only after a run of several MiB ends.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                # The process's own symbols: no ctypes.util.find_library, which runs
                # ldconfig in a subprocess (it cannot from a gevent loop callback).
                _malloc_trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                pass
    if _malloc_trim:
        _malloc_trim(0)
