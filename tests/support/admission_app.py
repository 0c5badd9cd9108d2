"""An app for tests/test_admission.py, served by gunicorn with tests/support/admission_conf.py.

The ``count`` flow sends ``chunks`` chunks (``"chunk 0"`` ...) and returns ``"done"``;
``GET /admission`` says whether the worker admits its connections by turns, how many of
them waited, and the worker's pid.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from flask import Flask

from flask_durable_stream import DurableStream

#: Set by the gunicorn conf's post_worker_init: the worker's Admission, if any.
ADMISSION: list[Any] = []


def count(data: dict[str, Any]) -> Iterator[str]:
    for i in range(int(data["chunks"])):
        yield f"chunk {i}"
    return "done"


app = Flask(__name__)
DurableStream(app, flows={"count": count})


@app.get("/admission")
def admission() -> dict[str, Any]:
    return {
        "installed": bool(ADMISSION),
        "waited": ADMISSION[0].waited if ADMISSION else 0,
        "pid": os.getpid(),
    }
