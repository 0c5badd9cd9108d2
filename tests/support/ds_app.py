"""A Durable Streams server for tests: ``gunicorn -k gevent tests.support.ds_app:app``.

``DS_BACKEND`` picks the storage (memory, sqlite with ``DS_SQLITE_PATH``, redis
with ``DS_REDIS_URL``), ``DS_LEASE`` its producer lease; ``DS_LONG_POLL_TIMEOUT``
the long-poll wait;
``DS_FLOW_POLL`` the seconds between a flow stream's polls where nothing pushes;
``DS_HANDOVER=0`` keeps every request of a keep-alive connection with gunicorn. Flows
``echo`` and ``fail`` run on the same manager, so their streams are readable as
Durable Streams at ``/ds/<stream id>`` too.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from flask_durable_stream import DurableStream, StreamManager
from flask_durable_stream.flows import FlowContext


def _manager() -> StreamManager:
    backend = os.environ.get("DS_BACKEND", "memory")
    lease = float(os.environ.get("DS_LEASE", "10"))
    if backend == "sqlite":
        from flask_durable_stream import SQLiteStreamManager

        path = os.environ["DS_SQLITE_PATH"]
        return SQLiteStreamManager(path, lease_seconds=lease)  # type: ignore[no-any-return]
    if backend == "redis":
        from flask_durable_stream import RedisStreamManager

        url = os.environ["DS_REDIS_URL"]
        return RedisStreamManager(url=url, lease_seconds=lease)  # type: ignore[no-any-return]
    from flask_durable_stream import InMemoryStreamManager

    return InMemoryStreamManager(lease_seconds=lease)


app = Flask(__name__)
app.config["DURABLE_STREAM_DS_URL_PREFIX"] = "/ds"
app.config["DURABLE_STREAM_DS_LONG_POLL_TIMEOUT"] = float(
    os.environ.get("DS_LONG_POLL_TIMEOUT", "2")
)
app.config["DURABLE_STREAM_DS_HANDOVER"] = os.environ.get("DS_HANDOVER", "1") == "1"
ext = DurableStream(stream_manager=_manager())


@ext.flow("echo")
def echo(data: Any, ctx: FlowContext) -> Any:
    """Sends ``data["chunks"]`` chunks; waits for ``data["gate"]`` files before some of them."""
    import time
    from pathlib import Path

    gate = data.get("gate")
    for i in range(int(data.get("chunks", 3))):
        if gate:
            path = Path(f"{gate}.{i}")
            while not path.exists():
                time.sleep(0.01)
        ctx.send_chunk({"i": i})
    return {"done": int(data.get("chunks", 3))}


@ext.flow("paced")
def paced(data: Any, ctx: FlowContext) -> Any:
    """``data["chunks"]`` chunks ``data["delay"]`` seconds apart, each stamped with the time
    it was sent (``bench/bench_ds_flows.py`` measures how late readers get them)."""
    import time

    chunks = int(data.get("chunks", 50))
    for i in range(chunks):
        time.sleep(float(data.get("delay", 0.02)))
        ctx.send_chunk({"i": i, "sent": time.time()})
    return {"done": chunks}


@ext.flow("fail")
def fail(data: Any, ctx: FlowContext) -> Any:
    """One chunk, then an error: public (``FlowError``) or redacted (anything else)."""
    from flask_durable_stream import FlowError

    ctx.send_chunk({"i": 0})
    if data.get("public"):
        raise FlowError("INVALID_ARGUMENT", "bad input")
    raise RuntimeError("a secret that must not reach clients")


ext.init_app(app)
if os.environ.get("DS_FLOW_POLL"):
    flows = app.blueprints["durable_streams"].flow_streams
    flows.poll = (float(os.environ["DS_FLOW_POLL"]),) * 2


class _WrappingMiddleware:
    """A WSGI middleware that wraps every response's body, as tracing middlewares do."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = self.inner(environ, start_response)

        class Wrapped:
            def __iter__(self) -> Any:
                return iter(body)

            def close(self) -> None:
                if hasattr(body, "close"):
                    body.close()

        return Wrapped()


#: ``tests.support.ds_app:wrapped``: the app behind :class:`_WrappingMiddleware`.
wrapped = _WrappingMiddleware(app)
