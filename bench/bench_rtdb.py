"""RtdbStreamManager figures against the RTDB protocol test server, run here in its own process.

    .venv/bin/python bench/bench_rtdb.py [--seconds 10] [--rate 50] [--replay 10000]

1. Writes per chunk at a steady chunk rate, with a producer that hands over
   everything that piled up (as the runner's persister does) and heartbeats every
   ``heartbeat_interval``; plus the delay from emitting a chunk to a live
   subscriber getting it. Genkit's RTDB manager costs 2 writes per chunk.
2. Replay time of a finished stream of ``--replay`` chunks, from the start and
   from near the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import firebase_admin  # noqa: E402

from flask_durable_stream import Event, RtdbStreamManager  # noqa: E402
from tests.support.servers import Server, free_port  # noqa: E402


def stats(base: str) -> dict[str, int]:
    return requests.get(f"{base}/.control/stats", timeout=5).json()  # type: ignore[no-any-return]


def steady(app: object, base: str, seconds: float, rate: float, linger: float) -> None:
    manager = RtdbStreamManager(
        firebase_app=app, ref_prefix=f"bench-{uuid.uuid4().hex[:8]}", linger=linger
    )
    sid = uuid.uuid4().hex
    writer = manager.open(sid)
    emitted: list[float] = []
    cond = threading.Condition()
    total = int(seconds * rate)
    received: dict[int, float] = {}

    def read() -> None:
        for event in manager.subscribe(sid):
            received[event.seq] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)

    def flow() -> None:
        start = time.monotonic()
        for i in range(total):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            with cond:
                emitted.append(time.monotonic())
                cond.notify()

    before = stats(base)["writes"]
    producer = threading.Thread(target=flow, daemon=True)
    producer.start()
    last_beat = time.monotonic()
    while writer.next_seq < total:
        with cond:
            while len(emitted) <= writer.next_seq:
                cond.wait()
            count = len(emitted) - writer.next_seq
        payload = '"' + "token " * 5 + '"'
        writer.append([Event(writer.next_seq + i, "chunk", payload) for i in range(count)])
        if time.monotonic() - last_beat >= manager.heartbeat_interval:
            last_beat = time.monotonic()
            writer.heartbeat()
    writer.done(None)
    writes = stats(base)["writes"] - before
    reader.join(30)
    delays = sorted(received[i] - emitted[i] for i in range(total) if i in received)
    p95 = delays[int(len(delays) * 0.95)] if delays else float("nan")
    print(
        f"  linger {linger:.2f}s: {total} chunks at {rate:.0f}/s -> {writes} writes = "
        f"{writes / total:.3f} writes/chunk (Genkit: 2.0); emit->subscriber "
        f"median {statistics.median(delays) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
    )
    manager.close()


def replay(app: object, n: int) -> None:
    manager = RtdbStreamManager(
        firebase_app=app, ref_prefix=f"bench-{uuid.uuid4().hex[:8]}", linger=0.0
    )
    sid = uuid.uuid4().hex
    writer = manager.open(sid)
    payload = '"' + "token " * 5 + '"'
    started = time.perf_counter()
    for start in range(0, n, 500):
        writer.append([Event(s, "chunk", payload) for s in range(start, min(n, start + 500))])
    writer.done(None)
    print(f"  stored {n} chunks in {time.perf_counter() - started:.2f}s (batches of 500)")
    for after in (-1, n - 100):
        started = time.perf_counter()
        events = list(manager.subscribe(sid, after=after))
        elapsed = time.perf_counter() - started
        assert [e.seq for e in events] == list(range(after + 1, n + 1))
        print(
            f"  replay after={after}: {len(events)} events in {elapsed * 1000:.0f} ms "
            f"({len(events) / elapsed:,.0f} events/s)"
        )
    manager.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--replay", type=int, default=10_000)
    args = parser.parse_args()
    port = free_port()
    server = Server(
        [
            sys.executable,
            "-m",
            "tests.support.rtdb_server",
            "--port",
            str(port),
            "--namespace",
            "bench",
        ],
        port,
    )
    app = firebase_admin.initialize_app(options={"databaseURL": f"{server.url}?ns=bench"})
    try:
        print("RTDB protocol test server (not a database), separate process, 127.0.0.1")
        print(f"1. writes per chunk, {args.seconds:.0f}s at {args.rate:.0f} chunks/s")
        for linger in (0.1, 0.25, 0.3):
            steady(app, server.url, args.seconds, args.rate, linger)
        print(f"2. replay of a {args.replay}-chunk stream")
        replay(app, args.replay)
    finally:
        firebase_admin.delete_app(app)
        server.stop()


if __name__ == "__main__":
    main()
