"""Helpers of the patched checks of live streams: a raw chunked response taken apart, a
count of the connections the live fast path takes over."""

from __future__ import annotations

from flask_durable_stream import _direct


def dechunk(raw: bytes) -> tuple[str, bytes]:
    """(the ``x-genkit-stream-id`` header's value or "", the body) of a chunked response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    stream_id = ""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-genkit-stream-id":
            stream_id = value.strip().decode()
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body += rest[:n]
        rest = rest[n + 2 :]
    return stream_id, body


def count_take_overs() -> list[int]:
    """From now on, ``[n]``: how many connections live streams' sinks have taken over."""
    taken = [0]
    take_over = _direct.DirectSink._take_over

    def counted(sink: _direct.DirectSink) -> bool:
        done = take_over(sink)
        taken[0] += done
        return done

    _direct.DirectSink._take_over = counted  # type: ignore[method-assign]
    return taken
