"""The in-memory manager's ``store_interval``: events held back, and no reader misses any.

Used by tests/test_gevent.py. In a patched process, a runner over an
``InMemoryStreamManager`` starts flows that emit one chunk per step of the check.
"Kept" is what the manager's stream holds, read without a read's catching up
(``_Stream.count``); what a reader gets comes from the manager's own API. With a
30 s interval nothing below can be the timer's doing; the last case uses 50 ms to
see the timer store. Prints a JSON report:

* ``held``: after each of two chunks, kept / what ``info()`` says / kept after it:
  the chunk is held, and the read stores it first;
* ``queued``: after each of those chunks, the stores queued in the process's timer:
  one, also after the read stored the first chunk before its time;
* ``follower``: a subscriber waiting on the stream: chunks it gets, each kept when
  ``send_chunk`` returned, and its events in order;
* ``end``: a chunk held, then the flow's end: kept at once, the status, and whether the
  stored stream let its run go;
* ``big``: kept after chunks of 1 MiB in all were emitted with no read (the run's
  memory check stores what is held before it would wait for storage);
* ``timer``: kept after the 50 ms timer, with no read at all; ``timer_runs``: how
  often the process's timer fired for it (when the store was due, not every step);
* ``invalid``: the error for a negative interval.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from flask_durable_stream import FlowContext, InMemoryStreamManager  # noqa: E402
from flask_durable_stream._concurrency import Later  # noqa: E402
from flask_durable_stream.runner import Runner  # noqa: E402


def kept(manager: InMemoryStreamManager, stream_id: str) -> int:
    stream = manager._streams[stream_id]
    with stream.lock:
        return stream.count


def count_runs(timer: Later) -> list[int]:
    """How many times ``timer`` fires from now on (its class's method, wrapped)."""
    runs = [0]
    run = Later._run

    def counted(self: Later) -> None:
        if self is timer:
            runs[0] += 1
        run(self)

    Later._run = counted  # type: ignore[method-assign]
    return runs


class Stepped:
    """A flow that emits one chunk per :meth:`step`, then returns "end"."""

    def __init__(self, chunks: list[Any]) -> None:
        self.chunks = chunks
        self.go = gevent.event.Event()
        self.done = gevent.event.Event()

    def __call__(self, data: Any, ctx: FlowContext) -> str:
        for chunk in self.chunks:
            self.go.wait()
            self.go.clear()
            ctx.send_chunk(chunk)
            self.done.set()
        self.go.wait()
        return "end"

    def step(self) -> None:
        self.done.clear()
        self.go.set()
        assert self.done.wait(10), "the flow did not emit"


def main() -> None:
    report: dict[str, Any] = {}
    manager = InMemoryStreamManager(store_interval=30.0)
    runner = Runner(manager)

    flow = Stepped(["a", "b", "c", "d"])
    sid = runner.start("stepped", flow, None).stream_id
    timer = Later.of(30.0)
    held, queued = [], []
    for _ in range(2):
        flow.step()
        before = kept(manager, sid)
        queued.append(len(timer._items))
        info = manager.info(sid)
        held.append([before, None if info is None else info.last_seq + 1, kept(manager, sid)])
    report["held"] = held
    report["queued"] = queued

    got: list[list[Any]] = []

    def follow() -> None:
        for event in manager.subscribe(sid, after=1, timeout=10):
            got.append([event.seq, event.kind, event.payload])

    follower = gevent.spawn(follow)
    gevent.sleep(0.05)  # it has read what there is and waits
    at_emit = []
    for _ in range(2):
        flow.step()
        at_emit.append(kept(manager, sid))
        gevent.sleep(0.01)
    flow.go.set()  # the end
    follower.join(10)
    report["follower"] = {"kept_at_emit": at_emit, "got": got}

    flow = Stepped(["x"])
    sid = runner.start("stepped", flow, None).stream_id
    flow.step()
    held_chunk = kept(manager, sid)
    flow.go.set()  # the end
    deadline = time.monotonic() + 10
    while kept(manager, sid) < 2 and time.monotonic() < deadline:
        gevent.sleep(0.001)
    stream = manager._streams[sid]
    report["end"] = {
        "held_chunk": held_chunk,
        "kept": kept(manager, sid),
        "status": stream.info.status.value,
        "run_let_go": stream.unstored is None,  # the stored stream no longer holds its run
    }

    flow = Stepped(["x" * 100_000] * 11 + ["y"])
    sid = runner.start("stepped", flow, None).stream_id
    for _ in range(12):
        flow.step()
    report["big"] = kept(manager, sid)
    flow.go.set()
    gevent.sleep(0.01)  # it ends

    quick = InMemoryStreamManager(store_interval=0.05)
    quick_runner = Runner(quick)
    runs = count_runs(Later.of(0.05))
    flow = Stepped(["t"])
    sid = quick_runner.start("stepped", flow, None).stream_id
    flow.step()
    first = kept(quick, sid)
    deadline = time.monotonic() + 10
    while kept(quick, sid) < 1 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    report["timer"] = [first, kept(quick, sid)]
    gevent.sleep(0.1)  # nothing more is held: the timer stays quiet
    report["timer_runs"] = runs[0]
    flow.go.set()
    gevent.sleep(0.01)

    try:
        InMemoryStreamManager(store_interval=-1)
    except ValueError as exc:
        report["invalid"] = str(exc)
    runner.shutdown(5)
    quick_runner.shutdown(5)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
