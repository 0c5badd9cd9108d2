"""gunicorn settings of the sweep's servers (bench/run.py): the production recipe's hooks.

``post_worker_init`` is the library's (the graceful stop, and new connections let in by
turns while the worker is busy: ``flask_durable_stream.gunicorn``), as
example_app/gunicorn.conf.py uses it; ``BENCH_ADMISSION=off`` lets every connection in at
once instead, as gunicorn does by itself, and ``BENCH_ADMISSION=<seconds>`` sets the length
of a turn. The app calls ``tune_gc`` itself.
"""

from __future__ import annotations

import os
from typing import Any

from flask_durable_stream import gunicorn as hooks


def post_worker_init(worker: Any) -> None:
    turn = os.environ.get("BENCH_ADMISSION", "")
    if turn == "off":
        hooks.post_worker_init(worker, admission=None)
    elif turn:
        hooks.post_worker_init(worker, admission=float(turn))
    else:
        hooks.post_worker_init(worker)
