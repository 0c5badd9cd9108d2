"""Run flows of every shape concurrently in a monkey-patched process; print a JSON report.

Used by tests/test_gevent.py: the pytest process itself is never patched.
"""

from gevent import monkey

monkey.patch_all()

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from flask_durable_stream import InMemoryStreamManager  # noqa: E402
from flask_durable_stream._concurrency import running_tasks  # noqa: E402
from flask_durable_stream.runner import Runner  # noqa: E402


async def async_flow(data, ctx):  # type: ignore[no-untyped-def]
    for i in range(10):
        await asyncio.sleep(0.02)
        ctx.send_chunk(i)
    return data


async def async_gen(data):  # type: ignore[no-untyped-def]
    for i in range(10):
        await asyncio.sleep(0.02)
        yield i


def sync_gen(data):  # type: ignore[no-untyped-def]
    for i in range(10):
        time.sleep(0.02)  # patched: yields to the hub
        yield i
    return data


def main() -> None:
    manager = InMemoryStreamManager()
    runner = Runner(manager)
    gaps: list[float] = []
    stop = False

    def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            gevent.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = gevent.spawn(ticker)
    started = time.perf_counter()
    runs = [
        runner.start("f", flow, n) for n in range(30) for flow in (async_flow, async_gen, sync_gen)
    ]
    for run in runs:
        run.wait(30)
    elapsed = time.perf_counter() - started
    runner.tasks.join(10)
    stop = True
    tick.join()
    stored = [[e.payload for e in manager.subscribe(r.stream_id)] for r in runs]
    manager.close()
    print(
        json.dumps(
            {
                "elapsed": elapsed,
                "max_gap": max(gaps),
                "stored": stored,
                "leftover_tasks": [t.name for t in running_tasks()],
            }
        )
    )


if __name__ == "__main__":
    main()
