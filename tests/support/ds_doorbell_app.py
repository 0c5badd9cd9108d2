""":mod:`tests.support.ds_app` with its readers' polling slowed to ``DS_POLL_SECONDS`` and a
``/pid`` route naming the worker that answers (to pair connections of different workers);
``/pid?block=1`` holds its whole worker process for a second first, so that the connections
opened meanwhile are accepted by the other worker.
"""

from __future__ import annotations

import os

from flask import request
from gevent import monkey

from tests.support.ds_app import app

_SECONDS = float(os.environ.get("DS_POLL_SECONDS", "60"))
for blueprint in app.blueprints.values():
    store = getattr(blueprint, "durable_streams_store", None)
    if store is not None:
        store.poll_interval = store.heard_poll_interval = (_SECONDS, _SECONDS)
        store.fast_poll_seconds = 0.0


@app.get("/pid")
def pid() -> str:
    if request.args.get("block"):
        monkey.get_original("time", "sleep")(1.0)  # not a greenlet's sleep: the process stops
    return str(os.getpid())
