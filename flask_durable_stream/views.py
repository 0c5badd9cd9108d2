"""HTTP: the per-flow view (Genkit's ``expressHandler`` analogue) and the blueprint factory.

One POST endpoint per flow speaks Genkit's protocol (see :mod:`.protocol`):
a new call starts the flow in the runner and streams it; the same POST with an
``x-genkit-stream-id`` header reattaches to a stream through the manager and
replays it from the start. ``POST <flow>/cancel`` with that header asks the
stream's flow to stop, wherever it runs. Every bad input gets a JSON error with
a 4xx status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import protocol
from .exceptions import HTTP_STATUS, DurableStreamError, InvalidRequest, StreamNotFound
from .flows import Flow, RequestData
from .managers.base import Event, StreamManager, valid_stream_id
from .managers.memory import InMemoryStreamManager
from .runner import Runner, runner_for

log = logging.getLogger("flask_durable_stream")

ContextProvider = Callable[[RequestData], Mapping[str, Any] | None]

DEFAULT_MAX_CONTENT_LENGTH = 1024 * 1024


class _StreamResponse(Response):
    """Sends status and headers before the first frame, so the client learns the
    stream id at once even when the first chunk takes a minute."""

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        app_iter, status, headers = self.get_wsgi_response(environ)
        write = start_response(status, headers)
        write(b"")
        return app_iter


def _json_response(body: Any, status: int) -> Response:
    return Response(protocol.encode(body), status=status, mimetype="application/json")


def error_response(exc: DurableStreamError) -> Response:
    return _json_response(exc.to_dict(), exc.http_status)


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
    ) -> None:
        if not callable(flow):
            raise TypeError(f"flow {name!r} is not callable")
        self.name = self.__name__ = name
        self.flow = flow
        self.runner = runner
        self.context_provider = context_provider
        self.max_content_length = max_content_length
        self.subscribe_timeout = subscribe_timeout

    @property
    def manager(self) -> StreamManager | None:
        return self.runner.manager

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

    def _guarded(self, handle: Callable[[], Response]) -> Response:
        try:
            return handle()
        except DurableStreamError as exc:
            return error_response(exc)
        except Exception:  # a bug in a context provider or a backend: logged, redacted
            log.exception("flow %r: request failed", self.name)
            return _json_response(protocol.INTERNAL_ERROR, 500)

    @staticmethod
    def _stream_id(*, required: bool) -> str | None:
        stream_id = request.headers.get(protocol.STREAM_ID_HEADER)
        if stream_id is None and required:
            raise InvalidRequest(f"Missing {protocol.STREAM_ID_HEADER} header.")
        if stream_id is not None and not valid_stream_id(stream_id):
            raise InvalidRequest(
                f"Invalid {protocol.STREAM_ID_HEADER}: expected 1-128 characters of [A-Za-z0-9_.-]."
            )
        return stream_id

    def _cancel(self) -> Response:
        stream_id = self._stream_id(required=True)
        assert stream_id is not None
        self._read_body(allow_empty=True)  # a body, if any, must still be sane
        self._context(None, stream_id)
        local = self.runner.request_cancel(stream_id)  # a flow of this process stops at once
        manager = self.manager
        if manager is not None:
            try:
                # Stored too, so every process (and a reader of the stream) sees it.
                if manager.request_cancel(stream_id) or local:
                    return self._cancelling(stream_id)
            except StreamNotFound:
                if local:
                    return self._cancelling(stream_id)
                raise StreamNotFound("Stream not found.") from None
            info = manager.info(stream_id)
            if info is None:  # expired between the two calls
                raise StreamNotFound("Stream not found.")
            body = {
                "status": "FAILED_PRECONDITION",
                "message": "Stream already ended.",
                "streamStatus": info.status.value,
            }
            return _json_response(body, 409)
        if local:
            return self._cancelling(stream_id)
        raise StreamNotFound("Stream not found.")

    @staticmethod
    def _cancelling(stream_id: str) -> Response:
        return _json_response({"streamId": stream_id, "status": "cancelling"}, 202)

    def _handle(self) -> Response:
        stream_id = self._stream_id(required=False)
        streaming = protocol.wants_stream(request.headers.get("Accept"), request.args.get("stream"))
        body = self._read_body(allow_empty=stream_id is not None)
        if stream_id is not None:
            self._context(body.get("data"), stream_id)
            return self._resume(stream_id, streaming)
        if "data" not in body:
            raise InvalidRequest('Request body must be a JSON object with a "data" field.')
        data = body["data"]
        context = self._context(data, None)
        run = self.runner.start(self.name, self.flow, data, context=context, durable=streaming)
        if streaming:
            headers = {}
            if self.manager is not None:
                headers[protocol.STREAM_ID_HEADER] = run.stream_id
            return self._stream(run.batches(), headers)
        terminal = run.wait()
        assert terminal is not None
        return self._plain(terminal)

    def _read_body(self, *, allow_empty: bool) -> dict[str, Any]:
        request.max_content_length = self.max_content_length
        try:
            raw = request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise InvalidRequest(
                f"Request body exceeds {self.max_content_length} bytes.",
                status="RESOURCE_EXHAUSTED",
                http_status=413,
            ) from None
        if not raw.strip() and allow_empty:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:  # includes UnicodeDecodeError
            raise InvalidRequest("Request body must be valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidRequest('Request body must be a JSON object with a "data" field.')
        return body

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
            return self._stream(batches, {protocol.STREAM_ID_HEADER: stream_id})
        terminal = None
        try:
            for batch in batches:
                terminal = batch[-1]
        except DurableStreamError as exc:
            return error_response(exc)
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
    def _stream(batches: Iterator[list[Event]], headers: dict[str, str]) -> Response:
        def generate() -> Iterator[bytes]:
            try:
                for batch in batches:
                    yield protocol.frames(batch)
            except DurableStreamError as exc:
                yield protocol.error_frame(exc.to_dict()).encode()
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
    write_retry_timeout: float = 30.0,
    shutdown_grace: float = 25.0,
) -> Blueprint:
    """A blueprint with ``POST /<flow name>`` and ``POST /<flow name>/cancel`` for each flow.

    All flows share one stream manager and one runner. Register it with any
    ``url_prefix``. Unknown flow names get Flask's JSON-less 404; use the
    :class:`~flask_durable_stream.DurableStream` extension for JSON errors everywhere.
    """
    manager = _resolve_manager(stream_manager)
    runner = runner_for(
        manager, write_retry_timeout=write_retry_timeout, shutdown_grace=shutdown_grace
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
        )
        bp.add_url_rule(f"/{flow_name}", endpoint=flow_name, view_func=endpoint, methods=["POST"])
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
