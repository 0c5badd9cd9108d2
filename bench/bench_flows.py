"""Flows shared by the benchmark servers (imported before or after monkey patching alike)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask_durable_stream import FlowContext

CHUNK = "x" * 14  # 16 bytes of JSON


def blast(data: Any) -> Iterator[str]:
    """As many chunks as asked, as fast as possible."""
    for _ in range(int(data["chunks"])):
        yield CHUNK
    return "end"


def llm(data: Any, ctx: FlowContext) -> str:
    """LLM-paced: a chunk every ``delay`` seconds, carrying its emit time."""
    for _ in range(int(data["chunks"])):
        time.sleep(float(data["delay"]))
        ctx.send_chunk(time.time())
    return "end"
