"""The Flask extension object: ``DurableStream(app)`` or ``ext.init_app(app)``.

Follows Flask's extension rules: no app is kept on the object; per-app state is
``app.extensions["durable_stream"]``; configuration is read once from
``DURABLE_STREAM_*`` keys (documented in README, "Configuration").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask

from .flows import Flow
from .managers.base import StreamManager
from .run import DEFAULT_BUFFER_LIMIT
from .runner import DEFAULT_SHUTDOWN_GRACE, DEFAULT_WRITE_RETRY_TIMEOUT, Runner
from .views import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONTENT_LENGTH,
    ContextProvider,
    durable_stream_blueprint,
)

EXTENSION_KEY = "durable_stream"

DEFAULTS: dict[str, Any] = {
    "DURABLE_STREAM_URL_PREFIX": "/flows",
    "DURABLE_STREAM_BACKEND": "memory",
    "DURABLE_STREAM_SQLITE_PATH": None,
    "DURABLE_STREAM_FIRESTORE_PROJECT": None,
    "DURABLE_STREAM_FIRESTORE_COLLECTION": "durable-streams",
    "DURABLE_STREAM_RTDB_URL": None,
    "DURABLE_STREAM_RTDB_PREFIX": "durable-streams",
    "DURABLE_STREAM_REDIS_URL": None,
    "DURABLE_STREAM_REDIS_PREFIX": "durable-streams",
    "DURABLE_STREAM_TTL": 300.0,
    "DURABLE_STREAM_TIMEOUT": 60.0,
    "DURABLE_STREAM_LEASE": 10.0,
    "DURABLE_STREAM_MAX_CONTENT_LENGTH": DEFAULT_MAX_CONTENT_LENGTH,
    "DURABLE_STREAM_WRITE_RETRY_TIMEOUT": DEFAULT_WRITE_RETRY_TIMEOUT,
    "DURABLE_STREAM_SHUTDOWN_GRACE": DEFAULT_SHUTDOWN_GRACE,
    "DURABLE_STREAM_LIVE_BUFFER_BYTES": DEFAULT_BUFFER_LIMIT,
    "DURABLE_STREAM_KEEPALIVE_INTERVAL": DEFAULT_KEEPALIVE_INTERVAL,
    "DURABLE_STREAM_SSE_LIFETIME": None,
}


@dataclass
class State:
    """What ``app.extensions["durable_stream"]`` holds."""

    manager: StreamManager | None
    runner: Runner
    flows: dict[str, Flow]


class DurableStream:
    """Registers flows as durable streaming endpoints on an app.

    ``flows`` may also be added with the :meth:`flow` decorator before
    :meth:`init_app`. ``stream_manager`` overrides ``DURABLE_STREAM_BACKEND``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        flows: dict[str, Flow] | None = None,
        stream_manager: StreamManager | None = None,
        context_provider: ContextProvider | None = None,
    ) -> None:
        self.flows: dict[str, Flow] = dict(flows or {})
        self.stream_manager = stream_manager
        self.context_provider = context_provider
        if app is not None:
            self.init_app(app)

    def flow(self, name: str | None = None) -> Callable[[Flow], Flow]:
        """Decorator: ``@ext.flow()`` registers a function as a flow under its name."""

        def register(fn: Flow) -> Flow:
            self.flows[name or fn.__name__] = fn
            return fn

        return register

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "A 'DurableStream' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = app.config
        manager = self.stream_manager if self.stream_manager is not None else build_manager(app)
        bp = durable_stream_blueprint(
            self.flows,
            stream_manager=manager,
            context_provider=self.context_provider,
            max_content_length=int(config["DURABLE_STREAM_MAX_CONTENT_LENGTH"]),
            write_retry_timeout=float(config["DURABLE_STREAM_WRITE_RETRY_TIMEOUT"]),
            shutdown_grace=float(config["DURABLE_STREAM_SHUTDOWN_GRACE"]),
            keepalive_interval=float(config["DURABLE_STREAM_KEEPALIVE_INTERVAL"]),
            sse_lifetime=_optional_float(config["DURABLE_STREAM_SSE_LIFETIME"]),
            live_buffer_bytes=_optional_int(config["DURABLE_STREAM_LIVE_BUFFER_BYTES"]),
        )
        app.register_blueprint(bp, url_prefix=config["DURABLE_STREAM_URL_PREFIX"])
        app.extensions[EXTENSION_KEY] = State(manager, bp.runner, dict(self.flows))  # type: ignore[attr-defined]
        from .cli import durable_stream_cli

        app.cli.add_command(durable_stream_cli)


def build_manager(app: Flask) -> StreamManager:
    """The manager ``DURABLE_STREAM_BACKEND`` names, built from config.

    A configuration that can never work raises ``ValueError`` here, at
    ``init_app``, naming the setting to fix. Storage that is only unreachable
    for now does not: requests that need it get ``503 UNAVAILABLE`` until it
    comes back.
    """
    config = app.config
    backend = str(config["DURABLE_STREAM_BACKEND"]).lower()
    ttl = float(config["DURABLE_STREAM_TTL"])
    timeout = float(config["DURABLE_STREAM_TIMEOUT"])
    lease = float(config["DURABLE_STREAM_LEASE"])
    if backend == "memory":
        from .managers.memory import InMemoryStreamManager

        return InMemoryStreamManager(ttl, timeout=timeout, lease_seconds=lease)
    if backend == "sqlite":
        from .managers.sqlite import SQLiteStreamManager

        path = config["DURABLE_STREAM_SQLITE_PATH"]
        if not path:  # the default lives in the app's instance folder, created if needed
            path = os.path.join(app.instance_path, "durable-streams.sqlite3")
            os.makedirs(app.instance_path, exist_ok=True)
        return SQLiteStreamManager(path, ttl_seconds=ttl, timeout=timeout, lease_seconds=lease)
    if backend == "firestore":
        from .managers.firestore import FirestoreStreamManager

        project = config["DURABLE_STREAM_FIRESTORE_PROJECT"] or _env_project()
        if not project:
            raise ValueError(
                "DURABLE_STREAM_BACKEND='firestore' needs a Google Cloud project: set"
                " DURABLE_STREAM_FIRESTORE_PROJECT (or GOOGLE_CLOUD_PROJECT in the environment)"
            )
        # The client is created lazily in each worker process (safe with
        # gunicorn --preload); the manager checks the credentials now.
        return FirestoreStreamManager(
            project=project,
            collection=config["DURABLE_STREAM_FIRESTORE_COLLECTION"],
            ttl_seconds=ttl,
            timeout=timeout,
            lease_seconds=lease,
        )
    if backend == "rtdb":
        from .managers.rtdb import RtdbStreamManager, firebase_app_for

        url = config["DURABLE_STREAM_RTDB_URL"]
        if not url:
            raise ValueError("DURABLE_STREAM_BACKEND='rtdb' needs DURABLE_STREAM_RTDB_URL")
        return RtdbStreamManager(
            firebase_app=firebase_app_for(url),
            ref_prefix=config["DURABLE_STREAM_RTDB_PREFIX"],
            ttl_seconds=ttl,
            timeout=timeout,
            lease_seconds=lease,
        )
    if backend == "redis":
        from .managers.redis import RedisStreamManager

        redis_url = config["DURABLE_STREAM_REDIS_URL"]
        if not redis_url:
            raise ValueError("DURABLE_STREAM_BACKEND='redis' needs DURABLE_STREAM_REDIS_URL")
        return RedisStreamManager(
            url=redis_url,
            prefix=config["DURABLE_STREAM_REDIS_PREFIX"],
            ttl_seconds=ttl,
            timeout=timeout,
            lease_seconds=lease,
        )
    raise ValueError(
        f"DURABLE_STREAM_BACKEND={backend!r}: use 'memory', 'sqlite', 'firestore', 'rtdb'"
        " or 'redis', or pass stream_manager= to DurableStream()"
    )


def _env_project() -> str | None:
    """The project Google's client libraries would pick from the environment."""
    return os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT")


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)
