"""Genkit's own JS client (npm `genkit`, `genkit/beta/client`) against our server, unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import servers

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node = shutil.which("node")
    assert node, "node is required for the Genkit client test (apt-get install nodejs)"
    if not (JS / "node_modules" / "genkit").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=600)
    return JS / "genkit_client.mjs"


@pytest.fixture(scope="module", params=["pywsgi", "gunicorn-gevent"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    env = servers.sqlite_env(tmp_path_factory)
    server = (
        servers.example_app(env)
        if request.param == "pywsgi"
        else servers.gunicorn("example_app:create_app()", env=env)
    )
    yield server
    server.stop()


@pytest.mark.parametrize("abort_after", [1, 12])
def test_genkit_stream_flow_aborts_and_resumes(
    node_client: Path, server: servers.Server, abort_after: int
) -> None:
    n = 25
    proc = subprocess.run(
        [
            "node",
            str(node_client),
            f"{server.url}/flows/story",
            json.dumps({"chunks": n, "delay": 0.03}),
            str(abort_after),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert len(report["streamId"]) == 32 and report["resumedStreamId"] == report["streamId"]
    assert [c["index"] for c in report["first"]] == list(range(abort_after))
    assert [c["index"] for c in report["resumed"]] == list(range(n))  # every chunk, once, in order
    assert report["output"]["words"] == n
    assert "resumedError" not in report
    assert report["unknownError"] == "Error: NOT_FOUND: Stream not found."
    assert report["plain"] == {"echo": {"hello": "world"}}
