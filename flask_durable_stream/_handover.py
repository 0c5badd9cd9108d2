"""Keep-alive connections handed from one handler to another: a Durable Streams client's,
from gunicorn's gevent worker to gevent's WSGI handler, and a live stream's, once the
stream's sink has sent it whole (see "a connection after a stream" below).

A Durable Streams client makes many short requests on one connection: a
writer one append after another, a reader one long-poll after another.
gunicorn's ``gevent`` worker parses each of them with its own HTTP parser and
builds each environ and response through several layers, which costs about as
much CPU as the append itself (``docs/durable-streams.md``, "The connection
after the first request"); gevent's WSGI handler, as :mod:`.gunicorn_worker`
runs it, costs about half as much. So once the fast path has answered a
request whole on such a connection, and the connection stays open, the rest
of it is served by that handler (``HandedOver``), in the same greenlet:

* the bytes gunicorn's parser has already read past the request (a pipelined
  next request) are taken from its buffer and read first;
* every later request on the connection, whatever its path, goes to the same
  WSGI application gunicorn calls, with gevent's environ (as under
  ``-k gevent_pywsgi``) plus gunicorn's ``gunicorn.socket`` and URL scheme
  (a trusted proxy's ``secure_scheme_headers``);
* gunicorn's rules go on: the next request is awaited for ``keepalive``
  seconds, each request counts towards ``max_requests``, a stopping worker
  (gunicorn's ``alive`` cleared) answers the request it is reading and then
  closes the connection, the access log gets a line per request in gunicorn's
  format, gunicorn's request limits give its 414 and 431, and the connection is
  still one of the worker's ``worker_connections`` that a graceful stop waits for.

The handover happens in the ``close`` of the first response, after gunicorn
has written its access log line; it never happens when something could tell
the difference: TLS, the PROXY protocol, a ``SCRIPT_NAME``, a ``pre_request``
or ``post_request`` hook of the configuration, a WSGI middleware that wraps the
response's body, a body gunicorn has not read to its end, a response gunicorn
closes, or a worker that is not gunicorn's ``gevent`` one. It is on by default
(``durable_streams_server(handover=False)`` or ``DURABLE_STREAM_DS_HANDOVER =
False`` keep every request with gunicorn).
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

from . import _responses

log = logging.getLogger("flask_durable_stream")

#: gunicorn worker -> {listener name: the server object its handed-over connections use}.
_SERVERS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def may_hand_over(environ: dict[str, Any], response: Any) -> bool:
    """Whether the connection of a request answered whole through gunicorn's ``response``
    may be handed over: it stays open and its request's body has been read to its end."""
    if response.should_close():
        return False
    body = environ.get("wsgi.input")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    return (
        getattr(reader, "length", None) == 0  # gunicorn's LengthReader, read to its end
        and not getattr(body, "failed", True)
        and getattr(body, "buf", None) is not None
        and body.buf.tell() == 0  # type: ignore[union-attr]
        and hasattr(unreader, "take_buffered")
    )


class HandOver:
    """The (empty) body of a response answered whole; its ``close`` hands the connection over.

    gunicorn calls ``close`` once the response is out and its access log line
    written; whatever stops the handover there leaves the connection to
    gunicorn as if nothing had happened.
    """

    __slots__ = ("environ", "response")

    def __init__(self, environ: dict[str, Any], response: Any) -> None:
        self.environ = environ
        self.response = response

    def __iter__(self) -> Any:
        return iter(())

    def close(self) -> None:
        found = _gunicorn_frame(sys._getframe(1))
        if found is None:
            return
        worker, req, listener_name, sock, addr = found
        trusted = getattr(req, "_peer_is_trusted_proxy", None)
        if trusted is None or not _worker_allows(worker) or self.environ.get("SCRIPT_NAME"):
            return  # SCRIPT_NAME: from gunicorn's environment or a proxy's header
        unreader = self.environ["wsgi.input"].reader.unreader
        pending: bytes = unreader.take_buffered()
        self.response.force_close()  # gunicorn's loop ends after this request; we go on
        server = _server(worker, listener_name)
        handler = server.handler_class(sock, addr, server, _reader(sock, pending))
        handler.trusted_proxy = bool(trusted())  # gunicorn's decision, as for every request
        handler.handle()


def _gunicorn_frame(frame: Any) -> tuple[Any, Any, Any, Any, Any] | None:
    """(worker, its request, listener name, socket, client address) when ``frame`` is the
    gevent worker's ``handle_request``, else None.

    Only gunicorn's own call of ``close`` hands over: a WSGI middleware that wraps the
    response's body (and so calls its ``close``) may still hold the first request's state
    (a tracing scope, a context variable) around that call, which the connection's later
    requests would then run inside.
    """
    if frame is None or frame.f_code.co_name != "handle_request":
        return None
    try:
        ggevent = _gunicorn("workers.ggevent")
    except ImportError:  # pragma: no cover - a gunicorn response without gunicorn's gevent
        return None
    local = frame.f_locals
    worker = local.get("self")
    if not isinstance(worker, ggevent.GeventWorker) or worker.server_class is not None:
        return None
    try:
        return worker, local["req"], local["listener_name"], local["sock"], local["addr"]
    except KeyError:  # pragma: no cover - another gunicorn's signature
        return None


@functools.cache  # import_module runs ~90 bytecode instructions even once imported
def _gunicorn(module: str) -> Any:
    """A module of gunicorn, imported when first needed (and untyped: gunicorn has no types)."""
    return importlib.import_module("gunicorn." + module)


def _worker_allows(worker: Any) -> bool:
    """Whether a connection of ``worker`` may be handed over after a request answered whole."""
    if not _keeps_connections(worker):
        return False
    settings = worker.cfg.settings
    return all(settings[name].value is settings[name].default for name in _HOOKS)


def _keeps_connections(worker: Any) -> bool:
    """Whether ``worker`` serves on a connection after its request, and lets another
    serve it the same: alive, with ``keepalive``, neither TLS nor the PROXY protocol."""
    cfg = worker.cfg
    if not worker.alive or not cfg.keepalive or cfg.is_ssl:
        return False
    # The PROXY line (a connection's first) has addresses that are gunicorn's to apply.
    return getattr(cfg, "proxy_protocol", False) in (False, "off")


#: gunicorn's per-request hooks: a configuration that sets one keeps every request with gunicorn.
_HOOKS = ("pre_request", "post_request")


def _server(worker: Any, listener_name: Any) -> Any:
    """The server object a handed-over connection's handler uses: gevent's ``WSGIServer``
    as gunicorn's ``gevent_pywsgi`` worker makes it, never started (no socket of its own)."""
    servers = _SERVERS.setdefault(worker, {})
    server = servers.get(listener_name)
    if server is None:
        ggevent = _gunicorn("workers.ggevent")
        limits: Any = importlib.import_module("flask_durable_stream.gunicorn_worker")
        environ = _gunicorn("http.wsgi").base_environ(worker.cfg)
        environ.update({"wsgi.multithread": True, "SERVER_SOFTWARE": ggevent.VERSION})
        if isinstance(listener_name, tuple):
            environ["SERVER_NAME"] = str(listener_name[0])
            environ["SERVER_PORT"] = str(listener_name[1])
        else:  # a Unix socket
            environ["SERVER_NAME"] = environ["SERVER_PORT"] = ""
        server = ggevent.PyWSGIServer(
            ("127.0.0.1", 0),  # never bound: only handlers use this server
            application=worker.wsgi,
            spawn=None,
            log=worker.log,
            handler_class=_handler_class(),
            environ=environ,
        )
        server.worker = worker
        # gunicorn's settings a handed-over request reads, looked up once (gunicorn's Config
        # finds each through __getattr__); a reloaded configuration comes with new workers.
        cfg = worker.cfg
        server.keepalive = cfg.keepalive
        server.max_request_line = cfg.limit_request_line
        size = cfg.limit_request_field_size
        server.max_line = size + 2 if size > 0 else limits.MAX_LINE  # its line break counts
        fields = cfg.limit_request_fields
        server.max_headers = fields if fields > 0 else limits.MAX_HEADERS
        server.secure_headers = {k.lower(): v for k, v in cfg.secure_scheme_headers.items()}
        servers[listener_name] = server
    return server


class _SocketReader(io.RawIOBase):
    """A socket read as a raw stream (for gevent's handler's buffered reader)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        try:
            return self._sock.recv_into(buffer)  # type: ignore[no-any-return]
        except BlockingIOError:  # a socket told not to wait (see _read_ahead)
            return None


class _Replayed:
    """A connection's socket, whose first bytes (read already by the server that served
    it until now) ``recv`` and ``recv_into`` give again."""

    def __init__(self, sock: Any, first: bytes) -> None:
        self._sock = sock
        self._first = memoryview(first)

    def recv(self, size: int) -> bytes:
        first = self._first
        if not first:
            return self._sock.recv(size)  # type: ignore[no-any-return]
        self._first = first[size:]
        return bytes(first[:size])

    def recv_into(self, buffer: Any, size: int = 0) -> int:
        first = self._first
        if not first:
            return self._sock.recv_into(buffer, size)  # type: ignore[no-any-return]
        n = min(size or len(buffer), len(first))
        buffer[:n] = first[:n]
        self._first = first[n:]
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _reader(sock: Any, first: bytes) -> io.BufferedReader:
    """gevent's handler's reader of a connection whose ``first`` bytes were read already."""
    return io.BufferedReader(_SocketReader(_Replayed(sock, first) if first else sock), 8192)


# -- a connection after a stream whose response ended early -------------------------
#
# A live stream's response can end as soon as its headers are out, its connection
# taken over by the stream's sink (``DURABLE_STREAM_DETACH_RESPONSE``, see
# ``flask_durable_stream._direct``). Once the sink has sent the stream's last frame,
# the connection is served on, in a greenlet of its own, by what would have served it
# had the response gone on: gunicorn's ``gevent`` worker (its ``handle``, as for a new
# connection) or gevent's handler of the server (a pywsgi worker's, gevent's
# WSGIServer's, :class:`HandedOver`), with the bytes read past the request first.


class After:
    """How to serve a taken-over connection on after its stream, kept by the sink for the
    stream's length."""

    __slots__ = ("_serve", "_alive", "pool")

    def __init__(
        self, serve: Callable[[Any], None], alive: Callable[[], bool], pool: Any = None
    ) -> None:
        self._serve = serve  # called with the connection's gevent socket
        self._alive = alive  # whether the server still serves
        self.pool = pool  # the server's pool, which then counts the connection


class Taking:
    """What a live stream's sink learns from the server of ``owner`` (the server's response
    object, or gevent's handler) as it takes the connection over; see :func:`taking`."""

    __slots__ = ("limit", "_after")

    def __init__(self, limit: int | None, after: Callable[[], After | None] | None) -> None:
        #: How many connections the server serves at once at most: gunicorn's
        #: ``worker_connections``, the size of a gevent server's pool; None when unbounded.
        self.limit = limit
        self._after = after

    def after(self) -> After | None:
        """How to serve the connection on once the stream has been sent, or None where it
        must close then: the client did not keep the connection alive, the request's body
        was not read to its end, the server is stopping, or (gunicorn) ``keepalive`` is
        0, TLS or the PROXY protocol. Call it once, after the connection is the sink's
        and before the server is told to close its side (it takes the bytes the server
        read ahead)."""
        if self._after is None:
            return None
        try:
            return self._after()
        except Exception:  # a server's internals not as expected: the connection closes
            log.exception("Cannot serve this connection on after its stream; it will close")
            return None


def taking(owner: Any) -> Taking:
    """The server's side of a live stream's take-over of ``owner``'s connection. Under
    gunicorn, found from the request's frames once."""
    if type(owner).__module__ == "gunicorn.http.wsgi":
        frame = _request_frame()
        found = _gunicorn_frame(frame)
        if found is None:
            return Taking(None, None)
        after = functools.partial(_after_gunicorn, owner, frame, found)
        return Taking(int(found[0].worker_connections), after)
    server = getattr(owner, "server", None)
    worker = getattr(server, "worker", None)  # a handover's server: gunicorn's worker's
    limit: int | None
    if worker is not None:
        limit = int(worker.worker_connections)
    else:
        pool = getattr(server, "pool", None)
        limit = None if pool is None or pool.size is None else int(pool.size)
    pywsgi = sys.modules.get("gevent.pywsgi")
    if pywsgi is not None and isinstance(owner, pywsgi.WSGIHandler):
        return Taking(limit, functools.partial(_after_handler, owner))
    return Taking(limit, None)


def _request_frame() -> Any:
    """gunicorn's ``handle_request`` frame, a few calls up from the response body's first
    step (where a live stream's sink takes the connection over), or None."""
    frame: Any = sys._getframe(1)
    for _ in range(16):
        if frame is None or frame.f_code.co_name == "handle_request":
            return frame
        frame = frame.f_back
    return None


def _after_gunicorn(response: Any, frame: Any, found: tuple[Any, ...]) -> After | None:
    worker, _req, _name, _sock, addr = found
    listener = None
    caller = frame.f_back
    while caller is not None and listener is None:  # gunicorn's handle(listener, client, addr)
        if caller.f_code.co_name == "handle":
            listener = caller.f_locals.get("listener")
        caller = caller.f_back
    environ = frame.f_locals.get("environ")
    if (
        listener is None
        or not isinstance(environ, dict)
        or not _keeps_connections(worker)
        or not may_hand_over(environ, response)
    ):
        return None
    pending: bytes = environ["wsgi.input"].reader.unreader.take_buffered()

    def serve(sock: Any) -> None:
        # No pool counts this connection: a graceful stop waits for it (at most its
        # keep-alive wait for the next request, then gunicorn closes it: not alive).
        busy = _responses.busy()
        try:
            worker.handle(listener, _Replayed(sock, pending) if pending else sock, addr)
        finally:
            _responses.idle(busy)

    return After(serve, lambda: bool(worker.alive))


def _after_handler(handler: Any) -> After | None:
    server = handler.server
    worker = getattr(server, "worker", None)  # a handover's server, never started itself
    body = getattr(handler, "environ", {}).get("wsgi.input")
    if (
        handler.close_connection
        or not (worker.alive if worker is not None else server.started)
        or body is None
        or body.chunked_input
        or body.content_length is None
        or body.position < int(body.content_length)
    ):
        return None
    handler_class, addr, pending = type(handler), handler.client_address, _read_ahead(handler)
    trusted = handler.trusted_proxy if worker is not None else None
    # gevent's handler would read out (and lose) what the client sent next, then close
    # the socket; the sink's duplicate is the connection now.
    handler.socket = _Released(handler.socket)

    def serve(sock: Any) -> None:
        served = handler_class(sock, addr, server, _reader(sock, pending))
        if trusted is not None:  # HandedOver, which no pool counts
            served.trusted_proxy = trusted
            served.counted = True
        served.handle()

    if worker is not None:
        return After(serve, lambda: bool(worker.alive))
    return After(serve, lambda: bool(server.started), getattr(server, "pool", None))


class _Released:
    """A handler's socket once a stream's sink has taken the connection over: closing it
    closes the handler's descriptor, and there is nothing to read out (``_sock``)."""

    __slots__ = ("_socket",)
    _sock = None

    def __init__(self, socket: Any) -> None:
        self._socket = socket

    def close(self) -> None:
        self._socket.close()


def _read_ahead(handler: Any) -> bytes:
    """What ``handler``'s reader holds past its request, read without waiting for more."""
    sock, rfile = handler.socket, handler.rfile
    timeout = sock.gettimeout()
    sock.settimeout(0.0)  # its reader's next read from it says "nothing now"
    try:
        held: bytes = rfile.peek()
        return rfile.read(len(held)) if held else b""
    finally:
        sock.settimeout(timeout)


def continue_after(after: After, raw: Any, closed: Callable[[], None]) -> None:
    """Serve the connection of ``raw`` (a non-blocking OS socket, whose response has been
    sent whole) on, in a greenlet of the server's pool where it has one (which it then
    counts, and a graceful stop waits for), else of its own. A full pool closes it.
    ``closed`` is called once the connection is closed."""
    import gevent

    pool = after.pool
    if pool is None:
        gevent.spawn(serve_after, after, raw, closed)
    elif pool.full():
        raw.close()
        closed()
    else:
        pool.spawn(serve_after, after, raw, closed)


def serve_after(after: After, raw: Any, closed: Callable[[], None]) -> None:
    """Serve ``raw``'s connection as ``after`` says, unless the server has stopped
    meanwhile. Closes ``raw``, then calls ``closed``."""
    from gevent import socket as gsocket

    try:
        sock = gsocket.socket(fileno=raw.detach())
    except BaseException:
        closed()
        raise
    try:
        if after._alive():
            after._serve(sock)
    finally:
        sock.close()
        closed()


@functools.cache
def _handler_class() -> Any:
    """:class:`HandedOver`, made on first use: gunicorn is imported only under gunicorn."""
    worker_module: Any = importlib.import_module("flask_durable_stream.gunicorn_worker")
    handler: Any = worker_module.Handler
    parse_headers = worker_module.parse_headers

    class HandedOver(handler):  # type: ignore[misc]
        """:class:`..gunicorn_worker.Handler` with gunicorn's worker's rules for a connection
        (``keepalive``, ``max_requests``, a stopping worker, the request limits) and its
        ``gunicorn.socket``."""

        _body_bytes = 0
        #: Whether the peer may set the scheme (gunicorn's ``forwarded_allow_ips``).
        trusted_proxy = False
        _scheme = "http"
        response_length: int  # gevent's count of the bytes sent

        #: Whether a graceful stop waits for the request being answered (:func:`serve_after`:
        #: no server counts the connection); its token meanwhile.
        counted = False
        _answering: object = None

        def handle_one_request(self) -> Any:
            if not self.server.worker.alive:
                return None
            self._body_bytes = 0
            # gunicorn's wait for the next request's head: keepalive seconds, then the close.
            self.socket.settimeout(self.server.keepalive)
            try:
                return super().handle_one_request()
            finally:
                token, self._answering = self._answering, None
                if token is not None:
                    _responses.idle(token)

        def MessageClass(self, rfile: Any, *args: Any) -> Any:  # noqa: N802 - gevent's name
            # gunicorn's limits: --limit-request-field_size, --limit-request-fields
            return parse_headers(rfile, self.server.max_line, self.server.max_headers)

        def read_request(self, raw_requestline: str) -> Any:
            limit = self.server.max_request_line  # --limit-request-line
            if limit > 0 and len(raw_requestline.rstrip("\r\n")) > limit:
                raise _Refused("414 URI Too Long", "Request Line is too large")
            try:
                result = super().read_request(raw_requestline)
            except ValueError:
                status = getattr(self.headers, "status", "")
                if status in ("Line too long", "Too many headers"):  # parse_headers' limits
                    raise _Refused("431 Request Header Fields Too Large", status) from None
                raise
            self.socket.settimeout(None)  # the head is in; the rest waits as under gunicorn
            if self.counted:
                self._answering = _responses.busy()
            worker = self.server.worker
            worker.nr += 1
            if worker.nr >= worker.max_requests and worker.alive:
                worker.log.info("Autorestarting worker after current request.")
                worker.alive = False
            if not worker.alive:
                self.close_connection = True
            if result and self.trusted_proxy:
                self._scheme = _scheme(self.headers.items_, self.server.secure_headers)
            return result

        def _handle_client_error(self, ex: Exception) -> Any:
            if isinstance(ex, _Refused):  # gunicorn's status for it, then the close
                return ex.status[:3], ex.response()
            return super()._handle_client_error(ex)

        def _closing(self) -> list[tuple[str, str]]:
            # gunicorn says so on a connection's last response
            if self.close_connection and self.request_version == "HTTP/1.1":
                return [("Connection", "close")]
            return []

        def send_whole_response(
            self, status: str, headers: list[tuple[str, str]], body: bytes
        ) -> bool:
            if not super().send_whole_response(status, headers, body):
                return False
            self._body_bytes += len(body)
            return True

        def _write(self, data: bytes) -> None:
            super()._write(data)
            self._body_bytes += len(data)

        def log_request(self) -> None:
            # gunicorn's log counts the body's bytes (its %(B)s); gevent's count has the head.
            sent, self.response_length = self.response_length, self._body_bytes
            try:
                super().log_request()
            finally:
                self.response_length = sent

        def get_environ(self) -> Any:
            env = super().get_environ()
            env["wsgi.url_scheme"] = self._scheme
            env["gunicorn.socket"] = self.socket
            return env

    return HandedOver


def _scheme(headers: list[tuple[str, str]], secure_headers: dict[str, str]) -> str:
    """The URL scheme gunicorn gives a request from a trusted proxy: a header of its
    ``secure_scheme_headers`` (here by lowercase name) with its secure value makes it
    ``https``; two that disagree are a 400 (a ``ValueError`` here, as gevent's handler
    answers one)."""
    scheme = None
    for name, value in headers:
        secure = secure_headers.get(name.lower())
        if secure is None:
            continue
        this = "https" if value == secure else "http"
        if scheme is not None and this != scheme:
            raise ValueError("Contradictory scheme headers")
        scheme = this
    return scheme or "http"


class _Refused(ValueError):
    """A request over one of gunicorn's limits: answered with gunicorn's status, then closed."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status

    def response(self) -> bytes:
        body = str(self).encode()
        return b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: text/plain\r\n" % (
            self.status.encode()
        ) + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
