"""A live stream's flow starts at once, not behind the hub's queued callbacks.

Used by tests/test_gevent.py. In a patched process, serves an app on gevent's
WSGIServer with a pool (as gunicorn's gevent worker does) while the hub's callback
queue is kept long (a callback that queues 20 more and itself again: what a worker
taking a storm of new requests has queued, each a greenlet started by a callback).
Each callback counts itself. For streams of a flow, with ``DURABLE_STREAM_FLOW_IN_RESPONSE``
on (argument ``in-response``), with ``DURABLE_STREAM_DETACH_RESPONSE`` (``detached``) or
neither, prints a JSON report, measured with no clock:

* ``callbacks_between``: per stream, how many of those callbacks ran between the
  view's return (Flask's ``after_request``, in the response's greenlet) and the flow's
  first line; ``own_task``: whether each flow ran in a task of its own (not the
  response's greenlet);
* ``bodies_ok``: whether every client got its chunks and result, in order, and the same
  bytes again on a replay from storage;
* ``detached``: how many responses' connections the live fast path took over.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from flask import Flask, Response  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import (  # noqa: E402
    DurableStream,
    FlowContext,
    InMemoryStreamManager,
)
from flask_durable_stream._concurrency import _greenlet_class  # noqa: E402
from tests.support.busy_hub import busy_hub  # noqa: E402
from tests.support.live_checks import count_take_overs, dechunk  # noqa: E402

STREAMS = 5
counted = [0]  # callbacks of the busy queue run so far
view_ends: list[int] = []
flow_starts: list[int] = []
own_task: list[bool] = []
detached = count_take_overs()


def counted_flow(data: Any, ctx: FlowContext) -> str:
    flow_starts.append(counted[0])
    own_task.append(isinstance(gevent.getcurrent(), _greenlet_class()))
    for i in range(3):
        ctx.send_chunk(i)
        gevent.sleep(0.001)
    return "done"


def request(port: int, headers: bytes = b"") -> bytes:
    # Not create_connection: its getaddrinfo goes through gevent's resolver thread, whose
    # answer waits for the busy hub to give up the interpreter lock, turn after turn.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(("127.0.0.1", port))
    body = b'{"data": null}'
    sock.sendall(
        b"POST /flows/counted HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s"
        % (headers, len(body), body)
    )
    raw = b""
    while True:
        piece = sock.recv(65536)
        if not piece:
            break
        raw += piece
    sock.close()
    return raw


def main() -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_FLOW_IN_RESPONSE"] = "in-response" in sys.argv[1:]
    app.config["DURABLE_STREAM_DETACH_RESPONSE"] = "detached" in sys.argv[1:]
    DurableStream(app, flows={"counted": counted_flow}, stream_manager=InMemoryStreamManager())

    @app.after_request
    def mark(response: Response) -> Response:
        view_ends.append(counted[0])
        return response

    server = WSGIServer(("127.0.0.1", 0), app, log=None, spawn=Pool(100))
    server.start()
    port = server.server_port
    stop = busy_hub(counted)
    expected = b"".join(b'data: {"message":%d}\n\n' % i for i in range(3))
    expected += b'data: {"result":"done"}\n\n'
    bodies_ok = True
    ids = []
    for _ in range(STREAMS):
        stream_id, body = dechunk(request(port))
        bodies_ok = bodies_ok and body == expected
        ids.append(stream_id)
    stop[0] = True
    starts = list(zip(view_ends[:STREAMS], flow_starts, strict=True))
    for stream_id in ids:  # a replay, from storage, equals the live body
        _, body = dechunk(request(port, b"x-genkit-stream-id: %s\r\n" % stream_id.encode()))
        bodies_ok = bodies_ok and body == expected
    server.stop()
    print(
        json.dumps(
            {
                "callbacks_between": [start - end for end, start in starts],
                "own_task": own_task,
                "bodies_ok": bodies_ok,
                "detached": detached[0],
            }
        )
    )


if __name__ == "__main__":
    main()
