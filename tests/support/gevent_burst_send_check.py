"""The live fast path sends a burst's first event from the emitting task.

Used by tests/test_gevent.py. In a patched process, a run with the in-memory
manager's writer and a live fast-path sink on one end of a Unix socket pair
(the other end is the "client"), while the hub's callback queue is kept long
(a callback that queues 20 more and itself again: what a worker taking a storm of
new requests has queued, each a greenlet started by a callback). Prints a JSON
report, measured with no clock involved:

* ``paced``: per chunk of a flow that sleeps between chunks, whether the client's
  socket already had the chunk's frame, and storage the event, when ``send_chunk``
  returned (before anything else ran);
* ``burst``: a flow that emits 50 chunks without yielding, then (at a later turn)
  its result: what the client had of the first at once, of the rest before the flow
  yielded and after (how many writes, how many frames), of the result at once; and
  whether all it got equals the stored stream, in order, once each.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from flask_durable_stream import FlowContext, InMemoryStreamManager, protocol  # noqa: E402
from flask_durable_stream._direct import DirectSink  # noqa: E402
from flask_durable_stream.run import Run  # noqa: E402
from flask_durable_stream.writer import RunWriter  # noqa: E402
from tests.support.busy_hub import busy_hub  # noqa: E402


def available(sock: socket.socket) -> bytes:
    """What the client's socket holds now, without waiting."""
    out = b""
    while True:
        try:
            data = sock._sock.recv(65536, socket.MSG_DONTWAIT)  # type: ignore[attr-defined]
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def http_chunks(wire: bytes) -> list[bytes]:
    """The bodies of the HTTP/1.1 chunks in ``wire``."""
    bodies = []
    while wire:
        size, _, rest = wire.partition(b"\r\n")
        n = int(size, 16)
        bodies.append(rest[:n])
        wire = rest[n + 2 :]
    return bodies


def setup(
    manager: InMemoryStreamManager, stream_id: str, store_interval: float = 0.0
) -> tuple[Run, Any, socket.socket]:
    run = Run(stream_id, FlowContext(stream_id))
    stream_writer = manager.open(stream_id)
    writer = RunWriter(
        run,
        stream_writer,
        spawn=gevent.spawn,
        retry_timeout=10.0,
        heartbeat_interval=3600.0,
        inline=True,
        store_interval=store_interval,
    )
    run.on_emit = writer.on_emit  # as the runner does
    server, client = socket.socketpair()
    reader = run.live = run.attach()
    sink = run.sink = DirectSink(run, reader, server, chunked=True)
    sink._pump()  # caught up: armed
    assert sink.armed
    return run, stream_writer, client


def stored_count(manager: InMemoryStreamManager, stream_id: str) -> int:
    info = manager.info(stream_id)
    return -1 if info is None else info.last_seq + 1


def main() -> None:
    manager = InMemoryStreamManager()
    report: dict[str, Any] = {}
    stop = busy_hub([0])
    gevent.sleep(0.01)  # the queue is filling

    run, _, client = setup(manager, "paced")
    paced = []
    for i in range(5):
        gevent.sleep(0.005)
        run.emit_chunk(protocol.encode(i))
        frames = http_chunks(available(client))
        frame = protocol.frame(protocol.CHUNK, protocol.encode(i)).encode()
        paced.append(
            {
                "at_client": frames == [frame],
                "stored": stored_count(manager, "paced") == i + 1,
            }
        )
    report["paced"] = paced

    run, _, client = setup(manager, "burst")
    gevent.sleep(0.005)
    run.emit_chunk(protocol.encode(0))
    first = http_chunks(available(client))
    for i in range(1, 50):
        run.emit_chunk(protocol.encode(i))
    before_yield = available(client)
    gevent.sleep(0)  # behind the busy queue, and behind the burst's deferred send
    rest = http_chunks(available(client))
    run.finish("end")
    last = http_chunks(available(client))

    # Events held for the timer (the in-memory manager's default store_interval): nothing
    # else is deferred in the burst's turn, and still its second event waits for the yield.
    run, _, client = setup(manager, "held", store_interval=0.1)
    gevent.sleep(0.005)
    run.emit_chunk(protocol.encode(0))
    http_chunks(available(client))
    run.emit_chunk(protocol.encode(1))
    run.emit_chunk(protocol.encode(2))
    report["held"] = {"before_yield": len(available(client))}
    gevent.sleep(0)
    report["held"]["rest_writes"] = len(http_chunks(available(client)))
    run.finish("end")
    stop[0] = True
    stored = b"".join(
        protocol.frame(e.kind, e.payload).encode() for e in manager.subscribe("burst", timeout=5)
    )
    report["burst"] = {
        "first": [f.decode() for f in first],
        "rest_before_yield": len(before_yield),
        "rest_writes": len(rest),
        "rest_frames": rest[0].count(b"\n\n") if rest else 0,
        "last": [f.decode() for f in last],
        "sent_equals_stored": b"".join(first + rest + last) == stored,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
