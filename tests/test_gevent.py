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
    # 90 flows of 10 x 20 ms each ran concurrently, not one after another (that would be 18 s).
    assert report["elapsed"] < 9
    # An await never blocked the hub: a 5 ms ticker kept ticking.
    assert report["max_gap"] < 0.5
    assert report["leftover_tasks"] == []
