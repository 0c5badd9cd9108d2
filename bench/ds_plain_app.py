"""bench/ds_instructions.py's baseline: the Durable Streams requests it makes, answered by
plain Flask views with the statuses the protocol gives them, nothing stored."""

from __future__ import annotations

from flask import Flask, Response

app = Flask(__name__)


@app.put("/ds/<path:name>")
def create(name: str) -> Response:
    return Response(status=201, headers={"Stream-Next-Offset": "0"})


@app.post("/ds/<path:name>")
def append(name: str) -> Response:
    return Response(status=204, headers={"Stream-Next-Offset": "1"})
