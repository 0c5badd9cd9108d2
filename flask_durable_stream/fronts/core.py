"""What every front shares: options, request parsing and checks, error replies, the
streaming response and the one keep-alive pump.

A front (:mod:`.genkit_http`, :mod:`.sse`, :mod:`flask_durable_stream.ai_sdk`) only maps
requests to runner and manager calls and events to bytes. Everything a client can
get wrong (ids, offsets, bodies) and everything that decides who may read a stream
(context provider, owner, flow) is checked here, once, the same way for each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Response, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_input_stream

from .. import _logging, protocol
from .._concurrency import TaskGroup
from .._responses import TrackedBody
from ..exceptions import DurableStreamError, InvalidRequest, StorageUnavailable
from ..flows import RequestData, foreign_error, resolve
from ..managers.base import (
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    close_batches,
    valid_stream_id,
)
from ..run import DEFAULT_BUFFER_LIMIT
from ..runner import DEFAULT_SHUTDOWN_GRACE, DEFAULT_WRITE_RETRY_TIMEOUT, Runner

log = logging.getLogger("flask_durable_stream")

T = TypeVar("T")

#: Returns the flow's context (``"owner"`` binds the stream to a user); may be async,
#: as Genkit's context providers may be.
ContextProvider = Callable[[RequestData], Mapping[str, Any] | None | Awaitable[Any]]

DEFAULT_MAX_CONTENT_LENGTH = 1024 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 15.0
#: Items a streaming response reads ahead of its client under gevent: for a client
#: that stops reading, the source stops being read instead of piling up in memory.
SSE_QUEUED_BATCHES = 4
_END = object()


@dataclass(frozen=True)
class FrontOptions:
    """The options of every front, given once and shared by all the flows of a blueprint.

    ``write_retry_timeout``: seconds a storage outage is retried (events wait in
    memory) before a stream ends ``DATA_LOSS``. ``live_buffer_bytes``: how far a
    live client may fall behind before its connection is closed (it can resume
    from storage); None for no bound. ``sse_lifetime``: seconds after which an SSE
    connection is closed for the client to resume (None: never).
    ``flow_in_response``: under gevent, a flow started by a streaming request of the
    Genkit endpoint runs in that request's greenlet while the live fast path serves it
    (one greenlet per stream instead of two). Once its client has gone, a generator
    or ``async`` flow moves to a task of its own at its next chunk; a plain function
    flow keeps the request until it ends (see docs/performance.md).
    ``detach_response``: under gevent, once a live stream's headers are out, the live
    fast path takes its connection over and the request ends at once: the stream is
    written from the hub to its end, then the connection is served on by the server's
    handler, kept alive (one greenlet per stream, the flow's; see docs/performance.md).
    ``flow_in_response`` wins over it.
    """

    context_provider: ContextProvider | None = None
    max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH
    subscribe_timeout: float | None = None
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    sse_lifetime: float | None = None
    write_retry_timeout: float = DEFAULT_WRITE_RETRY_TIMEOUT
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    live_buffer_bytes: int | None = DEFAULT_BUFFER_LIMIT
    flow_in_response: bool = False
    detach_response: bool = True

    @classmethod
    def of(cls, options: FrontOptions | None, overrides: Mapping[str, Any]) -> FrontOptions:
        """``options`` (or the defaults) with keyword arguments of a factory on top; an
        unknown keyword is a TypeError naming it, as for any function."""
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def runner_options(self) -> dict[str, Any]:
        """What :func:`~.runner.runner_for` takes: the options of the shared runner."""
        return {
            "write_retry_timeout": self.write_retry_timeout,
            "shutdown_grace": self.shutdown_grace,
            "live_buffer_bytes": self.live_buffer_bytes,
        }


# -- request parsing -------------------------------------------------------------------


def checked_stream_id(
    stream_id: str | None, name: str, where: str, *, required: bool
) -> str | None:
    """A stream id from the request, or a 400 naming the field it came from."""
    if stream_id is None:
        if required:
            raise InvalidRequest(f"Missing {name} {where}.")
        return None
    if not valid_stream_id(stream_id):
        raise InvalidRequest(f"Invalid {name}: expected 1-128 characters of [A-Za-z0-9_.-].")
    return stream_id


#: A canonical event id: no sign, no spaces, no leading zeros, no exponent; the
#: stream's last event's has ``-end`` after its seq (``protocol.SSE_END_ID``).
_EVENT_ID_RE = re.compile(r"(0|[1-9][0-9]{0,18})(-end)?")


def after_seq(last_event_id: str | None, after: str | None) -> tuple[int, bool]:
    """The seq to resume after, and whether the client had the stream's end.

    ``Last-Event-ID`` (newer, sent on reconnect) wins over ``?after=``. Only ids the
    server sends: canonical non-negative integers, the end's with ``-end``; another
    ("+1", " 1", "01", "1e3") is a client bug worth a 400, not a guess.
    """
    raw = last_event_id if last_event_id not in (None, "") else after
    if raw in (None, ""):
        return -1, False
    assert raw is not None
    match = _EVENT_ID_RE.fullmatch(raw)
    if match is None:
        raise InvalidRequest(
            "Last-Event-ID and after must be an event id: a non-negative integer"
            " without sign, spaces or leading zeros, or the last event's (<seq>-end)."
        )
    return int(match.group(1)), match.group(2) is not None


def with_stored_end(
    manager: StreamManager,
    stream_id: str,
    batches: Iterator[list[Event]],
    timeout: float | None,
) -> Iterator[list[Event]]:
    """A follow's ``batches``, then the stream's stored end if they stop without it.

    A backend's follow stops without an event when the stream ends while nothing is
    stored after the reader's cursor: the reader is past the stored end. It then
    has events that storage never got (their worker died first, or storage gave up
    on them), and the stream ended with an error ("Producer lost", DATA_LOSS) at a
    seq the reader had as a chunk. The reader gets that error, not a quiet end.
    """
    try:
        for batch in batches:
            yield batch
            if batch and batch[-1].terminal:
                return
    finally:
        close_batches(batches)
    info = manager.info(stream_id)
    if info is None or info.status in (StreamStatus.OPEN, StreamStatus.DONE):
        return  # gone; or ended well, so the reader had every event and the end
    tail = manager.subscribe_batches(stream_id, after=info.last_seq - 1, timeout=timeout)
    try:
        for batch in tail:
            if batch and batch[-1].terminal:
                yield batch[-1:]
                return
    finally:
        close_batches(tail)


def read_raw(limit: int) -> bytes:
    """The body, at most ``limit`` bytes however it is framed.

    Werkzeug's own limit on a chunked body (no Content-Length) silently
    truncates it; reading one byte past the limit tells a body that is too
    large from one that is exactly at it.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    # Bounded by Content-Length, or by a server that decodes chunked bodies and says
    # so (wsgi.input_terminated); empty otherwise. The limit is enforced below.
    stream = get_input_stream(request.environ)
    # With a Content-Length, nothing past it is read; without one, one byte past the
    # limit tells a body that is too large.
    want = length if length is not None else limit + 1
    parts: list[bytes] = []
    size = 0
    try:
        while size < want:
            part = stream.read(min(64 * 1024, want - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    except ClientDisconnected:
        raise InvalidRequest("Request body ended early.") from None
    if size > limit:
        raise _too_large(limit)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"Request body exceeds {limit} bytes.", status="RESOURCE_EXHAUSTED", http_status=413
    )


def read_json_object(limit: int, *, allow_empty: bool, shape: str) -> dict[str, Any]:
    """The body as a JSON object (``{}`` for an empty body where allowed); ``shape``
    says what the front expects, in the 400 for anything else."""
    raw = read_raw(limit)
    if not raw.strip() and allow_empty:
        return {}
    try:
        # json.loads first works out which of UTF-8, -16 and -32 a bytes body is in (some 50
        # bytecode instructions, for every request); one that starts with "{" and a byte
        # other than NUL is UTF-8 by its rules, decoded here as it would decode it.
        utf8 = raw[:1] == b"{" and raw[1:2] != b"\x00"
        body = json.loads(raw.decode("utf-8", "surrogatepass") if utf8 else raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError; nesting too deep to parse
        raise InvalidRequest("Request body must be valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"Request body must be {shape}.")
    return body


# -- who may read a stream -------------------------------------------------------------


def owner_of(context: Mapping[str, Any]) -> str | None:
    """The owner a context provider assigned to the request (``"owner"``), if any."""
    owner = context.get("owner")
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner:
        raise TypeError("the context provider's 'owner' must be a non-empty string")
    return owner


def request_context(
    provider: ContextProvider | None, data: Any, flow: str, stream_id: str | None
) -> dict[str, Any]:
    """The context ``provider`` gives the current request (sync or async provider): the one
    place every front (Genkit, SSE, AI SDK, Durable Streams) asks it."""
    if provider is None:
        return {}
    request_data = RequestData(
        method=request.method,
        path=request.path,
        headers={k.lower(): v for k, v in request.headers.items()},
        input=data,
        flow=flow,
        stream_id=stream_id,
    )
    return dict(resolve(provider(request_data)) or {})


def check_owner(owner: str | None, context: Mapping[str, Any]) -> None:
    """An owned stream is for its owner only: reading, following and cancelling it."""
    if owner is not None and owner_of(context) != owner:
        raise InvalidRequest("This stream belongs to another user.", status="PERMISSION_DENIED")


def of_another_flow(info: StreamInfo | None, flow: str) -> bool:
    """Whether the stream is another flow's: to an endpoint of ``flow`` it is as unknown
    as a missing one, so a reconnect to the wrong endpoint learns nothing. A backend
    that does not keep the flow's name (``info.flow`` None) cannot tell."""
    return info is not None and info.flow is not None and info.flow != flow


# -- replies ---------------------------------------------------------------------------


def json_response(body: Any, status: int) -> Response:
    return Response(protocol.encode(body), status=status, mimetype="application/json")


def public_error(exc: DurableStreamError, backend: str = "storage") -> dict[str, Any]:
    """The body a client sees for ``exc``.

    Backends word a :class:`StorageUnavailable` for clients (no file path, host
    or credentials: the contract in :mod:`.managers.base`); an empty one gets a
    generic message naming the backend.
    """
    if isinstance(exc, StorageUnavailable):
        log.warning("storage unavailable: %s", exc.message)
        message = exc.message or f"The {backend} backend is unavailable; try again shortly."
        return {"status": "UNAVAILABLE", "message": message}
    return exc.to_dict()


def error_response(exc: DurableStreamError, backend: str = "storage") -> Response:
    response = json_response(public_error(exc, backend), exc.http_status)
    if isinstance(exc, StorageUnavailable):
        response.headers["Retry-After"] = "1"
    return response


class StreamResponse(Response):
    """Sends status and headers before the first frame, so the client learns the
    stream id at once even when the first chunk takes a minute."""

    #: The live fast path's hook (see _direct): given the server's ``write`` once the
    #: headers are out, it returns what the body does before its first frame, if anything.
    on_headers: Callable[[Callable[[bytes], Any]], Callable[[], object] | None] | None = None
    #: Called once a server calls the response: it is being served from now on.
    on_call: Callable[[], None] | None = None

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        if self.on_call is not None:
            self.on_call()
        app_iter, status, headers = self.get_wsgi_response(environ)
        write = start_response(status, headers)
        write(b"")
        first = self.on_headers(write) if self.on_headers is not None else None
        # Tracked, so that a graceful stop lets it send the terminal frame first.
        return TrackedBody(app_iter, first)

    def get_wsgi_headers(self, environ: Any) -> Headers:
        """Werkzeug's, without the copy of every header it makes to change none of them:
        for a stream (200, a body that is no sequence, no ``Location`` or
        ``Content-Location``), Werkzeug's own fix-ups would leave the headers as they
        are. The server only reads them, once."""
        headers = self.headers
        if self.status_code != 200 or self.is_sequence:
            return super().get_wsgi_headers(environ)
        for key, _ in headers:
            if key.lower() in _LOCATIONS:
                return super().get_wsgi_headers(environ)
        return headers


#: The headers Werkzeug rewrites in a response (``get_wsgi_headers``), lowercase.
_LOCATIONS = frozenset(("location", "content-location"))


def stream_response(body: Iterable[bytes], headers: Mapping[str, str]) -> StreamResponse:
    """An event stream that no cache or proxy holds back; ``headers`` are added to it
    (names other than its own ``Content-Type``, ``Cache-Control`` and ``X-Accel-Buffering``)."""
    response = StreamResponse(body, status=200, mimetype="text/event-stream")
    add = response.headers.add  # the new response has none of these yet
    add("Cache-Control", "no-cache")
    add("X-Accel-Buffering", "no")
    for name, value in headers.items():
        add(name, value)
    return response


def closer(environ: Mapping[str, Any]) -> Callable[[], None] | None:
    """A way to close the client's connection from another task (gunicorn, werkzeug).

    A slow reader's task is blocked writing to its socket; shutting the socket
    down wakes it with an error, which ends the response.
    """
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    # gevent's socket wraps the OS one as ``_sock``. Shutting that one down lets the
    # blocked send fail as a client disconnect (EPIPE, which servers ignore) rather
    # than gevent cancelling the wait with an error that servers log as a crash.
    raw: Any = getattr(sock, "_sock", sock)
    if not callable(getattr(raw, "shutdown", None)):
        return None

    def close() -> None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    return close


def keepalive_pump(
    items: Iterable[T],
    tasks: TaskGroup,
    *,
    interval: float,
    maxsize: int = SSE_QUEUED_BATCHES,
    deadline: float | None = None,
    name: str = "durable-stream-sse",
) -> Iterator[T | None]:
    """``items``, with ``None`` after every ``interval`` of silence and at the
    ``deadline`` (a ``time.monotonic()`` value), for a keep-alive (gevent only).

    ``items`` is read in its own task, killed when the client goes away, so a
    silent stream does not keep a reader waiting for its timeout. At most
    ``maxsize`` items wait for the client: one that stops reading stops the task
    reading, instead of this process buffering the whole stream for it.
    """
    import gevent.queue

    queue: gevent.queue.Queue[Any] = gevent.queue.Queue(maxsize=maxsize)

    def pump() -> None:
        try:
            for item in items:
                queue.put(item)
            queue.put(_END)
        except Exception as exc:
            queue.put(exc)

    task = tasks.spawn(pump, name=name)
    try:
        while True:
            wait = interval
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            try:
                item = queue.get(timeout=wait)
            except gevent.queue.Empty:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        task.kill(timeout=5)


# -- the base of a front ---------------------------------------------------------------


class Front:
    """One flow's endpoints in one wire protocol: the runner, the options, and the
    answers every front gives the same way (errors, context, who may see a stream)."""

    #: Names the front in a log line about a request that failed.
    kind = "flow"

    def __init__(self, name: str, *, runner: Runner, options: FrontOptions) -> None:
        self.name = name
        self.runner = runner
        self.options = options

    @property
    def manager(self) -> StreamManager | None:
        return self.runner.manager

    @property
    def backend(self) -> str:
        manager = self.runner.manager
        return manager.display_name if manager is not None else "storage"

    def guarded(self, handle: Callable[[], Response]) -> Response:
        """``handle()``, with every error as the JSON reply a client can act on."""
        _logging.bind(None, self.name)  # log lines name the flow (and the stream, once known)
        try:
            return handle()
        except DurableStreamError as exc:
            return error_response(exc, self.backend)
        except Exception as exc:  # a bug in a context provider or a backend: logged, redacted
            public = foreign_error(exc)  # unless deliberate (a Genkit PublicError)
            if public is not None:
                return error_response(public, self.backend)
            log.exception("%s %r: request failed", self.kind, self.name)
            return json_response(protocol.INTERNAL_ERROR, 500)

    def context(self, data: Any, stream_id: str | None) -> dict[str, Any]:
        return request_context(self.options.context_provider, data, self.name, stream_id)

    def stream_info(self, stream_id: str) -> StreamInfo | None:
        """The stream if this flow may show it: None for an unknown one or another flow's."""
        manager = self.manager
        info = manager.info(stream_id) if manager is not None else None
        return None if of_another_flow(info, self.name) else info

    def keepalives(
        self, items: Iterable[T], *, deadline: float | None = None, name: str
    ) -> Iterator[T | None]:
        return keepalive_pump(
            items,
            self.runner.tasks,
            interval=self.options.keepalive_interval,
            deadline=deadline,
            name=name,
        )
