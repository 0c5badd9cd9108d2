"""The WSGI fast path: the protocol's hot requests answered before Flask sees them.

An append or a read is a few dozen microseconds of protocol work; Flask's
request context, URL matching, response object and ``after_request`` chain
cost several times that. Registering the blueprint wraps ``app.wsgi_app`` in
:class:`FastPath`, which serves ``GET``, ``HEAD``, ``POST``, ``DELETE`` and
``OPTIONS`` under the blueprint's prefix with the same view code
(:meth:`.DurableStreamsView.handle`) and the same headers, straight from the
environ. Everything else goes through Flask as before: ``PUT``, SSE, flow
streams, and every request while something could make Flask answer it
differently: a context provider (it may read ``flask.request``), any
``before_request``/``after_request``/``teardown_request`` hook or URL value
preprocessor of the app or the blueprint besides our own, another route
under the prefix, or a body whose length is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask, Response
from flask.blueprints import BlueprintSetupState
from werkzeug.http import HTTP_STATUS_CODES

from .._direct import ONE_WRITE_BYTES, is_gunicorn_response, send_whole
from .._handover import HandOver, may_hand_over
from .replies import Reply, common_headers
from .request import FLASK, Req

if TYPE_CHECKING:
    from .blueprint import DurableStreamsView

WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]

_STATUS = {code: f"{code} {phrase.upper()}" for code, phrase in HTTP_STATUS_CODES.items()}
_FAST_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})


def install(view: DurableStreamsView, after_request: Callable[..., Any]) -> Callable[..., None]:
    """A ``Blueprint.record_once`` callback that puts the fast path in front of the app."""

    def record(state: BlueprintSetupState) -> None:
        prefix = (state.url_prefix or "").rstrip("/")
        if not prefix or state.subdomain or state.name_prefix or state.app.url_map.host_matching:
            return  # unusual mounts stay with Flask
        app = state.app
        if not isinstance(app, Flask):
            return
        if getattr(app.wsgi_app, "__func__", None) is not Flask.wsgi_app:
            return  # WSGI middleware already wraps the app: every request goes through it
        endpoint = f"{state.name}.stream"
        app.wsgi_app = FastPath(  # type: ignore[method-assign]
            app, app.wsgi_app, view, prefix, state.name, endpoint, after_request
        )

    return record


class FastPath:
    """WSGI middleware for one mounted Durable Streams blueprint; see the module docstring."""

    def __init__(
        self,
        app: Flask,
        inner: WSGIApp,
        view: DurableStreamsView,
        prefix: str,
        blueprint: str,
        endpoint: str,
        after_request: Callable[..., Any],
    ) -> None:
        self.app = app
        self.inner = inner
        self.view = view
        self.prefix = prefix + "/"
        self.blueprint = blueprint
        self.endpoint = endpoint
        self.after_request = after_request
        self._routes_checked = False
        self._alone = False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path_info: str = environ.get("PATH_INFO", "")
        if (
            not path_info.startswith(self.prefix)
            or environ.get("REQUEST_METHOD") not in _FAST_METHODS
            or not self.enabled()
        ):
            return self.inner(environ, start_response)
        path = path_info[len(self.prefix) :]
        if not path or path[0] == "/" or "//" in path:
            return self.inner(environ, start_response)  # Flask's own slash handling
        stream = environ.get("wsgi.input")
        length = environ.get("CONTENT_LENGTH")
        if length and not length.isdigit():  # Flask's own 400
            return self.inner(environ, start_response)
        if environ["REQUEST_METHOD"] == "POST" and not (
            length or environ.get("wsgi.input_terminated")
        ):
            return self.inner(environ, start_response)
        try:
            path = path.encode("latin-1").decode()
        except UnicodeError:
            return self.inner(environ, start_response)
        req = Req(environ, stream, fast=True)  # type: ignore[arg-type]
        result = self.view.handle(req, path)
        if result is FLASK:
            return self.inner(environ, start_response)
        if isinstance(result, Response):  # pragma: no cover - the views answer Replies here
            return result(environ, start_response)
        assert isinstance(result, Reply)
        return _send(result, req, start_response, self.view.handover)

    def enabled(self) -> bool:
        """Whether Flask would answer exactly what the view answers on its own."""
        app = self.app
        if self.view.context_provider is not None or app.config.get("MAX_CONTENT_LENGTH"):
            return False  # the provider, and Flask's own body limit, are Flask's to apply
        blueprint = self.blueprint
        for hooks in (
            app.before_request_funcs,
            app.teardown_request_funcs,
            app.url_value_preprocessors,
        ):
            if hooks.get(None) or hooks.get(blueprint):  # every request: no generator
                return False
        if app.after_request_funcs.get(None):
            return False
        for hook in app.after_request_funcs.get(blueprint, ()):
            if hook is not self.after_request:
                return False
        if not self._routes_checked:
            # Another rule under the prefix (more specific than ours) would win in Flask.
            self._alone = not any(
                rule.rule.startswith(self.prefix) and rule.endpoint != self.endpoint
                for rule in app.url_map.iter_rules()
            )
            self._routes_checked = True
        return self._alone


def _send(reply: Reply, req: Req, start_response: Any, handover: bool) -> Iterable[bytes]:
    """The reply as Flask would send it (``to_response`` then ``add_common_headers``).

    With ``handover``, a reply written whole under gunicorn's gevent worker may hand its
    keep-alive connection over to gevent's handler (:mod:`.handover`).
    """
    status = reply.status
    headers = reply.headers
    body = reply.body
    out = list(headers.items())
    if body and "Content-Type" not in headers:
        out.append(("Content-Type", "text/plain; charset=utf-8"))
    if status not in (204, 304) and not 100 <= status < 200:  # no entity headers on a 304
        out.append(("Content-Length", str(len(body))))
    origin = req.environ.get("HTTP_ORIGIN")
    out.extend(common_headers(origin, req.method, "Cache-Control" in headers))
    if not body or req.method == "HEAD":
        body = b""  # the head alone (an append's 204, a HEAD)
    line = _STATUS.get(status, str(status))
    # gevent's handler as this package runs it (PyWSGIWorker, a handed-over connection)
    send_whole_response = getattr(getattr(start_response, "__self__", None),
                                  "send_whole_response", None)  # fmt: skip
    if send_whole_response is not None and send_whole_response(line, out, body):
        return []
    start_response(line, out)
    if not _sent_whole(start_response, body):
        return [body] if body else []
    if handover and may_hand_over(req.environ, start_response.__self__):
        return HandOver(req.environ, start_response.__self__)
    return []


def _sent_whole(start_response: Any, body: bytes) -> bool:
    """Under gunicorn, write the response's head and body in one ``send``; whether it did.

    gunicorn writes the head and the body of a response with two system calls
    (and two segments the client reads one after the other); a long-poll's or
    a short catch-up's answer is one short body. A longer one keeps the two
    writes: joining it to its head would copy it, which costs more than a call.
    The head is the one gunicorn would have written (its ``default_headers``
    and the headers it kept), and its response is told the body is out, so its
    keep-alive, access log and closing go on as usual. An empty ``body`` writes
    the head alone, for an answer without one (gunicorn's own write of it is a
    ``sendall``, which costs a system call more).
    """
    owner: Any = getattr(start_response, "__self__", None)
    if not is_gunicorn_response(owner):
        return False
    # A body gunicorn would drop (HEAD, 204, 304) is never passed: only its head is written.
    if (
        len(body) > ONE_WRITE_BYTES
        or owner.headers_sent
        or owner.chunked
        or (body and owner.response_length != len(body))
    ):
        return False
    head = owner.default_headers()
    head.extend(["%s: %s\r\n" % (k, v) for k, v in owner.headers])  # noqa: UP031 - as gunicorn
    head.append("\r\n")
    owner.headers_sent = True
    try:
        send_whole(owner.sock, "".join(head).encode("latin-1") + body)
    except OSError:
        owner.force_close()  # the client is gone: gunicorn closes the connection
        return True
    owner.sent = len(body)
    return True
