"""Genkit's own JS client (npm `genkit`, `genkit/beta/client`) against our server, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import node, servers


@pytest.fixture(scope="module")
def node_client() -> Path:
    return node.genkit_client()


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
    report = node.drop_and_resume(node_client, f"{server.url}/flows/story", 25, abort_after)
    node.assert_resumed_whole(report, 25, abort_after)
