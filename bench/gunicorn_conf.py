"""gunicorn settings of the sweep's servers (bench/run.py): the production recipe's hooks.

``post_worker_init`` is the library's (the graceful stop, and new connections let in by
turns while the worker is busy: ``flask_durable_stream.gunicorn``), as
example_app/gunicorn.conf.py uses it; ``BENCH_ADMISSION=off`` lets every connection in at
once instead, as gunicorn does by itself, and ``BENCH_ADMISSION=<seconds>`` sets the length
of a turn; ``BENCH_SETTINGS_ONCE=0`` keeps gunicorn's own settings object. The app calls
``tune_gc`` itself.
"""

from __future__ import annotations

import os
from typing import Any

from flask_durable_stream import gunicorn as hooks


def post_worker_init(worker: Any) -> None:
    turn = os.environ.get("BENCH_ADMISSION", "")
    once = os.environ.get("BENCH_SETTINGS_ONCE", "1") != "0"
    if turn == "off":
        hooks.post_worker_init(worker, admission=None, settings_once=once)
    elif turn:
        hooks.post_worker_init(worker, admission=float(turn), settings_once=once)
    else:
        hooks.post_worker_init(worker, settings_once=once)
