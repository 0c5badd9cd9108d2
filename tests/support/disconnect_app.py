"""An app for tests/test_disconnect_server.py under ``gunicorn -k gevent -w 1``.

    gunicorn -k gevent -w 1 'tests.support.disconnect_app:create_app()'

SQLite storage at ``DISCONNECT_APP_SQLITE`` when set (its ``store_interval`` from
``DISCONNECT_APP_SQLITE_STORE_INTERVAL``, seconds, its heartbeat interval from
``DISCONNECT_APP_SQLITE_HEARTBEAT``), else the in-memory manager;
``DISCONNECT_APP_FLOW_IN_RESPONSE=1`` sets ``DURABLE_STREAM_FLOW_IN_RESPONSE``,
``DISCONNECT_APP_DETACH_RESPONSE=1`` ``DURABLE_STREAM_DETACH_RESPONSE``,
``DISCONNECT_APP_METRICS=1`` ``DURABLE_STREAM_METRICS`` (``GET /stats`` then also says how
many live clients the metrics count). The
``gated`` flow emits ``before`` chunks, waits until ``POST /gate/<key>`` opens its gate,
then emits ``after`` more: a test can drop the client at a known point. ``GET /stats``
says how many frames the live fast path took (see ``_direct``), so a test can tell that
path was taken, and how many ``gated`` flows ran in their response's greenlet (the
fast path's one greenlet per stream) rather than in a task of the runner's, how many
live responses the fast path took the connection of (ending their requests), and how
many response bodies the server is iterating now, and how many ``GET /wait/<key>``
requests wait for their gate (``?timeout=`` seconds at most, else 120), and on SQLite
how many appends the writer thread got in requests carrying several streams' appends
(``together``); ``GET /apart`` lists the streams of those that a failed check sent one
by one, and ``GET /cancelled/<stream_id>`` says whether a flow running here was asked to
cancel.
The ``lockstep`` flow emits chunk ``i`` once the gate ``<key>-<i>`` opens.

The ``fill`` flow emits ``"start"``, waits for the gate ``go-<key>``, emits 16 KiB
chunks until its live client's socket is full (the client does not read meanwhile),
opens the gate ``full-<key>``, then emits ``after`` more: they can only reach the client
from the run, once it reads again.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask, request

from flask_durable_stream import (
    DurableStream,
    FlowContext,
    SQLiteStreamManager,
    _concurrency,
    _direct,
    _responses,
)

_gates: dict[str, threading.Event] = {}
_runner: list[Any] = []
FILL = "x" * 16384
_offers = [0]
_in_response = [0]
_detached = [0]
_waiting = [0]  # requests waiting in GET /wait/<key>
_together = [0]  # SQLite: appends stored in a request of several streams' appends
_apart: list[str] = []  # SQLite: of those, the streams a failed check sent one by one
_emitted = _direct.DirectSink.emitted
_flush = _direct.DirectSink.flush
_take_over = _direct.DirectSink._take_over


def _counted(send: Any) -> Any:
    # The fast path's two ways in: an event just emitted, and the deferred send of a
    # burst's rest. The events a send of the fast path takes move the reader's cursor.
    def counted(sink: _direct.DirectSink, *args: Any) -> None:
        before = sink.reader.cursor
        send(sink, *args)
        _offers[0] += sink.reader.cursor - before

    return counted


def _counted_take_over(sink: _direct.DirectSink) -> bool:
    taken = _take_over(sink)
    _detached[0] += taken
    return taken


_direct.DirectSink.emitted = _counted(_emitted)  # type: ignore[method-assign]
_direct.DirectSink.flush = _counted(_flush)  # type: ignore[method-assign]
_direct.DirectSink._take_over = _counted_take_over  # type: ignore[method-assign]


def _gate(key: str) -> threading.Event:
    return _gates.setdefault(key, threading.Event())


def gated(data: Any, ctx: FlowContext) -> str:
    import gevent

    if not isinstance(gevent.getcurrent(), _concurrency._greenlet_class()):
        _in_response[0] += 1
    for i in range(int(data["before"])):
        ctx.send_chunk(i)
    _gate(str(data["key"])).wait()
    for i in range(int(data["before"]), int(data["before"]) + int(data["after"])):
        time.sleep(0.001)  # paced like a model, so the fast path has a parked reader to serve
        ctx.send_chunk(i)
    return "done"


def gated_generator(data: Any) -> Any:
    """``gated`` as a generator; its result says whether it ended in a task of the runner's
    (where it moves, with the setting on, once its client has gone)."""
    import gevent

    for i in range(int(data["before"])):
        yield i
    _gate(str(data["key"])).wait()
    for i in range(int(data["before"]), int(data["before"]) + int(data["after"])):
        time.sleep(0.001)
        yield i
    return isinstance(gevent.getcurrent(), _concurrency._greenlet_class())


def lockstep(data: Any, ctx: FlowContext) -> str:
    """Chunk ``i`` once the gate ``<key>-<i>`` opens, for ``i`` below ``steps``: flows of one
    key emit each chunk in the same turn of the hub's loop, so their appends share a request."""
    for i in range(int(data["steps"])):
        _gate(f"{data['key']}-{i}").wait()
        ctx.send_chunk(i)
    return "done"


def fill(data: Any, ctx: FlowContext) -> int:
    ctx.send_chunk("start")
    _gate("go-" + str(data["key"])).wait()  # the client has the first frame: the sink is armed
    run = _runner[0].get(ctx.stream_id)
    assert run.sink is not None, "no live fast path for this response"
    filled = 0
    while run.sink.armed:  # until a send comes short: the client does not read
        ctx.send_chunk(FILL)
        filled += 1
        time.sleep(0.001)  # the burst's send happens when the flow yields
    _gate("full-" + str(data["key"])).set()
    for i in range(int(data["after"])):
        time.sleep(0.001)
        ctx.send_chunk(i)
    return filled


def _live_subscribers() -> int:
    """The metrics' gauge of live clients of the ``gated`` flow (-1 without metrics)."""
    if not os.environ.get("DISCONNECT_APP_METRICS"):
        return -1
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "durable_stream_subscribers", {"flow": "gated", "mode": "live"}
    )
    return int(value or 0)


def _count_appends_together(manager: SQLiteStreamManager) -> None:
    """Count the appends the writer thread got in requests of several streams' appends
    (the running flows' appends of one turn of the hub's loop)."""
    append_many = manager._op_append_many

    def counted(conn: Any, entries: Any) -> Any:
        if len(entries) > 1:
            _together[0] += len(entries)
        return append_many(conn, entries)

    together = manager._append_together

    def counted_together(conn: Any, entries: Any) -> bool:
        stored = together(conn, entries)
        if not stored:
            _apart.extend(entry[0] for entry in entries)
        return stored

    manager._op_append_many = counted  # type: ignore[method-assign]
    manager._append_together = counted_together  # type: ignore[method-assign]


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_FLOW_IN_RESPONSE"] = os.environ.get(
        "DISCONNECT_APP_FLOW_IN_RESPONSE", ""
    )
    app.config["DURABLE_STREAM_DETACH_RESPONSE"] = os.environ.get(
        "DISCONNECT_APP_DETACH_RESPONSE", ""
    )
    app.config["DURABLE_STREAM_METRICS"] = bool(os.environ.get("DISCONNECT_APP_METRICS"))
    path = os.environ.get("DISCONNECT_APP_SQLITE")
    interval = float(os.environ.get("DISCONNECT_APP_SQLITE_STORE_INTERVAL", "0"))
    beat = os.environ.get("DISCONNECT_APP_SQLITE_HEARTBEAT")  # seconds; the lease 10 of them
    timing = (
        {}
        if beat is None
        else {"heartbeat_interval": float(beat), "lease_seconds": 10 * float(beat)}
    )
    manager = SQLiteStreamManager(path, store_interval=interval, **timing) if path else None
    if manager is not None:
        _count_appends_together(manager)
    DurableStream(
        app,
        flows={"gated": gated, "generator": gated_generator, "fill": fill, "lockstep": lockstep},
        stream_manager=manager,
    )
    _runner[:] = [app.extensions["durable_stream"].runner]

    @app.post("/gate/<key>")
    def open_gate(key: str) -> dict[str, bool]:
        _gate(key).set()
        return {"open": True}

    @app.get("/wait/<key>")
    def wait_gate(key: str) -> dict[str, bool]:
        _waiting[0] += 1
        try:
            return {"open": _gate(key).wait(float(request.args.get("timeout", 120)))}
        finally:
            _waiting[0] -= 1

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return {
            "offers": _offers[0],
            "in_response": _in_response[0],
            "detached": _detached[0],
            "open_bodies": len(_responses._OPEN),
            "waiting": _waiting[0],
            "live_subscribers": _live_subscribers(),
            "taken": _direct._taken[0],  # connections the sinks own (or serve on) now
            "together": _together[0],
        }

    @app.get("/apart")
    def apart() -> dict[str, list[str]]:
        return {"streams": _apart}

    @app.get("/cancelled/<stream_id>")
    def cancelled(stream_id: str) -> dict[str, bool]:
        """Whether the flow of ``stream_id``, running here, was asked to cancel."""
        run = _runner[0].get(stream_id)
        return {"cancelled": run is not None and run.ctx.cancelled}

    return app
