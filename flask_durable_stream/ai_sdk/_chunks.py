"""A chat flow's output as UI message chunks, the unit the AI SDK's protocol counts.

The flow runs wrapped: every plain string it sends becomes a ``text-delta`` (inside
``text-start`` / ``text-end``), every dict with a ``type`` is a UI message chunk and
passes through. The stream stores those chunks one event each, so event ``seq``
*is* the chunk index that ``WorkflowChatTransport`` resumes from, and a replay
needs no state. The terminal event adds only ``[DONE]`` (after a stored error, the
``error`` and ``finish`` chunks at the next two indexes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..exceptions import FlowError
from ..flows import Flow, FlowContext, call_flow
from ..managers.base import Event, StreamManager

log = logging.getLogger("flask_durable_stream")

SSE_DONE = b"data: [DONE]\n\n"
_TEXT = frozenset({"text-start", "text-delta", "text-end"})


class _Translator:
    """Turns what the flow sends into UI chunk payloads, tracking the open text part."""

    def __init__(self, emit: Callable[[str], None], prefix: str) -> None:
        self.emit = emit
        self.prefix = prefix
        self.text_id: str | None = None  # the implicit text part, while open
        self.parts = 0
        self.finished = False
        self.invalid: str | None = None

    def send(self, payload: str) -> None:
        if payload.startswith('"'):  # a JSON string: text, spliced without decoding
            if self.text_id is None:
                self.text_id = f"{self.prefix}-{self.parts}"
                self.parts += 1
                self.emit('{"type":"text-start","id":"' + self.text_id + '"}')
            self.emit('{"type":"text-delta","id":"' + self.text_id + '","delta":' + payload + "}")
            return
        chunk = json.loads(payload) if payload.startswith("{") else None
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if not isinstance(kind, str):
            # Raised here for a sync flow; an async flow's chunks arrive in a hub
            # callback, so the flow's end raises it again (see chat_flow).
            self.invalid = (
                "a chat flow sends text (str) or UI message chunks (dicts with a 'type'),"
                f" not {payload[:80]}"
            )
            raise TypeError(self.invalid)
        if kind not in _TEXT and kind != "message-metadata":
            self.close_text()  # text after a tool call or a data part is a new part
        if kind == "finish":
            self.finished = True
        self.emit(payload)

    def close_text(self) -> None:
        if self.text_id is not None:
            self.emit('{"type":"text-end","id":"' + self.text_id + '"}')
            self.text_id = None

    def finish(self, reason: str | None) -> None:
        self.close_text()
        if not self.finished:
            self.finished = True
            self.emit(
                '{"type":"finish"}'
                if reason is None
                else json.dumps({"type": "finish", "finishReason": reason}, separators=(",", ":"))
            )


def chat_flow(
    flow: Flow, manager: StreamManager | None, pointer_key: Callable[[Any], str | None]
) -> Callable[[Any, FlowContext], Any]:
    """``flow`` as the runner runs it: UI chunks out, stop honoured, the chat's pointer cleared.

    A stop (cancel) is not an error here: the text so far is closed, ``finish`` is
    stored and the stream ends normally, so every reader sees the same partial answer.
    """

    def run(data: Any, ctx: FlowContext) -> Any:
        emit = ctx._emit
        assert emit is not None and ctx.stream_id is not None
        chunks = _Translator(emit, "text")
        emit(json.dumps({"type": "start", "messageId": ctx.stream_id}, separators=(",", ":")))
        ctx._emit = chunks.send
        try:
            try:
                output = call_flow(flow, data, ctx)
            except FlowError as exc:
                if exc.status != "CANCELLED" or not ctx.cancelled:
                    raise
                ctx._emit = emit
                chunks.finish("other")  # written past the cancel flag: the stop's own ending
                return None
            ctx._emit = emit
            if chunks.invalid is not None:
                raise TypeError(chunks.invalid)
            chunks.finish(None)
            return output
        finally:
            ctx._emit = emit
            _clear(manager, pointer_key(data), ctx.stream_id)

    run.__name__ = str(getattr(flow, "__name__", "chat"))
    return run


def _clear(manager: StreamManager | None, key: str | None, stream_id: str) -> None:
    if manager is None or key is None:
        return
    try:
        manager.clear_pointer(key, stream_id)
    except Exception as exc:  # readers also treat a pointer to an ended stream as none
        log.warning("clearing the active stream of %s failed: %s", key, exc)


def error_chunks(payload: str) -> list[str]:
    """The ``error`` and ``finish`` chunks for a stored error body (already redacted)."""
    try:
        message = json.loads(payload).get("message") or "Internal Error"
    except (ValueError, AttributeError):
        message = "Internal Error"
    error = json.dumps({"type": "error", "errorText": message}, separators=(",", ":"))
    return [error, '{"type":"finish","finishReason":"error"}']


def sse(batches: Iterable[list[Event]], start: int = 0) -> Iterator[bytes]:
    """The UI message stream (SSE) of stored events, from chunk index ``start`` on."""
    for batch in batches:
        out: list[str] = []
        for seq, kind, payload in batch:
            if kind == "chunk":
                if seq >= start:
                    out.append(payload)
            elif kind == "error":
                # Both, whatever ``start``: a client at or past the stored error's index
                # without ``finish`` had chunks that storage never got (their worker died
                # first, or storage gave up on them) under the indexes the error took.
                out.extend(error_chunks(payload))
        data = "".join(f"data: {chunk}\n\n" for chunk in out).encode()
        if batch and batch[-1].terminal:
            yield data + SSE_DONE
            return
        if data:
            yield data
