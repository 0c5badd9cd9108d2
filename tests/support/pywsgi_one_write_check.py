"""PyWSGIWorker's handler writes a short body with its head: the same bytes in fewer writes.

Used by tests/test_gunicorn_worker.py. In a patched process, each request is served by
gunicorn's ``gevent_pywsgi`` handler and by ours over one end of a Unix socket pair (the
request written to the other end first, then that end shut for writing, so the handler
answers and ends): what the client read, with ``Date`` blanked, and how many writes each
handler made to its socket. Prints a JSON report: ``{case: {handler: [writes, bytes]}}``, and
under ``"written whole"`` the ``/whole/`` paths that ours wrote with ``send_whole_response``.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402
from gunicorn.workers.ggevent import PyWSGIHandler  # noqa: E402

from flask_durable_stream.gunicorn_worker import ONE_WRITE_BYTES, Handler  # noqa: E402

BIG = b"z" * (ONE_WRITE_BYTES + 1)


#: The answers of ``/whole/<case>``: an application with its whole answer at once, as the
#: Durable Streams fast path has, which uses ``send_whole_response`` where the handler has it.
WHOLE: dict[str, tuple[str, list[tuple[str, str]], bytes]] = {
    "body": ("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")], b"ping"),
    "204": ("204 NO CONTENT", [("Stream-Next-Offset", "1"), ("Cache-Control", "no-store")], b""),
    "big": ("200 OK", [("Content-Length", str(len(BIG)))], BIG),
    "injected": ("200 OK", [("X-Evil", "a\r\nSet-Cookie: b"), ("Content-Length", "0")], b""),
}


#: The ``/whole/`` paths that ``send_whole_response`` wrote.
WRITTEN_WHOLE: list[str] = []


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/whole/"):
        status, headers, body = WHOLE[path[7:]]
        send = getattr(getattr(start_response, "__self__", None), "send_whole_response", None)
        if send is not None and send(status, headers, body):
            WRITTEN_WHOLE.append(path)
            return []
        start_response(status, headers)
        return [body]
    if path == "/short":  # a long-poll's answer: a short body of known length
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"ping"]
    if path == "/chunked":  # no length: gevent frames it as chunks
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"one", b"two"]
    if path == "/big":
        start_response("200 OK", [("Content-Length", str(len(BIG)))])
        return [BIG]
    if path == "/empty":  # an append's 204
        start_response("204 No Content", [("Stream-Next-Offset", "1")])
        return []
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


class Counting:
    """A socket that counts the writes made to it."""

    def __init__(self, sock: Any) -> None:
        self._s = sock
        self.writes = 0

    def send(self, data: bytes) -> int:
        self.writes += 1
        return int(self._s.send(data))

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self._s.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


def serve(handler: type, path: str) -> tuple[int, str]:
    server = WSGIServer(("127.0.0.1", 0), app, handler_class=handler, log=None)
    server.log = SimpleNamespace(access_log_enabled=False, access=lambda *args: None)
    ours, theirs = socket.socketpair()
    theirs.sendall(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    theirs.shutdown(socket.SHUT_WR)
    counting = Counting(ours)
    server.handle(counting, ("127.0.0.1", 1))
    ours.close()
    out = b""
    while data := theirs.recv(1 << 20):
        out += data
    theirs.close()
    text = re.sub(r"\r\nDate: [^\r]*", "\r\nDate: -", out.decode("latin-1"))
    return counting.writes, text


def main() -> None:
    report = {
        path: {name: serve(cls, "/" + path) for name, cls in (("theirs", PyWSGIHandler),
                                                               ("ours", Handler))}
        for path in ("short", "chunked", "big", "empty", "whole/body", "whole/204",
                     "whole/big", "whole/injected")
    }  # fmt: skip
    print(json.dumps({**report, "written whole": WRITTEN_WHOLE}))


if __name__ == "__main__":
    main()
