"""The production gunicorn settings of the chaos suite (as example_app/gunicorn.conf.py).

One addition: a worker whose gevent hub is blocked (gunicorn's WORKER TIMEOUT) dumps
the stack that blocks it to the log when gunicorn aborts it, so a hang is reported
with its cause.
"""

from __future__ import annotations

import faulthandler
from typing import Any

from flask_durable_stream import gunicorn as hooks
from flask_durable_stream import tune_gc
from flask_durable_stream.gunicorn import worker_exit  # noqa: F401

worker_class = "gevent"
worker_connections = 1000
preload_app = False
graceful_timeout = 10


def post_worker_init(worker: Any) -> None:
    hooks.post_worker_init(worker)
    tune_gc()
    # After gunicorn's own handlers: a C-level handler runs even when Python code cannot.
    faulthandler.enable(all_threads=True)  # SIGABRT, SIGBUS, SIGSEGV: the stack, to the log
