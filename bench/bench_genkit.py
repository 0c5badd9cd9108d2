"""Genkit Python flows at once in one ``gunicorn -k gevent`` worker: ours, and genkit-flask's.

    python bench/bench_genkit.py [--streams 1,10,50,200] [--chunks 20] [--delay 0.05]

Each stream is ``joke`` from tests/support/genkit_app.py: ``chunks`` chunks ``delay`` s
apart (1 s by default), so N streams that really run at once take about 1 s, and N
streams served one after another take N s. Reports the wall time of each batch and how
many streams ended with their result, for our blueprint (``/flows/joke``) and for
``genkit_flask_handler`` (``/genkit-flask/joke``) in the same worker. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import servers  # noqa: E402


def one(url: str, data: dict[str, float]) -> bool:
    try:
        r = requests.post(
            url,
            data=json.dumps({"data": data}),
            headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
            timeout=120,
        )
    except requests.RequestException:
        return False
    return r.status_code == 200 and r.text.rstrip().splitlines()[-1].startswith('data: {"result"')


def batch(url: str, n: int, data: dict[str, float]) -> tuple[float, int]:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as pool:
        ok = sum(pool.map(lambda _: one(url, data), range(n)))
    return time.monotonic() - started, ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,10,50,200")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    data = {"chunks": args.chunks, "delay": args.delay}
    server = servers.gunicorn("tests.support.genkit_app:create_app()", workers=1)
    try:
        one(f"{server.url}/flows/joke", {"chunks": 1})  # warm-up: Genkit, the asyncio thread
        one(f"{server.url}/genkit-flask/joke", {"chunks": 1})
        print(f"one stream = {args.chunks} chunks x {args.delay} s; gunicorn -k gevent -w 1")
        print(f"{'streams':>8} {'ours s':>8} {'ours ok':>8} {'genkit-flask s':>15} {'gf ok':>6}")
        for n in (int(x) for x in args.streams.split(",")):
            ours, ours_ok = batch(f"{server.url}/flows/joke", n, data)
            theirs, theirs_ok = batch(f"{server.url}/genkit-flask/joke", n, data)
            print(f"{n:>8} {ours:>8.2f} {ours_ok:>8} {theirs:>15.2f} {theirs_ok:>6}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
