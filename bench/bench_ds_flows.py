"""Durable Streams readers of a running flow: how late each message reaches them.

    .venv/bin/python bench/bench_ds_flows.py [--flows 5] [--chunks 50] [--delay 0.02]
                                             [--backends memory,sqlite,redis]

For each backend, a server of its own (``gunicorn -k gevent`` serving
``tests.support.ds_app``: one worker on the in-memory manager, two on SQLite and
on Redis, so that a reader and its flow may be in different workers). Each of
``--flows`` calls of the ``paced`` flow sends ``--chunks`` chunks ``--delay``
seconds apart, each stamped with the time it was sent; one Durable Streams
reader follows the flow from its URL (``Durable-Stream-Url``), by long-poll for
one half of the flows and by SSE for the other, and notes when each message
arrived. The figure is that delay, arrival less stamp (one clock: one machine),
p50 / p90 / max over every message; the flow's Genkit response is closed at once,
as a client that went away would. Redis is skipped when ``redis-server`` is not
installed. Prints figures only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402
from tests.support.ds import sse_events  # noqa: E402
from tests.support.redis_server import RedisServer, RedisUnavailable  # noqa: E402


def start(port: int, chunks: int, delay: float) -> str:
    """Call the flow, take its Durable Stream URL and hang up."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"data": {"chunks": chunks, "delay": delay}})
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    conn.request("POST", "/flows/paced", body=body, headers=headers)
    url = conn.getresponse().getheader("Durable-Stream-Url")
    conn.close()
    assert url, "no Durable-Stream-Url"
    return url


def follow_long_poll(url: str) -> list[float]:
    delays: list[float] = []
    offset = "-1"
    with requests.Session() as session:
        while True:
            reply = session.get(url, params={"offset": offset, "live": "long-poll"}, timeout=60)
            now = time.time()
            if reply.status_code == 200:
                delays += [now - m["message"]["sent"] for m in reply.json() if "message" in m]
            offset = reply.headers["Stream-Next-Offset"]
            if reply.headers.get("Stream-Closed") == "true":
                return delays


def follow_sse(url: str) -> list[float]:
    delays: list[float] = []
    params = {"offset": "-1", "live": "sse"}
    with requests.get(url, params=params, stream=True, timeout=60) as reply:
        for event, value in sse_events(reply.iter_lines(decode_unicode=True)):
            now = time.time()
            if event == "control":
                if value.get("streamClosed"):
                    return delays
            else:
                delays += [now - m["message"]["sent"] for m in value if "message" in m]
    return delays


def line(label: str, delays: list[float], expected: int) -> str:
    delays = sorted(delays)
    return (
        f"{label:<22} delay p50 {statistics.median(delays) * 1e3:6.1f} ms"
        f"  p90 {delays[int(len(delays) * 0.9)] * 1e3:6.1f} ms"
        f"  max {delays[-1] * 1e3:6.1f} ms  ({len(delays)} of {expected} messages)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--backends", default="memory,sqlite,redis")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            env = {"DS_BACKEND": backend, "DS_SQLITE_PATH": str(Path(tmp) / "ds.sqlite3")}
            if backend == "redis":
                try:
                    redis = RedisServer(Path(tmp))
                except RedisUnavailable as exc:
                    print(f"{backend:<22} skipped: {exc}")
                    continue
                stack.callback(redis.stop)
                env["DS_REDIS_URL"] = redis.url
            port = servers.free_port()
            workers = 1 if backend == "memory" else 2
            server = servers.Server(
                servers.gunicorn_args("tests.support.ds_app:app", port, workers=workers),
                port,
                env,
            )
            try:
                for mode, follow in (("long-poll", follow_long_poll), ("sse", follow_sse)):
                    delays: list[float] = []
                    flows = max(1, args.flows // 2)
                    for _ in range(flows):
                        delays += follow(start(port, args.chunks, args.delay))
                    label = f"{backend} ({workers}w), {mode}"
                    print(line(label, delays, flows * args.chunks), flush=True)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
