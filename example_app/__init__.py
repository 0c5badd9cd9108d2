"""The example app: three flows and a page that survives a reload mid-stream.

Run it with ``python -m example_app`` (gevent server) or
``gunicorn -k gevent -w 4 'example_app:create_app()'``.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, send_from_directory

from flask_durable_stream import DurableStream, FlowContext, FlowError

WORDS = (
    "Once upon a time a small robot named Pip lived at the edge of a quiet harbour town. "
    "Every morning it counted the boats, polished the lighthouse lens and listened to the gulls. "
    "One stormy night the lighthouse went dark, and Pip climbed the spiral stairs with a lantern, "
    "guiding the fishing fleet safely home."
).split()


def story(data: Any, ctx: FlowContext) -> Any:
    """LLM-like: about 40 chunks at about 20 per second, then a summary as the output."""
    topic = (data or {}).get("topic", "a robot") if isinstance(data, dict) else str(data)
    chunks = int((data or {}).get("chunks", 40)) if isinstance(data, dict) else 40
    delay = float((data or {}).get("delay", 0.05)) if isinstance(data, dict) else 0.05
    if not 0 < chunks <= 10_000 or not 0 <= delay <= 5:
        raise FlowError("INVALID_ARGUMENT", "chunks must be 1..10000 and delay 0..5 seconds")
    text = []
    for i in range(chunks):
        if ctx.wait_cancelled(delay):
            raise FlowError("CANCELLED", "Cancelled by client.")
        word = WORDS[i % len(WORDS)]
        text.append(word)
        ctx.send_chunk({"index": i, "text": word + " "})
    return {"topic": topic, "words": len(text), "text": " ".join(text)}


def throwy(data: Any):  # type: ignore[no-untyped-def]
    """Streams a few chunks and then fails, like Genkit's ``streamyThrowy``."""
    count = int(data.get("count", 3)) if isinstance(data, dict) else 3
    for i in range(count):
        time.sleep(0.05)
        yield {"count": i}
    raise RuntimeError("the flow hit an internal problem (this text is never sent to clients)")


def echo(data: Any) -> Any:
    """A plain call: returns its input."""
    return {"echo": data}


FLOWS = {"story": story, "throwy": throwy, "echo": echo}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    # The embedded default: a SQLite file in the instance folder, shared by every
    # worker process (gunicorn -w 4) and kept across restarts.
    app.config.from_mapping(DURABLE_STREAM_BACKEND="sqlite")
    # Any setting from the environment, e.g. FLASK_DURABLE_STREAM_SQLITE_PATH=/tmp/s.db
    app.config.from_prefixed_env()
    if config:
        app.config.update(config)
    DurableStream(app, flows=FLOWS)
    from .chat import init_chat

    init_chat(app)  # /chat: the Vercel AI SDK chat page, its flow at /api/chat

    @app.get("/")
    def index():  # type: ignore[no-untyped-def]
        return send_from_directory(app.static_folder or "static", "index.html")

    return app
