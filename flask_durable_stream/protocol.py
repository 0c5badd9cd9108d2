"""Genkit's wire protocol: JSON encoding, frames, error bodies. Shared by server and client.

A stream is a sequence of frames, each ``<field>: <compact JSON>\\n\\n``::

    data: {"message":<chunk>}
    data: {"result":<output>}
    error: {"error":{"status":"<STATUS>","message":"<msg>"}}

Genkit's JS client strips six characters from every frame and JSON-parses the
rest, so nothing else (comments, ``id:`` lines) may appear on the Genkit
endpoint. Payloads are encoded once, when a flow emits them, and stored as JSON
text; frames are built by string concatenation, so a replay is byte-identical to
the live stream.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .exceptions import DurableStreamError

CHUNK = "chunk"
DONE = "done"
ERROR = "error"

STREAM_ID_HEADER = "x-genkit-stream-id"

#: The redacted body of any error a flow did not raise deliberately.
INTERNAL_ERROR = {"status": "INTERNAL", "message": "Internal Error"}
# The blueprint's answer (404) for a flow name it does not have; the client tells it from a
# missing stream by this message.
UNKNOWN_FLOW = {"status": "NOT_FOUND", "message": "Unknown flow."}


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # pydantic v2
        return model_dump(mode="json")
    dict_method = getattr(value, "dict", None)
    if callable(dict_method) and hasattr(value, "__fields__"):  # pydantic v1
        return dict_method()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
)
# What ``_encoder.encode`` runs in the end, without its Python steps (about 80 bytecode
# instructions a call, for every chunk a flow emits): the C encoder, with the same
# arguments, so the text is the same. It is made once, without the cycle check (whose
# dict it would share between threads), so a cycle ends in a RecursionError; ``encode``
# then asks an encoder made for the call as ``JSONEncoder.iterencode`` makes it, with
# the check, for the ValueError ``json`` gives. Making one for each call cost about
# 0.2-0.3 µs a chunk. None where the interpreter has no C encoder.
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_c_arguments = (
    _encoder.default,
    json.encoder.encode_basestring_ascii
    if _encoder.ensure_ascii
    else json.encoder.encode_basestring,
    _encoder.indent,
    _encoder.key_separator,
    _encoder.item_separator,
    _encoder.sort_keys,
    _encoder.skipkeys,
    _encoder.allow_nan,
)
_c_encode: Any = None if _c_encoder is None else _c_encoder(None, *_c_arguments)


def encode(value: Any) -> str:
    """Compact JSON text, as JavaScript's ``JSON.stringify`` would write it.

    As it does, a UTF-16 surrogate on its own (a string from a JSON escape such as
    ``"\\ud800"``, or from bytes decoded with ``surrogateescape``) is written as a
    ``\\uXXXX`` escape: no UTF-8 text can carry it, and a payload with one could be
    neither sent nor stored. JSON readers give the same string back.
    """
    if _c_encode is None:
        text: str = _encoder.encode(value)
    else:
        try:
            text = "".join(_c_encode(value, 0))
        except RecursionError:  # a cycle, or nesting too deep: the checking encoder says which
            text = "".join(_c_encoder({}, *_c_arguments)(value, 0))
    if text.isascii() or _SURROGATE.search(text) is None:  # isascii: no scan
        return text
    return _SURROGATE.sub(_escaped, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def error_body(exc: BaseException) -> dict[str, Any]:
    """The client-visible body of an exception: public errors as-is, others redacted."""
    if isinstance(exc, DurableStreamError):
        return exc.to_dict()
    return dict(INTERNAL_ERROR)


_PREFIX = {CHUNK: 'data: {"message":', DONE: 'data: {"result":', ERROR: 'error: {"error":'}
kind_of = operator.itemgetter(1)  # an event's kind, for map()
payload_of = operator.itemgetter(2)  # an event's payload, for map()


def frame(kind: str, payload: str) -> str:
    """One wire frame for an event whose payload is already JSON text."""
    try:
        return _PREFIX[kind] + payload + "}\n\n"
    except KeyError:
        raise ValueError(f"unknown event kind {kind!r}") from None


def frames(events: Sequence[tuple[int, str, str]]) -> bytes:
    """The wire bytes of ``(seq, kind, payload)`` events, for one write."""
    prefix = _PREFIX
    if len(events) == 1:  # a live chunk's (a list comprehension is a call of its own)
        _, kind, payload = events[0]
        return (prefix[kind] + payload + "}\n\n").encode()
    kinds = list(map(kind_of, events))
    chunks = kinds.count(CHUNK)
    if chunks >= len(events) - 1 and (chunks == len(events) or kinds[-1] != CHUNK):
        # Chunks, and at most an end after them (a replay, a burst): the payloads joined
        # in one step, where a frame each was two concatenations in a Python loop.
        payloads = list(map(payload_of, events))
        end = "" if chunks == len(events) else prefix[kinds[-1]] + payloads.pop() + "}\n\n"
        head = prefix[CHUNK]
        return (head + ("}\n\n" + head).join(payloads) + "}\n\n" + end).encode()
    return "".join([prefix[kind] + payload + "}\n\n" for _, kind, payload in events]).encode()


def error_frame(body: dict[str, Any]) -> str:
    return frame(ERROR, encode(body))


# -- standard Server-Sent Events (the GET endpoint, for EventSource) ---------------------------
#: SSE event names: chunks use the default ``message`` (so ``onmessage`` sees them); the
#: error is not called ``error``, which EventSource also fires for connection failures.
SSE_EVENT = {CHUNK: "", DONE: "event: result\n", ERROR: "event: failure\n"}
SSE_KEEPALIVE = b": keep-alive\n\n"
#: First bytes of every SSE response: reconnect after 1 s, not the browser's default 3 s.
SSE_RETRY = b"retry: 1000\n\n"


#: What follows the seq in the ``id`` of a stream's last event (``result`` or ``failure``).
SSE_END_ID = "-end"
#: The ``id`` line of each kind of event: a chunk's is its seq; the end's says it is the end.
_SSE_ID_SUFFIX = {CHUNK: "\n", DONE: SSE_END_ID + "\n", ERROR: SSE_END_ID + "\n"}


def sse_events(events: Iterable[tuple[int, str, str]]) -> bytes:
    """Events as SSE messages whose ``id`` is the seq, so ``Last-Event-ID`` resumes after it.

    The stream's last event has the id ``<seq>-end``: a client that reconnects with it
    had the end. A plain seq at or past a failed stream's stored end cannot tell that,
    since a client that received events storage never got (their worker died first)
    has the seqs the stored failure took.
    """
    names = SSE_EVENT
    ids = _SSE_ID_SUFFIX
    return "".join(
        [f"id: {seq}{ids[kind]}{names[kind]}data: {payload}\n\n" for seq, kind, payload in events]
    ).encode()


def sse_comment(text: str) -> bytes:
    """A comment line: ignored by EventSource, kept for anyone reading the raw stream."""
    return f": {text.replace(chr(10), ' ').replace(chr(13), ' ')}\n\n".encode()


def wants_stream(accept: str | None, stream_arg: str | None) -> bool:
    """Genkit streams when ``Accept`` mentions text/event-stream (any case) or ``?stream=true``."""
    if stream_arg is not None and stream_arg.lower() == "true":
        return True
    return accept is not None and "text/event-stream" in accept.lower()


def parse_frames(buffer: str) -> tuple[list[tuple[str, Any]], str]:
    """Split complete frames off ``buffer``; return ``[(kind, value)], rest``.

    ``kind`` is ``chunk``, ``done`` or ``error``; for errors ``value`` is the
    ``{"status","message"}`` body. Used by the Python client and the tests.
    """
    events: list[tuple[str, Any]] = []
    while True:
        end = buffer.find("\n\n")
        if end < 0:
            return events, buffer
        raw, buffer = buffer[:end], buffer[end + 2 :]
        field, _, text = raw.partition(": ")
        if not text:
            continue
        body = json.loads(text)
        if "error" in body:
            events.append((ERROR, body["error"]))
        elif "message" in body:
            events.append((CHUNK, body["message"]))
        elif "result" in body or field == "data":
            events.append((DONE, body.get("result")))
