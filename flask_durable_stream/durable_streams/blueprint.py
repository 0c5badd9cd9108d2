"""HTTP: every path under the blueprint's prefix is a Durable Stream URL.

The views only parse (:mod:`.request`), call the protocol (:mod:`.engine`)
and shape the reply: status, the protocol's headers, the browser security
headers and CORS on every response, error or not. Flow streams of the same
manager are served read-only by :mod:`.flow_streams`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

from flask import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .._concurrency import TaskGroup
from ..exceptions import DurableStreamError
from ..views import ContextProvider, request_context
from . import request as rq
from .engine import Engine
from .flow_streams import FlowStreams, Forbidden
from .replies import (
    ALLOW_METHODS,
    CATCH_UP_CACHE,
    CLOSED,
    CURSOR,
    OFFSET,
    PRIVATE_CACHE,
    UP_TO_DATE,
    Chunk,
    Gone,
    Reply,
    cursor_for,
    empty_poll,
    sse_control,
    sse_data,
    sse_response,
    to_response,
)
from .request import FLASK, Req
from .store import DSStore, Meta

log = logging.getLogger("flask_durable_stream")

_BAD_PATH = re.compile(r"(^|/)\.\.?(/|$)|[\x00-\x1f]")


class DurableStreamsView:
    """The one view behind ``/<path:path>``; options as given to :func:`durable_streams_server`."""

    def __init__(
        self,
        store: DSStore,
        *,
        flows: FlowStreams | None,
        context_provider: ContextProvider | None,
        name: str,
        long_poll_timeout: float,
        sse_lifetime: float,
        max_body_bytes: int,
        max_read_bytes: int,
        gc_interval: float = 60.0,
        handover: bool = True,
    ) -> None:
        self.engine = Engine(store, max_read_bytes=max_read_bytes)
        self.flows = flows
        self.context_provider = context_provider
        self.name = name
        self.long_poll_timeout = long_poll_timeout
        self.sse_lifetime = sse_lifetime
        self.max_body_bytes = max_body_bytes
        self.cache_control = PRIVATE_CACHE if context_provider is not None else CATCH_UP_CACHE
        self.gc_interval = gc_interval
        #: Whether the fast path hands keep-alive connections over (:mod:`.handover`).
        self.handover = handover
        self._next_gc = time.monotonic() + gc_interval
        self._tasks = TaskGroup()

    def _maybe_gc(self) -> None:
        """Expired streams nobody asks for again go in a sweep, at most one per interval."""
        now = time.monotonic()
        if now < self._next_gc or len(self._tasks):
            return
        self._next_gc = now + self.gc_interval
        self._tasks.spawn(self._gc, name="durable-streams-gc")

    def _gc(self) -> None:
        try:
            self.engine.gc()
        except Exception:
            log.exception("Durable Streams expiry sweep failed")

    # -- dispatch -----------------------------------------------------------------------
    def __call__(self, path: str = "") -> Response:
        """The Flask view: every request the fast path (:mod:`.fast`) leaves to Flask."""
        result = self.handle(Req(request.environ, request.stream), path)
        if isinstance(result, Response):
            return result
        assert isinstance(result, Reply)
        return to_response(result)

    def handle(self, req: Req, path: str) -> Reply | Response | object:
        """The reply to one request, or :data:`FLASK` when ``req.fast`` and Flask must answer."""
        req.at = self.engine.store.now()
        self._maybe_gc()
        try:
            if req.method == "OPTIONS":
                return Reply(204)
            if not path or _BAD_PATH.search(path):
                return Reply(400, body=b"invalid stream path")
            owner = self._owner(path)
            handler = getattr(self, "_" + req.method.lower(), None)
            if handler is None:
                return Reply(405, {"Allow": ALLOW_METHODS})
            result: Reply | Response | object = handler(req, path, owner)
            return result
        except rq.BadRequest as exc:
            return Reply(400, body=str(exc).encode())
        except Gone:
            return Reply(410, body=b"stream is deleted")
        except RequestEntityTooLarge:
            return Reply(413, body=b"request body too large")
        except DurableStreamError as exc:
            return Reply(exc.http_status, body=exc.message.encode())
        except Exception:  # a backend or a context provider failed: logged, never shown
            log.exception("Durable Streams request failed")
            return Reply(500, body=b"internal error")

    def _owner(self, path: str) -> str | None:
        if self.context_provider is None:
            return None
        owner = request_context(self.context_provider, None, self.name, path).get("owner")
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise TypeError("the context provider's 'owner' must be a non-empty string")
        return owner

    @staticmethod
    def _forbidden(meta: Meta, owner: str | None) -> bool:
        return meta.owner is not None and meta.owner != owner

    # -- PUT ----------------------------------------------------------------------------
    def _put(self, req: Req, path: str, owner: str | None) -> Reply | object:
        if req.fast:  # rare, and needs Flask's view of the URL
            return FLASK
        h = req.headers
        if self.flows is not None and self.flows.exists(path):
            return Reply(409, body=b"a flow stream lives at this path")
        ttl = h.get("Stream-TTL")
        expires = h.get("Stream-Expires-At")
        if ttl is not None and expires is not None:
            raise rq.BadRequest("Stream-TTL and Stream-Expires-At exclude each other")
        content_type = h.get("Content-Type")
        if content_type is not None and not rq.valid_media_type(content_type):
            raise rq.BadRequest("invalid Content-Type")
        fork_of = h.get("Stream-Forked-From")
        fork_offset_h = h.get("Stream-Fork-Offset")
        sub_h = h.get("Stream-Fork-Sub-Offset")
        if fork_of is None and (fork_offset_h is not None or sub_h is not None):
            raise rq.BadRequest("fork headers need Stream-Forked-From")
        fork_offset = None
        if fork_offset_h is not None:
            fork_offset = rq.parse_offset(fork_offset_h.strip())
            if fork_offset < 0:
                raise rq.BadRequest("Stream-Fork-Offset must be an offset")
        sub = rq.parse_int("Stream-Fork-Sub-Offset", sub_h.strip()) if sub_h is not None else 0
        if sub and fork_offset is None:
            raise rq.BadRequest("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
        source = self._source_key(fork_of) if fork_of is not None else None
        body = self._body(req)
        effective_ct = content_type
        if effective_ct is None and source is not None:
            meta = self.engine.current(source, req.at)
            effective_ct = meta.content_type if meta is not None else None
        if effective_ct is not None and rq.is_json(effective_ct):
            record = rq.json_record(body, allow_empty=True)
        else:
            record = body or None
        reply = self.engine.create(
            path,
            content_type=content_type,
            ttl=rq.parse_ttl(ttl.strip()) if ttl is not None else None,
            expires_at=expires.strip() if expires is not None else None,
            expires_ts=rq.parse_expires_at(expires) if expires is not None else None,
            closed=rq.is_true(h.get("Stream-Closed")),
            record=record,
            fork_of=source,
            fork_offset=fork_offset,
            fork_sub=sub,
            owner=owner,
            at=req.at,
        )
        if reply.status == 201:
            reply.headers["Location"] = request.base_url
        return reply

    def _source_key(self, value: str) -> str:
        """``Stream-Forked-From`` is a path on this server: with or without our prefix."""
        mount = request.path[: len(request.path) - len(request.view_args["path"])]  # type: ignore[index]
        value = value.strip()
        if value.startswith(mount):
            value = value[len(mount) :]
        value = value.lstrip("/")
        if not value or _BAD_PATH.search(value):
            raise rq.BadRequest("invalid Stream-Forked-From")
        return value

    def _body(self, req: Req) -> bytes:
        length = req.content_length
        if length is not None:
            if length > self.max_body_bytes:
                raise RequestEntityTooLarge()
            data = req.stream.read(length) if length else b""
            if len(data) < length:  # the client went away mid-body: store nothing of it
                raise rq.BadRequest("request body ended early")
            return data
        data = req.stream.read(self.max_body_bytes + 1)  # chunked: read up to the limit
        if len(data) > self.max_body_bytes:
            raise RequestEntityTooLarge()
        return data

    # -- POST ---------------------------------------------------------------------------
    def _read_only(self, path: str, owner: str | None) -> Reply | None:
        """The refusal for a write to a flow stream, or None if ``path`` is not one."""
        if self.flows is None or not self.flows.exists(path):
            return None
        self.flows.check_owner(path, owner)
        return Reply(405, {"Allow": "GET, HEAD, OPTIONS"}, b"flow streams are read-only")

    def _post(self, req: Req, path: str, owner: str | None) -> Reply:
        # Flow streams are looked up only when the store has no such stream (or the
        # request is malformed), so an ordinary append costs no extra read.
        try:
            reply = self._append(req, path, owner)
        except rq.BadRequest:
            refusal = self._read_only(path, owner)
            if refusal is not None:
                return refusal
            raise
        if reply.status == 404:
            return self._read_only(path, owner) or reply
        return reply

    def _append(self, req: Req, path: str, owner: str | None) -> Reply:
        h = req.headers
        producer = rq.parse_producer(
            h.get("Producer-Id"), h.get("Producer-Epoch"), h.get("Producer-Seq")
        )
        close = rq.is_true(h.get("Stream-Closed"))
        body = self._body(req)
        content_type = h.get("Content-Type")
        record: bytes | None = None
        if body:
            if content_type is None or not rq.valid_media_type(content_type):
                raise rq.BadRequest("an append needs a valid Content-Type")
            record = rq.json_record(body, allow_empty=False) if rq.is_json(content_type) else body
        elif not close:
            raise rq.BadRequest("empty body without Stream-Closed: true")
        return self.engine.append(
            path,
            content_type=content_type,
            record=record,
            close=close,
            stream_seq=h.get("Stream-Seq"),
            producer=producer,
            may_write=lambda meta: Reply(403) if self._forbidden(meta, owner) else None,
            at=req.at,
        )

    # -- DELETE -------------------------------------------------------------------------
    def _delete(self, req: Req, path: str, owner: str | None) -> Reply:
        reply = self.engine.delete(
            path, lambda meta: Reply(403) if self._forbidden(meta, owner) else None, req.at
        )
        if reply.status == 404:
            return self._read_only(path, owner) or reply
        return reply

    # -- HEAD ---------------------------------------------------------------------------
    def _head(self, req: Req, path: str, owner: str | None) -> Reply | Response | object:
        meta = self._readable(path, owner, req.at)
        if meta is None:
            if self.flows is None:
                return Reply(404)
            return FLASK if req.fast else self.flows.head(path, owner)
        headers = {"Content-Type": meta.content_type, OFFSET: rq.format_offset(meta.tail)}
        headers["Cache-Control"] = "no-store"
        if meta.ttl is not None:
            headers["Stream-TTL"] = str(meta.ttl)
        if meta.expires_at is not None:
            headers["Stream-Expires-At"] = meta.expires_at
        if meta.closed:
            headers[CLOSED] = "true"
        return Reply(200, headers)

    def _readable(self, path: str, owner: str | None, at: float | None) -> Meta | None:
        meta = self.engine.current(path, at)
        if meta is not None and self._forbidden(meta, owner):
            raise Forbidden()
        return meta

    # -- GET ----------------------------------------------------------------------------
    def _get(self, req: Req, path: str, owner: str | None) -> Reply | Response | object:
        args = req.args
        offsets = args.get("offset", [])
        if len(offsets) > 1:
            raise rq.BadRequest("one offset only")
        live = req.arg("live")
        if live not in (None, "long-poll", "sse"):
            raise rq.BadRequest("live must be long-poll or sse")
        if live is not None and not offsets:
            raise rq.BadRequest("live reads need an offset")
        offset = rq.parse_offset(offsets[0]) if offsets else rq.START
        meta = self._readable(path, owner, req.at)
        if meta is None:
            if self.flows is not None and self.flows.exists(path):
                if req.fast:
                    return FLASK
                has_end = rq.offset_has_end(offsets[0]) if offsets else False
                return self.flows.get(
                    path, owner, offset, live, req.arg("cursor"), self, req, has_end=has_end
                )
            return Reply(404, body=b"stream not found")
        if live == "sse" and req.fast:  # long-lived: Flask's cost per request does not matter
            return FLASK
        if meta.ttl is not None:
            self.engine.touch(path, req.at)
        if live == "sse":
            return self._sse(req, path, meta, offset)
        chunk = self.engine.chunk(path, meta, offset)
        if live == "long-poll":
            return self._long_poll(req, path, chunk)
        return self.catch_up(req, chunk, offset)

    def catch_up(self, req: Req, chunk: Chunk, offset: int) -> Reply:
        reply = self._chunkto_response(chunk)
        if offset == rq.NOW:
            reply.headers["Cache-Control"] = "no-store"
            return reply
        etag = f'"{chunk.meta.gen}:{chunk.start}:{chunk.end}{":c" if chunk.closed else ""}"'
        reply.headers["ETag"] = etag
        reply.headers["Cache-Control"] = self.cache_control
        if req.headers.get("If-None-Match") == etag:
            return Reply(304, {"ETag": etag, "Cache-Control": self.cache_control})
        return reply

    @staticmethod
    def _chunkto_response(chunk: Chunk) -> Reply:
        headers = {"Content-Type": chunk.meta.content_type, OFFSET: chunk.next_offset}
        if chunk.up_to_date:
            headers[UP_TO_DATE] = "true"
        if chunk.closed:
            headers[CLOSED] = "true"
        return Reply(200, headers, chunk.body())

    def _long_poll(self, req: Req, path: str, chunk: Chunk) -> Reply:
        cursor = req.arg("cursor")
        deadline = time.monotonic() + self.long_poll_timeout
        meta: Meta | None = chunk.meta
        while not chunk.records:
            assert meta is not None
            if meta.closed:
                return empty_poll(meta, chunk.start, None)
            meta = self.engine.wait(path, meta, deadline)
            if meta is None:
                return Reply(404, body=b"stream not found")
            if meta.tail <= chunk.start and not meta.closed:
                return empty_poll(meta, chunk.start, cursor)
            chunk = self.engine.chunk(path, meta, chunk.start)
        reply = self._chunkto_response(chunk)
        reply.headers["Cache-Control"] = self.cache_control
        if not chunk.closed:
            reply.headers[CURSOR] = cursor_for(cursor, time.time())
        return reply

    # -- SSE ----------------------------------------------------------------------------
    def _sse(self, req: Req, path: str, meta: Meta, offset: int) -> Response:
        encode = not rq.is_text(meta.content_type)
        cursor = req.arg("cursor")
        start = self.engine.chunk(path, meta, offset).start
        engine, lifetime = self.engine, self.sse_lifetime

        def events() -> Iterator[bytes]:
            deadline = time.monotonic() + lifetime
            current: Meta | None = meta
            position = start
            first = True
            while current is not None:
                chunk = engine.chunk(path, current, position)
                if chunk.records or first:  # one write: a data event never arrives alone
                    data = sse_data(chunk.body(), encode) if chunk.records else b""
                    yield data + sse_control(chunk, cursor)
                    first = False
                if chunk.closed:
                    return
                position = chunk.end
                if not chunk.up_to_date:
                    current = engine.current(path)
                    continue
                if time.monotonic() >= deadline:
                    return
                current = engine.wait(path, current, min(deadline, time.monotonic() + 15))
                if current is not None and current.tail <= position and not current.closed:
                    yield b": keep-alive\n\n"

        return sse_response(events(), encode)
