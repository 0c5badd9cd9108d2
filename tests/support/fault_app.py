"""An app for the storage-fault tests under ``gunicorn -k gevent`` (tests/test_faults_server.py).

    gunicorn -k gevent 'tests.support.fault_app:create_app()'

SQLite storage at ``FAULT_APP_SQLITE``; when ``FAULT_APP_MAX_EVENT_BYTES`` is set the
manager stores no event larger than that, as a backend with a size limit does;
``FAULT_APP_DETACH_RESPONSE=1`` sets ``DURABLE_STREAM_DETACH_RESPONSE``, and the live fast
path's sink then says on stderr when it cuts a connection it took over.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

from flask import Flask

from flask_durable_stream import DurableStream, FlowContext, SQLiteStreamManager, _direct

_cut = _direct.DirectSink._cut


def _told_cut(sink: _direct.DirectSink) -> None:
    print("fault_app: the sink cut the connection it took over", file=sys.stderr, flush=True)
    _cut(sink)


_direct.DirectSink._cut = _told_cut  # type: ignore[method-assign]


class LimitedSQLite(SQLiteStreamManager):
    """SQLite that refuses events over ``FAULT_APP_MAX_EVENT_BYTES``, like Firestore does."""

    backend_name = "Limited"


def big_chunk(data: Any, ctx: FlowContext) -> Any:
    ctx.send_chunk("before")
    ctx.send_chunk("x" * int(data["size"]))
    return "unreachable"


def firehose(data: Any) -> Iterator[str]:
    """``count`` chunks of ``size`` characters, as fast as the worker can make them."""
    piece = "z" * int(data["size"])
    for _ in range(int(data["count"])):
        yield piece
    return "done"


def create_app() -> Flask:
    app = Flask(__name__)
    manager = LimitedSQLite(os.environ["FAULT_APP_SQLITE"])
    limit = os.environ.get("FAULT_APP_MAX_EVENT_BYTES")
    if limit:
        manager.max_event_bytes = int(limit)
    buffer = os.environ.get("FAULT_APP_LIVE_BUFFER_BYTES")
    if buffer:
        app.config["DURABLE_STREAM_LIVE_BUFFER_BYTES"] = int(buffer)
    app.config["DURABLE_STREAM_DETACH_RESPONSE"] = os.environ.get("FAULT_APP_DETACH_RESPONSE", "")
    DurableStream(app, flows={"big_chunk": big_chunk, "firehose": firehose}, stream_manager=manager)
    return app
