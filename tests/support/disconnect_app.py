"""An app for tests/test_disconnect_server.py under ``gunicorn -k gevent -w 1``.

    gunicorn -k gevent -w 1 'tests.support.disconnect_app:create_app()'

SQLite storage at ``DISCONNECT_APP_SQLITE`` when set, else the in-memory manager. The
``gated`` flow emits ``before`` chunks, waits until ``POST /gate/<key>`` opens its gate,
then emits ``after`` more: a test can drop the client at a known point.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask

from flask_durable_stream import DurableStream, FlowContext, SQLiteStreamManager

_gates: dict[str, threading.Event] = {}


def _gate(key: str) -> threading.Event:
    return _gates.setdefault(key, threading.Event())


def gated(data: Any, ctx: FlowContext) -> str:
    for i in range(int(data["before"])):
        ctx.send_chunk(i)
    _gate(str(data["key"])).wait()
    for i in range(int(data["before"]), int(data["before"]) + int(data["after"])):
        time.sleep(0.001)  # paced like a model
        ctx.send_chunk(i)
    return "done"


def create_app() -> Flask:
    app = Flask(__name__)
    path = os.environ.get("DISCONNECT_APP_SQLITE")
    manager = SQLiteStreamManager(path) if path else None
    DurableStream(app, flows={"gated": gated}, stream_manager=manager)

    @app.post("/gate/<key>")
    def open_gate(key: str) -> dict[str, bool]:
        _gate(key).set()
        return {"open": True}

    return app
