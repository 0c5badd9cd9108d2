"""The production gunicorn settings of the chaos suite (as example_app/gunicorn.conf.py)."""

from __future__ import annotations

from flask_durable_stream.gunicorn import post_worker_init, worker_exit  # noqa: F401

worker_class = "gevent"
worker_connections = 1000
preload_app = False
graceful_timeout = 10
