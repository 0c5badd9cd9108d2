"""What goes back to the client: replies, read chunks, SSE events, the headers every response has.

Shared by the protocol engine (which answers with :class:`Reply`) and the
views (which turn replies into Flask responses).
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Response, request

from .request import format_offset, is_json, join_json
from .store import Meta

ALLOW_METHODS = "GET, HEAD, PUT, POST, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Content-Type, Authorization, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Stream-Seq, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, "
    "Producer-Id, Producer-Epoch, Producer-Seq"
)
EXPOSE_HEADERS = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, Stream-SSE-Data-Encoding, ETag, Location, Content-Type, "
    "Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq"
)
CATCH_UP_CACHE = "public, max-age=60, stale-while-revalidate=300"
PRIVATE_CACHE = "private, max-age=60, stale-while-revalidate=300"
#: Cursor intervals: 20 s counted from 2024-10-09T00:00:00Z, as the protocol recommends.
CURSOR_EPOCH = 1728432000.0
CURSOR_INTERVAL = 20.0

OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
CURSOR = "Stream-Cursor"


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(slots=True)
class Chunk:
    """What a read found: records ``[start, end)`` of a stream as the client sees them."""

    meta: Meta
    start: int
    end: int
    records: list[bytes]
    #: A flow stream's: its offset past the end event says so (``request.END_MARK``).
    marks_end: bool = False

    @property
    def next_offset(self) -> str:
        return format_offset(self.end, self.marks_end and self.closed)

    @property
    def up_to_date(self) -> bool:
        return self.end >= self.meta.tail

    @property
    def closed(self) -> bool:
        return self.meta.closed and self.up_to_date

    def body(self) -> bytes:
        if is_json(self.meta.content_type):
            return join_json(self.records)
        return b"".join(self.records)


class Gone(Exception):
    """The stream is soft-deleted (410)."""


def cursor_for(client: str | None, now: float) -> str:
    """An interval number, strictly past the client's cursor so caches cannot loop."""
    interval = int((now - CURSOR_EPOCH) // CURSOR_INTERVAL)
    if client is not None and client.isdigit() and int(client) >= interval:
        jitter = random.randint(1, 3600)
        return str(int(client) + max(1, math.ceil(jitter / CURSOR_INTERVAL)))
    return str(interval)


def empty_poll(meta: Meta, start: int, cursor: str | None, *, marks_end: bool = False) -> Reply:
    """A long-poll that timed out (or found the stream closed): 204 at the tail.
    ``marks_end``: a flow stream's, whose offset past its end says so."""
    offset = format_offset(max(start, meta.tail), marks_end and meta.closed)
    headers = {OFFSET: offset, UP_TO_DATE: "true"}
    headers["Cache-Control"] = "no-store"
    if meta.closed:
        headers[CLOSED] = "true"
    else:
        headers[CURSOR] = cursor_for(cursor, time.time())
    return Reply(204, headers)


def sse_data(body: bytes, encode: bool) -> bytes:
    if encode:
        text = base64.b64encode(body).decode()
        lines = [text[i : i + 4096] for i in range(0, len(text), 4096)] or [""]
    else:
        lines = re.split(r"\r\n|\r|\n", body.decode("utf-8", errors="replace"))
    # "data:" then the line; a line that starts with a space gets one more, which
    # every SSE parser strips, so the line arrives intact.
    text = "".join(("data: " if line[:1] == " " else "data:") + line + "\n" for line in lines)
    return ("event: data\n" + text + "\n").encode()


def sse_control(chunk: Chunk, cursor: str | None) -> bytes:
    control: dict[str, Any] = {"streamNextOffset": chunk.next_offset}
    if chunk.closed:
        control["streamClosed"] = True
        control["upToDate"] = True
    else:
        control["streamCursor"] = cursor_for(cursor, time.time())
        if chunk.up_to_date:
            control["upToDate"] = True
    return ("event: control\ndata:" + json.dumps(control, separators=(",", ":")) + "\n\n").encode()


class _StreamingResponse(Response):
    """Sends status and headers before the first event, so an idle stream does not stall."""

    def __call__(self, environ: Any, start_response: Any) -> Any:
        app_iter, status, headers = self.get_wsgi_response(environ)
        write = start_response(status, headers)
        write(b"")
        return app_iter


def sse_response(events: Iterator[bytes], encode: bool) -> Response:
    response = _StreamingResponse(events, status=200, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    if encode:
        response.headers["Stream-SSE-Data-Encoding"] = "base64"
    return response


def to_response(reply: Reply) -> Response:
    response = Response(reply.body, status=reply.status)
    if not reply.body and "Content-Type" not in reply.headers:
        response.headers.remove("Content-Type")
    elif reply.body and "Content-Type" not in reply.headers:
        response.headers["Content-Type"] = "text/plain; charset=utf-8"
    for key, value in reply.headers.items():
        response.headers[key] = value
    return response


_COMMON = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
    ("Access-Control-Allow-Methods", ALLOW_METHODS),
    ("Access-Control-Allow-Headers", ALLOW_HEADERS),
    ("Access-Control-Expose-Headers", EXPOSE_HEADERS),
)


def common_headers(
    origin: str | None, method: str, has_cache_control: bool
) -> list[tuple[str, str]]:
    """Security headers and CORS on every response, errors included (absent from the reply)."""
    out = list(_COMMON)
    out.append(("Access-Control-Allow-Origin", origin or "*"))
    if origin:
        out.append(("Vary", "Origin"))
    if method == "OPTIONS":
        out.append(("Access-Control-Max-Age", "86400"))
    if not has_cache_control:
        out.append(("Cache-Control", "no-store"))
    return out


def add_common_headers(response: Response) -> Response:
    """:func:`common_headers` on a Flask response (the blueprint's ``after_request``)."""
    headers = response.headers
    extra = common_headers(
        request.environ.get("HTTP_ORIGIN"), request.method, "Cache-Control" in headers
    )
    for key, value in extra:
        headers[key] = value
    return response
