"""HTTP: the per-flow view (Genkit's ``expressHandler`` analogue) and the blueprint factory.

One POST endpoint per flow speaks Genkit's protocol (see :mod:`.protocol`):
a new call starts the flow in the runner and streams it; the same POST with an
``x-genkit-stream-id`` header reattaches to a stream through the manager and
replays it from the start. ``POST <flow>/cancel`` with that header asks the
stream's flow to stop, wherever it runs. ``GET <flow>/events?streamId=<id>`` is
the same stream as standard Server-Sent Events for ``EventSource``: ids are
sequence numbers, so ``Last-Event-ID`` (or ``?after=<seq>``) resumes after the
last event received. Every bad input gets a JSON error with a 4xx status.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_input_stream

from . import protocol
from ._concurrency import gevent_patched
from .exceptions import (
    HTTP_STATUS,
    DurableStreamError,
    InvalidRequest,
    StorageUnavailable,
    StreamNotFound,
)
from .flows import Flow, RequestData
from .managers.base import Event, StreamManager, StreamStatus, valid_stream_id
from .managers.memory import InMemoryStreamManager
from .run import DEFAULT_BUFFER_LIMIT
from .runner import (
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_WRITE_RETRY_TIMEOUT,
    Runner,
    runner_for,
)

log = logging.getLogger("flask_durable_stream")

ContextProvider = Callable[[RequestData], Mapping[str, Any] | None]

DEFAULT_MAX_CONTENT_LENGTH = 1024 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 15.0
#: Batches read ahead from storage for one SSE connection under gevent.
SSE_QUEUED_BATCHES = 4
_END = object()


class _StreamResponse(Response):
    """Sends status and headers before the first frame, so the client learns the
    stream id at once even when the first chunk takes a minute."""

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        app_iter, status, headers = self.get_wsgi_response(environ)
        write = start_response(status, headers)
        write(b"")
        return app_iter


def _checked_stream_id(
    stream_id: str | None, name: str, where: str, *, required: bool
) -> str | None:
    """A stream id from the request, or a 400 naming the field it came from."""
    if stream_id is None:
        if required:
            raise InvalidRequest(f"Missing {name} {where}.")
        return None
    if not valid_stream_id(stream_id):
        raise InvalidRequest(f"Invalid {name}: expected 1-128 characters of [A-Za-z0-9_.-].")
    return stream_id


def _owner_of(context: Mapping[str, Any]) -> str | None:
    """The owner a context provider assigned to the request (``"owner"``), if any."""
    owner = context.get("owner")
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner:
        raise TypeError("the context provider's 'owner' must be a non-empty string")
    return owner


def _check_owner(owner: str | None, context: Mapping[str, Any]) -> None:
    """An owned stream is for its owner only: reading, following and cancelling it."""
    if owner is not None and _owner_of(context) != owner:
        raise InvalidRequest("This stream belongs to another user.", status="PERMISSION_DENIED")


#: A canonical event id: no sign, no spaces, no leading zeros, no exponent.
_EVENT_ID_RE = re.compile(r"(?:0|[1-9][0-9]{0,18})")


def _after_seq(last_event_id: str | None, after: str | None) -> int:
    """The seq to resume after: ``Last-Event-ID`` (newer, sent on reconnect) over ``?after=``.

    Only canonical non-negative integers: an id the server never sent ("+1",
    " 1", "01", "1e3") is a client bug worth a 400, not a guess.
    """
    raw = last_event_id if last_event_id not in (None, "") else after
    if raw in (None, ""):
        return -1
    assert raw is not None
    if not _EVENT_ID_RE.fullmatch(raw):
        raise InvalidRequest(
            "Last-Event-ID and after must be an event id: a non-negative integer"
            " without sign, spaces or leading zeros."
        )
    return int(raw)


def _json_response(body: Any, status: int) -> Response:
    return Response(protocol.encode(body), status=status, mimetype="application/json")


def public_error(exc: DurableStreamError, backend: str = "storage") -> dict[str, Any]:
    """The body a client sees for ``exc``.

    Backends word a :class:`StorageUnavailable` for clients (no file path, host
    or credentials: the contract in :mod:`.managers.base`); an empty one gets a
    generic message naming the backend.
    """
    if isinstance(exc, StorageUnavailable):
        log.warning("storage unavailable: %s", exc.message)
        message = exc.message or f"The {backend} backend is unavailable; try again shortly."
        return {"status": "UNAVAILABLE", "message": message}
    return exc.to_dict()


def error_response(exc: DurableStreamError, backend: str = "storage") -> Response:
    response = _json_response(public_error(exc, backend), exc.http_status)
    if isinstance(exc, StorageUnavailable):
        response.headers["Retry-After"] = "1"
    return response


def _closer(environ: Mapping[str, Any]) -> Callable[[], None] | None:
    """A way to close the client's connection from another task (gunicorn, werkzeug).

    A slow reader's task is blocked writing to its socket; shutting the socket
    down wakes it with an error, which ends the response.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    # gevent's socket wraps the OS one as ``_sock``. Shutting that one down lets the
    # blocked send fail as a client disconnect (EPIPE, which servers ignore) rather
    # than gevent cancelling the wait with an error that servers log as a crash.
    raw: Any = getattr(sock, "_sock", sock)
    if not callable(getattr(raw, "shutdown", None)):
        return None

    def close() -> None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    return close


class FlowEndpoint:
    """The view function of one flow. Build it with :func:`flow_view`."""

    def __init__(
        self,
        name: str,
        flow: Flow,
        *,
        runner: Runner,
        context_provider: ContextProvider | None = None,
        max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
        subscribe_timeout: float | None = None,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        sse_lifetime: float | None = None,
    ) -> None:
        if not callable(flow):
            raise TypeError(f"flow {name!r} is not callable")
        self.name = self.__name__ = name
        self.flow = flow
        self.runner = runner
        self.context_provider = context_provider
        self.max_content_length = max_content_length
        self.subscribe_timeout = subscribe_timeout
        self.keepalive_interval = keepalive_interval
        self.sse_lifetime = sse_lifetime

    @property
    def manager(self) -> StreamManager | None:
        return self.runner.manager

    @property
    def backend(self) -> str:
        manager = self.runner.manager
        return manager.display_name if manager is not None else "storage"

    def __call__(self) -> Response:
        return self._guarded(self._handle)

    def cancel(self) -> Response:
        """The view of ``POST <flow>/cancel``: ask a stream's flow to stop.

        202 ``{"streamId": ..., "status": "cancelling"}`` when the stream was open:
        a flow in this process sees the request at once, one in another process at
        its next heartbeat. 409 ``FAILED_PRECONDITION`` with ``streamStatus`` when
        it had already ended, 404 for an unknown or expired id, 400 without a valid
        ``x-genkit-stream-id``. The context provider sees the request first (with
        ``stream_id`` set), so it can refuse it.
        """
        return self._guarded(self._cancel)

    def events(self) -> Response:
        """The view of ``GET <flow>/events?streamId=<id>[&after=<seq>]``: standard SSE.

        Each event is ``id: <seq>`` plus ``data: <JSON>``: chunks as default
        ``message`` events, then ``event: result`` (the output) or ``event: failure``
        (``{"status", "message"}``), after which the connection closes. A reconnect
        with ``Last-Event-ID`` (EventSource sends it by itself) or ``?after=`` gets
        the events after that seq; once nothing follows an ended stream, 204 (which
        stops EventSource). Under gevent a ``: keep-alive`` comment goes out after
        ``keepalive_interval`` seconds of silence, and with ``sse_lifetime`` the
        connection is closed after that many seconds for the client to resume.
        """
        return self._guarded(self._events)

    def _guarded(self, handle: Callable[[], Response]) -> Response:
        try:
            return handle()
        except DurableStreamError as exc:
            return error_response(exc, self.backend)
        except Exception:  # a bug in a context provider or a backend: logged, redacted
            log.exception("flow %r: request failed", self.name)
            return _json_response(protocol.INTERNAL_ERROR, 500)

    @staticmethod
    def _stream_id(*, required: bool) -> str | None:
        return _checked_stream_id(
            request.headers.get(protocol.STREAM_ID_HEADER),
            protocol.STREAM_ID_HEADER,
            "header",
            required=required,
        )

    def _cancel(self) -> Response:
        stream_id = self._stream_id(required=True)
        assert stream_id is not None
        self._read_body(allow_empty=True)  # a body, if any, must still be sane
        context = self._context(None, stream_id)
        manager = self.manager
        info = manager.info(stream_id) if manager is not None else None
        if info is not None:
            _check_owner(info.owner, context)
        local = self.runner.request_cancel(stream_id)  # a flow of this process stops at once
        if manager is None or info is None:
            if local:
                return self._cancelling(stream_id)
            raise StreamNotFound("Stream not found.")
        try:
            # Stored too, so every process (and a reader of the stream) sees it.
            if manager.request_cancel(stream_id) or local:
                return self._cancelling(stream_id)
        except StreamNotFound:
            if local:
                return self._cancelling(stream_id)
            raise StreamNotFound("Stream not found.") from None
        ended = manager.info(stream_id)  # it ended before the flag landed: say how
        if ended is None:  # and expired meanwhile
            raise StreamNotFound("Stream not found.")
        body = {
            "status": "FAILED_PRECONDITION",
            "message": "Stream already ended.",
            "streamStatus": ended.status.value,
        }
        return _json_response(body, 409)

    def _events(self) -> Response:
        stream_id = _checked_stream_id(
            request.args.get("streamId") or request.headers.get(protocol.STREAM_ID_HEADER),
            "streamId",
            "query parameter",
            required=True,
        )
        assert stream_id is not None
        after = _after_seq(request.headers.get("Last-Event-ID"), request.args.get("after"))
        context = self._context(None, stream_id)
        manager = self.manager
        info = manager.info(stream_id) if manager is not None else None
        if manager is None or info is None:
            raise StreamNotFound("Stream not found.")
        _check_owner(info.owner, context)
        if info.status is not StreamStatus.OPEN and after >= info.last_seq:
            return Response(status=204)  # nothing follows: EventSource stops reconnecting
        try:
            batches = manager.subscribe_batches(
                stream_id, after=after, timeout=self.subscribe_timeout
            )
        except StreamNotFound:
            raise StreamNotFound("Stream not found.") from None
        response = _StreamResponse(self._sse(batches), status=200, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    def _sse(self, batches: Iterator[list[Event]]) -> Iterator[bytes]:
        deadline = None if self.sse_lifetime is None else time.monotonic() + self.sse_lifetime
        source: Iterator[list[Event] | None] = (
            self._with_keepalives(batches, deadline) if gevent_patched() else iter(batches)
        )
        try:
            yield protocol.SSE_RETRY
            for batch in source:
                if batch is None:
                    yield protocol.SSE_KEEPALIVE
                else:
                    yield protocol.sse_events(batch)
                if deadline is not None and time.monotonic() >= deadline:
                    return  # the client resumes with Last-Event-ID
        except DurableStreamError as exc:
            # Not the stream's end: the connection closes and the client resumes, and a
            # stream that is gone then gets its 404. A comment says why, for logs only.
            log.info("SSE connection ended: %s", exc)
            body = public_error(exc, self.backend)
            yield protocol.sse_comment("failure " + protocol.encode(body))
        except Exception:
            log.exception("reading a stream failed")
            yield protocol.sse_comment("failure " + protocol.encode(protocol.INTERNAL_ERROR))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _with_keepalives(
        self, batches: Iterator[list[Event]], deadline: float | None
    ) -> Iterator[list[Event] | None]:
        """``batches``, with ``None`` after every ``keepalive_interval`` of silence and at
        the ``deadline`` (gevent).

        The subscription runs in its own greenlet, killed when the client goes away,
        so a silent stream does not keep a reader waiting for its timeout.
        """
        import gevent.queue

        # Bounded: for a client that stops reading, the subscription stops reading
        # storage instead of piling the stream up in this process.
        queue: gevent.queue.Queue[Any] = gevent.queue.Queue(maxsize=SSE_QUEUED_BATCHES)

        def pump() -> None:
            try:
                for batch in batches:
                    queue.put(batch)
                queue.put(_END)
            except Exception as exc:
                queue.put(exc)

        task = self.runner.tasks.spawn(pump, name="durable-stream-sse")
        try:
            while True:
                wait = self.keepalive_interval
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                try:
                    item = queue.get(timeout=wait)
                except gevent.queue.Empty:
                    yield None
                    continue
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            task.kill(timeout=5)

    def _check_owner_of(self, stream_id: str, context: Mapping[str, Any]) -> None:
        """For a reconnect: an owned stream is its owner's only (an unknown id passes)."""
        assert self.manager is not None
        info = self.manager.info(stream_id)
        if info is not None:
            _check_owner(info.owner, context)

    @staticmethod
    def _cancelling(stream_id: str) -> Response:
        return _json_response({"streamId": stream_id, "status": "cancelling"}, 202)

    def _handle(self) -> Response:
        stream_id = self._stream_id(required=False)
        streaming = protocol.wants_stream(request.headers.get("Accept"), request.args.get("stream"))
        body = self._read_body(allow_empty=stream_id is not None)
        if stream_id is not None:
            context = self._context(body.get("data"), stream_id)
            if self.manager is not None:
                self._check_owner_of(stream_id, context)
            return self._resume(stream_id, streaming)
        if "data" not in body:
            raise InvalidRequest('Request body must be a JSON object with a "data" field.')
        data = body["data"]
        context = self._context(data, None)
        run = self.runner.start(
            self.name,
            self.flow,
            data,
            context=context,
            durable=streaming,
            owner=_owner_of(context),
            live=streaming,
        )
        if streaming:
            headers = {}
            if self.manager is not None:
                headers[protocol.STREAM_ID_HEADER] = run.stream_id
            # A client that stops reading is dropped past the buffer bound: its
            # connection is closed and it can resume from storage.
            batches = run.batches(reader=run.live, on_drop=_closer(request.environ))
            return self._stream(batches, headers, self.backend)
        terminal = run.wait()
        assert terminal is not None
        return self._plain(terminal)

    def _read_body(self, *, allow_empty: bool) -> dict[str, Any]:
        raw = self._read_raw()
        if not raw.strip() and allow_empty:
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError; nesting too deep to parse
            raise InvalidRequest("Request body must be valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidRequest('Request body must be a JSON object with a "data" field.')
        return body

    def _read_raw(self) -> bytes:
        """The body, at most ``max_content_length`` bytes however it is framed.

        Werkzeug's own limit on a chunked body (no Content-Length) silently
        truncates it; reading one byte past the limit tells a body that is too
        large from one that is exactly at it.
        """
        limit = self.max_content_length
        too_large = InvalidRequest(
            f"Request body exceeds {limit} bytes.", status="RESOURCE_EXHAUSTED", http_status=413
        )
        length = request.content_length
        if length is not None and length > limit:
            raise too_large
        # Bounded by Content-Length, or by a server that decodes chunked bodies and says
        # so (wsgi.input_terminated); empty otherwise. The limit is enforced below.
        stream = get_input_stream(request.environ)
        parts: list[bytes] = []
        size = 0
        try:
            while size <= limit:
                part = stream.read(min(64 * 1024, limit + 1 - size))
                if not part:
                    break
                parts.append(part)
                size += len(part)
        except ClientDisconnected:
            raise InvalidRequest("Request body ended early.") from None
        if size > limit:
            raise too_large
        return b"".join(parts)

    def _context(self, data: Any, stream_id: str | None) -> dict[str, Any]:
        if self.context_provider is None:
            return {}
        request_data = RequestData(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            input=data,
            flow=self.name,
            stream_id=stream_id,
        )
        context = self.context_provider(request_data)
        return dict(context or {})

    def _resume(self, stream_id: str, streaming: bool) -> Response:
        if self.manager is None:
            return Response(status=204)
        try:
            batches = self.manager.subscribe_batches(stream_id, timeout=self.subscribe_timeout)
        except StreamNotFound:
            return Response(status=204)
        if streaming:
            return self._stream(batches, {protocol.STREAM_ID_HEADER: stream_id}, self.backend)
        terminal = None
        try:
            for batch in batches:
                terminal = batch[-1]
        except DurableStreamError as exc:
            return error_response(exc, self.backend)
        if terminal is None or not terminal.terminal:
            return error_response(StreamNotFound("Stream already ended."))
        return self._plain(terminal)

    @staticmethod
    def _plain(terminal: Event) -> Response:
        if terminal.kind == protocol.DONE:
            return Response(
                '{"result":' + terminal.payload + "}", status=200, mimetype="application/json"
            )
        body = terminal.value
        return _json_response(body, HTTP_STATUS.get(body.get("status"), 500))

    @staticmethod
    def _stream(batches: Iterator[list[Event]], headers: dict[str, str], backend: str) -> Response:
        def generate() -> Iterator[bytes]:
            try:
                for batch in batches:
                    yield protocol.frames(batch)
            except DurableStreamError as exc:
                yield protocol.error_frame(public_error(exc, backend)).encode()
            except Exception:
                log.exception("reading a stream failed")
                yield protocol.error_frame(protocol.INTERNAL_ERROR).encode()

        response = _StreamResponse(generate(), status=200, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers["Access-Control-Expose-Headers"] = protocol.STREAM_ID_HEADER
        response.headers.update(headers)
        return response


_DEFAULT = object()


def _resolve_manager(stream_manager: Any) -> StreamManager | None:
    if stream_manager is _DEFAULT or stream_manager is None:
        return InMemoryStreamManager()
    if stream_manager is False:
        return None
    if not isinstance(stream_manager, StreamManager):
        raise TypeError("stream_manager must be a StreamManager, None (in-memory) or False (none)")
    return stream_manager


def flow_view(
    flow: Flow,
    *,
    stream_manager: StreamManager | None | bool = None,
    context_provider: ContextProvider | None = None,
    name: str | None = None,
    max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
    subscribe_timeout: float | None = None,
    runner: Runner | None = None,
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    sse_lifetime: float | None = None,
) -> FlowEndpoint:
    """A view for one flow, for ``app.add_url_rule(path, view_func=..., methods=["POST"])``.

    ``stream_manager=None`` gives the view its own :class:`InMemoryStreamManager`;
    ``False`` turns durability off (no stream id, reconnects get 204).
    """
    manager = _resolve_manager(stream_manager) if runner is None else runner.manager
    return FlowEndpoint(
        name or str(getattr(flow, "__name__", "flow")),
        flow,
        runner=runner or runner_for(manager),
        context_provider=context_provider,
        max_content_length=max_content_length,
        subscribe_timeout=subscribe_timeout,
        keepalive_interval=keepalive_interval,
        sse_lifetime=sse_lifetime,
    )


def durable_stream_blueprint(
    flows: Mapping[str, Flow],
    *,
    stream_manager: StreamManager | None | bool = None,
    context_provider: ContextProvider | None = None,
    name: str = "durable_stream",
    import_name: str = __name__,
    max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
    subscribe_timeout: float | None = None,
    write_retry_timeout: float = DEFAULT_WRITE_RETRY_TIMEOUT,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    sse_lifetime: float | None = None,
    live_buffer_bytes: int | None = DEFAULT_BUFFER_LIMIT,
) -> Blueprint:
    """A blueprint with ``POST /<flow name>``, ``POST /<flow name>/cancel`` and
    ``GET /<flow name>/events`` (SSE) for each flow.

    All flows share one stream manager and one runner. Register it with any
    ``url_prefix``. ``write_retry_timeout``: seconds a storage outage is retried
    (events wait in memory) before a stream ends ``DATA_LOSS``.
    ``live_buffer_bytes``: how far a live client may fall behind before its
    connection is closed (it can resume from storage); None for no bound.
    Unknown flow names get Flask's JSON-less 404; use the
    :class:`~flask_durable_stream.DurableStream` extension for JSON errors everywhere.
    """
    manager = _resolve_manager(stream_manager)
    runner = runner_for(
        manager,
        write_retry_timeout=write_retry_timeout,
        shutdown_grace=shutdown_grace,
        live_buffer_bytes=live_buffer_bytes,
    )
    bp = Blueprint(name, import_name)
    bp.runner = runner  # type: ignore[attr-defined]
    bp.stream_manager = manager  # type: ignore[attr-defined]
    for flow_name, flow in flows.items():
        if not flow_name or "/" in flow_name:
            raise ValueError(f"invalid flow name {flow_name!r}")
        endpoint = flow_view(
            flow,
            name=flow_name,
            runner=runner,
            context_provider=context_provider,
            max_content_length=max_content_length,
            subscribe_timeout=subscribe_timeout,
            keepalive_interval=keepalive_interval,
            sse_lifetime=sse_lifetime,
        )
        bp.add_url_rule(f"/{flow_name}", endpoint=flow_name, view_func=endpoint, methods=["POST"])
        bp.add_url_rule(
            f"/{flow_name}/events",
            endpoint=f"{flow_name}:events",
            view_func=endpoint.events,
            methods=["GET"],
        )
        bp.add_url_rule(
            f"/{flow_name}/cancel",
            endpoint=f"{flow_name}:cancel",
            view_func=endpoint.cancel,
            methods=["POST"],
        )

    def unknown_flow(unknown: str) -> Response:
        return _json_response({"status": "NOT_FOUND", "message": "Unknown flow."}, 404)

    bp.add_url_rule(
        "/<path:unknown>", endpoint="unknown_flow", view_func=unknown_flow, methods=["POST"]
    )

    return bp
