"""An AI SDK client that stops reading, under gevent: the process must not buffer the
answer for it.

Used by tests/test_ai_sdk_slow_reader.py. A chat flow writes far more than the
sockets hold while the client reads nothing. The server may read ahead a few
chunks for it, then the client falls behind the runner's live buffer bound and is
dropped (its connection closed), as a Genkit client is; it resumes from storage.
Prints a JSON report: whether the flow ended, what the stalled client received
and what a resume received.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402

from flask import Flask  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import InMemoryStreamManager  # noqa: E402
from flask_durable_stream.ai_sdk import chat_blueprint  # noqa: E402
from flask_durable_stream.runner import runner_for  # noqa: E402

CHUNKS = 1000
CHUNK = "x" * (16 * 1024)  # 16 MB in all: far more than both sockets' buffers
LIVE_BUFFER = 256 * 1024


def answer(data, ctx):  # type: ignore[no-untyped-def]
    for _ in range(CHUNKS):
        yield CHUNK


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            part = sock.recv(1 << 20)
        except OSError:  # reset: the server closed a connection with data in flight
            return received
        if not part:
            return received
        received += part


def request(port: int, raw: bytes, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(raw)
    return sock


def main() -> None:
    manager = InMemoryStreamManager()
    runner = runner_for(manager, live_buffer_bytes=LIVE_BUFFER)
    app = Flask(__name__)
    app.register_blueprint(chat_blueprint(answer, stream_manager=manager), url_prefix="/chat")
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    port = server.server_port

    body = b'{"id":"c1","messages":[]}'
    head = (
        b"POST /chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    )
    stalled = request(port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body, rcvbuf=4096)
    headers = b""
    while b"\r\n\r\n" not in headers:  # the headers come before the first chunk
        headers += stalled.recv(1)
    run_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"x-workflow-run-id:")
    )
    run = runner.get(run_id)
    assert run is not None
    terminal = run.wait(120)  # the client reads nothing meanwhile
    received = read_all(stalled)
    stalled.close()

    resume = request(
        port, f"GET /chat/{run_id}/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    resumed = read_all(resume)
    resume.close()
    server.stop()
    runner.shutdown(5)
    manager.close()
    print(
        json.dumps(
            {
                "ended": terminal is not None,
                "stalled_bytes": len(received),
                "stalled_done": b"data: [DONE]" in received,
                "resumed_chunks": resumed.count(CHUNK.encode()),
                "resumed_done": b"data: [DONE]" in resumed,
            }
        )
    )


if __name__ == "__main__":
    main()
