"""A Durable Streams server (the ElectricSQL protocol) on this package's storage backends."""

from .blueprint import durable_streams_server
from .engine import Engine, Reply
from .memory import MemoryDSStore
from .store import DSStore, Meta, Txn

__all__ = ["DSStore", "Engine", "MemoryDSStore", "Meta", "Reply", "Txn", "durable_streams_server"]
