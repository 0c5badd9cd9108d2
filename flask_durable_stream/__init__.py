"""Durable, resumable streaming for Flask flows, wire-compatible with Genkit."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

from . import backends as _backends
from ._memory import tune_gc
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

try:
    __version__ = _version("flask_durable_stream")  # one source: pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from .client import DurableStreamClient
    from .managers.firestore import FirestoreStreamManager
    from .managers.redis import RedisStreamManager
    from .managers.rtdb import RtdbStreamManager
    from .managers.sqlite import SQLiteStreamManager

# Optional backends (and the client) are imported on first use, so their
# dependencies stay optional; the backend classes come from the registry.
_LAZY = {cls: module for module, cls in _backends.BUILTIN.values()}
_LAZY["DurableStreamClient"] = "flask_durable_stream.client"
_LAZY["durable_streams_server"] = "flask_durable_stream.durable_streams"


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    "tune_gc",
]
