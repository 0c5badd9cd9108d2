"""The StreamManager contract for every bundled backend, through the shipped kit.

Each class is what a third-party backend writes: a subclass of
:class:`flask_durable_stream.testing.StreamManagerContract` with a
``make_manager`` fixture. The fixtures in ``tests/backends/`` start the real
servers (Redis, the Firestore emulator, the RTDB protocol server).
"""

from __future__ import annotations

import pytest

from flask_durable_stream.testing import MakeManager, StreamManagerContract


class TestMemory(StreamManagerContract):
    shares_storage = False  # every InMemoryStreamManager holds its own streams

    @pytest.fixture
    def make_manager(self, backend_memory: MakeManager) -> MakeManager:
        return backend_memory


class TestSQLite(StreamManagerContract):
    @pytest.fixture
    def make_manager(self, backend_sqlite: MakeManager) -> MakeManager:
        return backend_sqlite


class TestRedis(StreamManagerContract):
    @pytest.fixture
    def make_manager(self, backend_redis: MakeManager) -> MakeManager:
        return backend_redis


class TestRtdb(StreamManagerContract):
    @pytest.fixture
    def make_manager(self, backend_rtdb: MakeManager) -> MakeManager:
        return backend_rtdb


class TestFirestore(StreamManagerContract):
    @pytest.fixture
    def make_manager(self, backend_firestore: MakeManager) -> MakeManager:
        return backend_firestore
