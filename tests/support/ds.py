"""Calls of the Durable Streams engine with the protocol's defaults, for tests: only what a
test varies is spelled out."""

from __future__ import annotations

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
