"""A small app on the public API only, as a new user would write it, for the chaos suite.

Run by ``gunicorn -k gevent`` with the settings in ``gunicorn_conf.py``; the backend
and its options come from ``FLASK_DURABLE_STREAM_*`` environment variables. Every
response names the worker process that served it (``X-Worker-Pid``), so a test can
tell a replay from storage (another worker) from one served by the producer.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response

from flask_durable_stream import DurableStream, FlowContext, FlowError


def filler(index: int, size: int) -> str:
    """``size`` ASCII characters that start with ``index``: every chunk is told apart."""
    head = f"{index:09d}:"
    return (head + "abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:size]


def _ints(data: Any, **defaults: int) -> list[int]:
    if not isinstance(data, dict):
        raise FlowError("INVALID_ARGUMENT", "data must be an object")
    return [int(data.get(name, default)) for name, default in defaults.items()]


def burst(data: Any, ctx: FlowContext) -> Any:
    """``count`` chunks of ``size`` characters, as fast as the flow can emit them."""
    count, size = _ints(data, count=1, size=16)
    for i in range(count):
        ctx.send_chunk(filler(i, size))
    return {"count": count}


def output(data: Any) -> Any:
    """No chunks; one output of ``size`` characters."""
    (size,) = _ints(data, size=16)
    return filler(0, size)


def paced(data: Any, ctx: FlowContext) -> Any:
    """``count`` small chunks, one every ``delay_ms``: an LLM-like stream."""
    count, delay_ms = _ints(data, count=10, delay_ms=50)
    for i in range(count):
        if ctx.wait_cancelled(delay_ms / 1000):
            raise FlowError("CANCELLED", "Cancelled by client.")
        ctx.send_chunk({"i": i})
    return {"count": count}


def echo(data: Any) -> Any:
    return {"echo": data}


FLOWS = {"burst": burst, "output": output, "paced": paced, "echo": echo}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DURABLE_STREAM_BACKEND="memory")
    app.config.from_prefixed_env()
    DurableStream(app, flows=FLOWS)
    store_interval = str(app.extensions["durable_stream"].runner.manager.store_interval)

    @app.after_request
    def name_the_worker(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        response.headers["X-Store-Interval"] = store_interval  # what the manager took
        return response

    return app
