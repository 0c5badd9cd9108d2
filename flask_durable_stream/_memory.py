"""Memory of a serving process: freed pages given back after large runs, and the
cyclic garbage collector fitted to many concurrent streams."""

from __future__ import annotations

import atexit
import gc
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


#: ``tune_gc``'s default: container allocations between two young-generation collections.
YOUNG_THRESHOLD = 10_000
#: ``tune_gc``'s middle generation: collected every this many young collections (CPython: 10).
MIDDLE_THRESHOLD = 2
#: ``tune_gc``'s oldest generation: examined every this many middle collections (CPython: 10),
#: so a full collection comes after as many young ones as with CPython's 10 and 10.
OLD_THRESHOLD = 50


def tune_gc(young: int = YOUNG_THRESHOLD, *, freeze: bool = True) -> None:
    """Fit Python's cyclic garbage collector to a process that serves many streams.

    Call it once in each serving process, after the app is loaded: in gunicorn's
    ``post_worker_init`` hook (see ``example_app/gunicorn.conf.py``), or at the end
    of the app factory. It changes process-wide settings, so it is never called
    for you.

    Every open stream keeps objects the collector tracks (the request's, the
    flow's, its events: ``bench/stream_memory.py`` counts them, some 130 per
    in-memory stream against 60 for a plain Flask response), and CPython's
    default thresholds run a full
    collection each time the objects that survived grow by a quarter. With a
    thousand streams that is a pause of tens of milliseconds for every stream
    of the process, several times a second while streams open, and it sets the
    tail of the gap between chunks. Here:

    * ``freeze``: what is alive now (modules, the app, its routes: tens of
      thousands of objects) is collected once and then never scanned again
      (:func:`gc.freeze`);
    * ``young``: the young generation is collected every ``young`` container
      allocations instead of every 700, so a stream's objects are mostly freed
      by reference counting before a collection looks at them. Cyclic garbage
      still goes, later;
    * the middle generation is collected every 2 young collections instead of
      every 10. A middle collection examines every object that survived since
      the last one: with a thousand streams open, ten young collections' worth
      was a pause of 30-45 ms for every stream of the worker, two is a few
      milliseconds. The oldest generation is examined every 50 middle
      collections instead of 10, so full collections come as rarely as before.

    Measured in ``docs/performance.md``.
    """
    if young < 1:
        raise ValueError(f"young must be at least 1, got {young}")
    if freeze:
        gc.collect()
        gc.freeze()
        # Frozen objects are never collected, not even while the interpreter shuts down:
        # garbage among them would be freed only once modules are torn down, running
        # finalizers (logging's handler weakrefs) against cleared globals. Registered
        # once, however often this is called.
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)
    gc.set_threshold(young, MIDDLE_THRESHOLD, OLD_THRESHOLD)
