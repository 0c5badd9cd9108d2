"""Calls of the Durable Streams engine with the protocol's defaults, for tests: only what a
test varies is spelled out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flask_durable_stream.durable_streams import Engine
from flask_durable_stream.durable_streams.replies import Reply


def create(engine: Engine, path: str, ct: str = "text/plain", **options: object) -> int:
    defaults: dict[str, object] = {
        "content_type": ct,
        "ttl": None,
        "expires_at": None,
        "expires_ts": None,
        "closed": False,
        "record": None,
    }
    return engine.create(path, **{**defaults, **options}).status  # type: ignore[arg-type]


def append_reply(engine: Engine, path: str, data: bytes | None, **options: object) -> Reply:
    defaults: dict[str, object] = {
        "content_type": "text/plain",
        "record": data,
        "close": False,
        "stream_seq": None,
        "producer": None,
    }
    return engine.append(path, **{**defaults, **options})  # type: ignore[arg-type]


def append(engine: Engine, path: str, data: bytes | None, **options: object) -> int:
    return append_reply(engine, path, data, **options).status


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """A Durable Streams SSE body, line by line, as (event, JSON data): ``data`` events
    carry a JSON-mode batch, ``control`` events the offsets and flags."""
    event = "message"
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line.split(":", 1)[1])


def long_poll_to_the_end(url: str, offset: str, within: float) -> tuple[list[Any], str]:
    """Long-poll ``url`` from ``offset`` on one keep-alive connection, as the official clients
    do, until the stream is closed or ``within`` seconds have passed: the messages and the
    last ``Stream-Next-Offset``."""
    import time

    import requests

    messages: list[Any] = []
    deadline = time.monotonic() + within
    with requests.Session() as client:
        while time.monotonic() < deadline:
            reply = client.get(url, params={"offset": offset, "live": "long-poll"}, timeout=60)
            assert reply.status_code in (200, 204), (reply.status_code, reply.text[:300])
            if reply.status_code == 200:
                messages += reply.json()
            offset = reply.headers["Stream-Next-Offset"]
            if reply.headers.get("Stream-Closed") == "true":
                break
    return messages, offset
