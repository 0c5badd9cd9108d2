"""Genkit Python flows (``@ai.flow()``) served unchanged, in process and under gunicorn -k gevent.

The flows live in ``tests/support/genkit_app.py``; the same app also serves them
with ``genkit_flask_handler``, Genkit's own Flask integration, for comparison.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import flow_view, protocol
from tests.support import (
    genkit_app,  # genkit and genkit-flask come with the test extra
    node,
    servers,
)

STREAM = {"Accept": "text/event-stream"}
JS = Path(__file__).parent / "js"


def events(body: str) -> list[tuple[str, Any]]:
    parsed, rest = protocol.parse_frames(body)
    assert rest == ""
    return parsed


@pytest.fixture
def client() -> Iterator[FlaskClient]:
    app = genkit_app.create_app()
    yield app.test_client()
    state = app.extensions["durable_stream"]
    state.runner.shutdown(5)
    state.manager.close()
    # Finish off the per-run event loops of thread mode now: CPython 3.11.7 can raise
    # "AST constructor recursion depth mismatch" when a collection runs finalizers in the
    # middle of Werkzeug compiling the next app's routes.
    gc.collect()


def test_chunks_output_and_context_reach_the_client(client: FlaskClient) -> None:
    r = client.post("/flows/joke", json={"data": {"chunks": 3}}, headers={**STREAM, "x-user": "al"})
    assert r.status_code == 200 and len(r.headers[protocol.STREAM_ID_HEADER]) == 32
    got = events(r.get_data(as_text=True))
    assert got[:3] == [("chunk", {"index": i, "text": f"word{i} "}) for i in range(3)]
    kind, output = got[3]
    assert kind == "done" and output["words"] == 3
    # The context provider's context is the action's context, and Genkit's current context.
    assert output["auth"] == {"uid": "al"} and output["currentContext"] == {"auth": {"uid": "al"}}

    replay = client.post(
        "/flows/joke",
        headers={**STREAM, protocol.STREAM_ID_HEADER: r.headers[protocol.STREAM_ID_HEADER]},
    )
    assert replay.get_data() == r.get_data()  # a reconnect replays the very same frames

    plain = client.post("/flows/joke", json={"data": {"chunks": 2}})
    assert plain.status_code == 200 and plain.get_json()["result"]["words"] == 2


def test_genkit_model_chunks_are_serialized_like_genkit(client: FlaskClient) -> None:
    r = client.post("/flows/tell", json={"data": "owls"}, headers=STREAM)
    got = events(r.get_data(as_text=True))
    texts = [c["content"][0]["text"] for kind, c in got if kind == "chunk"]
    assert texts == ["a ", "short ", "joke ", "about ", "owls "]
    assert got[0][1]["role"] == "model"
    assert got[-1] == ("done", "a short joke about owls")


def test_a_genkit_error_keeps_its_status_and_message(client: FlaskClient) -> None:
    r = client.post("/flows/refuse", json={"data": None}, headers=STREAM)
    assert events(r.get_data(as_text=True)) == [
        ("chunk", {"step": 1}),
        (
            "error",
            {
                "status": "FAILED_PRECONDITION",
                "message": "the joke is not ready",
                "details": {"retry": True},
            },
        ),
    ]
    plain = client.post("/flows/refuse", json={"data": None})
    assert plain.status_code == 400
    assert plain.get_json()["message"] == "the joke is not ready"
    # Genkit's own input validation is a GenkitError too: INVALID_ARGUMENT, 400.
    bad = client.post("/flows/tell", json={"data": {"not": "a string"}})
    assert bad.status_code == 400 and bad.get_json()["status"] == "INVALID_ARGUMENT"


def test_anything_else_is_redacted(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    r = client.post("/flows/crash", json={"data": None}, headers=STREAM)
    body = r.get_data(as_text=True)
    assert events(body) == [("chunk", {"step": 1}), ("error", protocol.INTERNAL_ERROR)]
    assert "hunter2" not in body
    plain = client.post("/flows/crash", json={"data": None})
    assert plain.status_code == 500 and plain.get_json() == protocol.INTERNAL_ERROR
    assert "hunter2" in caplog.text  # the operator still sees what happened


def test_context_provider_public_error_is_sent(client: FlaskClient) -> None:
    r = client.post("/flows/joke", json={"data": {}}, headers={**STREAM, "x-user": "mallory"})
    assert r.status_code == 403
    assert r.get_json() == {"status": "PERMISSION_DENIED", "message": "mallory may not call flows"}


def test_flow_view_takes_a_genkit_flow() -> None:
    view = flow_view(genkit_app.joke, context_provider=genkit_app.provide_context)
    assert view.name == "joke"
    app = Flask(__name__)
    app.add_url_rule("/joke", view_func=view, methods=["POST"])
    r = app.test_client().post("/joke", json={"data": {"chunks": 1}}, headers=STREAM)
    assert [k for k, _ in events(r.get_data(as_text=True))] == ["chunk", "done"]
    view.runner.shutdown(5)
    assert view.manager is not None
    view.manager.close()


def test_genkit_is_imported_only_when_a_genkit_flow_is_registered() -> None:
    code = """
import sys
import example_app
app = example_app.create_app({"DURABLE_STREAM_BACKEND": "memory"})
async def shout(data):
    return str(data).upper()
from flask_durable_stream import flow_view
app.add_url_rule("/shout", view_func=flow_view(shout), methods=["POST"])
c = app.test_client()
assert c.post("/shout", json={"data": "hi"}).get_json() == {"result": "HI"}
assert c.post("/flows/echo", json={"data": 1}).status_code == 200
loaded = [m for m in sys.modules if m.split(".")[0] == "genkit" or m.endswith(".genkit")]
print(sorted(loaded))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=servers.ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -- under gunicorn -k gevent ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    db = tmp_path_factory.mktemp("genkit") / "streams.sqlite3"
    server = servers.gunicorn(
        "tests.support.genkit_app:create_app()", env={"GENKIT_APP_SQLITE": str(db)}
    )
    yield server
    server.stop()


def post(server: servers.Server, path: str, data: Any, **headers: str) -> requests.Response:
    return requests.post(
        f"{server.url}{path}", json={"data": data}, headers={**STREAM, **headers}, timeout=60
    )


def test_same_frames_as_genkit_flask(gunicorn: servers.Server) -> None:
    """An uninterrupted run: byte for byte what Genkit's own Flask handler sends."""
    for name, data in [("joke", {"chunks": 4}), ("tell", "cats"), ("echo", {"x": [1, 2]})]:
        ours = post(gunicorn, f"/flows/{name}", data, **{"x-user": "zoe"})
        theirs = post(gunicorn, f"/genkit-flask/{name}", data, **{"x-user": "zoe"})
        assert ours.status_code == theirs.status_code == 200
        assert ours.content == theirs.content, name
        assert ours.headers[protocol.STREAM_ID_HEADER]  # and ours can be resumed


def test_many_genkit_flows_run_at_once(gunicorn: servers.Server) -> None:
    """Each ``gather`` run ends only once all n have started: served one at a time, they
    would each hit their deadline (DEADLINE_EXCEEDED) instead."""
    n = 12
    results: list[list[tuple[str, Any]]] = [[] for _ in range(n)]

    def call(i: int) -> None:
        r = post(gunicorn, "/flows/gather", {"group": "g1", "n": n, "deadline": 60})
        results[i] = events(r.text)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for got in results:
        assert got[-1][0] == "done", got
        assert got[-1][1]["ran_together"] == n
    # No asyncio loop leaked into the worker's greenlets: genkit-flask's async view (asgiref
    # refuses to run where a loop is running) still answers after ours ran.
    assert post(gunicorn, "/genkit-flask/echo", 1).status_code == 200


def test_a_genkit_flow_can_resolve_names_and_call_out(gunicorn: servers.Server) -> None:
    """DNS goes through asyncio's executor and the request back to this worker must be
    served while the flow waits for it: neither may hang."""
    r = post(gunicorn, "/flows/relay", {"port": gunicorn.port, "payload": {"n": 7}})
    assert events(r.text) == [
        ("chunk", {"relayed": True}),
        ("done", {"result": {"echo": {"n": 7}}}),
    ]


def test_cancel_stops_a_genkit_flow(gunicorn: servers.Server) -> None:
    with requests.post(
        f"{gunicorn.url}/flows/joke",
        json={"data": {"chunks": 1000, "delay": 0.05}},
        headers=STREAM,
        stream=True,
        timeout=60,
    ) as r:
        stream_id = r.headers[protocol.STREAM_ID_HEADER]
        lines = r.iter_lines()
        assert next(lines).startswith(b"data: ")  # the flow is running
        cancel = requests.post(
            f"{gunicorn.url}/flows/joke/cancel",
            headers={protocol.STREAM_ID_HEADER: stream_id},
            timeout=30,
        )
        assert cancel.status_code == 202
        rest = b"\n".join(lines)
    assert b'error: {"error":{"status":"CANCELLED"' in rest


# -- Genkit's own JS client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def node_client() -> Path:
    return node.genkit_client()


def test_genkit_js_client_drops_and_resumes_a_genkit_python_flow(
    node_client: Path, gunicorn: servers.Server
) -> None:
    report = node.drop_and_resume(node_client, f"{gunicorn.url}/flows/joke", 25, 3)
    node.assert_resumed_whole(report, 25, 3)
