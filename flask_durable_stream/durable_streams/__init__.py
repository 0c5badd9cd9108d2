"""A Durable Streams server (the ElectricSQL protocol) on this package's storage backends."""

from .engine import Engine
from .memory import MemoryDSStore
from .replies import Reply
from .server import durable_streams_server
from .store import DSStore, Meta, Txn

__all__ = ["DSStore", "Engine", "MemoryDSStore", "Meta", "Reply", "Txn", "durable_streams_server"]
