"""Cases for :class:`Signal` and :class:`Inbox`, run with gevent's patching and without.

tests/test_concurrency.py runs them in its own (unpatched) process, and through
``gevent_signal_check`` in a monkey-patched one. Each case returns what it saw;
none depends on timing: waits end on the condition, and a case that lost a
wake-up hangs (the caller's timeout fails it) rather than passing.
"""

from __future__ import annotations

from typing import Any

from gevent import monkey

from flask_durable_stream._concurrency import (
    Inbox,
    Signal,
    TaskGroup,
    sleep,
    start_native_thread,
)


def _real_lock() -> Any:
    """A lock of the OS, even under patching: what a native thread may block on."""
    return monkey.get_original("_thread", "allocate_lock")()


def set_before_wait() -> list[bool]:
    signal = Signal()
    signal.set()
    first = signal.wait()
    signal.clear()
    return [first, signal.is_set(), signal.wait(0.01)]


def wait_times_out() -> bool:
    return Signal().wait(0.01)


def woken_by_native_thread_while_others_run() -> dict[str, Any]:
    """A native thread fires the signal only after other tasks ran while we waited.

    The waiter waits with no timeout: under gevent nothing else keeps the hub's
    loop alive once the ticker ends, so this also shows the signal does.
    """
    signal = Signal()
    gate = _real_lock()
    gate.acquire()
    ticks: list[int] = []

    def native() -> None:
        gate.acquire()  # a real block: only the ticker's release frees it
        signal.set()

    def ticker() -> None:
        for i in range(5):
            ticks.append(i)
            sleep(0.001)
        gate.release()

    start_native_thread(native)
    tasks = TaskGroup()
    tasks.spawn(ticker, name="ticker")
    woken = signal.wait()
    tasks.join(10)
    return {"woken": woken, "ticks": len(ticks)}


def many_wakeups_from_native_threads(rounds: int = 300) -> int:
    """Each round a native thread fires a fresh or reused signal at an arbitrary moment."""
    woken = 0
    reused = Signal()
    for n in range(rounds):
        signal = reused if n % 2 else Signal()
        signal.clear()
        start_native_thread(signal.set)
        woken += signal.wait()  # no timeout: a lost wake-up hangs
    return woken


def inbox_in_order_from_native_thread(count: int = 2000) -> bool:
    inbox = Inbox()

    def produce() -> None:
        for i in range(count):
            inbox.put(i)

    start_native_thread(produce)
    got: list[int] = []
    while len(got) < count:
        item = inbox.get(None)
        if item is not None:
            got.append(item)
    return got == list(range(count)) and inbox.get(0.01) is None


def run_all() -> dict[str, Any]:
    return {
        "set_before_wait": set_before_wait(),
        "wait_times_out": wait_times_out(),
        "native": woken_by_native_thread_while_others_run(),
        "many": many_wakeups_from_native_threads(),
        "inbox": inbox_in_order_from_native_thread(),
    }
