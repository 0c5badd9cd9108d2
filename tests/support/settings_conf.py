"""gunicorn settings for tests/test_gunicorn_settings.py: the library's ``post_worker_init``
(``settings_once`` as ``SETTINGS_ONCE`` says), and a count of the settings gunicorn reads
through ``Config.__getattr__``, which ``post_request`` appends to the file ``SETTINGS_READS``
after each request (the reads since the previous request ended)."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.config import Config

from flask_durable_stream import gunicorn as hooks
from flask_durable_stream.gunicorn import worker_exit  # noqa: F401

READS = [0]


def post_worker_init(worker: Any) -> None:
    hooks.post_worker_init(worker, settings_once=os.environ["SETTINGS_ONCE"] == "1")
    lookup = Config.__getattr__

    def counted(self: Any, name: str) -> Any:
        if name in self.__dict__.get("settings", ()):
            READS[0] += 1
        return lookup(self, name)

    Config.__getattr__ = counted  # type: ignore[method-assign]


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    with open(os.environ["SETTINGS_READS"], "a") as out:
        out.write(f"{environ['PATH_INFO']} {READS[0]}\n")
    READS[0] = 0
