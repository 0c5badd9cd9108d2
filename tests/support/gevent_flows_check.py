"""Run flows of every shape concurrently in a monkey-patched process; print a JSON report.

Used by tests/test_gevent.py: the pytest process itself is never patched. Every chunk
and every tick of a hub greenlet is recorded, in order, in ORDER, so the test can check
how they interleaved (a logical property, not a timing). An async flow sends its next
chunk only once the hub has ticked again, so however the machine schedules the threads,
ticks land between its chunks; an await that blocked the hub would stop the flow instead
(its chunks stop, the test fails).
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

ORDER: list[str] = []  # "<flow>:<i>" per chunk, "tick" per hub tick
TICKS = [0]  # hub ticks so far
from tests.support.waiting import PATIENCE  # noqa: E402  (how long an async flow waits for a hub tick)


async def hub_ticked() -> None:
    """Return once the hub has ticked since the call (the hub must run while we await)."""
    seen = TICKS[0]
    deadline = time.monotonic() + PATIENCE
    while TICKS[0] == seen:
        if time.monotonic() > deadline:
            raise RuntimeError("the hub did not tick while an async flow awaited")
        await asyncio.sleep(0.005)


async def async_flow(data, ctx):  # type: ignore[no-untyped-def]
    for i in range(10):
        await asyncio.sleep(0.02)
        await hub_ticked()
        ORDER.append(f"async-{data}:{i}")
        ctx.send_chunk(i)
    return data


async def async_gen(data):  # type: ignore[no-untyped-def]
    for i in range(10):
        await asyncio.sleep(0.02)
        await hub_ticked()
        ORDER.append(f"agen-{data}:{i}")
        yield i


def sync_gen(data):  # type: ignore[no-untyped-def]
    for i in range(10):
        time.sleep(0.02)  # patched: yields to the hub
        ORDER.append(f"sync-{data}:{i}")
        yield i
    return data


def main() -> None:
    manager = InMemoryStreamManager()
    runner = Runner(manager)
    stop = False

    def ticker() -> None:
        while not stop:
            gevent.sleep(0.005)
            ORDER.append("tick")
            TICKS[0] += 1

    tick = gevent.spawn(ticker)
    runs = [
        runner.start("f", flow, n) for n in range(30) for flow in (async_flow, async_gen, sync_gen)
    ]
    for run in runs:
        run.wait(PATIENCE)
    runner.tasks.join(PATIENCE)
    stop = True
    tick.join()
    stored = [[e.payload for e in manager.subscribe(r.stream_id)] for r in runs]
    manager.close()
    print(
        json.dumps(
            {
                "order": ORDER,
                "stored": stored,
                "leftover_tasks": [t.name for t in running_tasks()],
            }
        )
    )


if __name__ == "__main__":
    main()
