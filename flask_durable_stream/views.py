"""HTTP: the per-flow view (Genkit's ``expressHandler`` analogue) and the blueprint factory.

Each flow gets ``POST /<flow>`` and ``POST /<flow>/cancel`` (Genkit's protocol,
:mod:`.fronts.genkit_http`) and ``GET /<flow>/events`` (standard SSE,
:mod:`.fronts.sse`); what they share lives in :mod:`.fronts.core`. Every bad
input gets a JSON error with a 4xx status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RoutingException

from . import protocol
from .flows import Flow, adapt
from .fronts.core import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONTENT_LENGTH,
    SSE_QUEUED_BATCHES,
    ContextProvider,
    FrontOptions,
    error_response,
    json_response,
    public_error,
    request_context,
)
from .fronts.genkit_http import GenkitFront
from .fronts.sse import SseFront
from .managers.base import StreamManager
from .managers.memory import InMemoryStreamManager
from .runner import Runner, runner_for

__all__ = [
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_CONTENT_LENGTH",
    "SSE_QUEUED_BATCHES",
    "ContextProvider",
    "DurableStreamBlueprint",
    "FlowEndpoint",
    "FrontOptions",
    "add_flow_rules",
    "durable_stream_blueprint",
    "error_response",
    "flow_view",
    "public_error",
    "request_context",
    "runner_for",
]


class FlowEndpoint(GenkitFront, SseFront):
    """The views of one flow: itself (``POST``), :meth:`cancel` and :meth:`events`.
    Build it with :func:`flow_view`."""

    def __init__(
        self, name: str, flow: Flow, *, runner: Runner, options: FrontOptions | None = None
    ) -> None:
        if not callable(flow):
            raise TypeError(f"flow {name!r} is not callable")
        super().__init__(name, runner=runner, options=options or FrontOptions())
        self.__name__ = name
        self.flow = flow


class DurableStreamBlueprint(Blueprint):
    """The blueprint of :func:`durable_stream_blueprint`: its flows share ``runner``
    (and its ``stream_manager``) and ``options``."""

    def __init__(
        self, name: str, import_name: str, *, runner: Runner, options: FrontOptions
    ) -> None:
        super().__init__(name, import_name)
        self.runner = runner
        self.stream_manager = runner.manager
        self.options = options


_ANY_METHOD = ["DELETE", "GET", "PATCH", "POST", "PUT"]


def add_flow_rules(add_url_rule: Callable[..., None], endpoint: FlowEndpoint) -> None:
    """The three routes of one flow, through a Blueprint's or an app's ``add_url_rule``."""
    name = endpoint.name
    if not name or "/" in name:
        raise ValueError(f"invalid flow name {name!r}")
    # The endpoint's bound method rather than the endpoint: Flask asks for every request
    # whether its view is a coroutine function, and ``inspect`` answers for a function or a
    # method at once, for a callable object only after looking for a function's attributes.
    add_url_rule(f"/{name}", endpoint=name, view_func=endpoint.__call__, methods=["POST"])
    add_url_rule(
        f"/{name}/events", endpoint=f"{name}:events", view_func=endpoint.events, methods=["GET"]
    )
    add_url_rule(
        f"/{name}/cancel", endpoint=f"{name}:cancel", view_func=endpoint.cancel, methods=["POST"]
    )


def _unknown_flow(unknown: str) -> Response:
    """No flow of the blueprint has this name: 405 when another route serves the path with
    other methods (the blueprint must not hide the app's routes), else the JSON 404."""
    adapter = current_app.create_url_adapter(request)
    assert adapter is not None
    allowed = []
    for method in _ANY_METHOD:
        try:
            endpoint, _ = adapter.match(method=method)
        except (HTTPException, RoutingException):
            continue
        if current_app.view_functions.get(endpoint) is not _unknown_flow:
            allowed.append(method)
    if allowed:
        raise MethodNotAllowed(valid_methods=allowed)
    return json_response(protocol.UNKNOWN_FLOW, 404)


def _resolve_manager(stream_manager: Any) -> StreamManager | None:
    if stream_manager is None:
        return InMemoryStreamManager()
    if stream_manager is False:
        return None
    if not isinstance(stream_manager, StreamManager):
        raise TypeError("stream_manager must be a StreamManager, None (in-memory) or False (none)")
    return stream_manager


def flow_view(
    flow: Flow,
    *,
    stream_manager: StreamManager | None | bool = None,
    name: str | None = None,
    runner: Runner | None = None,
    options: FrontOptions | None = None,
    **overrides: Any,
) -> FlowEndpoint:
    """A view for one flow, for ``app.add_url_rule(path, view_func=..., methods=["POST"])``.

    ``stream_manager=None`` gives the view its own :class:`InMemoryStreamManager`;
    ``False`` turns durability off (no stream id, reconnects get 204). ``options``
    (:class:`~.fronts.core.FrontOptions`), with any of its fields given as keyword
    arguments on top (``context_provider=...``, ``max_content_length=...``).
    """
    options = FrontOptions.of(options, overrides)
    if runner is None:  # the runner options given here, if any: others keep the runner's
        given = {k: v for k, v in options.runner_options().items() if k in overrides}
        runner = runner_for(_resolve_manager(stream_manager), **given)
    flow = adapt(flow)
    return FlowEndpoint(
        name or str(getattr(flow, "__name__", "flow")), flow, runner=runner, options=options
    )


def durable_stream_blueprint(
    flows: Mapping[str, Flow],
    *,
    stream_manager: StreamManager | None | bool = None,
    name: str = "durable_stream",
    import_name: str = __name__,
    options: FrontOptions | None = None,
    **overrides: Any,
) -> DurableStreamBlueprint:
    """A blueprint with ``POST /<flow name>``, ``POST /<flow name>/cancel`` and
    ``GET /<flow name>/events`` (SSE) for each flow.

    All flows share one stream manager, one runner and ``options``
    (:class:`~.fronts.core.FrontOptions`; its fields may be given as keyword
    arguments instead). Register it with any ``url_prefix``. An unknown flow name
    gets a JSON 404 on every method and path shape of a flow; a path another route
    of the app serves keeps its 405.
    """
    options = FrontOptions.of(options, overrides)
    runner = runner_for(_resolve_manager(stream_manager), **options.runner_options())
    bp = DurableStreamBlueprint(name, import_name, runner=runner, options=options)
    for flow_name, flow in flows.items():
        if not flow_name or "/" in flow_name:
            raise ValueError(f"invalid flow name {flow_name!r}")
        add_flow_rules(
            bp.add_url_rule, flow_view(flow, name=flow_name, runner=runner, options=options)
        )
    # Every method on every path shape of a flow, so an unknown flow always gets the JSON
    # 404; a path some other route serves gets the 405 it would get without these.
    for path, suffix in (
        ("/<unknown>", ""),
        ("/<unknown>/events", ":events"),
        ("/<unknown>/cancel", ":cancel"),
    ):
        bp.add_url_rule(
            path, endpoint=f"unknown_flow{suffix}", view_func=_unknown_flow, methods=_ANY_METHOD
        )
    return bp
