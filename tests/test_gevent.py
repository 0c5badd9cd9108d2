"""Under gevent's monkey patching (as in gunicorn -k gevent), in a subprocess."""

from __future__ import annotations

import json
import subprocess

from tests.support.servers import PYTHON, ROOT


def test_all_flow_shapes_run_concurrently_without_blocking_the_hub() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "tests.support.gevent_flows_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    chunks = [str(i) for i in range(10)]
    for n, (a, ag, sg) in enumerate(zip(*[iter(report["stored"])] * 3, strict=True)):
        assert a == chunks + [str(n)]
        assert ag == chunks + ["null"]
        assert sg == chunks + [str(n)]
    order: list[str] = report["order"]
    flows = {entry.split(":")[0] for entry in order if entry != "tick"}
    assert len(flows) == 90
    first = {f: order.index(f"{f}:0") for f in flows}
    last = {f: order.index(f"{f}:9") for f in flows}
    # Concurrent, not one after another: every flow had started before any had finished.
    assert max(first.values()) < min(last.values())
    # Awaits never blocked the hub: its ticker kept running while the async flows were
    # between their first and last chunks.
    async_span = order[
        min(first[f] for f in flows if f.startswith("async")) : max(
            last[f] for f in flows if f.startswith("async")
        )
    ]
    assert async_span.count("tick") >= 5
    assert report["leftover_tasks"] == []
