"""What ``tune_gc`` and the library's greenlets leave in a fresh patched process.

    python -m tests.support.gc_check [tune_gc | tune_gc_no_freeze | example_conf | tasks]

Prints one JSON report: the collector's thresholds and frozen count after the step.
"""

from gevent import monkey

monkey.patch_all()

import gc  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from flask_durable_stream import tune_gc  # noqa: E402
from flask_durable_stream._concurrency import TaskGroup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """What gunicorn's post_worker_init hook is given, as far as the hooks use it."""

    alive = True


def main(step: str) -> dict[str, Any]:
    report: dict[str, Any] = {"before": list(gc.get_threshold())}
    if step == "tune_gc":
        tune_gc()
    elif step == "tune_gc_no_freeze":
        tune_gc(5_000, freeze=False)
    elif step == "example_conf":
        conf = runpy.run_path(str(ROOT / "example_app" / "gunicorn.conf.py"))
        worker = Worker()
        conf["post_worker_init"](worker)
        report["stop_hook"] = worker.durable_stream_shutdown is not None  # type: ignore[attr-defined]
        worker.alive = False
        worker.durable_stream_shutdown.join(5)  # type: ignore[attr-defined]
    elif step == "tasks":
        group = TaskGroup()
        seen: list[Any] = []
        task = group.spawn(lambda: seen.append(gevent.getcurrent()), name="flow-x")
        task.join(5)
        greenlet = seen[0]
        report["ran"] = not task.alive
        report["name"] = greenlet.name
        report["spawning_stack"] = repr(greenlet.spawning_stack)
        report["gevent_greenlet"] = isinstance(greenlet, gevent.Greenlet)
        report["plain_spawning_stack"] = gevent.Greenlet(lambda: None).spawning_stack is not None
    report["after"] = list(gc.get_threshold())
    report["frozen"] = gc.get_freeze_count()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
