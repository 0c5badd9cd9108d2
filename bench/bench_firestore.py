"""Firestore manager figures, on a private Firestore emulator.

    .venv/bin/python bench/bench_firestore.py [--seconds 10] [--rate 50]

1. Steady stream: ``rate`` chunks/s for ``seconds`` s with a heartbeat every 2 s
   (as the runner does), for several linger values: commit RPCs per chunk
   (Genkit's manager: 1.0, one array update per chunk) and the live latency from
   ``append`` to a subscriber receiving the chunk (p50/p99).
2. A finished 10,000-chunk stream of 1 KiB chunks: time to write it and time to
   replay it from the start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flask_durable_stream import Event, FirestoreStreamManager  # noqa: E402
from tests.support.firestore_emulator import FirestoreEmulator  # noqa: E402


class CommitCounter:
    """Counts commit RPCs: every Firestore write goes through one."""

    def __init__(self, client: Any) -> None:
        self.count = 0
        gapic = type(client._firestore_api)
        original = gapic.commit

        def commit(api: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(api, *args, **kwargs)

        gapic.commit = commit


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steady(client: Any, counter: CommitCounter, linger: float, rate: float, seconds: float) -> None:
    manager = FirestoreStreamManager(client=client, collection="bench-steady", linger=linger)
    sid = uuid.uuid4().hex
    writer = manager.open(sid)
    sent: dict[int, float] = {}
    latencies: list[float] = []
    live = manager.subscribe(sid)

    def read() -> None:
        for event in live:
            if event.seq in sent:
                latencies.append(time.monotonic() - sent[event.seq])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)  # listeners attached
    chunks = int(rate * seconds)
    before = counter.count
    start = last_beat = time.monotonic()
    for seq in range(chunks):
        due = start + seq / rate
        time.sleep(max(0.0, due - time.monotonic()))
        sent[seq] = time.monotonic()
        writer.append([Event(seq, "chunk", json.dumps({"token": f"t{seq}"}))])
        if time.monotonic() - last_beat >= 2.0:
            writer.heartbeat()
            last_beat = time.monotonic()
    writer.append([Event(chunks, "done", '"end"')])
    writer.close()
    writes = counter.count - before
    reader.join(30)
    manager.close()
    p50 = statistics.median(latencies) * 1000
    p99 = percentile(latencies, 0.99) * 1000
    print(
        f"  linger {linger * 1000:5.0f} ms: {chunks} chunks at {rate:g}/s -> {writes} commits, "
        f"{writes / chunks:.3f} writes/chunk; live latency p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        f" ({len(latencies)} received)"
    )


def replay(client: Any, counter: CommitCounter) -> None:
    manager = FirestoreStreamManager(client=client, collection="bench-replay")
    sid = uuid.uuid4().hex
    writer = manager.open(sid)
    payloads = [json.dumps({"i": i, "text": "x" * 1000}) for i in range(10_000)]
    before = counter.count
    started = time.monotonic()
    for seq, payload in enumerate(payloads):
        writer.append([Event(seq, "chunk", payload)])
    writer.append([Event(10_000, "done", "null")])
    writer.close()
    wrote = time.monotonic() - started
    writes = counter.count - before
    mib = sum(map(len, payloads)) / 2**20
    print(f"  write 10,000 x 1 KiB ({mib:.1f} MiB): {wrote:.2f} s, {writes} commits")
    times = []
    for _ in range(3):
        started = time.monotonic()
        events = list(manager.subscribe(sid))
        times.append(time.monotonic() - started)
        assert [e.payload for e in events[:-1]] == payloads
    print(
        f"  replay from the start: best {min(times):.2f} s, "
        f"median {statistics.median(times):.2f} s ({len(events)} events)"
    )
    started = time.monotonic()
    tail = list(manager.subscribe(sid, after=9_899))
    print(
        f"  replay the last 100 (after=9899): {time.monotonic() - started:.3f} s"
        f" ({len(tail)} events)"
    )
    manager.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--lingers", default="0.05,0.1,0.25,0.5")
    args = parser.parse_args()
    with FirestoreEmulator() as emulator:
        client = emulator.client()
        counter = CommitCounter(client)
        client.collection("warm-up").document("jvm").set({"ok": True})
        print(f"Firestore emulator on {emulator.host}")
        print("Steady stream (Genkit's Firestore manager: 1.000 writes/chunk):")
        for linger in (float(v) for v in args.lingers.split(",")):
            steady(client, counter, linger, args.rate, args.seconds)
        print("Long stream (Genkit's manager stops at the 1 MiB document limit):")
        replay(client, counter)


if __name__ == "__main__":
    main()
