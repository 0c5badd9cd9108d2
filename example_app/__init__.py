"""The example app: three flows and a page that survives a reload mid-stream.

Run it with ``python -m example_app`` (gevent server) or
``gunicorn -k gevent -w 4 'example_app:create_app()'``.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, send_from_directory

from flask_durable_stream import DurableStream, FlowContext, FlowError

STORY = (
    "Once upon a time, a small robot named Pip wanted to know everything about {topic}. "
    "It asked the gulls, the fishing boats and the old lighthouse keeper. "
    "Each of them told a different tale about {topic}, and Pip wrote every one down. "
    "That night Pip read the tales aloud, and the whole harbour town listened. The end."
)
DEFAULT_TOPIC = "a lighthouse robot"


def story_words(topic: str, chunks: int | None = None) -> list[str]:
    """The story about ``topic``, a word each; ``chunks`` words (repeating the story) if given,
    the last one closing its sentence either way."""
    words = STORY.format(topic=topic).split()
    if chunks is None:
        return words
    picked = [words[i % len(words)] for i in range(chunks)]
    last = picked[-1].rstrip(",;:")
    picked[-1] = last if last.endswith((".", "!", "?")) else last + "."
    return picked


def story(data: Any, ctx: FlowContext) -> Any:
    """LLM-like: a story about the topic, a word per chunk at about 20 per second, then a summary
    as the output. ``chunks`` and ``delay`` shape it for tests and benchmarks."""
    options = data if isinstance(data, dict) else {"topic": data}
    topic = " ".join(str(options.get("topic") or DEFAULT_TOPIC).split())[:100] or DEFAULT_TOPIC
    chunks = options.get("chunks")
    delay = float(options.get("delay", 0.05))
    if (chunks is not None and not 0 < int(chunks) <= 10_000) or not 0 <= delay <= 5:
        raise FlowError("INVALID_ARGUMENT", "chunks must be 1..10000 and delay 0..5 seconds")
    words = story_words(topic, None if chunks is None else int(chunks))
    for i, word in enumerate(words):
        if ctx.wait_cancelled(delay):
            raise FlowError("CANCELLED", "Cancelled by client.")
        ctx.send_chunk({"index": i, "text": word + " "})
    return {"topic": topic, "words": len(words), "text": " ".join(words)}


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


FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#2d6cdf"/>'
    '<path d="M4 4h8M4 8h8M4 12h5" stroke="#fff" stroke-width="2" stroke-linecap="round"/></svg>'
)

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

    @app.get("/favicon.ico")
    def favicon() -> Response:
        # Browsers ask for it on every page: an inline SVG instead of a 404 in the console.
        return Response(FAVICON, mimetype="image/svg+xml")

    return app
