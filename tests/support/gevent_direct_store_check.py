"""The in-memory manager's default: each chunk stored as it is emitted, in the emitting task.

Used by tests/test_gevent.py. In a patched process, a runner over an
``InMemoryStreamManager`` (``store_interval`` 0, the default) starts flows that emit one
chunk per step. "Kept" is what the manager's stream holds, read without a read's
catching up (``_Stream.count``); ``appends`` counts the manager's batch appends
(``InMemoryStreamManager._append``), the way every event went before. Prints a JSON
report:

* ``kept``: kept right after each ``send_chunk`` returned, before the flow yields;
* ``appends``: batch appends for those chunks (none: each went in one call);
* ``run_held``: events the run still holds once the live reader took them all;
* ``got``: what a subscriber reads back, and ``info``: the stream's status and last seq;
* ``cancel``: a cancel request from the manager's side (as another front would make
  it): the chunk after it is stored the usual way, which reads the flag and stops the
  flow, and the stream ends CANCELLED with every chunk before it;
* ``lost``: a stream whose lease a reader declared lost: the next chunk is not stored
  as a chunk after the error;
* ``measured``: with Prometheus metrics on (the writer wrapped to measure appends),
  a chunk goes through the measured batch append instead.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from flask_durable_stream import FlowContext, InMemoryStreamManager  # noqa: E402
from flask_durable_stream.managers.memory import _Stream  # noqa: E402
from flask_durable_stream.runner import Runner  # noqa: E402
from tests.support import gevent_store_interval_check  # noqa: E402
from tests.support.gevent_store_interval_check import kept  # noqa: E402


class Stepped(gevent_store_interval_check.Stepped):
    """The stepped flow of the store-interval check, also noting what was kept right after
    each ``send_chunk`` (before the flow yields)."""

    def __init__(self, chunks: list[Any], manager: InMemoryStreamManager) -> None:
        super().__init__(chunks)
        self.manager = manager
        self.kept: list[int] = []

    def __call__(self, data: Any, ctx: FlowContext) -> str:
        for chunk in self.chunks:
            self.go.wait()
            self.go.clear()
            ctx.send_chunk(chunk)
            assert ctx.stream_id is not None
            self.kept.append(kept(self.manager, ctx.stream_id))
            self.done.set()
        self.go.wait()
        return "end"

    def end(self) -> None:
        self.go.set()


def wait_ended(manager: InMemoryStreamManager, stream_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = manager.info(stream_id)
        if info is not None and info.status.value != "open":
            return {"status": info.status.value, "last_seq": info.last_seq}
        gevent.sleep(0.005)
    raise AssertionError("the stream did not end")


def events(manager: InMemoryStreamManager, stream_id: str) -> list[list[Any]]:
    return [[e.seq, e.kind, e.payload] for e in manager.subscribe(stream_id, timeout=5)]


def main() -> None:
    report: dict[str, Any] = {}
    manager = InMemoryStreamManager()
    runner = Runner(manager)
    appends = [0]
    append = InMemoryStreamManager._append

    def counted(self: InMemoryStreamManager, stream: _Stream, batch: Any) -> bool:
        appends[0] += 1
        return append(self, stream, batch)

    InMemoryStreamManager._append = counted  # type: ignore[method-assign]

    flow = Stepped(["a", "b", "c", "d", "e"], manager)
    run = runner.start("stepped", flow, None, live=True)
    sid = run.stream_id
    assert run.live is not None
    for _ in range(5):
        flow.step()
    report["kept"] = flow.kept
    report["appends"] = appends[0]
    run.read(run.live, None)  # the live client takes every event, as its response would
    run.release()
    report["run_held"] = len(run.events)
    flow.end()
    report["info"] = wait_ended(manager, sid)
    report["got"] = events(manager, sid)

    flow = Stepped(["a", "b", "c"], manager)
    sid = runner.start("stepped", flow, None).stream_id
    flow.step()
    manager.request_cancel(sid)  # not the runner's: only storage knows
    flow.step()  # stored the usual way, which reads the flag
    flow.go.set()  # the next chunk: the flow is cancelled
    report["cancel"] = {"end": wait_ended(manager, sid), "events": events(manager, sid)}

    flow = Stepped(["a", "b"], manager)
    sid = runner.start("stepped", flow, None).stream_id
    flow.step()
    stream = manager._streams[sid]
    with stream.lock:
        manager._mark_lost(stream)  # what a reader does once the producer's lease ran out
    flow.step()  # a chunk after the stream ended in storage
    flow.end()
    gevent.sleep(0.05)
    report["lost"] = {"events": events(manager, sid), "kept_after": flow.kept}

    from flask_durable_stream.metrics import PrometheusMetrics

    measured = Runner(manager)
    measured.metrics = PrometheusMetrics()
    flow = Stepped(["m"], manager)
    sid = measured.start("stepped", flow, None).stream_id
    before = appends[0]
    flow.step()
    gevent.sleep(0.01)
    now = kept(manager, sid)
    report["measured"] = {"kept": flow.kept, "appends": appends[0] - before, "now": now}
    flow.end()
    wait_ended(manager, sid)

    for each in (runner, measured):
        each.shutdown(5)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
