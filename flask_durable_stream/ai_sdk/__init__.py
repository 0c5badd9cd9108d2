"""The Vercel AI SDK's chat protocol, durable: ``useChat`` with ``resume: true``, served by Flask.

``chat_blueprint(flow)`` registered with ``url_prefix`` = the ``api`` of
``DefaultChatTransport({ api })`` (or ``WorkflowChatTransport`` from
``@workflow/ai``) gives:

* ``POST <api>``: the transport's body (``id``, ``messages``, ``trigger``,
  ``messageId``, any ``body`` fields) becomes the flow's ``data``; the flow runs in
  the runner, apart from the connection, and the answer is the UI message stream
  (SSE, ``x-vercel-ai-ui-message-stream: v1``). The stream id is the run id
  (``x-workflow-run-id``) and becomes the chat's *active stream*, a pointer
  stored through the stream manager, so every worker finds it.
* ``GET <api>/<chat id>/stream``: ``204`` when the chat has no active stream,
  else that stream from its start, live to the end (``reconnectToStream``).
  ``GET <api>/<run id>/stream?startIndex=<n>``: that run from chunk ``n`` on
  (``WorkflowChatTransport``; a negative ``n`` counts from the end).
* ``POST <api>/<chat id or run id>/stop``: stops the active stream wherever it
  runs; what was generated stays stored and ends with ``finish``.
* ``GET <api>/client.js``: ``stopChat``, the client side of stop.

See docs/ai-sdk.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import protocol
from .._concurrency import gevent_patched
from ..exceptions import DurableStreamError, InvalidRequest, StreamNotFound
from ..flows import Flow
from ..managers.base import StreamInfo, StreamManager, StreamStatus, valid_stream_id
from ..managers.memory import InMemoryStreamManager
from ..runner import DEFAULT_SHUTDOWN_GRACE, DEFAULT_WRITE_RETRY_TIMEOUT, Runner, runner_for
from ..views import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONTENT_LENGTH,
    ContextProvider,
    _check_owner,
    _owner_of,
    _StreamResponse,
    error_response,
    request_context,
)
from ._chunks import SSE_DONE, chat_flow, sse

__all__ = ["RUN_ID_HEADER", "UI_STREAM_HEADER", "ChatEndpoints", "chat_blueprint"]

log = logging.getLogger("flask_durable_stream")

UI_STREAM_HEADER = "x-vercel-ai-ui-message-stream"
RUN_ID_HEADER = "x-workflow-run-id"
TAIL_INDEX_HEADER = "x-workflow-stream-tail-index"
_END = object()


class ChatEndpoints:
    """The views of one chat flow. Build them with :func:`chat_blueprint`."""

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
    ) -> None:
        if not callable(flow):
            raise TypeError(f"chat flow {name!r} is not callable")
        if runner.manager is None:
            raise TypeError("a chat needs a stream manager: its streams must outlive connections")
        self.name = name
        self.manager: StreamManager = runner.manager
        self.flow = chat_flow(flow, self.manager, self._key_of_body)
        self.runner = runner
        self.context_provider = context_provider
        self.max_content_length = max_content_length
        self.subscribe_timeout = subscribe_timeout
        self.keepalive_interval = keepalive_interval

    # -- the chat -> active stream pointer -------------------------------------------
    def pointer_key(self, chat_id: str) -> str:
        return f"{self.name}.{chat_id}"

    def _key_of_body(self, body: Any) -> str | None:
        chat_id = body.get("id") if isinstance(body, dict) else None
        return self.pointer_key(chat_id) if isinstance(chat_id, str) else None

    def _chat_id(self, value: Any) -> str:
        longest = 127 - len(self.name)  # the pointer key "<name>.<chat id>" is a stream key
        if not isinstance(value, str) or not valid_stream_id(value) or len(value) > longest:
            raise InvalidRequest(
                f"Invalid chat id: expected 1-{longest} characters of [A-Za-z0-9_.-]."
            )
        return value

    def active_stream(self, chat_id: str) -> StreamInfo | None:
        """The chat's open stream, if any. A pointer left by a stream that ended is cleared."""
        key = self.pointer_key(chat_id)
        stream_id = self.manager.get_pointer(key)
        if stream_id is None:
            return None
        info = self.manager.info(stream_id)
        run = self.runner.get(stream_id)
        # A run of this process knows it ended before its terminal event is stored.
        ended_here = run is not None and run.ended
        if info is None or info.status is not StreamStatus.OPEN or ended_here:
            self.manager.clear_pointer(key, stream_id)
            return None
        return info

    def _resolve(self, ident: str) -> tuple[StreamInfo | None, bool]:
        """``(stream, by_chat)`` for a path id: a chat's active stream first, else a run id."""
        if not valid_stream_id(ident):
            raise InvalidRequest("Invalid id: expected a chat id or a run id.")
        if len(self.pointer_key(ident)) <= 128:
            info = self.active_stream(ident)
            if info is not None:
                return info, True
        return self.manager.info(ident), False

    # -- views ----------------------------------------------------------------------------
    def post(self) -> Response:
        return self._guarded(self._post)

    def stream(self, ident: str) -> Response:
        return self._guarded(lambda: self._stream(ident))

    def stop(self, ident: str) -> Response:
        return self._guarded(lambda: self._stop(ident))

    def _guarded(self, handle: Callable[[], Response]) -> Response:
        try:
            return handle()
        except DurableStreamError as exc:
            return error_response(exc)
        except Exception:  # a bug in a context provider or a backend: logged, redacted
            log.exception("chat %r: request failed", self.name)
            return Response(
                protocol.encode(protocol.INTERNAL_ERROR), 500, mimetype="application/json"
            )

    def _post(self) -> Response:
        body = self._read_body()
        chat_id = self._chat_id(body["id"]) if body.get("id") is not None else None
        context = self._context(body, None)
        owner = _owner_of(context)
        if chat_id is not None:
            current = self.active_stream(chat_id)
            if current is not None:
                _check_owner(current.owner, context)  # nobody takes over another's chat
        run = self.runner.start(self.name, self.flow, body, context=context, owner=owner)
        if chat_id is not None:
            try:
                self.manager.set_pointer(self.pointer_key(chat_id), run.stream_id)
            except Exception as exc:  # the answer is running: still send it
                log.warning("chat %s: storing its active stream failed: %s", chat_id, exc)
        return self._respond(sse(run.batches()), run.stream_id)

    def _stream(self, ident: str) -> Response:
        start = _start_index(request.args.get("startIndex"))
        info, _ = self._resolve(ident)
        if info is None:
            return Response(status=204)
        context = self._context(None, info.stream_id)
        _check_owner(info.owner, context)
        count = _chunk_count(info)
        if start < 0:  # the tail: resolved against what is stored now
            start = max(0, count + start)
        ended = info.status is not StreamStatus.OPEN
        if ended and start >= count:
            return Response(status=204)  # nothing follows
        after = min(start, info.last_seq if ended else start) - 1
        try:
            batches = self.manager.subscribe_batches(
                info.stream_id, after=after, timeout=self.subscribe_timeout
            )
        except StreamNotFound:
            return Response(status=204)
        response = self._respond(_guard(sse(batches, start)), info.stream_id)
        response.headers[TAIL_INDEX_HEADER] = str(count - 1)
        return response

    def _stop(self, ident: str) -> Response:
        self._read_body(allow_empty=True)
        info, by_chat = self._resolve(ident)
        if info is None or info.status is not StreamStatus.OPEN:
            return Response(status=204)  # nothing running: stopping is done
        context = self._context(None, info.stream_id)
        _check_owner(info.owner, context)
        stream_id = info.stream_id
        self.runner.request_cancel(stream_id)  # a flow of this process stops at once
        try:
            self.manager.request_cancel(stream_id)  # others at their next heartbeat
        except StreamNotFound:
            pass
        if by_chat:
            self.manager.clear_pointer(self.pointer_key(ident), stream_id)
        body = {"streamId": stream_id, "status": "stopping"}
        return Response(protocol.encode(body), 202, mimetype="application/json")

    # -- plumbing ---------------------------------------------------------------------------
    def _read_body(self, *, allow_empty: bool = False) -> dict[str, Any]:
        request.max_content_length = self.max_content_length
        try:
            raw = request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise InvalidRequest(
                f"Request body exceeds {self.max_content_length} bytes.",
                status="RESOURCE_EXHAUSTED",
                http_status=413,
            ) from None
        if allow_empty and not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise InvalidRequest("Request body must be valid JSON.") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
            raise InvalidRequest('Request body must be a JSON object with a "messages" list.')
        return body

    def _context(self, data: Any, stream_id: str | None) -> dict[str, Any]:
        return request_context(self.context_provider, data, self.name, stream_id)

    def _respond(self, body: Iterator[bytes], stream_id: str) -> Response:
        if gevent_patched():
            body = self._with_keepalives(body)
        response = _StreamResponse(body, status=200, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers[UI_STREAM_HEADER] = "v1"
        response.headers[RUN_ID_HEADER] = stream_id
        response.headers["Access-Control-Expose-Headers"] = f"{RUN_ID_HEADER}, {TAIL_INDEX_HEADER}"
        return response

    def _with_keepalives(self, body: Iterator[bytes]) -> Iterator[bytes]:
        """``body``, with an SSE comment after every ``keepalive_interval`` of silence
        (gevent), so proxies keep a chat open while the model thinks. The AI SDK's
        parser skips comments, and they are not chunks: indexes do not move.

        The body runs in its own greenlet, killed when the client goes away.
        """
        import gevent.queue

        queue: gevent.queue.Queue[Any] = gevent.queue.Queue()

        def pump() -> None:
            try:
                for data in body:
                    queue.put(data)
                queue.put(_END)
            except Exception as exc:
                queue.put(exc)

        task = self.runner.tasks.spawn(pump, name="durable-stream-chat-sse")
        try:
            while True:
                try:
                    item = queue.get(timeout=self.keepalive_interval)
                except gevent.queue.Empty:
                    yield protocol.SSE_KEEPALIVE
                    continue
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            task.kill(timeout=5)


def _chunk_count(info: StreamInfo) -> int:
    """How many UI chunks a stream has so far: one per chunk event, plus error and
    finish when it ended in an error."""
    if info.status is StreamStatus.OPEN:
        return info.last_seq + 1
    return info.last_seq + (0 if info.status is StreamStatus.DONE else 2)


def _start_index(raw: str | None) -> int:
    if raw in (None, ""):
        return 0
    assert raw is not None
    try:
        if len(raw) > 20:
            raise ValueError
        return int(raw)
    except ValueError:
        raise InvalidRequest("startIndex must be an integer.") from None


def _guard(body: Iterator[bytes]) -> Iterator[bytes]:
    """A stored stream that fails while read (storage gone, timeout) ends with an error chunk."""
    try:
        yield from body
    except DurableStreamError as exc:
        log.info("chat stream read ended: %s", exc)
        chunk = {"type": "error", "errorText": exc.to_dict().get("message", "Internal Error")}
        yield f"data: {protocol.encode(chunk)}\n\n".encode() + SSE_DONE
    except Exception:
        log.exception("reading a chat stream failed")
        yield b'data: {"type":"error","errorText":"Internal Error"}\n\n' + SSE_DONE


def chat_blueprint(
    flow: Flow,
    *,
    stream_manager: StreamManager | None = None,
    context_provider: ContextProvider | None = None,
    name: str = "ai_chat",
    import_name: str = __name__,
    max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
    subscribe_timeout: float | None = None,
    write_retry_timeout: float = DEFAULT_WRITE_RETRY_TIMEOUT,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
) -> Blueprint:
    """A blueprint for one chat flow; register it with ``url_prefix`` = the transport's ``api``.

    ``stream_manager=None`` gives it its own :class:`InMemoryStreamManager` (one
    process only); pass the app's manager (``app.extensions["durable_stream"].manager``)
    to share storage and runner with the other flows.
    """
    manager = stream_manager if stream_manager is not None else InMemoryStreamManager()
    if not isinstance(manager, StreamManager):
        raise TypeError("stream_manager must be a StreamManager or None (in-memory)")
    runner = runner_for(
        manager, write_retry_timeout=write_retry_timeout, shutdown_grace=shutdown_grace
    )
    chat = ChatEndpoints(
        name,
        flow,
        runner=runner,
        context_provider=context_provider,
        max_content_length=max_content_length,
        subscribe_timeout=subscribe_timeout,
        keepalive_interval=keepalive_interval,
    )
    bp = Blueprint(name, import_name)
    bp.chat = chat  # type: ignore[attr-defined]
    bp.add_url_rule("", endpoint="chat", view_func=chat.post, methods=["POST"])
    bp.add_url_rule("/<ident>/stream", endpoint="stream", view_func=chat.stream, methods=["GET"])
    bp.add_url_rule("/<ident>/stop", endpoint="stop", view_func=chat.stop, methods=["POST"])

    client_js = resources.files(__name__).joinpath("client.js").read_bytes()

    def client() -> Response:
        return Response(client_js, mimetype="text/javascript")

    bp.add_url_rule("/client.js", endpoint="client", view_func=client, methods=["GET"])
    return bp
