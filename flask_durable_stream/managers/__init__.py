"""Stream managers: one module per storage, one contract in :mod:`.base`."""

from .base import Event, StreamInfo, StreamManager, StreamStatus, StreamWriter
from .memory import InMemoryStreamManager

__all__ = [
    "Event",
    "InMemoryStreamManager",
    "StreamInfo",
    "StreamManager",
    "StreamStatus",
    "StreamWriter",
]
