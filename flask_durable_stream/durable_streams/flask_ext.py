"""Wiring for the extension: ``DURABLE_STREAM_DS_URL_PREFIX`` mounts the server."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, request

from .. import protocol
from ..managers.base import StreamManager
from ..views import ContextProvider
from .server import durable_streams_server

#: On a flow's Genkit response: where the same stream reads as a Durable Stream.
STREAM_URL_HEADER = "Durable-Stream-Url"


def register_durable_streams(
    app: Flask,
    flows_bp: Blueprint,
    manager: StreamManager | None,
    context_provider: ContextProvider | None,
) -> None:
    config = app.config
    prefix = "/" + str(config["DURABLE_STREAM_DS_URL_PREFIX"]).strip("/")
    bp = durable_streams_server(
        manager,
        context_provider=context_provider,
        long_poll_timeout=float(config["DURABLE_STREAM_DS_LONG_POLL_TIMEOUT"]),
        handover=bool(config["DURABLE_STREAM_DS_HANDOVER"]),
    )
    app.register_blueprint(bp, url_prefix=prefix)

    def advertise(response: Response) -> Response:
        stream_id = response.headers.get(protocol.STREAM_ID_HEADER)
        if stream_id and request.blueprint == flows_bp.name:
            response.headers[STREAM_URL_HEADER] = (
                f"{request.root_url.rstrip('/')}{prefix}/{stream_id}"
            )
            exposed = response.headers.get("Access-Control-Expose-Headers")
            response.headers["Access-Control-Expose-Headers"] = (
                f"{exposed}, {STREAM_URL_HEADER}" if exposed else STREAM_URL_HEADER
            )
        return response

    # Scoped to the flows' blueprint (not the app), so the Durable Streams fast path
    # stays on; first in the list, so it runs after the blueprint's other hooks.
    app.after_request_funcs.setdefault(flows_bp.name, []).insert(0, advertise)
