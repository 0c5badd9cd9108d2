"""A raw HTTP client for tests: reads Genkit frames and can drop the connection at will."""

from __future__ import annotations

import codecs
import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from flask_durable_stream import protocol


@dataclass
class StreamCall:
    status: int
    headers: dict[str, str]
    events: list[tuple[str, Any]] = field(default_factory=list)
    raw: bytes = b""

    @property
    def stream_id(self) -> str | None:
        return self.headers.get(protocol.STREAM_ID_HEADER)

    @property
    def chunks(self) -> list[Any]:
        return [v for k, v in self.events if k == protocol.CHUNK]

    @property
    def terminal(self) -> tuple[str, Any] | None:
        return self.events[-1] if self.events and self.events[-1][0] != protocol.CHUNK else None


def post_stream(
    base_url: str,
    path: str,
    body: Any,
    *,
    stream_id: str | None = None,
    stop_after: int | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> StreamCall:
    """POST with ``Accept: text/event-stream``; ``stop_after=k`` drops the socket after k chunks."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    all_headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        **(headers or {}),
    }
    if stream_id is not None:
        all_headers[protocol.STREAM_ID_HEADER] = stream_id
    conn.request("POST", path, body=json.dumps(body).encode(), headers=all_headers)
    response = conn.getresponse()
    call = StreamCall(response.status, {k.lower(): v for k, v in response.getheaders()})
    buffer = ""
    utf8 = codecs.getincrementaldecoder("utf-8")()  # a read may end inside a character
    raw = bytearray()
    try:
        while True:
            data = response.read1(65536)
            if not data:
                break
            raw += data
            buffer += utf8.decode(data)
            events, buffer = protocol.parse_frames(buffer)
            call.events.extend(events)
            if stop_after is not None and len(call.chunks) >= stop_after:
                break  # vanish like a closed tab
    finally:
        call.raw = bytes(raw)
        if conn.sock is not None:
            # At once: close() alone leaves the connection open while the response's
            # file still refers to the socket (until it is freed), and a server that
            # goes on writing to it sees a client that is still there.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the server closed it first
            conn.sock.close()
        response.close()
        conn.close()
    return call
