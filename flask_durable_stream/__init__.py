"""Durable, resumable streaming for Flask flows, wire-compatible with Genkit."""

from .exceptions import (
    DurableStreamError,
    FlowError,
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
    StreamTimeout,
)
from .managers import (
    Event,
    InMemoryStreamManager,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
)

__all__ = [
    "DurableStreamError",
    "Event",
    "FlowError",
    "InMemoryStreamManager",
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
]
