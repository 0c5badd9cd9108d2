"""Flow streams, read-only, as JSON-mode Durable Streams.

A flow stream's events (``seq`` 0, 1, ...) are its messages, one record each:
``{"message": <chunk>}``, then ``{"result": <output>}`` or ``{"error":
<body>}``, the payloads of Genkit's frames byte for byte (an error body is
stored already redacted). The offset after event ``seq`` is record ``seq + 1``;
the stream is closed once its terminal event is stored. Live reads poll the
manager's ``info`` (cheap on every backend) and then read what arrived with
``subscribe_batches``, which returns stored events at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from flask import Response

from .. import protocol
from ..exceptions import DurableStreamError
from ..managers.base import Event, StreamInfo, StreamManager, StreamStatus, valid_stream_id
from .engine import start_of
from .replies import (
    CLOSED,
    OFFSET,
    Chunk,
    Reply,
    cursor_for,
    empty_poll,
    sse_control,
    sse_data,
    sse_response,
    to_response,
)
from .request import Req, format_offset
from .store import Meta

if TYPE_CHECKING:
    from .blueprint import DurableStreamsView

CONTENT_TYPE = "application/json"
_KEY = {
    protocol.CHUNK: b'[{"message":',
    protocol.DONE: b'[{"result":',
    protocol.ERROR: b'[{"error":',
}


class Forbidden(DurableStreamError):
    status = "PERMISSION_DENIED"

    def __init__(self) -> None:
        super().__init__("This stream belongs to another user.")


def record(event: Event) -> bytes:
    return _KEY[event.kind] + event.payload.encode() + b"}]"


class FlowStreams:
    def __init__(self, manager: StreamManager, *, poll: tuple[float, float] = (0.005, 0.1)) -> None:
        self.manager = manager
        self.poll = poll

    def info(self, path: str) -> StreamInfo | None:
        if not valid_stream_id(path):
            return None
        return self.manager.info(path)

    def exists(self, path: str) -> bool:
        return self.info(path) is not None

    def check_owner(self, path: str, owner: str | None) -> None:
        info = self.info(path)
        if info is not None and info.owner is not None and info.owner != owner:
            raise Forbidden()

    @staticmethod
    def meta(info: StreamInfo) -> Meta:
        return Meta(
            gen=f"flow-{info.created_at!r}",
            content_type=CONTENT_TYPE,
            created=info.created_at,
            touched=info.updated_at,
            tail=info.last_seq + 1,
            closed=info.status != StreamStatus.OPEN,
        )

    def head(self, path: str, owner: str | None) -> Response:
        info = self._owned(path, owner)
        if info is None:
            return to_response(Reply(404, body=b"stream not found"))
        meta = self.meta(info)
        headers = {"Content-Type": CONTENT_TYPE, OFFSET: format_offset(meta.tail)}
        headers["Cache-Control"] = "no-store"
        if meta.closed:
            headers[CLOSED] = "true"
        return to_response(Reply(200, headers))

    def _owned(self, path: str, owner: str | None) -> StreamInfo | None:
        info = self.info(path)
        if info is not None and info.owner is not None and info.owner != owner:
            raise Forbidden()
        return info

    def chunk(self, path: str, meta: Meta, offset: int) -> Chunk:
        start = start_of(meta, offset)
        records: list[bytes] = []
        if start < meta.tail:
            batches = self.manager.subscribe_batches(path, start - 1)
            try:
                for batch in batches:
                    records.extend(record(e) for e in batch if e.seq < meta.tail)
                    if not batch or batch[-1].seq + 1 >= meta.tail:
                        break
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
        return Chunk(meta, start, start + len(records), records)

    def wait(self, path: str, meta: Meta, deadline: float) -> Meta | None:
        delay = self.poll[0]
        while time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, self.poll[1])
            info = self.info(path)
            if info is None:
                return None
            fresh = self.meta(info)
            if fresh.tail != meta.tail or fresh.closed != meta.closed:
                return fresh
        return meta

    def get(
        self,
        path: str,
        owner: str | None,
        offset: int,
        live: str | None,
        cursor: str | None,
        view: DurableStreamsView,
        req: Req,
    ) -> Response:
        info = self._owned(path, owner)
        if info is None:
            return to_response(Reply(404, body=b"stream not found"))
        meta = self.meta(info)
        chunk = self.chunk(path, meta, offset)
        if live is None:
            return to_response(view.catch_up(req, chunk, offset))
        if live == "long-poll":
            deadline = time.monotonic() + view.long_poll_timeout
            current: Meta | None = meta
            while not chunk.records:
                assert current is not None
                if current.closed:
                    return to_response(empty_poll(current, chunk.start, None))
                current = self.wait(path, current, deadline)
                if current is None:
                    return to_response(Reply(404, body=b"stream not found"))
                if current.tail <= chunk.start and not current.closed:
                    return to_response(empty_poll(current, chunk.start, cursor))
                chunk = self.chunk(path, current, chunk.start)
            reply = view._chunkto_response(chunk)
            reply.headers["Cache-Control"] = view.cache_control
            if not chunk.closed:
                reply.headers["Stream-Cursor"] = cursor_for(cursor, time.time())
            return to_response(reply)

        lifetime = view.sse_lifetime

        def events() -> Iterator[bytes]:
            deadline = time.monotonic() + lifetime
            current: Meta | None = meta
            position = chunk.start
            first = True
            while current is not None:
                part = self.chunk(path, current, position)
                if part.records or first:
                    data = sse_data(part.body(), False) if part.records else b""
                    yield data + sse_control(part, cursor)
                    first = False
                if part.closed or time.monotonic() >= deadline:
                    return
                position = part.end
                if part.up_to_date:
                    current = self.wait(path, current, min(deadline, time.monotonic() + 15))
                    if current is not None and current.tail <= position and not current.closed:
                        yield b": keep-alive\n\n"

        return sse_response(events(), False)
