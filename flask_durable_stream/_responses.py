"""The streamed response bodies this process is sending, so a graceful stop lets them end.

A flow ended by the shutdown stores its terminal event, and every client
following it (a live reader, or a storage follower in any worker) gets that
event as its last frame, but only if its connection is still being served
then. Servers end connections on their own schedule: gevent's ``serve_forever``
kills its handlers a second after the listener closes, and a gunicorn worker
exits once :func:`~.runner.shutdown_all` returns. So the shutdown waits, bounded,
for the open bodies to finish (their last frame written) before it returns.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator

from ._concurrency import real_lock

_OPEN: weakref.WeakSet[TrackedBody] = weakref.WeakSet()
#: Work no server waits for at its stop that the shutdown lets end too: a live stream whose
#: connection its sink took over, a request on a connection served on after such a stream.
_BUSY: set[object] = set()
_LOCK = real_lock()  # taken twice per stream; never held across a switch
_CHANGED = threading.Event()
#: A body dropped without ``close()`` leaves the set silently: look again this often.
_RECHECK = 0.5


class TrackedBody:
    """A WSGI body counted as open from its first frame until it ends or is closed.

    Counted only once the server starts iterating it, so a response nobody sends
    (an unread test response) never holds up a shutdown; held weakly, so one
    dropped without ``close()`` cannot either.
    """

    __slots__ = ("_inner", "_it", "_first", "__weakref__")

    def __init__(self, inner: Iterable[bytes], first: Callable[[], object] | None = None) -> None:
        self._inner = inner
        self._it: Iterator[bytes] | None = None
        # Called once, before the inner body is first iterated: the live fast path's
        # wait, here rather than under the body's nested iterators (see _direct).
        self._first = first

    def __iter__(self) -> TrackedBody:
        return self

    def __next__(self) -> bytes:
        if self._it is None:
            self._it = iter(self._inner)
            with _LOCK:
                _OPEN.add(self)
        try:
            first = self._first
            if first is not None:
                self._first = None
                first()
            return next(self._it)
        except BaseException:  # StopIteration (the end), or the server's task being killed
            self._done()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._done()

    def _done(self) -> None:
        with _LOCK:
            if self in _OPEN:
                _OPEN.discard(self)
                _CHANGED.set()


def busy() -> object:
    """Count something that is not a body as open until :func:`idle` gets its token."""
    token = object()
    with _LOCK:
        _BUSY.add(token)
    return token


def idle(token: object) -> None:
    with _LOCK:
        if token in _BUSY:
            _BUSY.discard(token)
            _CHANGED.set()


def open_count() -> int:
    with _LOCK:
        return len(_OPEN) + len(_BUSY)


def wait_finished(deadline: float) -> bool:
    """Block until no body (nor anything :func:`busy`) is open or ``deadline`` (monotonic)
    passes; True if none is."""
    while True:
        with _LOCK:
            if not _OPEN and not _BUSY:
                return True
            _CHANGED.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        _CHANGED.wait(min(left, _RECHECK))
