"""RedisStreamManager figures against a local redis-server started here.

    .venv/bin/python bench/bench_redis.py [--chunks 20000] [--replay 10000] [--follow 500]

1. Append throughput: a 20,000-chunk stream of 16-byte chunks written the way the
   runner writes (a persister thread appends whatever the flow emitted meanwhile),
   Redis vs the in-memory manager, and how many Redis round trips it took.
2. Replay of a finished stream of ``--replay`` 1 KiB chunks, from the start and the
   last 100 events.
3. Follow latency across managers (separate connection pools, as separate worker
   processes would have): a producer writes ``--follow`` chunks 10 ms apart carrying
   ``time.time()``; a follower blocked in XREAD records receive - write, and the
   Redis commands it sent per chunk.
Prints figures only; nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flask_durable_stream import Event, InMemoryStreamManager, StreamManager  # noqa: E402
from flask_durable_stream.managers.redis import RedisStreamManager  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CHUNK = '"0123456789abcd"'  # 16 bytes of JSON


def runner_style(manager: StreamManager, chunks: int) -> tuple[float, int]:
    """Seconds to store ``chunks`` chunks and the done event; number of appends."""
    writer = manager.open(uuid.uuid4().hex)
    emitted: list[Event] = []
    finished = threading.Event()
    appends = 0

    def persist() -> None:
        nonlocal appends
        while True:
            ended = finished.is_set()
            batch = emitted[writer.next_seq : len(emitted)]
            if batch:
                writer.append(batch)
                appends += 1
            elif ended:
                return
            else:
                time.sleep(0)

    started = time.perf_counter()
    thread = threading.Thread(target=persist)
    thread.start()
    for seq in range(chunks):
        emitted.append(Event(seq, "chunk", CHUNK))
    emitted.append(Event(chunks, "done", '"end"'))
    finished.set()
    thread.join()
    return time.perf_counter() - started, appends


def bench_throughput(server: RedisServer, chunks: int) -> None:
    print(f"1. runner-style appends, {chunks:,} chunks x 16 B, three runs each")
    redis = RedisStreamManager(url=server.url, prefix="bench-throughput")
    memory = InMemoryStreamManager()
    for name, manager in (("memory", memory), ("redis", redis)):
        runs = [runner_style(manager, chunks) for _ in range(3)]
        best = min(t for t, _ in runs)
        appends = [n for _, n in runs]
        print(f"   {name:7} best {chunks / best:12,.0f} chunks/s   appends per stream {appends}")
    redis.close()


def bench_replay(server: RedisServer, count: int) -> None:
    manager = RedisStreamManager(url=server.url, prefix="bench-replay")
    writer = manager.open("replay")
    payload = '"' + "x" * 1022 + '"'
    for start in range(0, count, 500):
        writer.append([Event(s, "chunk", payload) for s in range(start, min(count, start + 500))])
    writer.done(None)
    for label, after in (("from the start", -1), ("last 100 events", count - 100)):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            n = sum(len(batch) for batch in manager.subscribe_batches("replay", after))
            times.append(time.perf_counter() - started)
        print(f"2. replay {count:,} x 1 KiB, {label}: {n} events, best {min(times):.3f} s")
    manager.close()


def bench_follow(server: RedisServer, count: int) -> None:
    producer = RedisStreamManager(url=server.url, prefix="bench-follow")
    follower = RedisStreamManager(url=server.url, prefix="bench-follow")
    writer = producer.open("follow")
    delays: list[float] = []
    commands = 0
    execute = follower.client.execute_command

    def counted(*args: object, **options: object) -> object:
        nonlocal commands
        commands += 1
        return execute(*args, **options)

    follower.client.execute_command = counted  # type: ignore[method-assign]

    def follow() -> None:
        for event in follower.subscribe("follow"):
            if not event.terminal:
                delays.append((time.time() - float(event.payload)) * 1000)

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.2)
    waiting = commands  # the follower has read the stream and waits
    for _ in range(count):
        writer.write(time.time())
        time.sleep(0.01)
    writer.done(None)
    thread.join()
    ordered = sorted(delays)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    print(
        f"3. follow latency across managers, {count} chunks 10 ms apart:"
        f" p50 {statistics.median(delays):.2f} ms  p99 {p99:.2f} ms  max {ordered[-1]:.2f} ms;"
        f" follower's Redis commands per chunk {(commands - waiting) / count:.2f}"
    )
    producer.close()
    follower.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--replay", type=int, default=10_000)
    parser.add_argument("--follow", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        try:
            bench_throughput(server, args.chunks)
            bench_replay(server, args.replay)
            bench_follow(server, args.follow)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
