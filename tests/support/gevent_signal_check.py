"""Run tests/support/signal_cases.py in a monkey-patched process; print a JSON report."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402

from flask_durable_stream._concurrency import gevent_patched  # noqa: E402
from tests.support.signal_cases import run_all  # noqa: E402

report = run_all()
report["patched"] = gevent_patched()
print(json.dumps(report))
