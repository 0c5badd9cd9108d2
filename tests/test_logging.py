"""Every log line about a stream carries ``stream_id`` and ``flow`` as record fields."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_durable_stream import DurableStream, FlowContext, InMemoryStreamManager, protocol
from flask_durable_stream.exceptions import StorageUnavailable
from flask_durable_stream.flows import RequestData

STREAM = {"Accept": "text/event-stream"}


class FlakyManager(InMemoryStreamManager):
    """In-memory storage whose appends fail while ``down``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = False

    def _append(self, stream: Any, events: Any) -> None:
        if self.down:
            raise StorageUnavailable("storage unreachable")
        super()._append(stream, events)


def count(data: Any, ctx: FlowContext) -> int:
    for i in range(int(data)):
        ctx.send_chunk(i)
    return int(data)


def crash(data: Any) -> None:
    raise RuntimeError("boom")


def picky(request: RequestData) -> dict[str, Any]:
    if request.headers.get("x-crash-provider"):
        raise RuntimeError("a bug in the context provider")
    return {}


@pytest.fixture
def app() -> Iterator[Flask]:
    app = Flask(__name__)
    app.config.update(DURABLE_STREAM_WRITE_RETRY_TIMEOUT=0.2)
    DurableStream(
        app,
        flows={"l_count": count, "l_crash": crash},
        stream_manager=FlakyManager(),
        context_provider=picky,
    )
    yield app
    state = app.extensions["durable_stream"]
    state.runner.shutdown(5)
    state.manager.close()


def about(caplog: pytest.LogCaptureFixture, stream_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if stream_id in r.getMessage()]


def test_a_failing_flow_logs_its_stream(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "flask_durable_stream")
    r = app.test_client().post("/flows/l_crash", json={"data": None}, headers=STREAM)
    stream_id = r.headers[protocol.STREAM_ID_HEADER]
    records = about(caplog, stream_id)
    assert records and all(
        (rec.stream_id, rec.flow) == (stream_id, "l_crash")  # type: ignore[attr-defined]
        for rec in records
    )


def test_storage_trouble_logs_its_stream(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    """Writer lines come from flush tasks, not from the flow or the request."""
    caplog.set_level(logging.INFO, "flask_durable_stream")
    state = app.extensions["durable_stream"]
    state.manager.down = True
    run = state.runner.start("l_count", count, 3)
    run.wait(10)
    deadline = time.monotonic() + 20
    while not run.durable_failed and time.monotonic() < deadline:
        time.sleep(0.01)
    state.manager.down = False
    while state.runner.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    records = about(caplog, run.stream_id)
    assert len(records) >= 2  # a retry warning, the give-up error, the stored marker
    for rec in records:
        assert (rec.stream_id, rec.flow) == (run.stream_id, "l_count"), rec.getMessage()  # type: ignore[attr-defined]


def test_request_lines_name_the_stream(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    r = client.post("/flows/l_count", json={"data": 2}, headers=STREAM)
    stream_id = r.headers[protocol.STREAM_ID_HEADER]
    caplog.clear()
    failed = client.post(
        "/flows/l_count",
        headers={**STREAM, protocol.STREAM_ID_HEADER: stream_id, "x-crash-provider": "1"},
    )
    assert failed.status_code == 500
    (record,) = [r for r in caplog.records if "request failed" in r.getMessage()]
    assert (record.stream_id, record.flow) == (stream_id, "l_count")  # type: ignore[attr-defined]


def test_explicit_extra_wins_and_other_lines_have_empty_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("flask_durable_stream")
    done = threading.Event()

    def elsewhere() -> None:  # a fresh thread: bound to no stream
        log.warning("about nothing in particular")
        log.warning("about one", extra={"stream_id": "abc", "flow": "f"})
        done.set()

    threading.Thread(target=elsewhere).start()
    assert done.wait(5)
    nothing, one = [r for r in caplog.records if r.getMessage().startswith("about")]
    assert (nothing.stream_id, nothing.flow) == (None, None)  # type: ignore[attr-defined]
    assert (one.stream_id, one.flow) == ("abc", "f")  # type: ignore[attr-defined]
