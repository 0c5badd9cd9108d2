"""``DURABLE_STREAM_FLOW_IN_RESPONSE``: a live stream's flow in its response's greenlet.

Used by tests/test_gevent.py. In a patched process, serves an app on gevent's
WSGIServer with a pool (as gunicorn's gevent worker does) and prints a JSON report:

* ``context``: what a flow sees of a context variable that the request set (a flow
  runs in a fresh context, as in a greenlet of its own);
* ``unclaimed``: the body of a stream served where the live fast path cannot reach the
  socket (Flask's test client): its flow reports that it ran in a task of its own;
* ``greenlets_per_stream`` and ``in_response_greenlet``: the greenlets alive per open
  live stream, and whether the flows ran in the response's greenlet (not a task of the
  runner's);
* ``after_disconnect``: a flow whose client went away after its first frame: the
  events it stored once it ended;
* ``generator_after_disconnect``: the same for a generator flow, which moves to a task of
  its own at its first chunk after its client left, so its response ends then: it reports
  where it ended and whether its response's greenlet had ended by then;
  ``generator_connected``: the end of one whose client stayed (it never moved);
* ``async_after_disconnect``: the same for async generator flows (a greenlet relays
  their chunks from the asyncio thread; it is what moves); ``moves``: how many flows
  moved, counted where each move is raised;
* ``killed``: the terminal events stored for flows whose response greenlets the server
  killed when it stopped (its graceful stop's timeout).
"""

from gevent import monkey

monkey.patch_all()

import contextvars  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import (  # noqa: E402
    DurableStream,
    FlowContext,
    InMemoryStreamManager,
    flows,  # noqa: E402
)
from flask_durable_stream._concurrency import _greenlet_class  # noqa: E402

STREAMS = 10
moves: list[int] = []  # one per flow that moved to a task of its own
_moved_init = flows.FlowMoved.__init__


def _counted_move(self: flows.FlowMoved, rest: Any) -> None:
    moves.append(1)
    _moved_init(self, rest)


flows.FlowMoved.__init__ = _counted_move  # type: ignore[method-assign]
REQUEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")
gate = threading.Event()
own_task: list[bool] = []


def seen(data: Any, ctx: FlowContext) -> str:
    ctx.send_chunk(REQUEST_VAR.get())
    ctx.send_chunk(isinstance(gevent.getcurrent(), _greenlet_class()))
    return "ok"


def parked(data: Any, ctx: FlowContext) -> str:
    own_task.append(isinstance(gevent.getcurrent(), _greenlet_class()))
    ctx.send_chunk("start")
    gate.wait()
    for i in range(3):
        gevent.sleep(0.001)
        ctx.send_chunk(i)
    return "done"


gen_gate = threading.Event()


def parked_generator(data: Any) -> Any:
    """A generator flow: where it ends, and whether its response's greenlet had ended."""
    response = gevent.getcurrent()
    yield "start"
    gen_gate.wait()
    for i in range(10):
        gevent.sleep(0.001)
        yield i
    return {
        "own_task": isinstance(gevent.getcurrent(), _greenlet_class()),
        "response_ended": response.dead,
    }


async def parked_async_generator(data: Any) -> Any:
    """An async generator flow (run on the asyncio thread; a greenlet relays its chunks)."""
    import asyncio

    yield "start"
    while not gen_gate.is_set():  # a native thread: no gevent wait here
        await asyncio.sleep(0.005)
    for i in range(10):
        await asyncio.sleep(0.001)
        yield i


def forever(data: Any, ctx: FlowContext) -> str:
    ctx.send_chunk("start")
    gevent.sleep(3600)
    return "never"


def open_stream(port: int, flow: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    body = b'{"data": null}'
    sock.sendall(
        b"POST /flows/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
        % (flow.encode(), len(body), body)
    )
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    raw = b""
    while marker not in raw:
        piece = sock.recv(65536)
        if not piece:
            break
        raw += piece
    return raw


def stream_id(raw: bytes) -> str:
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"x-genkit-stream-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no stream id in {raw[:300]!r}")


def live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o and not o.dead)


def stored(manager: InMemoryStreamManager, sid: str) -> list[list[Any]]:
    return [[e.kind, e.value] for e in manager.subscribe(sid, timeout=30)]


def main() -> None:
    manager = InMemoryStreamManager()
    app = Flask(__name__)
    app.config["DURABLE_STREAM_FLOW_IN_RESPONSE"] = True
    DurableStream(app, flows={"seen": seen, "parked": parked, "forever": forever,
                         "generator": parked_generator, "async": parked_async_generator},
                  stream_manager=manager)  # fmt: skip

    @app.before_request
    def set_var() -> None:
        REQUEST_VAR.set("set by the request")

    server = WSGIServer(("127.0.0.1", 0), app, spawn=Pool(100), log=None)
    server.start()
    port = server.server_port
    report: dict[str, Any] = {}

    sock = open_stream(port, "seen")
    raw = read_until(sock, b"0\r\n\r\n")
    sock.close()
    report["context"] = json.loads(raw.split(b'data: {"message":', 1)[1].split(b"}", 1)[0])
    # A server whose socket the sink cannot reach (here Flask's test client): nobody claims
    # the flow, which starts in a task of its own at the hub's next turn.
    body = app.test_client().post(
        "/flows/seen", json={"data": None}, headers={"Accept": "text/event-stream"}
    )
    report["unclaimed"] = body.get_data(as_text=True)

    first = open_stream(port, "parked")  # the runner's own tasks (its ticker) are up
    socks = [first]
    heads = [read_until(first, b"start")]
    before = live_greenlets()
    socks += [open_stream(port, "parked") for _ in range(STREAMS)]
    heads += [read_until(s, b"start") for s in socks[1:]]
    report["greenlets_per_stream"] = (live_greenlets() - before) / STREAMS
    report["in_response_greenlet"] = own_task == [False] * (STREAMS + 1)
    ids = [stream_id(h) for h in heads]
    for s in socks:  # every client goes away; the flows go on when the gate opens
        s.close()
    gevent.sleep(0.05)
    gate.set()
    report["after_disconnect"] = [stored(manager, sid) for sid in ids]

    gen_socks = [open_stream(port, "generator") for _ in range(4)]
    gen_ids = [stream_id(read_until(s, b"start")) for s in gen_socks]
    staying = gen_socks.pop()
    async_socks = [open_stream(port, "async") for _ in range(3)]
    async_ids = [stream_id(read_until(s, b"start")) for s in async_socks]
    for s in gen_socks + async_socks:  # gone at once (a reset), so the next send fails
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    gevent.sleep(0.05)
    gen_gate.set()
    report["generator_after_disconnect"] = [stored(manager, sid) for sid in gen_ids[:3]]
    report["async_after_disconnect"] = [stored(manager, sid) for sid in async_ids]
    report["moves"] = len(moves)
    read_until(staying, b"0\r\n\r\n")
    staying.close()
    report["generator_connected"] = stored(manager, gen_ids[3])[-1]

    killed = [open_stream(port, "forever") for _ in range(3)]
    killed_ids = [stream_id(read_until(s, b"start")) for s in killed]
    server.stop(timeout=0.2)  # the graceful stop's timeout kills the response greenlets
    report["killed"] = [stored(manager, sid)[-1] for sid in killed_ids]
    for s in killed:
        s.close()
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
