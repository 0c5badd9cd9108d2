"""Genkit's wire protocol (see :mod:`..protocol`): ``POST <flow>`` and ``POST <flow>/cancel``.

A new call starts the flow in the runner and streams it; the same POST with an
``x-genkit-stream-id`` header reattaches to a stream through the manager and
replays it from the start. ``POST <flow>/cancel`` with that header asks the
stream's flow to stop, wherever it runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, request

from .. import _logging, protocol
from .._direct import live_hook  # live fast path hook
from ..exceptions import HTTP_STATUS, DurableStreamError, InvalidRequest, StreamNotFound
from ..flows import Flow
from ..managers.base import Event
from ..metrics import Observer
from .core import (
    Front,
    StreamResponse,
    check_owner,
    checked_stream_id,
    closer,
    error_response,
    json_response,
    owner_of,
    public_error,
    read_json_object,
    stream_response,
)

log = logging.getLogger("flask_durable_stream")

_SHAPE = 'a JSON object with a "data" field'


class GenkitFront(Front):
    """``POST <flow>`` (call or reconnect) and ``POST <flow>/cancel`` of one flow."""

    flow: Flow

    def __call__(self) -> Response:
        return self.guarded(self._handle)

    def cancel(self) -> Response:
        """The view of ``POST <flow>/cancel``: ask a stream's flow to stop.

        202 ``{"streamId": ..., "status": "cancelling"}`` when the stream was open:
        a flow in this process sees the request at once, one in another process at
        its next heartbeat. 409 ``FAILED_PRECONDITION`` with ``streamStatus`` when
        it had already ended, 404 for an unknown or expired id,
        400 without a valid ``x-genkit-stream-id``. The context provider sees the
        request first (with ``stream_id`` set), so it can refuse it.
        """
        return self.guarded(self._cancel)

    @staticmethod
    def _stream_id(*, required: bool) -> str | None:
        return checked_stream_id(
            request.headers.get(protocol.STREAM_ID_HEADER),
            protocol.STREAM_ID_HEADER,
            "header",
            required=required,
        )

    def _read_body(self, *, allow_empty: bool) -> dict[str, Any]:
        limit = self.options.max_content_length
        return read_json_object(limit, allow_empty=allow_empty, shape=_SHAPE)

    def _cancel(self) -> Response:
        stream_id = self._stream_id(required=True)
        assert stream_id is not None
        _logging.bind(stream_id, self.name)
        self._read_body(allow_empty=True)  # a body, if any, must still be sane
        context = self.context(None, stream_id)
        manager = self.manager
        info = manager.info(stream_id) if manager is not None else None
        if info is not None:
            check_owner(info.owner, context)
        local = self.runner.request_cancel(stream_id)  # a flow of this process stops at once
        if manager is None or info is None:
            if local:
                return _cancelling(stream_id)
            raise StreamNotFound("Stream not found.")
        try:
            # Stored too, so every process (and a reader of the stream) sees it.
            if manager.request_cancel(stream_id) or local:
                return _cancelling(stream_id)
        except StreamNotFound:
            if local:
                return _cancelling(stream_id)
            raise StreamNotFound("Stream not found.") from None
        ended = manager.info(stream_id)  # it ended before the flag landed: say how
        if ended is None:  # and expired meanwhile
            raise StreamNotFound("Stream not found.")
        body = {
            "status": "FAILED_PRECONDITION",
            "message": "Stream already ended.",
            "streamStatus": ended.status.value,
        }
        return json_response(body, 409)

    def _handle(self) -> Response:
        stream_id = self._stream_id(required=False)
        # ``request.args`` parses the query string; most calls have none.
        query = request.environ.get("QUERY_STRING")
        stream_arg = request.args.get("stream") if query else None
        streaming = protocol.wants_stream(request.headers.get("Accept"), stream_arg)
        body = self._read_body(allow_empty=stream_id is not None)
        if stream_id is not None:
            _logging.bind(stream_id, self.name)
            self.runner.metrics.reconnect(self.name)
            context = self.context(body.get("data"), stream_id)
            return self._resume(stream_id, streaming, context)
        if "data" not in body:
            raise InvalidRequest(f"Request body must be {_SHAPE}.")
        data = body["data"]
        context = self.context(data, None)
        run = self.runner.start(
            self.name,
            self.flow,
            data,
            context=context,
            durable=streaming,
            owner=owner_of(context),
            live=streaming,
            # The live fast path starts it at once, in the response's greenlet with
            # flow_in_response, else in a task of its own (see _direct).
            claimable=streaming,
        )
        _logging.bind(run.stream_id, self.name)
        if streaming:
            headers = {}
            if self.manager is not None:
                headers[protocol.STREAM_ID_HEADER] = run.stream_id
            # A client that stops reading is dropped past the buffer bound: its
            # connection is closed and it can resume from storage.
            reader = run.live
            assert reader is not None  # started live
            batches = run.batches(reader=reader, on_drop=closer(request.environ))
            response = self._stream(batches, headers)
            # Counted until the run lets go of the reader: the live fast path may serve
            # it before the body's first step and after the request (see _direct).
            metrics = self.runner.metrics
            if type(metrics).live_subscriber is not Observer.live_subscriber:  # not a no-op
                response.on_call = functools.partial(metrics.live_subscriber, reader, self.name)
            options = self.options
            live_hook(
                response,
                run,
                in_response=options.flow_in_response,
                detach=options.detach_response,
            )
            return response
        terminal = run.wait()
        assert terminal is not None
        return _plain(terminal)

    def _resume(self, stream_id: str, streaming: bool, context: dict[str, Any]) -> Response:
        manager = self.manager
        if manager is None:
            return Response(status=204)
        info = self.stream_info(stream_id)
        if info is None:  # unknown, expired, or another flow's: nothing to resume
            return Response(status=204)
        check_owner(info.owner, context)
        try:
            batches = manager.subscribe_batches(stream_id, timeout=self.options.subscribe_timeout)
        except StreamNotFound:
            return Response(status=204)
        batches = self.runner.metrics.subscriber(batches, self.name, "replay")
        if streaming:
            return self._stream(batches, {protocol.STREAM_ID_HEADER: stream_id})
        terminal = None
        try:
            for batch in batches:
                terminal = batch[-1]
        except DurableStreamError as exc:
            return error_response(exc, self.backend)
        if terminal is None or not terminal.terminal:
            return error_response(StreamNotFound("Stream already ended."))
        return _plain(terminal)

    def _stream(self, batches: Iterator[list[Event]], headers: dict[str, str]) -> StreamResponse:
        backend = self.backend

        def generate() -> Iterator[bytes]:
            try:
                for batch in batches:
                    yield protocol.frames(batch)
            except DurableStreamError as exc:
                yield protocol.error_frame(public_error(exc, backend)).encode()
            except Exception:
                log.exception("reading a stream failed")
                yield protocol.error_frame(protocol.INTERNAL_ERROR).encode()

        headers = {"Access-Control-Expose-Headers": protocol.STREAM_ID_HEADER, **headers}
        return stream_response(generate(), headers)


def _cancelling(stream_id: str) -> Response:
    return json_response({"streamId": stream_id, "status": "cancelling"}, 202)


def _plain(terminal: Event) -> Response:
    if terminal.kind == protocol.DONE:
        return Response(
            '{"result":' + terminal.payload + "}", status=200, mimetype="application/json"
        )
    body = terminal.value
    return json_response(body, HTTP_STATUS.get(body.get("status"), 500))
