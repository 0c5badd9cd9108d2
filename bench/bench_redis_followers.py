"""Many concurrent Redis streams, each with a live SSE follower, on ``gunicorn -k gevent -w 2``.

    .venv/bin/python bench/bench_redis_followers.py [--streams 300] [--chunks 40] [--delay 0.1]

Starts a redis-server and the example app on Redis, POSTs ``--streams`` story flows at once
and, as soon as each answers with its stream id, follows it with ``GET /flows/story/events``.
Prints the HTTP statuses, how many POSTs and SSE followers got every chunk and the result, and
how many "Too many connections" the server logged. (Each follower used to hold a
pooled Redis connection while it waited: past redis-py's 100, "503 Too many connections".)
Prints figures only; nothing here asserts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.1)
    args = parser.parse_args()
    redis = RedisServer(Path(tempfile.mkdtemp()))
    port = servers.free_port()
    env = {"FLASK_DURABLE_STREAM_BACKEND": "redis", "FLASK_DURABLE_STREAM_REDIS_URL": redis.url}
    server = servers.Server(
        servers.gunicorn_args("example_app:create_app()", port, workers=2), port, env
    )
    posts: list[tuple[int, int, bool]] = []
    follows: list[tuple[int, int, bool]] = []
    followers: list[threading.Thread] = []
    lock = threading.Lock()

    def follow(stream_id: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("GET", f"/flows/story/events?streamId={stream_id}")
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        with lock:
            follows.append((response.status, body.count('"index"'), '"words"' in body))

    def produce() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        data = {"data": {"chunks": args.chunks, "delay": args.delay}}
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        conn.request("POST", "/flows/story", body=json.dumps(data), headers=headers)
        response = conn.getresponse()
        stream_id = response.getheader("x-genkit-stream-id")
        if stream_id:
            thread = threading.Thread(target=follow, args=(stream_id,))
            thread.start()
            with lock:
                followers.append(thread)
        body = response.read().decode()
        conn.close()
        with lock:
            posts.append((response.status, body.count('"index"'), '"words"' in body))

    try:
        producers = [threading.Thread(target=produce) for _ in range(args.streams)]
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join(600)
        for thread in list(followers):
            thread.join(600)
    finally:
        output = server.stop()
        redis.stop()

    def complete(rows: list[tuple[int, int, bool]]) -> int:
        return sum(
            1 for status, chunks, done in rows if status == 200 and chunks == args.chunks and done
        )

    print(f"POST statuses {dict(Counter(s for s, _, _ in posts))}, complete {complete(posts)}")
    print(f"SSE statuses {dict(Counter(s for s, _, _ in follows))}, complete {complete(follows)}")
    print(f"server log: {output.count('Too many connections')} x 'Too many connections'")


if __name__ == "__main__":
    main()
