"""The Flask extension object: ``DurableStream(app)`` or ``ext.init_app(app)``.

Follows Flask's extension rules: no app is kept on the object; per-app state is
``app.extensions["durable_stream"]``; configuration is read once from
``DURABLE_STREAM_*`` keys (documented in README, "Configuration").
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app

from .backends import build_manager
from .exceptions import DurableStreamError
from .flows import Flow
from .fronts.core import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONTENT_LENGTH,
    ContextProvider,
    FrontOptions,
)
from .managers.base import StreamManager
from .run import DEFAULT_BUFFER_LIMIT
from .runner import DEFAULT_SHUTDOWN_GRACE, DEFAULT_WRITE_RETRY_TIMEOUT, Runner
from .views import add_flow_rules, durable_stream_blueprint, flow_view

log = logging.getLogger("flask_durable_stream")

EXTENSION_KEY = "durable_stream"

#: The settings of every app; the selected backend adds its own (``config_defaults``).
DEFAULTS: dict[str, Any] = {
    "DURABLE_STREAM_URL_PREFIX": "/flows",
    "DURABLE_STREAM_BACKEND": "memory",
    "DURABLE_STREAM_TTL": 300.0,
    "DURABLE_STREAM_TIMEOUT": 60.0,
    "DURABLE_STREAM_LEASE": 10.0,
    "DURABLE_STREAM_MAX_CONTENT_LENGTH": DEFAULT_MAX_CONTENT_LENGTH,
    "DURABLE_STREAM_WRITE_RETRY_TIMEOUT": DEFAULT_WRITE_RETRY_TIMEOUT,
    "DURABLE_STREAM_SHUTDOWN_GRACE": DEFAULT_SHUTDOWN_GRACE,
    "DURABLE_STREAM_LIVE_BUFFER_BYTES": DEFAULT_BUFFER_LIMIT,
    "DURABLE_STREAM_KEEPALIVE_INTERVAL": DEFAULT_KEEPALIVE_INTERVAL,
    "DURABLE_STREAM_SSE_LIFETIME": None,
    "DURABLE_STREAM_FLOW_IN_RESPONSE": False,
    "DURABLE_STREAM_DETACH_RESPONSE": True,
    "DURABLE_STREAM_METRICS": False,
    "DURABLE_STREAM_METRICS_PATH": "/metrics",
    "DURABLE_STREAM_READY_ENDPOINT": False,
    "DURABLE_STREAM_DS_URL_PREFIX": None,
    "DURABLE_STREAM_DS_LONG_POLL_TIMEOUT": 20.0,
    "DURABLE_STREAM_DS_HANDOVER": True,
}


@dataclass
class State:
    """What ``app.extensions["durable_stream"]`` holds."""

    manager: StreamManager | None
    runner: Runner
    flows: dict[str, Flow]
    options: FrontOptions = FrontOptions()


class DurableStream:
    """Registers flows as durable streaming endpoints on an app.

    ``flows`` may also be added with the :meth:`flow` decorator, before or after
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
        # Weak: a flow decorated after init_app is routed on these apps, which stay the
        # caller's to keep or drop.
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def flow(self, name: str | None = None) -> Callable[[Flow], Flow]:
        """Decorator: ``@ext.flow()`` registers a function as a flow under its name.

        After :meth:`init_app` the flow is routed on the app at once, like ``@app.route``
        (so, like it, only before the app handled its first request).
        """

        def register(fn: Flow) -> Flow:
            flow_name = name or fn.__name__
            for app in list(self._apps):
                self._add_flow(app, flow_name, fn)
            self.flows[flow_name] = fn
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
        options = options_from_config(config, self.context_provider)
        bp = durable_stream_blueprint(
            self.flows, stream_manager=manager, name=EXTENSION_KEY, options=options
        )
        runner = bp.runner
        if config["DURABLE_STREAM_READY_ENDPOINT"]:
            bp.add_url_rule("/_ready", "ready", lambda: self._ready_view(), methods=["GET"])
        app.register_blueprint(bp, url_prefix=config["DURABLE_STREAM_URL_PREFIX"])
        app.extensions[EXTENSION_KEY] = State(manager, runner, dict(self.flows), options)
        self._apps.add(app)
        if config["DURABLE_STREAM_METRICS"]:
            from .metrics import PrometheusMetrics, metrics_response

            runner.metrics = PrometheusMetrics()

            def metrics_view() -> Response:
                body, content_type = metrics_response()
                return Response(body, content_type=content_type)

            app.add_url_rule(
                config["DURABLE_STREAM_METRICS_PATH"], "durable_stream_metrics", metrics_view
            )
        if config["DURABLE_STREAM_DS_URL_PREFIX"]:
            from .durable_streams.flask_ext import register_durable_streams

            register_durable_streams(app, bp, manager, self.context_provider)
        from .cli import durable_stream_cli

        app.cli.add_command(durable_stream_cli)

    def _add_flow(self, app: Flask, flow_name: str, fn: Flow) -> None:
        """Route one more flow on an app the blueprint is already registered on."""
        state: State = app.extensions[EXTENSION_KEY]
        if flow_name in state.flows:
            raise ValueError(f"flow {flow_name!r} is already registered on {app.name!r}")
        view = flow_view(fn, name=flow_name, runner=state.runner, options=state.options)
        prefix = str(app.config["DURABLE_STREAM_URL_PREFIX"] or "").rstrip("/")

        def add_url_rule(rule: str, *, endpoint: str, **options: Any) -> None:
            # The blueprint's endpoint names, so url_for and its handlers work as for the rest.
            app.add_url_rule(prefix + rule, endpoint=f"{EXTENSION_KEY}.{endpoint}", **options)

        add_flow_rules(add_url_rule, view)
        state.flows[flow_name] = fn

    def ready(self, app: Flask | None = None) -> Readiness:
        """Whether this worker can take streams now: storage reachable and writable, and
        not shutting down. For a load balancer's or Kubernetes' readiness probe."""
        state: State = (app or current_app).extensions[EXTENSION_KEY]
        manager = state.manager
        backend = manager.display_name if manager is not None else "none"
        if state.runner.closed:
            return Readiness(False, backend, "SHUTTING_DOWN")
        if manager is None:
            return Readiness(True, backend)
        try:
            manager.check()
        except Exception as exc:
            log.warning("readiness check failed: %s storage: %r", backend, exc)
            status = exc.status if isinstance(exc, DurableStreamError) else "UNAVAILABLE"
            return Readiness(False, backend, status)
        return Readiness(True, backend)

    def _ready_view(self) -> Response:
        readiness = self.ready()
        body = {"status": "ready" if readiness else "unavailable", "backend": readiness.backend}
        if readiness.error is not None:
            body["error"] = readiness.error
        return Response(json.dumps(body), 200 if readiness else 503, mimetype="application/json")


@dataclass(frozen=True)
class Readiness:
    """The answer of :meth:`DurableStream.ready`; true when ready. ``error`` is a status
    name (``UNAVAILABLE``, ``SHUTTING_DOWN``...), never a host name or a path."""

    ok: bool
    backend: str
    error: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def options_from_config(
    config: Mapping[str, Any], provider: ContextProvider | None
) -> FrontOptions:
    """The options of every front, from ``DURABLE_STREAM_*`` config: read once, shared by
    the blueprint and the flows added later."""
    return FrontOptions(
        context_provider=provider,
        max_content_length=int(config["DURABLE_STREAM_MAX_CONTENT_LENGTH"]),
        keepalive_interval=float(config["DURABLE_STREAM_KEEPALIVE_INTERVAL"]),
        sse_lifetime=_optional_float(config["DURABLE_STREAM_SSE_LIFETIME"]),
        write_retry_timeout=float(config["DURABLE_STREAM_WRITE_RETRY_TIMEOUT"]),
        shutdown_grace=float(config["DURABLE_STREAM_SHUTDOWN_GRACE"]),
        live_buffer_bytes=_optional_int(config["DURABLE_STREAM_LIVE_BUFFER_BYTES"]),
        flow_in_response=_flag(config, "DURABLE_STREAM_FLOW_IN_RESPONSE"),
        detach_response=_flag(config, "DURABLE_STREAM_DETACH_RESPONSE"),
    )


def _flag(config: Mapping[str, Any], name: str) -> bool:
    """A boolean setting, also from an environment string ("1", "true", "yes", "on")."""
    value = config[name]
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("", "0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be a boolean (true/false, 1/0, yes/no, on/off): {value!r}")
    return bool(value)


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)
