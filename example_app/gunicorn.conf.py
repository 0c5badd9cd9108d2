"""Production gunicorn settings for the example app.

    gunicorn -c example_app/gunicorn.conf.py
    gunicorn -c example_app/gunicorn.conf.py -b 0.0.0.0:8000 -w 8   # the command line wins

Every worker builds its own app, stream manager and SQLite connections after the
fork (no ``preload_app``), and all workers share the one SQLite file, so a client
that reconnects to any worker replays and follows the stream.

Stopping, and why ``graceful_timeout`` depends on DURABLE_STREAM_SHUTDOWN_GRACE
-----------------------------------------------------------------------------
On SIGTERM (or SIGINT/SIGQUIT) the master tells every worker to stop and kills
with SIGKILL any worker still alive ``graceful_timeout`` seconds later. A
stopping worker stops accepting, gives running flows
``DURABLE_STREAM_SHUTDOWN_GRACE`` seconds to finish, then stores the terminal
``UNAVAILABLE`` "Server shutting down" error for the rest, so their clients end
cleanly when they reconnect to any other or a restarted server.

The worker does that at interpreter exit, which comes only after its open
connections are gone, and a client following a long flow keeps its connection
open until the flow ends. The hooks below therefore start the flows' shutdown as
soon as the worker is told to stop: the flows end within the grace, their
followers receive the terminal frame, the connections close and the worker exits.
The hooks come from ``flask_durable_stream.gunicorn``.

So ``graceful_timeout`` must exceed the grace, plus the time to store the final
events (usually milliseconds, at most 5 s), plus ``keepalive``: a client that got
its last frame keeps its idle connection open, and gunicorn's handler waits up to
``keepalive`` seconds for its next request before the worker can exit (and checks
for open connections once a second). Here: grace + 5 + keepalive + 2. A worker killed
before that loses the clean ending: its unfinished streams end only when a
reader finds the producer lease expired ("Producer lost", DURABLE_STREAM_LEASE
seconds later). Both values are read from the same environment variable, which
the app reads too (``FLASK_DURABLE_STREAM_SHUTDOWN_GRACE``, default 25).
"""

from __future__ import annotations

import math
import os
from typing import Any

from flask_durable_stream import gunicorn as hooks
from flask_durable_stream import tune_gc
from flask_durable_stream.gunicorn import post_fork, worker_exit  # noqa: F401

wsgi_app = "example_app:create_app()"
bind = ["127.0.0.1:5000"]
worker_class = "gevent"
# One gevent worker per core serves many streams; more processes only add contention for
# the SQLite file's single write lock. WEB_CONCURRENCY is gunicorn's own default knob.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_connections = 1000  # concurrent connections (streams) per worker
preload_app = False  # each worker opens its own SQLite connections and writer thread
keepalive = 5

SHUTDOWN_GRACE = float(os.environ.get("FLASK_DURABLE_STREAM_SHUTDOWN_GRACE", 25.0))
# grace + storing the last events (at most 5 s) + an idle keep-alive connection + 2 s of checks
graceful_timeout = math.ceil(SHUTDOWN_GRACE) + 5 + keepalive + 2


def post_worker_init(worker: Any) -> None:
    # The graceful stop of running flows, and new connections let in by turns while the
    # worker is busy (admission=: the turn's length in seconds, None to turn it off).
    hooks.post_worker_init(worker)
    # Many streams per worker: collections of the garbage collector rare and short
    # (the app is loaded by now; see tune_gc and docs/performance.md).
    tune_gc()


accesslog = "-"
errorlog = "-"
