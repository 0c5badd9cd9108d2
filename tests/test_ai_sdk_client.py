"""The Vercel AI SDK's own transports (npm ``ai``, ``@workflow/ai``, pinned in tests/ai_sdk/)
against the example app's chat on ``gunicorn -k gevent`` with two workers sharing SQLite.

tests/ai_sdk/chat_client.mjs runs each scenario in node and reports what the SDK saw.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from example_app.chat import WORDS
from tests.support import servers

JS = Path(__file__).parent / "ai_sdk"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node = shutil.which("node")
    assert node, "node is required for the AI SDK client tests (apt-get install nodejs)"
    if (
        not (JS / "node_modules" / "ai").is_dir()
        or not (JS / "node_modules" / "@workflow").is_dir()
    ):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600)
    return JS / "chat_client.mjs"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    env = servers.sqlite_env(tmp_path_factory)
    # Keep-alive comments between most chunks: the SDK's parsers must skip them.
    env["FLASK_DURABLE_STREAM_KEEPALIVE_INTERVAL"] = "0.02"
    server = servers.gunicorn("example_app:create_app()", workers=2, env=env)
    yield server
    server.stop()


def run(node_client: Path, server: servers.Server, scenario: str, **options: Any) -> Any:
    proc = subprocess.run(
        ["node", str(node_client), f"{server.url}/api/chat", scenario, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def answer(said: str, words: int) -> str:
    """What the example chat flow writes, word by word."""
    return f"You said: {said}." + "".join(" " + WORDS[i % len(WORDS)] for i in range(words))


def ui_chunks(run_id: str, said: str, words: int) -> list[dict[str, Any]]:
    """The whole UI message stream of one uninterrupted answer."""
    deltas = [f"You said: {said}."] + [" " + WORDS[i % len(WORDS)] for i in range(words)]
    return [
        {"type": "start", "messageId": run_id},
        {"type": "text-start", "id": "text-0"},
        *({"type": "text-delta", "id": "text-0", "delta": d} for d in deltas),
        {"type": "text-end", "id": "text-0"},
        {"type": "finish"},
    ]


@pytest.mark.parametrize("abort_after", [3, 12])
def test_aborted_answer_is_reassembled_by_reconnect_to_stream(
    node_client: Path, server: servers.Server, abort_after: int
) -> None:
    words = 20
    report = run(
        node_client, server, "abortAndReconnect", words=words, delay=0.05, abortAfter=abort_after
    )
    run_id = report["first"][0]["messageId"]
    assert len(run_id) == 32
    assert report["first"] == ui_chunks(run_id, "hello", words)[:abort_after]
    assert report["message"] == {
        "id": run_id,
        "role": "assistant",
        "parts": [{"type": "text", "text": answer("hello", words), "state": "done"}],
    }
    assert report["afterEnd"] is None  # the answer ended: 204, no active stream


def test_use_chat_machinery_resumes_after_the_tab_went_away(
    node_client: Path, server: servers.Server
) -> None:
    """The SDK's AbstractChat (what useChat runs): stop() closes the tab's connection only."""
    words = 20
    report = run(node_client, server, "useChatResume", words=words, delay=0.05)
    user, assistant = report["messages"]
    assert user["role"] == "user" and user["parts"] == [{"type": "text", "text": "hello"}]
    assert assistant["role"] == "assistant" and len(assistant["id"]) == 32
    assert assistant["parts"] == [{"type": "text", "text": answer("hello", words), "state": "done"}]
    assert answer("hello", words).startswith(report["seen"])
    assert (report["status"], report["error"]) == ("ready", None)
    assert report["afterEnd"] == 2  # resume once the answer ended: nothing added


@pytest.mark.parametrize("cut_after", [1, 6])
def test_workflow_transport_resumes_from_its_index_with_nothing_repeated(
    node_client: Path, server: servers.Server, cut_after: int
) -> None:
    words = 10
    report = run(node_client, server, "workflowResume", words=words, delay=0.05, cutAfter=cut_after)
    post, *reconnects = report["log"]
    assert post == {"request": "POST /api/chat", "received": 0}
    assert len(reconnects) == 1
    run_id = report["chunks"][0]["messageId"]
    assert reconnects[0] == {
        "request": f"GET /api/chat/{run_id}/stream?startIndex={cut_after}",
        "received": cut_after,
    }
    assert report["chunks"] == ui_chunks(run_id, "resume me", words)  # each chunk once


def test_stop_ends_the_answer_for_every_reader(node_client: Path, server: servers.Server) -> None:
    words = 200
    report = run(node_client, server, "stop", words=words, delay=0.05)
    assert report["stopped"] is True
    sender, follower = report["sender"], report["follower"]
    assert sender == follower  # the one who asked and a reader of the chat: the same end
    assert sender[-2:] == [
        {"type": "text-end", "id": "text-0"},
        {"type": "finish", "finishReason": "other"},
    ]
    text = "".join(c["delta"] for c in sender if c["type"] == "text-delta")
    assert answer("stop me", words).startswith(text) and len(text) < len(answer("stop me", words))
    assert report["afterStop"] is None
    assert report["stopAgain"] is False


def test_silences_carry_keepalive_comments_that_are_not_chunks(server: servers.Server) -> None:
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
    body = {"id": "keepalive-chat", "messages": [message], "words": 3, "delay": 0.1}
    with requests.post(f"{server.url}/api/chat", json=body, stream=True, timeout=30) as response:
        raw = response.content.decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames.count(": keep-alive") >= 3  # each 0.1 s silence is longer than 0.02 s
    data = [json.loads(f[6:]) for f in frames if f.startswith("data: {")]
    run_id = response.headers["x-workflow-run-id"]
    assert data == ui_chunks(run_id, "hi", 3)
    assert frames[-1] == "data: [DONE]"
