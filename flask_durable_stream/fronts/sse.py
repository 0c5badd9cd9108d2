"""Standard Server-Sent Events: ``GET <flow>/events?streamId=<id>`` for ``EventSource``.

Ids are sequence numbers, so ``Last-Event-ID`` (or ``?after=<seq>``) resumes
after the last event received.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flask import Response, request

from .. import _logging, protocol
from .._concurrency import gevent_patched
from ..exceptions import DurableStreamError, StreamNotFound
from ..managers.base import Event, StreamStatus, close_batches
from .core import (
    Front,
    after_seq,
    check_owner,
    checked_stream_id,
    public_error,
    stream_response,
    with_stored_end,
)

log = logging.getLogger("flask_durable_stream")


class SseFront(Front):
    """``GET <flow>/events`` of one flow."""

    def events(self) -> Response:
        """The view of ``GET <flow>/events?streamId=<id>[&after=<seq>]``: standard SSE.

        Each event is ``id: <seq>`` plus ``data: <JSON>``: chunks as default
        ``message`` events, then ``event: result`` (the output) or ``event: failure``
        (``{"status", "message"}``) with the id ``<seq>-end``, after which the
        connection closes. A reconnect with ``Last-Event-ID`` (EventSource sends it by
        itself) or ``?after=`` gets the events after that seq; with the end's id, 204
        (which stops EventSource). A client at or past a failed stream's stored end
        without its end gets the stored failure. Under gevent a ``: keep-alive``
        comment goes out after ``keepalive_interval`` seconds of silence, and with
        ``sse_lifetime`` the connection is closed after that many seconds for the
        client to resume.
        """
        return self.guarded(self._events)

    def _events(self) -> Response:
        stream_id = checked_stream_id(
            request.args.get("streamId") or request.headers.get(protocol.STREAM_ID_HEADER),
            "streamId",
            "query parameter",
            required=True,
        )
        assert stream_id is not None
        _logging.bind(stream_id, self.name)
        after, had_end = after_seq(request.headers.get("Last-Event-ID"), request.args.get("after"))
        context = self.context(None, stream_id)
        manager = self.manager
        info = self.stream_info(stream_id)
        if manager is None or info is None:
            raise StreamNotFound("Stream not found.")
        check_owner(info.owner, context)
        if info.status is not StreamStatus.OPEN and after >= info.last_seq:
            if had_end or (after == info.last_seq and info.status is StreamStatus.DONE):
                return Response(status=204)  # nothing follows: EventSource stops reconnecting
            # At or past a failed stream's stored end without having had the end: the
            # client had events that storage never got (their worker died first, or
            # storage gave up on them), and the stored failure took their seqs. It gets
            # that failure ("Producer lost", DATA_LOSS), not a 204 that would tell it
            # nothing went wrong.
            after = info.last_seq - 1
        timeout = self.options.subscribe_timeout
        try:
            batches = manager.subscribe_batches(stream_id, after=after, timeout=timeout)
        except StreamNotFound:
            raise StreamNotFound("Stream not found.") from None
        batches = with_stored_end(manager, stream_id, batches, timeout)
        if request.headers.get("Last-Event-ID"):
            self.runner.metrics.reconnect(self.name)
        batches = self.runner.metrics.subscriber(batches, self.name, "replay")
        return stream_response(self._sse(batches), {})

    def _sse(self, batches: Iterator[list[Event]]) -> Iterator[bytes]:
        lifetime = self.options.sse_lifetime
        deadline = None if lifetime is None else time.monotonic() + lifetime
        source: Iterator[list[Event] | None] = (
            self.keepalives(batches, deadline=deadline, name="durable-stream-sse")
            if gevent_patched()
            else iter(batches)
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
            close_batches(source)
