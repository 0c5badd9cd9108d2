"""Backend plugin for the conformance suite: the Realtime Database manager.

Runs against the RTDB protocol test server (``tests/support/rtdb_server.py``),
started once per session on a free port; or, when
``FIREBASE_DATABASE_EMULATOR_HOST`` is set, against that real emulator. Each
test gets its own ``ref_prefix`` (shared by the managers it makes, like two
processes) so ``gc()`` and ``list_streams()`` only see its own streams.
``linger`` defaults to 0 here because the suite writes one event per call;
``tests/test_rtdb.py`` covers batching with the real default.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from flask_durable_stream import StreamManager

EMULATOR_ENV = "FIREBASE_DATABASE_EMULATOR_HOST"


@dataclass
class RtdbServer:
    """Where the tests' database is. ``server`` is None for a real emulator (no test hooks)."""

    host: str
    port: int
    namespace: str
    server: Any = None
    apps: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def database_url(self) -> str:
        return f"{self.url}?ns={self.namespace}"

    def require_hooks(self) -> Any:
        if self.server is None:
            pytest.skip("needs the protocol test server's hooks (a real emulator is configured)")
        return self.server

    def drop_streams(self) -> int:
        return int(self.require_hooks().drop_streams())

    def app(self) -> Any:
        """A firebase_admin app of its own on this database (emulator credentials)."""
        import firebase_admin

        app = firebase_admin.initialize_app(
            options={"databaseURL": self.database_url}, name=f"rtdb-test-{uuid.uuid4().hex}"
        )
        self.apps.append(app)
        return app


@pytest.fixture(scope="session")
def rtdb_server() -> Iterator[RtdbServer]:
    emulator = os.environ.get(EMULATOR_ENV)
    if emulator:
        host, _, port = emulator.rpartition(":")
        handle = RtdbServer(host, int(port), f"durable-test-{uuid.uuid4().hex[:8]}")
        yield handle
    else:
        from tests.support.rtdb_server import RtdbProtocolServer

        server = RtdbProtocolServer(namespace="durable-test").start()
        handle = RtdbServer(server.host, server.port, server.namespace, server)
        try:
            yield handle
        finally:
            server.stop()
    import firebase_admin

    for app in handle.apps:
        firebase_admin.delete_app(app)


@pytest.fixture(scope="session")
def rtdb_app(rtdb_server: RtdbServer) -> Any:
    return rtdb_server.app()


@pytest.fixture
def backend_rtdb(rtdb_app: Any) -> Iterator[Callable[..., StreamManager]]:
    from flask_durable_stream import RtdbStreamManager

    made: list[StreamManager] = []
    prefix = f"t-{uuid.uuid4().hex[:12]}"

    def make(**options: Any) -> StreamManager:
        options.setdefault("linger", 0.0)
        manager = RtdbStreamManager(firebase_app=rtdb_app, ref_prefix=prefix, **options)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()
