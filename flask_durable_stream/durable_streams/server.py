"""The blueprint factory: a Durable Streams server on a manager's storage."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from ..fronts.core import ContextProvider
from ..managers.base import StreamManager
from .blueprint import DurableStreamsView
from .fast import install as install_fast_path
from .flow_streams import FlowStreams
from .replies import Reply, add_common_headers, to_response
from .store import DSStore

log = logging.getLogger("flask_durable_stream")


def store_of(stream_manager: StreamManager | DSStore | None) -> DSStore:
    if isinstance(stream_manager, DSStore):
        return stream_manager
    if stream_manager is None:
        from .memory import MemoryDSStore

        return MemoryDSStore()
    return stream_manager.durable_streams_store()


class DurableStreamsBlueprint(Blueprint):
    """The blueprint of :func:`durable_streams_server`; ``durable_streams_store`` keeps its
    streams, ``flow_streams`` serves the manager's flow streams (None when it does not)."""

    def __init__(
        self, name: str, import_name: str, *, store: DSStore, flows: FlowStreams | None = None
    ) -> None:
        super().__init__(name, import_name)
        self.durable_streams_store = store
        self.flow_streams = flows


def durable_streams_server(
    stream_manager: StreamManager | DSStore | None = None,
    *,
    name: str = "durable_streams",
    context_provider: ContextProvider | None = None,
    import_name: str = __name__,
    flow_streams: bool = True,
    long_poll_timeout: float = 20.0,
    sse_lifetime: float = 60.0,
    max_body_bytes: int = 64 * 1024 * 1024,
    max_read_bytes: int = 1024 * 1024,
    gc_interval: float = 60.0,
    handover: bool = True,
) -> DurableStreamsBlueprint:
    """A blueprint that serves the Durable Streams protocol at every path under its prefix.

    ``stream_manager``: the manager whose storage keeps the streams (its
    :meth:`~.StreamManager.durable_streams_store`), a store, or None for a
    fresh in-memory store. With a manager, its flow streams are readable too
    (``flow_streams=False`` turns that off). Register with any ``url_prefix``.
    Under gunicorn's gevent worker, a keep-alive connection whose request the fast
    path answered is served on by gevent's handler (:mod:`.handover`);
    ``handover=False`` keeps every request with gunicorn.
    """
    store = store_of(stream_manager)
    flows = None
    if flow_streams and isinstance(stream_manager, StreamManager):
        flows = FlowStreams(stream_manager)
        if long_poll_timeout < stream_manager.lease_seconds:
            log.warning(
                "Durable Streams long-polls of %g s are shorter than the producer lease of"
                " %g s: a worker's readers of a flow stream judge the lease together, so a"
                " client polling on one keep-alive connection learns that a flow's worker"
                " died, but one whose long-polls go to other workers each time may never.",
                long_poll_timeout,
                stream_manager.lease_seconds,
            )
    view = DurableStreamsView(
        store,
        flows=flows,
        context_provider=context_provider,
        name=name,
        long_poll_timeout=long_poll_timeout,
        sse_lifetime=sse_lifetime,
        max_body_bytes=max_body_bytes,
        max_read_bytes=max_read_bytes,
        gc_interval=gc_interval,
        handover=handover,
    )
    bp = DurableStreamsBlueprint(name, import_name, store=store, flows=flows)
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]  # PATCH: our 405
    for rule in ("/", "/<path:path>"):
        bp.add_url_rule(
            rule,
            endpoint="stream",
            view_func=view,
            methods=methods,
            provide_automatic_options=False,
        )
    bp.after_request(add_common_headers)
    bp.record_once(install_fast_path(view, add_common_headers))

    @bp.errorhandler(413)
    def too_large(exc: Exception) -> Response:
        return to_response(Reply(413, body=b"request body too large"))

    return bp
