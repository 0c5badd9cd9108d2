"""Flows shared by the benchmark servers (imported before or after monkey patching alike)."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from typing import Any

from flask_durable_stream import FlowContext

CHUNK = "x" * 14  # 16 bytes of JSON


def blast(data: Any) -> Iterator[str]:
    """As many chunks as asked, as fast as possible."""
    for _ in range(int(data["chunks"])):
        yield CHUNK
    return "end"


def llm(data: Any, ctx: FlowContext) -> str:
    """LLM-paced: a chunk every ``delay`` seconds, carrying its emit time."""
    for _ in range(int(data["chunks"])):
        time.sleep(float(data["delay"]))
        ctx.send_chunk(time.time())
    return "end"


CHUNK_PREFIX = b'data: {"message":'


def read_lags(
    response: http.client.HTTPResponse, lags: list[float], since: float | None = None
) -> bool:
    """Read an ``llm`` stream to its end, appending receive - emit (seconds) for each chunk.

    Chunks emitted before ``since`` (a replay) are not a latency and are skipped.
    Returns True if the stream ended with its result.
    """
    buffer, finished = b"", False
    while True:
        data = response.read1(65536)
        if not data:
            return finished
        now = time.time()
        buffer += data
        *frames, buffer = buffer.split(b"\n\n")
        for frame in frames:
            if frame.startswith(CHUNK_PREFIX):
                emitted = float(frame[len(CHUNK_PREFIX) : -1])
                if since is None or emitted > since:
                    lags.append(now - emitted)
            elif frame.startswith(b'data: {"result"'):
                finished = True
