"""Prometheus metrics: in process (every hook), and scraped from gunicorn -k gevent -w 2
in multiprocess mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from flask_durable_stream import (
    DurableStream,
    FlowContext,
    FlowError,
    InMemoryStreamManager,
    protocol,
)
from flask_durable_stream.exceptions import StorageUnavailable
from tests.support import servers

STREAM = {"Accept": "text/event-stream"}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class FlakyManager(InMemoryStreamManager):
    """In-memory storage whose appends fail while ``down``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = False
        self.failed = threading.Event()

    def _append(self, stream: Any, events: Any) -> None:
        if self.down:
            self.failed.set()
            raise StorageUnavailable("storage unreachable")
        super()._append(stream, events)


def count(data: Any, ctx: FlowContext) -> int:
    for i in range(int(data)):
        ctx.send_chunk(i)
    return int(data)


def broken(data: Any) -> None:
    raise FlowError("FAILED_PRECONDITION", "not today")


@pytest.fixture
def app() -> Iterator[Flask]:
    app = Flask(__name__)
    app.config.update(DURABLE_STREAM_METRICS=True, DURABLE_STREAM_WRITE_RETRY_TIMEOUT=0.3)
    DurableStream(app, flows={"m_count": count, "m_broken": broken}, stream_manager=FlakyManager())
    yield app
    state = app.extensions["durable_stream"]
    state.runner.shutdown(5)
    state.manager.close()


def test_streams_chunks_subscribers_and_reconnects(app: Flask) -> None:
    client = app.test_client()
    before = {
        "started": value("durable_stream_streams_started_total", flow="m_count"),
        "ok": value("durable_stream_streams_ended_total", flow="m_count", status="OK"),
        "failed": value(
            "durable_stream_streams_ended_total", flow="m_broken", status="FAILED_PRECONDITION"
        ),
        "chunks": value("durable_stream_chunks_total", flow="m_count"),
        "reconnects": value("durable_stream_reconnects_total", flow="m_count"),
        "writes": value("durable_stream_storage_write_seconds_count", backend="in-memory"),
    }
    r = client.post("/flows/m_count", json={"data": 5}, headers=STREAM)
    stream_id = r.headers[protocol.STREAM_ID_HEADER]
    assert r.get_data(as_text=True).endswith('data: {"result":5}\n\n')
    client.post("/flows/m_count", headers={**STREAM, protocol.STREAM_ID_HEADER: stream_id})
    client.post("/flows/m_broken", json={"data": None}, headers=STREAM)
    runner = app.extensions["durable_stream"].runner
    deadline = time.monotonic() + 10
    while runner.active() and time.monotonic() < deadline:  # the last writes land
        time.sleep(0.01)

    assert value("durable_stream_streams_started_total", flow="m_count") == before["started"] + 1
    ok = value("durable_stream_streams_ended_total", flow="m_count", status="OK")
    assert ok == before["ok"] + 1
    failed = value(
        "durable_stream_streams_ended_total", flow="m_broken", status="FAILED_PRECONDITION"
    )
    assert failed == before["failed"] + 1
    assert value("durable_stream_chunks_total", flow="m_count") == before["chunks"] + 5
    assert value("durable_stream_reconnects_total", flow="m_count") == before["reconnects"] + 1
    writes = value("durable_stream_storage_write_seconds_count", backend="in-memory")
    assert writes > before["writes"]
    assert value("durable_stream_streams_open", flow="m_count") == 0
    for mode in ("live", "replay"):  # both readers came and went
        assert value("durable_stream_subscribers", flow="m_count", mode=mode) == 0

    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    names = {f.name for f in text_string_to_metric_families(scraped.get_data(as_text=True))}
    assert {"durable_stream_streams_started", "durable_stream_storage_lag_seconds"} <= names


def test_a_reader_is_counted_while_it_reads(app: Flask) -> None:
    manager = app.extensions["durable_stream"].manager
    runner = app.extensions["durable_stream"].runner
    release = threading.Event()

    def wait(data: Any, ctx: FlowContext) -> None:
        ctx.send_chunk("first")
        release.wait(10)

    run = runner.start("m_wait", wait, None)
    batches = runner.metrics.subscriber(
        manager.subscribe_batches(run.stream_id), "m_wait", "replay"
    )
    assert next(batches)[0].value == "first"
    assert value("durable_stream_subscribers", flow="m_wait", mode="replay") == 1
    assert value("durable_stream_streams_open", flow="m_wait") == 1
    release.set()
    list(batches)
    assert value("durable_stream_subscribers", flow="m_wait", mode="replay") == 0


def test_retries_lag_and_data_loss(app: Flask) -> None:
    manager: FlakyManager = app.extensions["durable_stream"].manager
    runner = app.extensions["durable_stream"].runner
    retries = value("durable_stream_storage_retries_total", backend="in-memory")
    lag = value("durable_stream_storage_lag_seconds_count", backend="in-memory")
    lost = value("durable_stream_data_loss_total", flow="m_count")

    manager.down = True
    run = runner.start("m_count", count, 3)
    assert run.wait(10) is not None  # the flow and its live readers are not held up
    deadline = time.monotonic() + 20
    while not run.durable_failed and time.monotonic() < deadline:  # past the retry timeout
        time.sleep(0.01)
    assert run.durable_failed
    manager.down = False  # the DATA_LOSS marker can be stored now
    while runner.active() and time.monotonic() < deadline:
        time.sleep(0.01)

    assert value("durable_stream_storage_retries_total", backend="in-memory") > retries
    assert value("durable_stream_data_loss_total", flow="m_count") == lost + 1
    assert value("durable_stream_storage_lag_seconds_count", backend="in-memory") > lag
    info = manager.info(run.stream_id)
    assert info is not None and info.status.value == "error"


# -- gunicorn -k gevent -w 2, multiprocess mode ---------------------------------------------


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    prom_dir: Path = tmp_path_factory.mktemp("prometheus")
    env = {
        **servers.sqlite_env(tmp_path_factory),
        "FLASK_DURABLE_STREAM_METRICS": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
    }
    server = servers.gunicorn("example_app:create_app()", workers=2, env=env)
    yield server
    server.stop()


def scrape(server: servers.Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gunicorn_multiprocess_counters_move(gunicorn: servers.Server) -> None:
    started = ("durable_stream_streams_started_total", (("flow", "story"),))
    ended = ("durable_stream_streams_ended_total", (("flow", "story"), ("status", "OK")))
    chunks = ("durable_stream_chunks_total", (("flow", "story"),))
    reconnects = ("durable_stream_reconnects_total", (("flow", "story"),))
    before = scrape(gunicorn)
    n, ids = 6, []
    for _ in range(n):
        r = requests.post(
            f"{gunicorn.url}/flows/story",
            json={"data": {"chunks": 4, "delay": 0}},
            headers=STREAM,
            timeout=60,
        )
        ids.append(r.headers[protocol.STREAM_ID_HEADER])
        assert r.text.endswith("}}\n\n") and '"result"' in r.text
    for stream_id in ids[:2]:
        r = requests.post(
            f"{gunicorn.url}/flows/story",
            headers={**STREAM, protocol.STREAM_ID_HEADER: stream_id},
            timeout=60,
        )
        assert '"result"' in r.text
    # Every worker's numbers, whichever worker answers the scrape.
    for _ in range(4):
        after = scrape(gunicorn)
        assert after[started] - before.get(started, 0) == n
        assert after[chunks] - before.get(chunks, 0) == 4 * n
        assert after[reconnects] - before.get(reconnects, 0) == 2
        deadline = time.monotonic() + 10  # a stream counts as ended once its flow task returns
        while after[ended] - before.get(ended, 0) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            after = scrape(gunicorn)
        assert after[ended] - before.get(ended, 0) == n
    writes = ("durable_stream_storage_write_seconds_count", (("backend", "SQLite"),))
    assert after.get(writes, 0) > before.get(writes, 0)


def test_with_metrics_on_paced_sqlite_streams_are_stored_whole_and_timed(
    gunicorn: servers.Server,
) -> None:
    """Through ``gunicorn -k gevent`` with SQLite and the metrics on: concurrent paced
    streams are stored equal to what their clients got, and their appends are timed."""
    writes = ("durable_stream_storage_write_seconds_count", (("backend", "SQLite"),))
    lag = ("durable_stream_storage_lag_seconds_count", (("backend", "SQLite"),))
    n, chunks = 8, 10

    def stream(_: int) -> tuple[str, bytes]:
        r = requests.post(
            f"{gunicorn.url}/flows/story",
            json={"data": {"chunks": chunks, "delay": 0.01}},
            headers=STREAM,
            timeout=60,
        )
        assert r.status_code == 200 and '"result"' in r.text
        return r.headers[protocol.STREAM_ID_HEADER], r.content

    before = scrape(gunicorn)
    with ThreadPoolExecutor(n) as pool:
        lives = list(pool.map(stream, range(n)))
    for stream_id, body in lives:
        again = requests.post(
            f"{gunicorn.url}/flows/story",
            headers={**STREAM, protocol.STREAM_ID_HEADER: stream_id},
            timeout=60,
        )
        assert again.content == body  # byte for byte what its live client got
    after = scrape(gunicorn)
    # Each stream's events took at least one timed append (its end at least), whichever
    # worker stored them; every timed append observed its lag too.
    assert after.get(writes, 0) - before.get(writes, 0) >= n
    assert after.get(lag, 0) - before.get(lag, 0) >= n
