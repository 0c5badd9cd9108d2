"""Genkit Python flows, written as Genkit's docs write them, served two ways by one app.

* ``/flows/<name>``: our blueprint (durable: ``x-genkit-stream-id``, reconnects, cancel).
* ``/genkit-flask/<name>``: the same flow objects under ``genkit_flask_handler``.

No flow needs a model key: they send chunks themselves, or call ``ai.generate_stream``
on ``countdown``, a model defined right here that streams what it was asked to.
Serve with ``gunicorn -k gevent 'tests.support.genkit_app:create_app()'``;
``GENKIT_APP_SQLITE`` picks a SQLite file instead of the in-memory manager.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

from flask import Flask
from genkit import ActionRunContext, Genkit, Part, PublicError, Role
from genkit.model import Message, ModelRequest, ModelResponse, ModelResponseChunk
from genkit_flask import genkit_flask_handler

from flask_durable_stream import DurableStream

ai = Genkit()


async def countdown_model(request: ModelRequest, ctx: ActionRunContext) -> ModelResponse:
    """A model with no key: streams the words of the last prompt, one chunk each."""
    words = "".join(p.text or "" for p in request.messages[-1].content).split()
    for i, word in enumerate(words):
        ctx.send_chunk(
            ModelResponseChunk(role=Role.MODEL, index=i, content=[Part.from_text(word + " ")])
        )
        await asyncio.sleep(0)
    return ModelResponse(
        message=Message(role=Role.MODEL, content=[Part.from_text(" ".join(words))])
    )


ai.define_model(name="countdown", fn=countdown_model)


async def provide_context(request_data: Any) -> dict[str, Any]:
    """A Genkit-style (async) context provider: what both handlers call per request."""
    user = request_data.headers.get("x-user")
    if user == "mallory":
        raise PublicError("PERMISSION_DENIED", "mallory may not call flows")
    return {"auth": {"uid": user or "anonymous"}}


@ai.flow()
async def joke(data: dict[str, Any], ctx: ActionRunContext) -> dict[str, Any]:
    """Sends its own chunks: ``chunks`` of them, ``delay`` seconds apart."""
    n = int(data.get("chunks", 5))
    delay = float(data.get("delay", 0))
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        ctx.send_chunk({"index": i, "text": f"word{i} "})
    return {
        "topic": data.get("topic", "cats"),
        "words": n,
        "auth": ctx.context.get("auth"),
        "currentContext": ai.current_context(),
    }


@ai.flow()
async def tell(topic: str, ctx: ActionRunContext) -> str:
    """Genkit's own streaming path: generate_stream on a model, chunks forwarded."""
    stream = ai.generate_stream(model="countdown", prompt=f"a short joke about {topic}")
    async for chunk in stream.stream:
        ctx.send_chunk(chunk)
    return (await stream.response).text


_GROUPS: dict[str, int] = {}
_GROUPS_LOCK = threading.Lock()


@ai.flow()
async def gather(data: dict[str, Any], ctx: ActionRunContext) -> dict[str, Any]:
    """Finishes only once ``n`` runs of its ``group`` have started: proof they run at once.

    Runs that were served one after another would each wait for the others forever,
    so a deadline turns that into an error the test can see.
    """
    group, n = str(data["group"]), int(data["n"])
    with _GROUPS_LOCK:
        _GROUPS[group] = _GROUPS.get(group, 0) + 1
    ctx.send_chunk({"started": True, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(data.get("deadline", 60))
    while _GROUPS[group] < n:
        if loop.time() > deadline:
            raise PublicError("DEADLINE_EXCEEDED", f"only {_GROUPS[group]} of {n} ran at once")
        await asyncio.sleep(0.01)
    ctx.send_chunk({"all": n})
    return {"group": group, "ran_together": n, "pid": os.getpid()}


@ai.flow()
async def refuse(data: Any, ctx: ActionRunContext) -> None:
    """A deliberate error: its status and message reach the client."""
    ctx.send_chunk({"step": 1})
    raise PublicError("FAILED_PRECONDITION", "the joke is not ready", details={"retry": True})


@ai.flow()
async def crash(data: Any, ctx: ActionRunContext) -> None:
    """Anything else: redacted."""
    ctx.send_chunk({"step": 1})
    raise RuntimeError("password=hunter2 in the database connection string")


@ai.flow()
async def relay(data: dict[str, Any], ctx: ActionRunContext) -> Any:
    """Calls this very server from inside a flow: a host name to resolve (asyncio's
    executor), a socket, and a request the server must serve while the flow waits."""
    reader, writer = await asyncio.open_connection("localhost", int(data["port"]))
    body = json.dumps({"data": data.get("payload")}).encode()
    writer.write(
        b"POST /flows/echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    raw = await reader.read()
    writer.close()
    reply = json.loads(raw.partition(b"\r\n\r\n")[2])
    ctx.send_chunk({"relayed": True})
    return reply


@ai.flow()
async def echo(data: Any) -> dict[str, Any]:
    return {"echo": data}


FLOWS = {f.name: f for f in (joke, tell, gather, refuse, crash, relay, echo)}


def create_app() -> Flask:
    app = Flask(__name__)
    sqlite_path = os.environ.get("GENKIT_APP_SQLITE")
    if sqlite_path:
        app.config.update(DURABLE_STREAM_BACKEND="sqlite", DURABLE_STREAM_SQLITE_PATH=sqlite_path)
    DurableStream(app, flows=dict(FLOWS), context_provider=provide_context)
    for name, flow in FLOWS.items():
        view = genkit_flask_handler(ai, context_provider=provide_context)(flow)
        app.add_url_rule(f"/genkit-flask/{name}", f"genkit_flask_{name}", view, methods=["POST"])
    return app
