"""A client that goes away stops nothing, whichever path its frames took.

Under ``gunicorn -k gevent -w 1``, with the in-memory and the SQLite manager: a stream
whose client disconnected must still run to its end and be stored whole, and a client
that stays gets every frame once, in order, equal to storage. A faster live path must
keep passing this. Nothing here depends on timing: the flow waits at a gate the test opens.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flask_durable_stream import protocol
from tests.support import servers
from tests.support.client import post_stream

APP = "tests.support.disconnect_app:create_app()"
BEFORE, AFTER = 5, 200


@pytest.fixture(params=["memory", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[servers.Server]:
    env = {"DISCONNECT_APP_SQLITE": str(tmp_path / "streams.db")}
    server = servers.gunicorn(APP, env=env if request.param == "sqlite" else {})
    yield server
    server.stop()


def open_gate(server: servers.Server, key: str) -> None:
    requests.post(f"{server.url}/gate/{key}", timeout=30).raise_for_status()


def expected_events() -> list[tuple[str, object]]:
    return [("chunk", i) for i in range(BEFORE + AFTER)] + [("done", "done")]


def test_a_disconnected_client_stops_nothing_and_the_stream_is_stored_whole(
    server: servers.Server,
) -> None:
    key = uuid.uuid4().hex
    body = {"data": {"before": BEFORE, "after": AFTER, "key": key}}
    live = post_stream(server.url, "/flows/gated", body, stop_after=BEFORE)
    assert live.chunks == list(range(BEFORE))
    assert live.stream_id is not None
    open_gate(server, key)  # the flow goes on after its client is gone
    replay = post_stream(server.url, "/flows/gated", {}, stream_id=live.stream_id, timeout=60)
    assert replay.events == expected_events()
    again = post_stream(server.url, "/flows/gated", {}, stream_id=live.stream_id)
    assert again.raw == replay.raw


def test_a_client_that_stays_gets_every_frame_once_in_order_and_equal_to_storage(
    server: servers.Server,
) -> None:
    key = uuid.uuid4().hex
    body = json.dumps({"data": {"before": BEFORE, "after": AFTER, "key": key}})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(
        "POST",
        "/flows/gated",
        body=body,
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    response = conn.getresponse()
    stream_id = response.getheader(protocol.STREAM_ID_HEADER)
    raw = b""
    while raw.count(b"\n\n") < BEFORE:  # every chunk before the gate, while connected
        piece = response.read1(65536)
        assert piece, "the stream ended early"
        raw += piece
    open_gate(server, key)
    raw += response.read()
    conn.close()
    events, rest = protocol.parse_frames(raw.decode())
    assert rest == ""
    assert events == expected_events()
    replay = post_stream(server.url, "/flows/gated", {}, stream_id=stream_id)
    assert replay.raw == raw
