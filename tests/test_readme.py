"""README's Python snippets, run as a reader would copy them, and type-checked with mypy --strict.

Each snippet is written to a file of its own and imported (the app snippets, then driven
with Flask's test client) or run against the example app on a real server (the client
snippet). A new snippet needs a runner here: the test fails for one it does not know.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flask_durable_stream import StreamManager, protocol
from flask_durable_stream.runner import runner_for
from tests.support import servers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README, re.MULTILINE | re.DOTALL)
SSE = {"Accept": "text/event-stream"}


def kind(snippet: str) -> str:
    if "@ai.flow()" in snippet:
        return "genkit"
    if "DURABLE_STREAM_METRICS" in snippet:
        return "operations"
    if "DurableStream(app" in snippet:
        return "extension"
    if "durable_stream_blueprint(" in snippet:
        return "blueprint"
    if "DurableStreamClient(" in snippet:
        return "client"
    if "chat_blueprint(" in snippet:
        return "chat"
    return "unknown"


def test_every_snippet_has_a_runner() -> None:
    assert sorted(kind(s) for s in SNIPPETS) == [
        "blueprint",
        "chat",
        "client",
        "extension",
        "genkit",
        "operations",
    ]


def load(snippet: str, directory: Path, name: str) -> ModuleType:
    """The snippet as a module of its own file, as ``flask --app <name>`` would import it."""
    path = directory / f"{name}.py"
    path.write_text(snippet)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative paths in the snippets land here
    return tmp_path


def stopped(manager: StreamManager) -> None:
    runner_for(manager).shutdown(5)
    manager.close()


def frames(data: bytes) -> list[tuple[str, Any]]:
    events, rest = protocol.parse_frames(data.decode())
    assert rest == ""
    return events


def test_the_use_it_snippet_runs_as_is(workdir: Path) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "extension"]
    module = load(snippet, workdir, "readme_app")
    manager = module.app.extensions["durable_stream"].manager
    try:
        client = module.app.test_client()
        ada = {"Authorization": "Bearer token-of-ada"}
        live = client.post(
            "/flows/story", json={"data": {"topic": "whales"}}, headers={**SSE, **ada}
        )
        assert live.status_code == 200
        events = frames(live.data)
        text = "".join(value["text"] for kind_, value in events if kind_ == "chunk")
        assert "whales" in text and text.strip().endswith("The end.")
        assert events[-1] == ("done", {"done": True})
        sid = live.headers["x-genkit-stream-id"]
        assert manager.info(sid).owner == "ada"
        replay = client.post("/flows/story", headers={**SSE, **ada, "x-genkit-stream-id": sid})
        assert frames(replay.data) == events
        refused = client.post("/flows/story", json={"data": {"topic": "x"}}, headers=SSE)
        assert (refused.status_code, refused.json["status"]) == (403, "PERMISSION_DENIED")
        missing = client.post("/flows/story", json={"data": {}}, headers=ada)
        assert (missing.status_code, missing.json["message"]) == (400, "topic is required")
        assert client.post("/flows/echo", json={"data": [1]}, headers=ada).json == {"result": [1]}
        ended = client.post("/flows/story/cancel", headers={**ada, "x-genkit-stream-id": sid})
        assert ended.status_code == 409
        assert (workdir / "instance" / "durable-streams.sqlite3").exists()
    finally:
        stopped(manager)


def test_the_blueprint_snippet_runs_as_is(workdir: Path) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "blueprint"]
    module = load(snippet, workdir, "readme_blueprint")
    try:
        client = module.app.test_client()
        assert client.post("/api/echo", json={"data": "hi"}).json == {"result": "hi"}
        assert client.post("/echo", json={"data": 2}).json == {"result": 2}
        streamed = client.post("/api/echo", json={"data": 3}, headers=SSE)
        assert frames(streamed.data) == [("done", 3)]
        assert (workdir / "streams.sqlite3").exists()
    finally:
        stopped(module.manager)


def test_the_chat_snippet_runs_as_is(workdir: Path) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "chat"]
    module = load(snippet, workdir, "readme_chat")
    try:
        client = module.app.test_client()
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "why?"}]}
        body = {"id": "chat-1", "messages": [message], "trigger": "submit-message"}
        response = client.post("/api/chat", json=body)
        assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
        lines = [f[len("data: ") :] for f in response.data.decode().split("\n\n") if f]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
        assert text == "You asked: why? "
        assert {"type": "data-sources", "data": {"count": 0}} in chunks
        assert chunks[-1] == {"type": "finish"}
        assert client.get("/api/chat/chat-1/stream").status_code == 204  # it ended
        assert (workdir / "chats.sqlite3").exists()
    finally:
        stopped(module.manager)


def test_the_genkit_snippet_runs_as_is(workdir: Path) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "genkit"]
    module = load(snippet, workdir, "readme_genkit")
    state = module.app.extensions["durable_stream"]
    try:
        response = module.app.test_client().post(
            "/flows/joke", json={"data": "chicken"}, headers=SSE
        )
        assert response.status_code == 200
        words = ["Why", "did", "the", "chicken", "cross", "the", "road?"]
        assert frames(response.data) == [
            *(("chunk", w) for w in words),
            ("done", "To get to the other side."),
        ]
    finally:
        stopped(state.manager)


def test_the_operations_snippet_runs_as_is(workdir: Path) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "operations"]
    module = load(snippet, workdir, "readme_operations")  # its ext.ready() assertion runs here
    state = module.app.extensions["durable_stream"]
    try:
        client = module.app.test_client()
        assert client.post("/flows/echo", json={"data": 7}).get_json() == {"result": 7}
        assert client.get("/flows/_ready").get_json()["status"] == "ready"
        metrics = client.get("/metrics").data.decode()
        assert 'flow="echo"' in metrics
    finally:
        stopped(state.manager)


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.example_app(servers.sqlite_env(tmp_path_factory, "readme"))
    yield server
    server.stop()


def test_the_client_snippet_runs_as_is_against_the_example_app(
    example_server: servers.Server,
) -> None:
    (snippet,) = [s for s in SNIPPETS if kind(s) == "client"]
    assert "http://127.0.0.1:5000/flows" in snippet  # the quick start's address
    code = snippet.replace("http://127.0.0.1:5000", example_server.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (client snippet)", "exec"), {"__name__": "readme_client"})
    lines = out.getvalue().splitlines()
    story, result, echo, tail, cancelled, failure = lines
    assert "whales" in story and story.rstrip().endswith(".")
    assert "'topic': 'whales'" in result
    assert echo == "{'echo': {'x': 1}}"
    assert story.split()[6:] == tail.split()  # after=5: from the seventh chunk on
    assert cancelled == "False"  # the stream had ended
    assert failure == "INTERNAL Internal Error"


def test_the_quick_start_lists_the_example_apps_endpoints() -> None:
    from example_app import create_app

    start = README.index("## Quick start")
    section = README[start : README.index("\n## ", start + 1)]
    listed = re.findall(r"^\| `(GET|POST) (/[^` ?]*)", section, re.MULTILINE)
    assert len(listed) >= 6
    app = create_app({"DURABLE_STREAM_BACKEND": "memory"})
    manager = app.extensions["durable_stream"].manager
    try:
        adapter = app.url_map.bind("localhost")
        for method, path in listed:
            concrete = path.replace("<flow>", "story")
            endpoint, _ = adapter.match(concrete, method=method)
            assert "unknown_flow" not in str(endpoint), (method, path)
        flows = {p.split("/")[2] for m, p in listed if p.startswith("/flows/") and "<" not in p}
        assert flows == set(app.extensions["durable_stream"].flows)
    finally:
        stopped(manager)


def test_the_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    for number, snippet in enumerate(SNIPPETS):
        (tmp_path / f"snippet_{number}.py").write_text(snippet)
    # A control: the lazily imported names must have their real types, not Any or object.
    (tmp_path / "control.py").write_text(
        "from flask_durable_stream import DurableStreamClient, SQLiteStreamManager\n"
        'wrong: int = SQLiteStreamManager(":memory:")\n'
        'also_wrong: int = DurableStreamClient("http://127.0.0.1:1")\n'
    )
    # The package as from an install: its own optional imports have no stubs, which mypy
    # reports for source on MYPYPATH but not for an installed package.
    (tmp_path / "mypy.ini").write_text(
        "[mypy]\n[mypy-gevent.*,grpc.*,google.*,firebase_admin.*,redis.*]\n"
        "ignore_missing_imports = True\n"
    )
    files = sorted(p.name for p in tmp_path.glob("*.py"))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini", *files],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout
    assert errors[0].startswith("control.py:2:") and '"SQLiteStreamManager"' in errors[0]
    assert errors[1].startswith("control.py:3:") and '"DurableStreamClient"' in errors[1]
