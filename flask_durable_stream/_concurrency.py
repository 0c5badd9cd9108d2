"""Greenlets under gevent, threads otherwise: one small seam for the whole package.

Production runs under gevent's monkey patching (gunicorn ``-k gevent``), where
the library's background work runs in greenlets. Under ``flask run`` (no
patching) the same work runs in daemon threads, so flows still outlive their
requests and a blocking flow does not stall the others. Primitives are taken
from :mod:`threading` at call time: once gevent has patched it they are
cooperative, before that they are real. A real OS thread hands a wake-up (or
items) to a greenlet only through :class:`Signal` (or :class:`Inbox`, built on it).
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import functools
import math
import os
import queue
import selectors
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_patched = False  # once patched, for good


def gevent_patched() -> bool:
    """True when gevent has monkey-patched :mod:`threading` in this process."""
    global _patched
    if _patched:
        return True
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a hard dependency
        return False
    _patched = bool(monkey.is_module_patched("threading"))
    return _patched


class Task:
    """A handle on one greenlet or thread started by :class:`TaskGroup`."""

    __slots__ = ("_impl", "name")

    def __init__(self, impl: Any, name: str) -> None:
        self._impl = impl
        self.name = name

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the task; return True when it has finished."""
        try:
            self._impl.join(timeout)
        except RuntimeError:  # a thread whose spawn() has not called start() yet
            time.sleep(0.001)
        return not self.alive

    def kill(self, timeout: float | None = None) -> None:
        """Stop a greenlet (``GreenletExit`` at its wait); a thread cannot be stopped."""
        kill = getattr(self._impl, "kill", None)
        if kill is not None:
            kill(block=True, timeout=timeout)

    @property
    def alive(self) -> bool:
        impl = self._impl
        if hasattr(impl, "dead"):
            return not impl.dead
        return bool(impl.is_alive())


_GROUPS: weakref.WeakSet[TaskGroup] = weakref.WeakSet()


@functools.cache
def _greenlet_class() -> Any:
    """gevent's ``Greenlet`` without the record of where it was spawned.

    gevent keeps, per greenlet, the ten innermost frames of its spawner (seven
    objects the cyclic garbage collector tracks for as long as the greenlet
    lives): a debugging aid that, with thousands of flows alive, only lengthens
    every collection. The library's tasks carry a name instead.
    """
    import gevent

    class _Task(gevent.Greenlet):  # type: ignore[misc]
        spawning_stack_limit = 0

    return _Task


def running_tasks() -> list[Task]:
    """Every task still running in any group: the leak check of the test suite."""
    return [task for group in list(_GROUPS) for task in group.tasks() if task.alive]


class TaskGroup:
    """Tracks every greenlet/thread the library spawns so none can leak unseen.

    The group holds the greenlet/thread objects themselves (no wrapper, no
    closure), so a finished task leaves no reference cycle behind: short-lived
    tasks are freed at once, not at the next garbage collection.
    """

    def __init__(self) -> None:
        self._lock = real_lock()  # taken twice per task; never held across a switch
        self._impls: set[Any] = set()
        _GROUPS.add(self)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "durable-stream") -> Task:
        impl: Any
        if gevent_patched():
            impl = _greenlet_class()(self._run_greenlet, fn, args)
            impl.name = name
        else:
            impl = threading.Thread(
                target=self._run_thread, args=(fn, args), name=name, daemon=True
            )
        with self._lock:
            self._impls.add(impl)
        impl.start()
        return Task(impl, name)

    def run_now(self, fn: Callable[..., Any], *args: Any, name: str = "flow") -> None:
        """Under gevent, from a greenlet that has nothing to do until something switches
        back to it: start ``fn`` in a task of its own by switching to it at once.

        :meth:`spawn` starts a greenlet from a hub callback, which runs behind every
        callback queued before it (a storm of new requests' greenlets). This one runs
        now, up to its first wait; the caller then stays switched out until whoever
        holds it switches back to it (its own switch, from a hub callback).
        """
        impl = _greenlet_class()(self._run_greenlet, fn, args)
        impl.name = name
        with self._lock:
            self._impls.add(impl)
        impl.switch()

    def _run_greenlet(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        import gevent

        try:
            fn(*args)
        finally:
            with self._lock:
                self._impls.discard(gevent.getcurrent())

    def _run_thread(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        finally:
            with self._lock:
                self._impls.discard(threading.current_thread())

    def __len__(self) -> int:
        with self._lock:
            return len(self._impls)

    def tasks(self) -> list[Task]:
        with self._lock:
            return [Task(impl, impl.name) for impl in self._impls]

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every task (including ones spawned meanwhile) has finished.

        Returns True if all did within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            tasks = self.tasks()
            if not tasks:
                return True
            for task in tasks:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                task.join(remaining)
            if deadline is not None and time.monotonic() >= deadline:
                return len(self) == 0


def sleep(seconds: float) -> None:
    time.sleep(seconds)  # cooperative once gevent has patched time


def original(module: str, name: str, default: Any) -> Any:
    """The object gevent's monkey patching replaced (``default`` when nothing was patched).

    What code that must block a real OS thread (a native thread's lock or queue) uses.
    """
    if not gevent_patched():
        return default
    from gevent import monkey

    return monkey.get_original(module, name)


_patched_allocate_lock: Callable[[], Any] | None = None  # found once: patching is for good


def real_lock() -> Any:
    """A lock of the OS's, also after gevent's monkey patching (whose lock is Python code).

    For code that must block a real OS thread, and for short sections that never wait or
    switch while they hold it (no greenlet can then find it taken). Made once per
    in-memory stream, so the patched module's original is looked up once."""
    global _patched_allocate_lock
    allocate = _patched_allocate_lock
    if allocate is None:
        if not gevent_patched():
            return _thread.allocate_lock()
        allocate = _patched_allocate_lock = original("_thread", "allocate_lock", None)
    return allocate()


def start_native_thread(fn: Callable[..., Any], *args: Any) -> None:
    """A real OS thread even under monkey patching (``threading.Thread`` then makes a greenlet)."""
    original("_thread", "start_new_thread", _thread.start_new_thread)(fn, args)


class NativeExecutor(ThreadPoolExecutor):
    """The default executor of :class:`AsyncioThread`: jobs on native threads.

    asyncio runs ``getaddrinfo`` and ``to_thread`` calls in its default
    executor. A stock ``ThreadPoolExecutor`` would start greenlets there,
    bound to the loop thread's hub, which never runs while the loop waits in
    its selector: the first DNS lookup would hang forever.
    """

    def __init__(self, max_workers: int = 8) -> None:
        super().__init__(max_workers)  # asyncio accepts ThreadPoolExecutors only; submit is ours
        self._jobs: Any = original("queue", "SimpleQueue", queue.SimpleQueue)()
        self._lock = real_lock()
        self._workers = 0
        self._idle = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args, kwargs))
        with self._lock:
            start = self._idle == 0 and self._workers < self._max_workers
            if start:
                self._workers += 1
        if start:
            start_native_thread(self._work)
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in range(self._workers):
            self._jobs.put(None)


class AsyncioThread:
    """One asyncio event loop in a native OS thread: where coroutines run under gevent.

    A loop run inside a greenlet would mark itself as *the* running loop of the
    whole OS thread, so every other greenlet would see it (``asyncio.run`` and
    Flask's ``async def`` views then fail), and it would depend on gevent's
    selector. In its own native thread the loop is plain asyncio: it waits in a
    real selector, with the GIL released, and hands results back to greenlets
    through :meth:`submit`'s future, whose done callback may feed an :class:`Inbox`.
    """

    def __init__(self, name: str = "durable-stream-asyncio") -> None:
        selector = original("selectors", "DefaultSelector", selectors.DefaultSelector)()
        self.loop = asyncio.SelectorEventLoop(selector)
        self.loop.set_default_executor(NativeExecutor())
        self.name = name
        self.thread_id: int | None = None
        started = real_lock()
        started.acquire()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.thread_id = threading.get_native_id()
            self.loop.call_soon(started.release)
            self.loop.run_forever()

        start_native_thread(main)
        started.acquire()  # a real lock: blocks this greenlet's thread only until the loop runs

    def submit(self, coro: Any) -> Future[Any]:
        """Schedule ``coro`` on the loop; the future completes in the loop thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class Signal:
    """A wake-up that any OS thread may fire and one thread or greenlet waits on.

    The one way the library hands a wake-up from a real OS thread (SQLite's
    writer thread, gRPC's callback threads, the asyncio loop thread) to a
    greenlet. Under gevent the waiter starts an ``async`` watcher on its own
    hub for the length of the wait: the only thing another thread may safely
    poke on a hub, and it keeps the hub's loop alive while nothing else would
    (a plain ``gevent.event.Event`` waited on with no timeout would end in
    ``LoopExit``). A :meth:`set` before the wait is kept in a flag the waiter
    reads after starting its watcher, so no wake-up is lost. Without gevent it
    is a :class:`threading.Event`.
    """

    __slots__ = ("_event", "_watcher", "_fired", "_gevent")

    def __init__(self) -> None:
        self._fired = False
        self._watcher: Any = None
        self._gevent = gevent_patched()
        if self._gevent:
            from gevent.event import Event as GeventEvent

            self._event: Any = GeventEvent()
        else:
            self._event = threading.Event()

    def set(self) -> None:
        """Wake the waiter (now, or at its next :meth:`wait`); safe from any thread."""
        if not self._gevent:
            self._event.set()
            return
        self._fired = True  # read by wait() after it started the watcher: no lost wake-up
        watcher = self._watcher
        if watcher is not None:
            watcher.send()

    def clear(self) -> None:
        self._fired = False
        self._event.clear()

    def is_set(self) -> bool:
        return self._fired or bool(self._event.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set or ``timeout`` seconds passed; True when set. One waiter at a time."""
        if not self._gevent:
            return bool(self._event.wait(timeout))
        if self._watcher is None:
            import gevent

            self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._event.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # In slices: a timer keeps the hub from finding nothing to wait for (a
                # LoopExit was seen once with the async watcher not counted), and a
                # wake-up that did not reach the hub is still seen through ``_fired``.
                left = _SIGNAL_SLICE if deadline is None else deadline - time.monotonic()
                if self._fired or self._event.wait(max(0.0, min(left, _SIGNAL_SLICE))):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return self._fired
        finally:
            self._watcher.stop()


#: Seconds a greenlet waiting on a :class:`Signal` sleeps at most before it looks again.
_SIGNAL_SLICE = 1.0


class Inbox:
    """Hands items from any thread (or greenlet) to one waiting consumer, in order."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._ready = Signal()

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    def get(self, timeout: float | None = None) -> Any:
        """The next item, or None after ``timeout`` seconds (or a spurious wake-up)."""
        if not self._items:
            self._ready.clear()  # before looking again, so a put() after the look still wakes
            if not self._items:
                self._ready.wait(None if timeout is None else max(0.0, timeout))
        return self._items.popleft() if self._items else None


class HubCallbacks:
    """Runs callbacks in one gevent hub's thread, posted from any OS thread.

    gevent's ``loop.run_callback_threadsafe`` counts each callback in libev's count
    of active watchers (``ev_ref``) from the calling thread, with no lock, while the
    hub's thread changes the same count inside the loop with the interpreter lock
    released. The count drifts (a script posting 300,000 callbacks from a thread
    while the hub runs timers left it at -14), and a loop whose count fell below
    zero ends its next wait with ``LoopExit``: in a gunicorn worker, the worker's
    own sleep, which kills the worker and every stream in it. Here the other thread
    only appends to a deque and sends an ``async`` watcher (libev's thread-safe
    wake-up); the hub's thread runs what is queued and alone changes the count.

    Made with :meth:`of` in the hub's thread; :meth:`expect` (hub's thread) before
    each :meth:`post` (any thread) keeps the loop alive until it has run. A process
    forked meanwhile starts with nothing expected and nothing queued: the threads
    that were to post are not in the child, and their posts would keep its loop
    alive for ever.
    """

    __slots__ = ("_items", "_watcher", "_hub", "_expected", "__weakref__")

    _by_hub: weakref.WeakKeyDictionary[Any, HubCallbacks] = weakref.WeakKeyDictionary()

    def __init__(self, hub: Any) -> None:
        self._items: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._hub = hub
        self._expected = 0  # posts expected and not yet run: while any, the loop stays alive
        self._watcher = hub.loop.async_(ref=False)
        self._watcher.start(self._run)

    @classmethod
    def of(cls, hub: Any) -> HubCallbacks:
        """The one for ``hub`` (called in its thread)."""
        callbacks = cls._by_hub.get(hub)
        if callbacks is None:
            callbacks = cls._by_hub[hub] = cls(hub)
        return callbacks

    def expect(self) -> None:
        """In the hub's thread: one :meth:`post` will come; keep the loop alive for it."""
        if self._expected == 0:
            self._watcher.ref = True
        self._expected += 1

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """From any thread: run ``fn(*args)`` in the hub's thread, soon, in order."""
        self._items.append((fn, args))
        self._watcher.send()

    def _run(self) -> None:
        items = self._items
        while items:
            fn, args = items.popleft()
            if self._expected:
                self._expected -= 1
                if self._expected == 0:
                    self._watcher.ref = False
            try:
                fn(*args)
            except Exception:
                self._hub.handle_error(fn, *sys.exc_info())


class Later:
    """Callbacks run in one gevent hub's thread about ``interval`` seconds after each was
    queued: one timer for every stream of the process, not one each.

    The runner delays in-process stores with it (see ``RunWriter``): a thousand paced
    streams then cost one timer, and each stream's store takes the events of several
    chunks at once. The loop's clock is cut in steps of ``interval / STEPS`` seconds, and
    the timer fires at the end of a step only when a callback falls due in it: a worker
    with one paced stream wakes once per store, a busy one at most ``STEPS`` times an
    interval, each time running what is due, so the work is spread over the interval
    as the callbacks were queued, not done in one pause of the whole worker. Made with
    :meth:`of` in the hub's thread; callbacks are queued from that thread only.
    """

    STEPS = 8

    __slots__ = ("interval", "_step", "_items", "_timer", "_hub", "_loop", "__weakref__")

    _by_hub: weakref.WeakKeyDictionary[Any, dict[float, Later]] = weakref.WeakKeyDictionary()

    def __init__(self, hub: Any, interval: float) -> None:
        self.interval = interval
        self._step = interval / self.STEPS
        self._items: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._hub = hub
        self._loop = hub.loop
        self._timer: Any = None  # armed while anything waits

    @classmethod
    def of(cls, interval: float) -> Later:
        """The one of the calling thread's hub for ``interval``."""
        import gevent

        hub = gevent.get_hub()
        by_interval = cls._by_hub.get(hub)
        if by_interval is None:
            by_interval = cls._by_hub[hub] = {}
        later = by_interval.get(interval)
        if later is None:
            later = by_interval[interval] = cls(hub, interval)
        return later

    def add(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` about ``interval`` seconds from now (at most one step more)."""
        due = self._loop.now() + self.interval
        self._items.append((due, fn))
        if self._timer is None:
            self._arm(due)

    def _arm(self, due: float) -> None:
        # The timer fires at the first step of the loop's clock at or after ``due``, and
        # runs everything due by then: callbacks queued within one step share a run.
        step = self._step
        at = math.ceil(due / step) * step
        if at < due:  # rounding
            at += step
        self._timer = self._loop.timer(max(0.0, at - self._loop.now()))
        self._timer.start(self._run)

    def _run(self) -> None:
        items = self._items
        now = self._loop.now()
        try:
            while items and items[0][0] <= now:
                fn = items.popleft()[1]
                try:
                    fn()
                except Exception:  # one stream's bug must not skip the others' stores
                    self._hub.handle_error(fn, *sys.exc_info())
        finally:  # (a callback that queues another finds the timer still armed)
            self._timer.close()
            self._timer = None
            if items:
                self._arm(items[0][0])


def _hub_callbacks_after_fork() -> None:
    for callbacks in list(HubCallbacks._by_hub.values()):
        callbacks._items.clear()
        callbacks._expected = 0
        callbacks._watcher.ref = False
    Later._by_hub.clear()  # the parent's streams are not the child's


os.register_at_fork(after_in_child=_hub_callbacks_after_fork)
