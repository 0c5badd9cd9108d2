"""An SSE reader that goes away, under gevent: its subscription must go with it.

Used by tests/test_gevent.py. Prints a JSON report: the library tasks named
``durable-stream-sse`` while the reader is connected and after it left, and the
keep-alive comments it received meanwhile.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import InMemoryStreamManager, durable_stream_blueprint  # noqa: E402
from flask_durable_stream._concurrency import running_tasks  # noqa: E402
from tests.support.waiting import PATIENCE  # noqa: E402  (seconds before a wait counts as a hang)


def silent(data, ctx):  # type: ignore[no-untyped-def]
    ctx.wait_cancelled(10 * PATIENCE)  # says nothing until cancelled
    return "cancelled" if ctx.cancelled else "timed out"


def sse_tasks() -> int:
    return sum(task.name == "durable-stream-sse" for task in running_tasks())


def request(port: int, raw: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(raw)
    return sock


def main() -> None:
    manager = InMemoryStreamManager()
    app = Flask(__name__)
    bp = durable_stream_blueprint(
        {"silent": silent}, stream_manager=manager, keepalive_interval=0.05
    )
    app.register_blueprint(bp)
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    port = server.server_port
    runner = bp.runner  # type: ignore[attr-defined]
    run = runner.start("silent", silent, None)

    reader = request(
        port,
        f"GET /silent/events?streamId={run.stream_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    received = b""
    while received.count(b": keep-alive") < 3:
        received += reader.recv(4096)
    connected = sse_tasks()
    reader.close()  # the client goes away mid-stream
    deadline = time.monotonic() + PATIENCE
    while sse_tasks() and time.monotonic() < deadline:  # noticed at its next write (a keep-alive)
        gevent.sleep(0.02)
    after = sse_tasks()
    runner.request_cancel(run.stream_id)
    terminal = run.wait(PATIENCE)
    runner.shutdown(5)
    server.stop()
    manager.close()
    print(
        json.dumps(
            {
                "connected": connected,
                "after": after,
                "keepalives": received.count(b": keep-alive"),
                "terminal": terminal.payload if terminal else None,
            }
        )
    )


if __name__ == "__main__":
    main()
