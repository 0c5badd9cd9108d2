"""gunicorn settings for tests/test_admission.py: the library's post_worker_init, with a turn
of 0 s, so that every connection of a burst after the first waits for a turn of its own."""

from __future__ import annotations

from typing import Any

from flask_durable_stream import gunicorn as hooks
from flask_durable_stream.gunicorn import worker_exit  # noqa: F401


def post_worker_init(worker: Any) -> None:
    hooks.post_worker_init(worker, admission=0.0)
    from tests.support import admission_app

    admission_app.ADMISSION.append(worker.durable_stream_admission)
