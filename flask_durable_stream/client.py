"""A Python client for durable flows that survives lost connections.

    client = DurableStreamClient("http://localhost:8000/flows")
    with client.stream("story", {"topic": "whales"}) as stream:
        for chunk in stream:          # reconnects by itself and never repeats a chunk
            print(chunk)
    print(stream.result)

A new stream starts with Genkit's ``POST /<flow>``. If the connection drops
before the end, the client reconnects to ``GET /<flow>/events`` with the last
sequence number it received (frames are numbered from 0, so counting them is
enough) and goes on from there, up to ``max_reconnects`` times in a row with
exponential backoff. The stream's error frame raises :class:`FlowError` with the
flow's status and message. Standard library only (``http.client``); under gevent
it is cooperative like any socket code.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from . import protocol, sse
from .exceptions import DurableStreamError, FlowError, StreamError, StreamNotFound

__all__ = ["DurableStreamClient", "FlowStream"]

_RETRYABLE = (OSError, http.client.HTTPException)


class _Dropped(Exception):
    """The connection ended before the stream did."""


class DurableStreamClient:
    """Calls the flows mounted at ``base_url`` (e.g. ``http://host:8000/flows``)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        max_reconnects: int = 5,
        backoff: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port
        self.prefix = url.path
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.backoff = backoff

    # -- requests ------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection()
        all_headers = {**self.headers, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=data, headers=all_headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def _error(self, response: http.client.HTTPResponse, flow: str) -> DurableStreamError:
        """The JSON error body of a non-2xx answer, as an exception with its status."""
        raw = response.read()
        try:
            body = json.loads(raw)
            status, message = str(body["status"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            return StreamError(f"HTTP {response.status}: {raw[:200]!r}", status="UNKNOWN")
        if status == "NOT_FOUND" and message == protocol.UNKNOWN_FLOW["message"]:
            # Not a missing stream: nothing at this URL runs a flow of that name.
            base = f"{self.scheme}://{self.host}{'' if self.port is None else f':{self.port}'}"
            return FlowError(
                "NOT_FOUND", f"unknown flow {flow!r}: {base}{self.prefix} has no flow of that name"
            )
        if status == "NOT_FOUND":
            return StreamNotFound(message)
        try:
            return FlowError(status, message, details=body.get("details"))
        except ValueError:  # a status this package does not know
            return StreamError(f"{status}: {message}", status="UNKNOWN")

    # -- the API -------------------------------------------------------------------------
    def call(self, flow: str, data: Any = None) -> Any:
        """A plain (non-streaming, not stored) call: the flow's output, or its error raised."""
        conn, response = self._request("POST", f"/{flow}", body={"data": data})
        try:
            if response.status != 200:
                raise self._error(response, flow)
            return json.loads(response.read())["result"]
        finally:
            conn.close()

    def stream(self, flow: str, data: Any = None) -> FlowStream:
        """Start ``flow`` and follow its stream. Iterate it for the chunks."""
        return FlowStream(self, flow, data=data)

    def resume(self, flow: str, stream_id: str, *, after: int = -1) -> FlowStream:
        """Follow an existing stream from the event after ``after`` (-1: from the start)."""
        return FlowStream(self, flow, stream_id=stream_id, after=after)

    def cancel(self, flow: str, stream_id: str) -> bool:
        """Ask the stream's flow to stop: True if it was running, False if it had ended.

        :class:`StreamNotFound` for an unknown or expired id.
        """
        conn, response = self._request(
            "POST", f"/{flow}/cancel", headers={protocol.STREAM_ID_HEADER: stream_id}
        )
        try:
            if response.status == 202:
                response.read()
                return True
            if response.status == 409:
                response.read()
                return False
            raise self._error(response, flow)
        finally:
            conn.close()


class FlowStream:
    """One stream, as an iterator of chunk values; reconnects on its own.

    After the iteration, :attr:`result` is the flow's output. :attr:`last_seq` is
    the sequence number of the last event received, :attr:`reconnects` how many
    times the connection was re-established.
    """

    def __init__(
        self,
        client: DurableStreamClient,
        flow: str,
        *,
        data: Any = None,
        stream_id: str | None = None,
        after: int = -1,
    ) -> None:
        self.client = client
        self.flow = flow
        self.stream_id = stream_id
        self.last_seq = after
        self.reconnects = 0
        self.result: Any = None
        self.done = False
        self._data = data
        self._conn: http.client.HTTPConnection | None = None

    def __iter__(self) -> Iterator[Any]:
        failures = 0
        try:
            while not self.done:
                try:
                    for kind, value in self._events():
                        failures = 0
                        if kind == protocol.CHUNK:
                            yield value
                        elif kind == protocol.DONE:
                            self.result, self.done = value, True
                        else:
                            self.done = True
                            raise FlowError(
                                str(value.get("status", "UNKNOWN")),
                                str(value.get("message", "")),
                                details=value.get("details"),
                            )
                    if not self.done:
                        raise _Dropped("the connection ended before the stream")
                except (_Dropped, *_RETRYABLE) as exc:
                    self.close()
                    if self.stream_id is None or failures >= self.client.max_reconnects:
                        raise StreamError(
                            f"lost the stream of {self.flow!r} ({exc!r})", status="UNAVAILABLE"
                        ) from exc
                    first, longest = self.client.backoff
                    time.sleep(min(longest, first * 2**failures))
                    failures += 1
                    self.reconnects += 1
        finally:
            self.close()  # also when the caller stops iterating early

    def _events(self) -> Iterator[tuple[str, Any]]:
        """The events of one connection: a new stream's POST, else the SSE endpoint."""
        if self.stream_id is None:
            conn, response = self.client._request(
                "POST",
                f"/{self.flow}",
                body={"data": self._data},
                headers={"Accept": "text/event-stream"},
            )
            self._conn = conn
            if response.status != 200:
                raise self.client._error(response, self.flow)
            self.stream_id = response.getheader(protocol.STREAM_ID_HEADER)
            for kind, value in _read_frames(response):
                self.last_seq += 1  # frames are numbered 0, 1, 2... with no gaps
                yield kind, value
            return
        params: dict[str, Any] = {"streamId": self.stream_id}
        if self.last_seq >= 0:  # event ids are non-negative; no ``after``: from the start
            params["after"] = self.last_seq
        query = urllib.parse.urlencode(params)
        conn, response = self.client._request("GET", f"/{self.flow}/events?{query}")
        self._conn = conn
        if response.status == 204:
            raise StreamNotFound("The stream ended and nothing follows the last event received.")
        if response.status in (502, 503, 504):  # a proxy or a restarting server: try again
            raise _Dropped(f"HTTP {response.status}")
        if response.status != 200:
            raise self.client._error(response, self.flow)
        for seq, kind, value in _read_sse(response):
            if seq is None:  # not a stored event: skip it, the connection decides
                continue
            if kind == protocol.CHUNK:
                if seq <= self.last_seq:
                    continue  # never yield a chunk twice
                self.last_seq = seq
            # The end comes once, and may have a seq this client had as a chunk: a
            # failure stored after its worker died, before storing what it had sent.
            yield kind, value

    def cancel(self) -> bool:
        """Ask the flow to stop (see :meth:`DurableStreamClient.cancel`)."""
        if self.stream_id is None:
            raise StreamError("the stream has no id yet", status="FAILED_PRECONDITION")
        return self.client.cancel(self.flow, self.stream_id)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> FlowStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_frames(response: http.client.HTTPResponse) -> Iterator[tuple[str, Any]]:
    buffer = ""
    for text in sse.iter_text(response):
        events, buffer = protocol.parse_frames(buffer + text)
        yield from events


def _read_sse(response: http.client.HTTPResponse) -> Iterator[tuple[int | None, str, Any]]:
    """``(id, kind, value)`` per SSE message; ``id`` None for one that is not a stored event."""
    kinds = {"message": protocol.CHUNK, "result": protocol.DONE, "failure": protocol.ERROR}
    for message in sse.read_events(response):
        number = message.id.removesuffix(protocol.SSE_END_ID)
        seq = int(number) if number.isascii() and number.isdigit() else None
        yield seq, kinds.get(message.event, protocol.CHUNK), message.json()
