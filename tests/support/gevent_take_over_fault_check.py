"""A server whose internals are not as the live fast path expects: streams still whole.

Used by tests/test_gevent.py. In a patched process, serves an app on gevent's
WSGIServer (with a pool) and ``DURABLE_STREAM_DETACH_RESPONSE``, where what the sink
asks of the server as it takes a live stream's connection over raises (argument
``taking``: the whole question; ``after``: how to serve the connection on after the
stream; ``none``: nothing raises). On one keep-alive connection a live stream, then a
second request. Prints a JSON report:

* ``body_ok``: the stream's body was whole and equal to its replay from storage;
* ``second``: the second request on the connection was answered;
* ``detached``: how many connections the sink took over;
* ``taken_left``: the sinks' count of taken-over connections once all is over;
* ``fds``: open descriptors after, less before;
* ``logged``: the messages the library logged at ERROR.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import (  # noqa: E402
    DurableStream,
    FlowContext,
    InMemoryStreamManager,
    _direct,
    _handover,
)
from tests.support.live_checks import count_take_overs, dechunk  # noqa: E402

detached = count_take_overs()


def broken(*args: Any) -> Any:
    raise RuntimeError("not the server this library knows")


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def paced(data: Any, ctx: FlowContext) -> str:
    for i in range(3):
        ctx.send_chunk(i)
        gevent.sleep(0.001)
    return "done"


def stream_request(extra: bytes = b"") -> bytes:
    body = b'{"data": null}'
    return (
        b"POST /flows/paced HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)
    )


def read_response(sock: socket.socket) -> bytes:
    """One chunked response, or what came before the connection closed."""
    raw = b""
    while not raw.endswith(b"\r\n0\r\n\r\n"):
        piece = sock.recv(65536)
        if not piece:
            break
        raw += piece
    return raw


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    fault = sys.argv[1]
    if fault == "taking":
        _handover.taking = broken  # type: ignore[assignment]
    elif fault == "after":
        _handover._after_handler = broken  # type: ignore[assignment]
    errors = Errors()
    logging.getLogger("flask_durable_stream").addHandler(errors)
    app = Flask(__name__)
    app.config["DURABLE_STREAM_DETACH_RESPONSE"] = True
    DurableStream(app, flows={"paced": paced}, stream_manager=InMemoryStreamManager())
    server = WSGIServer(("127.0.0.1", 0), app, log=None, spawn=Pool(100))
    server.start()
    address = ("127.0.0.1", server.server_port)

    warm = socket.create_connection(address)  # the first request's lazy imports and objects
    warm.sendall(stream_request(b"Connection: close\r\n"))
    read_response(warm)
    warm.close()
    gevent.sleep(0.2)
    before = fds()

    sock = socket.create_connection(address)
    sock.sendall(stream_request())
    stream_id, body = dechunk(read_response(sock))
    second = b""
    try:
        sock.sendall(stream_request(b"Connection: close\r\n"))
        second = read_response(sock)
    except OSError:
        pass
    sock.close()
    replay = socket.create_connection(address)
    replay.sendall(
        stream_request(b"Connection: close\r\nx-genkit-stream-id: %s\r\n" % stream_id.encode())
    )
    _, stored = dechunk(read_response(replay))
    replay.close()
    gevent.sleep(0.2)  # the server's side of the connections closes
    expected = b"".join(b'data: {"message":%d}\n\n' % i for i in range(3))
    expected += b'data: {"result":"done"}\n\n'
    opened = fds() - before
    server.stop()
    print(
        json.dumps(
            {
                "body_ok": body == expected and stored == expected,
                "second": second.startswith(b"HTTP/1.1 200"),
                "detached": detached[0],
                "taken_left": _direct._taken[0],
                "fds": opened,
                "logged": errors.messages,
            }
        )
    )


if __name__ == "__main__":
    main()
