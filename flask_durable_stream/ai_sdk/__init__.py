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

import functools
import logging
from collections.abc import Iterator
from importlib import resources
from typing import Any

from flask import Blueprint, Response, request

from .. import protocol
from .._concurrency import gevent_patched
from ..exceptions import DurableStreamError, InvalidRequest, StreamNotFound
from ..flows import Flow
from ..fronts.core import (
    Front,
    FrontOptions,
    check_owner,
    closer,
    json_response,
    owner_of,
    read_json_object,
    stream_response,
    with_stored_end,
)
from ..managers.base import StreamInfo, StreamManager, StreamStatus, valid_stream_id
from ..managers.memory import InMemoryStreamManager
from ..runner import Runner, runner_for
from ._chunks import SSE_DONE, chat_flow, sse

__all__ = [
    "RUN_ID_HEADER",
    "UI_STREAM_HEADER",
    "ChatBlueprint",
    "ChatEndpoints",
    "chat_blueprint",
]

log = logging.getLogger("flask_durable_stream")

UI_STREAM_HEADER = "x-vercel-ai-ui-message-stream"
RUN_ID_HEADER = "x-workflow-run-id"
TAIL_INDEX_HEADER = "x-workflow-stream-tail-index"


class ChatEndpoints(Front):
    """The views of one chat flow. Build them with :func:`chat_blueprint`."""

    kind = "chat"

    def __init__(
        self, name: str, flow: Flow, *, runner: Runner, options: FrontOptions | None = None
    ) -> None:
        if not callable(flow):
            raise TypeError(f"chat flow {name!r} is not callable")
        if runner.manager is None:
            raise TypeError("a chat needs a stream manager: its streams must outlive connections")
        super().__init__(name, runner=runner, options=options or FrontOptions())
        self.flow = chat_flow(flow, self.manager, self._key_of_body)

    @property
    def manager(self) -> StreamManager:
        manager = self.runner.manager
        assert manager is not None  # checked when built
        return manager

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

    def _resolve(self, ident: str, *, any_flow: bool = False) -> tuple[StreamInfo | None, bool]:
        """``(stream, by_chat)`` for a path id: a chat's active stream first, else a run id
        (another flow's run only with ``any_flow``: stopping, like Genkit's cancel)."""
        if not valid_stream_id(ident):
            raise InvalidRequest("Invalid id: expected a chat id or a run id.")
        if len(self.pointer_key(ident)) <= 128:
            info = self.active_stream(ident)
            if info is not None:
                return info, True
        if any_flow:
            return self.manager.info(ident), False
        return self.stream_info(ident), False  # another flow's run reads as unknown

    # -- views ----------------------------------------------------------------------------
    def post(self) -> Response:
        return self.guarded(self._post)

    def stream(self, ident: str) -> Response:
        return self.guarded(lambda: self._stream(ident))

    def stop(self, ident: str) -> Response:
        return self.guarded(lambda: self._stop(ident))

    def _post(self) -> Response:
        body = self._read_body()
        chat_id = self._chat_id(body["id"]) if body.get("id") is not None else None
        context = self.context(body, None)
        owner = owner_of(context)
        if chat_id is not None:
            current = self.active_stream(chat_id)
            if current is not None:
                check_owner(current.owner, context)  # nobody takes over another's chat
        # The live reader is attached before the flow starts: nothing is released before it reads.
        run = self.runner.start(self.name, self.flow, body, context=context, owner=owner, live=True)
        if chat_id is not None:
            try:
                self.manager.set_pointer(self.pointer_key(chat_id), run.stream_id)
            except Exception as exc:  # the answer is running: still send it
                log.warning("chat %s: storing its active stream failed: %s", chat_id, exc)
        # A client that stops reading is dropped past the runner's live buffer bound:
        # its connection is closed and it resumes from storage (``reconnectToStream``).
        batches = run.batches(reader=run.live, on_drop=closer(request.environ))
        return self._respond(sse(batches), run.stream_id)

    def _stream(self, ident: str) -> Response:
        start = _start_index(request.args.get("startIndex"))
        info, _ = self._resolve(ident)
        if info is None:
            return Response(status=204)
        context = self.context(None, info.stream_id)
        check_owner(info.owner, context)
        count = _chunk_count(info)
        if start < 0:  # the tail: resolved against what is stored now
            start = max(0, count + start)
        ended = info.status is not StreamStatus.OPEN
        if ended and info.status is not StreamStatus.DONE and start >= count - 2:
            # At or past a failed stream's stored error: a client asks only while it
            # lacks ``finish``, so it had chunks that storage never got (their worker
            # died first, or storage gave up on them) under the indexes the error and
            # finish took. It gets them, not a 204 that says all is well.
            start = count - 2
        elif ended and start >= count:
            return Response(status=204)  # nothing follows
        after = min(start, info.last_seq if ended else start) - 1
        timeout = self.options.subscribe_timeout
        try:
            batches = self.manager.subscribe_batches(info.stream_id, after=after, timeout=timeout)
        except StreamNotFound:
            return Response(status=204)
        batches = with_stored_end(self.manager, info.stream_id, batches, timeout)
        response = self._respond(_guard(sse(batches, start)), info.stream_id)
        response.headers[TAIL_INDEX_HEADER] = str(count - 1)
        return response

    def _stop(self, ident: str) -> Response:
        self._read_body(allow_empty=True)
        info, by_chat = self._resolve(ident, any_flow=True)
        if info is None or info.status is not StreamStatus.OPEN:
            return Response(status=204)  # nothing running: stopping is done
        context = self.context(None, info.stream_id)
        check_owner(info.owner, context)
        stream_id = info.stream_id
        self.runner.request_cancel(stream_id)  # a flow of this process stops at once
        try:
            self.manager.request_cancel(stream_id)  # others at their next heartbeat
        except StreamNotFound:
            pass
        if by_chat:
            self.manager.clear_pointer(self.pointer_key(ident), stream_id)
        return json_response({"streamId": stream_id, "status": "stopping"}, 202)

    # -- plumbing ---------------------------------------------------------------------------
    def _read_body(self, *, allow_empty: bool = False) -> dict[str, Any]:
        shape = 'a JSON object with a "messages" list'
        limit = self.options.max_content_length
        body = read_json_object(limit, allow_empty=allow_empty, shape=shape)
        if not isinstance(body.get("messages", []), list):
            raise InvalidRequest(f"Request body must be {shape}.")
        return body

    def _respond(self, body: Iterator[bytes], stream_id: str) -> Response:
        if gevent_patched():  # a comment after each silence, so proxies keep a chat open
            body = _keepalive_comments(self.keepalives(body, name="durable-stream-chat-sse"))
        headers = {
            UI_STREAM_HEADER: "v1",
            RUN_ID_HEADER: stream_id,
            "Access-Control-Expose-Headers": f"{RUN_ID_HEADER}, {TAIL_INDEX_HEADER}",
        }
        return stream_response(body, headers)


def _keepalive_comments(items: Iterator[bytes | None]) -> Iterator[bytes]:
    """An SSE comment for each silence: the AI SDK's parser skips comments, and they
    are not chunks, so indexes do not move."""
    for item in items:
        yield protocol.SSE_KEEPALIVE if item is None else item


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


class ChatBlueprint(Blueprint):
    """The blueprint of :func:`chat_blueprint`; ``chat`` is its endpoints' object."""

    def __init__(self, name: str, import_name: str, *, chat: ChatEndpoints) -> None:
        super().__init__(name, import_name)
        self.chat = chat
        self.add_url_rule("", endpoint="chat", view_func=chat.post, methods=["POST"])
        self.add_url_rule("/<ident>/stream", endpoint="stream", view_func=chat.stream)
        self.add_url_rule("/<ident>/stop", endpoint="stop", view_func=chat.stop, methods=["POST"])
        self.add_url_rule("/client.js", endpoint="client", view_func=_client_js)


@functools.cache
def _client_script() -> bytes:
    return resources.files(__name__).joinpath("client.js").read_bytes()


def _client_js() -> Response:
    return Response(_client_script(), mimetype="text/javascript")


def chat_blueprint(
    flow: Flow,
    *,
    stream_manager: StreamManager | None = None,
    name: str = "ai_chat",
    import_name: str = __name__,
    options: FrontOptions | None = None,
    **overrides: Any,
) -> ChatBlueprint:
    """A blueprint for one chat flow; register it with ``url_prefix`` = the transport's ``api``.

    ``stream_manager=None`` gives it its own :class:`InMemoryStreamManager` (one
    process only); pass the app's manager (``app.extensions["durable_stream"].manager``)
    to share storage and runner with the other flows. ``options``
    (:class:`~..fronts.core.FrontOptions`), with any of its fields given as keyword
    arguments on top. ``sse_lifetime`` does not apply, and ``live_buffer_bytes`` (how far
    a client may fall behind before its connection is closed) is the runner's own.
    """
    manager = stream_manager if stream_manager is not None else InMemoryStreamManager()
    if not isinstance(manager, StreamManager):
        raise TypeError("stream_manager must be a StreamManager or None (in-memory)")
    options = FrontOptions.of(options, overrides)
    runner_options = options.runner_options()
    # The runner may be the app's flows' too: their live buffer bound stays theirs.
    del runner_options["live_buffer_bytes"]
    chat = ChatEndpoints(name, flow, runner=runner_for(manager, **runner_options), options=options)
    return ChatBlueprint(name, import_name, chat=chat)
