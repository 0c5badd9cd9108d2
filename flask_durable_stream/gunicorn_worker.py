"""A cheaper gevent worker for gunicorn: ``-k flask_durable_stream.gunicorn_worker.PyWSGIWorker``.

gunicorn's ``gevent`` worker spends about as much CPU per request as a small
append costs in all the rest of the server (its parser checks every request
against ``forwarded_allow_ips``, builds a full environ and formats the reply
through several layers). Its ``gevent_pywsgi`` worker, which serves through
gevent's own WSGI server, costs less; this one is that worker with the two
costs left in gevent's handler taken out: request headers are parsed by
:func:`parse_headers` instead of through the standard library's e-mail parser,
and nothing is built for the access log when gunicorn's access log is off;
and three smaller ones: the ``Date`` header is formatted once a second, a
response is written with one ``send`` (gevent's ``sendall`` asks the socket
for its buffer size first, a system call per response), and a short body goes
out in the same write as its head.
Everything else (keep-alive, chunked bodies, ``Expect: 100-continue``,
streaming responses, graceful stops, the server hooks) is gevent's and
gunicorn's own.

It is an option, measured for the Durable Streams server
(``docs/durable-streams.md``); the default recipe stays ``-k gevent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from gevent.pywsgi import format_date_time
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from ._direct import ONE_WRITE_BYTES, send_whole

#: The standard library's limits (``http.client``): longer lines or more headers get a 400.
MAX_LINE = 65536
MAX_HEADERS = 100
_IGNORED = ("CONTENT_TYPE", "CONTENT_LENGTH")


class Headers:
    """What gevent's handler reads of a request's headers (``http.client.HTTPMessage``'s API).

    ``status`` is empty, or why the request is refused with a 400.
    """

    __slots__ = ("items_", "first", "status")

    def __init__(self, items: list[tuple[str, str]], status: str = "") -> None:
        self.items_ = items
        self.status = status
        self.first: dict[str, str] = {}
        for key, value in reversed(items):
            self.first[key.lower()] = value

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.first.get(name.lower(), default)

    getheader = get

    def __delitem__(self, name: str) -> None:
        name = name.lower()
        self.items_ = [(k, v) for k, v in self.items_ if k.lower() != name]
        self.first.pop(name, None)

    def items(self) -> list[tuple[str, str]]:
        return list(self.items_)

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")

    @property
    def headers(self) -> Iterator[str]:
        return (f"{key}: {value}\r\n" for key, value in self.items_)


def parse_headers(rfile: Any, max_line: int = MAX_LINE, max_headers: int = MAX_HEADERS) -> Headers:
    """The header lines up to the empty line, as ``http.client.parse_headers`` would keep them.

    A line folded onto the previous one (obsolete in HTTP/1.1) or without a
    colon is refused rather than guessed at, and so is a line longer than
    ``max_line`` bytes (its line break included) or more than ``max_headers`` lines.
    """
    items: list[tuple[str, str]] = []
    while True:
        line = rfile.readline(max_line + 1)
        if len(line) > max_line:
            return Headers(items, "Line too long")
        if line in (b"\r\n", b"\n", b""):
            return Headers(items)
        if len(items) >= max_headers:
            return Headers(items, "Too many headers")
        text = line.decode("latin-1")
        name, colon, value = text.partition(":")
        if not colon or not name or name[0] in " \t" or name != name.rstrip():
            return Headers(items, "Invalid header line")
        items.append((name, value.lstrip(" \t").rstrip("\r\n")))


class Handler(PyWSGIHandler):  # type: ignore[misc]
    """gunicorn's pywsgi handler with :func:`parse_headers` and a lazy access log."""

    provided_date: Any  # gevent's, set per response
    code: Any
    status: Any
    headers_sent: bool
    response_headers: list[Any]
    _holding = False  # in _write_with_headers, for a body short enough to join its head
    _held: Any = None  # the head kept back meanwhile

    def MessageClass(self, rfile: Any, *args: Any) -> Headers:  # noqa: N802 - gevent's name
        return parse_headers(rfile)

    def _headers(self) -> Iterator[tuple[str, str]]:
        """``HTTP_*`` environ entries, as gevent makes them (names with ``_`` dropped)."""
        for name, value in self.headers.items_:
            if "_" in name:
                continue
            key = name.replace("-", "_").upper()
            if key not in _IGNORED:
                yield "HTTP_" + key, value.strip()

    def log_request(self) -> None:
        if self.server.log.access_log_enabled:
            super().log_request()

    def send_whole_response(self, status: str, headers: list[tuple[str, str]], body: bytes) -> bool:
        """Write a whole response, head and body, with one ``send``; whether it did.

        For an application that has its whole answer at once (the Durable Streams fast
        path's): the bytes gevent would write for ``start_response(status, headers)`` and a
        body of ``body`` (``headers`` giving its ``Content-Length``, or none for a 204 or 304),
        without its per-header checks and encodings, which cost more than the rest of a
        short answer's writing. A header with a line break in it (gevent refuses those), a
        body over :data:`ONE_WRITE_BYTES`, a request older than HTTP/1.1 or an answer already
        begun are left to gevent: False.
        A client gone meanwhile closes the connection, as gevent does.
        """
        if self.headers_sent or self.request_version != "HTTP/1.1":
            return False
        if len(body) > ONE_WRITE_BYTES:
            return False  # a catch-up's megabyte: joined to its head, it went out 3x slower
        headers = [*headers, ("Date", _date_text()), *self._closing()]
        lines = [f"HTTP/1.1 {status}\r\n"]
        lines.extend([f"{name}: {value}\r\n" for name, value in headers])
        lines.append("\r\n")
        head = "".join(lines)
        breaks = len(lines)  # one per line: none inside a name, a value or the status
        if head.count("\n") != breaks or head.count("\r") != breaks:
            return False
        try:
            data = head.encode("latin-1") + body
        except UnicodeEncodeError:
            return False  # gevent's start_response explains it
        self.status = status.encode("latin-1")
        self.code = int(status[:3])
        self.response_headers = headers
        self.provided_date = headers[-1][1]
        self.headers_sent = True
        try:
            send_whole(self.socket, data)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            self.code = -self.code
            self.close_connection = True
            return True
        self.response_length += len(data)
        return True

    def _closing(self) -> list[tuple[str, str]]:
        """Headers the handler adds because the connection closes after this response."""
        return []

    def finalize_headers(self) -> None:
        if self.provided_date is None:  # gevent's own Date, formatted once a second
            self.provided_date = _date()
            self.response_headers.append((b"Date", self.provided_date))
        super().finalize_headers()
        closing = self._closing()
        if closing and not any(name.lower() == b"connection" for name, _ in self.response_headers):
            self.response_headers.extend((n.encode(), v.encode()) for n, v in closing)

    def _write_with_headers(self, data: bytes) -> None:
        """gevent's, but a first body write of up to :data:`ONE_WRITE_BYTES` leaves with the
        head in one write (gevent sends the head, then the body: two system calls, two segments
        that a client reads one after the other; a long-poll's answer is a short body).

        The bytes are gevent's own, in its order: :meth:`_sendall` keeps the head back and
        sends it with the next write, the body (framed as a chunk where gevent frames it). A
        longer body keeps the two writes: joining it to its head would copy it.
        """
        if not data or len(data) > ONE_WRITE_BYTES:
            super()._write_with_headers(data)
            return
        self._holding = True
        try:
            super()._write_with_headers(data)
        finally:
            self._holding = False
            head, self._held = self._held, None
        if head is not None:  # nothing followed the head
            self._sendall(head)

    def _sendall(self, data: bytes) -> None:
        """gevent's, but one ``send`` first: a small response leaves in one system call."""
        if self._holding:
            if self._held is None:
                self._held = data  # the head: it goes out with the write that follows
                return
            data, self._held, self._holding = self._held + data, None, False
        try:
            send_whole(self.socket, data)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)


_DATE: list[Any] = [0, b"", ""]  # [second, its Date value, the same as text]


def _date() -> bytes:
    now = int(time.time())
    if _DATE[0] != now:
        value = format_date_time(now)
        _DATE[:] = [now, value, value.decode("latin-1")]
    return _DATE[1]  # type: ignore[no-any-return]


def _date_text() -> str:
    _date()
    return _DATE[2]  # type: ignore[no-any-return]


class PyWSGIWorker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's ``gevent_pywsgi`` worker serving through :class:`Handler`."""

    wsgi_handler = Handler
