"""Durable, resumable streaming for Flask flows, wire-compatible with Genkit."""

from .exceptions import (
    DurableStreamError,
    EventTooLarge,
    FlowError,
    StorageError,
    StoragePermanentError,
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
    StreamTimeout,
)
from .extension import DurableStream
from .flows import FlowContext, RequestData
from .managers import (
    Event,
    InMemoryStreamManager,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
)
from .views import FlowEndpoint, durable_stream_blueprint, flow_view

_LAZY = {
    # Optional backends: imported on first use so their dependencies stay optional.
    "SQLiteStreamManager": ".managers.sqlite",
    "FirestoreStreamManager": ".managers.firestore",
    "RtdbStreamManager": ".managers.rtdb",
    "RedisStreamManager": ".managers.redis",
    "DurableStreamClient": ".client",
    "durable_streams_server": ".durable_streams",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "DurableStream",
    "DurableStreamClient",
    "DurableStreamError",
    "Event",
    "EventTooLarge",
    "FirestoreStreamManager",
    "FlowContext",
    "FlowEndpoint",
    "FlowError",
    "InMemoryStreamManager",
    "RedisStreamManager",
    "RequestData",
    "RtdbStreamManager",
    "SQLiteStreamManager",
    "StorageError",
    "StoragePermanentError",
    "StorageUnavailable",
    "StreamClosed",
    "StreamError",
    "StreamExists",
    "StreamInfo",
    "StreamManager",
    "StreamNotFound",
    "StreamStatus",
    "StreamTimeout",
    "StreamWriter",
    "durable_stream_blueprint",
    "durable_streams_server",
    "flow_view",
]
