"""Flow streams, read-only, as JSON-mode Durable Streams.

A flow stream's events (``seq`` 0, 1, ...) are its messages, one record each:
``{"message": <chunk>}``, then ``{"result": <output>}`` or ``{"error":
<body>}``, the payloads of Genkit's frames byte for byte (an error body is
stored already redacted). The offset after event ``seq`` is record ``seq + 1``;
the stream is closed once its terminal event is stored, and an offset past the
terminal event says so (``_0000000000000001``, :data:`~.request.END_MARK`). A
client may count the messages it had live into an offset; one that had a chunk
storage never got (its producer died first) holds the offset of the stored end
without the mark, and reads the stored end again ("Producer lost"), not nothing.

Live reads follow the flow with the manager's own subscription
(``subscribe_batches``, each backend's push: a condition in memory, the SQLite
change poller, Redis, a Firestore listener, an RTDB event stream) under gevent:
a long-poll answers as soon as the flow's next event is stored, and an SSE
connection holds one subscription for its lifetime. The subscription runs in a
task of its own (:func:`~..fronts.core.keepalive_pump`), so the request's
deadline and the SSE keep-alives hold however the backend waits. Without
gevent (threads, ``flask run``) a live read polls the manager's ``info`` every
``poll`` seconds, backing off, then reads what arrived; it judges the producer's
lease from what it polls, and when that runs out a subscription marks the stream
lost, as one would under gevent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, cast

from flask import Response

from .. import protocol
from .._concurrency import TaskGroup, gevent_patched
from ..exceptions import DurableStreamError, StreamNotFound
from ..fronts.core import keepalive_pump
from ..managers.base import (
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    close_batches,
    valid_stream_id,
)
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

log = logging.getLogger("flask_durable_stream")

CONTENT_TYPE = "application/json"
#: An SSE connection on a silent flow stream sends a keep-alive comment this often (seconds).
KEEPALIVE = 15.0
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
        self.poll = poll  # without gevent: how often a live read looks (first, at most)
        self.tasks = TaskGroup()  # the subscriptions live reads follow (under gevent)

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
        headers = {"Content-Type": CONTENT_TYPE, OFFSET: format_offset(meta.tail, meta.closed)}
        headers["Cache-Control"] = "no-store"
        if meta.closed:
            headers[CLOSED] = "true"
        return to_response(Reply(200, headers))

    def _owned(self, path: str, owner: str | None) -> StreamInfo | None:
        info = self.info(path)
        if info is not None and info.owner is not None and info.owner != owner:
            raise Forbidden()
        return info

    def chunk(
        self, path: str, meta: Meta, offset: int, *, has_end: bool = True, failed: bool = False
    ) -> Chunk:
        """Records from ``offset`` on. ``has_end``: the client's offset includes the end
        (its mark); ``failed``: the stream ended with an error."""
        start = start_of(meta, offset)
        if (
            meta.closed
            and meta.tail > 0
            and (offset > meta.tail or (offset == meta.tail and failed and not has_end))
        ):
            # Past the stored end, or at it without having had the end: the client had
            # events that storage never got (their worker died first, or storage gave up
            # on them), and the stored error took the seq of the first of them. It reads
            # the stored end again, which says so ("Producer lost", DATA_LOSS), rather
            # than nothing. (A stream that ended well cannot have been ahead of storage.)
            start = meta.tail - 1
        records: list[bytes] = []
        if start < meta.tail:
            batches = self.manager.subscribe_batches(path, start - 1)
            try:
                for batch in batches:
                    records.extend(record(e) for e in batch if e.seq < meta.tail)
                    if not batch or batch[-1].seq + 1 >= meta.tail:
                        break
            finally:
                close_batches(batches)
        return Chunk(meta, start, start + len(records), records, marks_end=True)

    def wait(self, path: str, meta: Meta, deadline: float) -> Meta | None:
        """Until the stream has more than ``meta`` says, or ``deadline``: its fresh metadata
        (``meta`` itself at the deadline), None once it is gone."""
        if gevent_patched():
            return self._follow(path, meta, deadline)
        manager = self.manager
        # Polling, this read judges the producer's lease as a subscription would, going on
        # from the stream's previous reader in this process (docs/fault-model.md).
        with manager.producer_watches.watch(path, manager.lease_seconds) as watch:
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
                if (
                    info.status is StreamStatus.OPEN
                    and watch.observe(info.heartbeat_at, manager.now()) <= 0
                ):
                    break  # to a subscription, once this watch has ended
            else:
                return meta
        return self._end_lost(path, meta)

    def _fresh(self, path: str) -> Meta | None:
        """The stream's metadata as stored now, None once it is gone."""
        info = self.info(path)
        return self.meta(info) if info is not None else None

    def _end_lost(self, path: str, meta: Meta) -> Meta | None:
        """The producer's lease ran out for this process's readers: a subscription, which goes
        on with their watch, marks the stream lost (as under gevent); its fresh metadata."""
        try:
            batches = self.manager.subscribe_batches(
                path, meta.tail - 1, timeout=2 * self.manager.lease_seconds
            )
        except DurableStreamError as exc:
            log.debug("flow stream %s: cannot follow it: %s", path, exc)
        else:
            try:
                next(iter(batches), None)
            except DurableStreamError as exc:  # lost, timed out: the stream's state says
                log.debug("flow stream %s: its subscription ended: %s", path, exc)
            finally:
                close_batches(batches)
        return self._fresh(path)

    def _batches(
        self, path: str, after: int, deadline: float, interval: float
    ) -> Generator[list[Event] | None, None, None]:
        """The stream's events after seq ``after`` as the manager pushes them, with None
        after ``interval`` seconds of silence and at ``deadline`` (gevent only)."""
        timeout = max(1.0, deadline - time.monotonic() + 1.0)  # the deadline ends it first
        batches = self.manager.subscribe_batches(path, after, timeout=timeout)
        pump = keepalive_pump(
            batches,
            self.tasks,
            interval=interval,
            maxsize=1,
            deadline=deadline,
            name="durable-streams-flow",
        )
        return cast("Generator[list[Event] | None, None, None]", pump)

    def _follow(self, path: str, meta: Meta, deadline: float) -> Meta | None:
        if time.monotonic() < deadline:
            try:
                source = self._batches(path, meta.tail - 1, deadline, deadline - time.monotonic())
            except StreamNotFound:
                return None
            try:
                for batch in source:
                    if batch is None or batch:  # the deadline, or events stored after ``meta``
                        break
            except DurableStreamError as exc:  # lost, timed out: the stream's state says
                log.debug("flow stream %s: its subscription ended: %s", path, exc)
            finally:
                source.close()
        return self._fresh(path)

    def get(
        self,
        path: str,
        owner: str | None,
        offset: int,
        live: str | None,
        cursor: str | None,
        view: DurableStreamsView,
        req: Req,
        *,
        has_end: bool = False,
    ) -> Response:
        info = self._owned(path, owner)
        if info is None:
            return to_response(Reply(404, body=b"stream not found"))
        meta = self.meta(info)
        failed = info.status not in (StreamStatus.OPEN, StreamStatus.DONE)
        chunk = self.chunk(path, meta, offset, has_end=has_end, failed=failed)
        if live is None:
            return to_response(view.catch_up(req, chunk, offset))
        if live == "long-poll":
            deadline = time.monotonic() + view.long_poll_timeout
            current: Meta | None = meta
            while not chunk.records:
                assert current is not None
                if current.closed:
                    return to_response(empty_poll(current, chunk.start, None, marks_end=True))
                current = self.wait(path, current, deadline)
                if current is None:
                    return to_response(Reply(404, body=b"stream not found"))
                if current.tail <= chunk.start and not current.closed:
                    return to_response(empty_poll(current, chunk.start, cursor, marks_end=True))
                chunk = self.chunk(path, current, chunk.start)
            reply = view._chunkto_response(chunk)
            reply.headers["Cache-Control"] = view.cache_control
            if not chunk.closed:
                reply.headers["Stream-Cursor"] = cursor_for(cursor, time.time())
            return to_response(reply)

        lifetime = view.sse_lifetime

        def events() -> Iterator[bytes]:
            deadline = time.monotonic() + lifetime
            if gevent_patched():
                yield from self._pushed(path, meta, chunk, deadline, cursor)
                return
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

    def _pushed(
        self, path: str, meta: Meta, chunk: Chunk, deadline: float, cursor: str | None
    ) -> Iterator[bytes]:
        """An SSE connection under gevent: what ``chunk`` read, then one subscription's
        batches as the manager pushes them, each a data event and its control event."""
        data = sse_data(chunk.body(), False) if chunk.records else b""
        yield data + sse_control(chunk, cursor)
        if chunk.closed or time.monotonic() >= deadline:
            return
        position = chunk.end
        try:
            source = self._batches(path, position - 1, deadline, KEEPALIVE)
        except StreamNotFound:
            return  # gone since: the client's next request gets its 404
        try:
            for batch in source:
                if batch is None:
                    if time.monotonic() >= deadline:
                        return  # the client reconnects from its last offset
                    yield b": keep-alive\n\n"
                    continue
                records = [record(e) for e in batch if e.seq >= position]
                if not records:
                    continue
                end = position + len(records)
                state = dataclasses.replace(meta, tail=end, closed=batch[-1].terminal)
                part = Chunk(state, position, end, records, marks_end=True)
                yield sse_data(part.body(), False) + sse_control(part, cursor)
                position = end
                if part.closed or time.monotonic() >= deadline:
                    return
        except DurableStreamError as exc:  # lost or timed out: the client reconnects
            log.debug("flow stream %s: its subscription ended: %s", path, exc)
        finally:
            source.close()
