"""The official Durable Streams conformance suite (npm, pinned in tests/ds) against our server.

A real ``gunicorn -k gevent`` serves :mod:`tests.support.ds_app` on each backend:
one worker for memory (its streams live in the process), two for SQLite and
Redis (the suite's requests then land on either process). SQLite runs again under
the optional worker class :class:`flask_durable_stream.gunicorn_worker.PyWSGIWorker`
(the summary line names it). The suite's summary line is printed, so ``pytest -s``
or the captured output shows it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import servers
from tests.support.redis_server import RedisServer

DS = Path(__file__).parent / "ds"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ensure_node_modules() -> None:
    assert shutil.which("node"), (
        "node is required for the Durable Streams suite (apt-get install nodejs)"
    )
    if not (DS / "node_modules" / "@durable-streams" / "server-conformance-tests").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=DS, check=True, timeout=600)


PYWSGI = "flask_durable_stream.gunicorn_worker.PyWSGIWorker"


def ds_server(
    backend: str,
    tmp_path: Path,
    redis: RedisServer | None = None,
    workers: int = 2,
    worker_class: str = "gevent",
    env: dict[str, str] | None = None,
) -> servers.Server:
    env = {
        "DS_BACKEND": backend,
        "DS_SQLITE_PATH": str(tmp_path / "ds.sqlite3"),
        "DS_LONG_POLL_TIMEOUT": "2",
        **(env or {}),
    }
    if redis is not None:
        env["DS_REDIS_URL"] = redis.url
    # Keep-alive longer than node's (4 s): the client, not the server, closes idle
    # connections, so no request is ever sent on a connection the server just closed.
    extra = ["--keep-alive", "30"]
    port = servers.free_port()
    args = servers.gunicorn_args("tests.support.ds_app:app", port, workers=workers, extra=extra)
    args[args.index("-k") + 1] = worker_class
    return servers.Server(args, port, env)


@pytest.fixture(params=["memory", "sqlite", "redis", "sqlite-pywsgi"])
def backend_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[servers.Server]:
    backend, _, worker = request.param.partition("-")
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    workers = 1 if backend == "memory" else 2
    server = ds_server(backend, tmp_path, redis, workers, PYWSGI if worker else "gevent")
    yield server
    server.stop()


def summary(output: str) -> dict[str, int]:
    """Counts from vitest's ``Tests  2 failed | 330 passed | 6 skipped (338)`` line."""
    line = next(ln for ln in _ANSI.sub("", output).splitlines() if ln.strip().startswith("Tests "))
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped)", line)}
    counts["total"] = int(re.search(r"\((\d+)\)", line).group(1))  # type: ignore[union-attr]
    return {"passed": 0, "failed": 0, "skipped": 0, **counts}


def test_official_conformance_suite(
    backend_server: servers.Server,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    ensure_node_modules()
    proc = subprocess.run(
        # vitest's own 5 s per case is a limit on the machine, not on the server: some cases
        # send hundreds of requests in a row, and on a loaded 2-core machine they need longer.
        # The cases' protocol timings (how long a read waits for data) are their own and stay.
        [
            "npx",
            "vitest",
            "run",
            "conformance.test.mjs",
            "--reporter=dot",
            "--testTimeout=60000",
            "--hookTimeout=60000",
        ],
        cwd=DS,
        env={**_node_env(), "DS_URL": f"{backend_server.url}/ds"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    counts = summary(output)
    with capsys.disabled():  # the summary belongs in every run's output, -s or not
        worker = " (-k PyWSGIWorker)" if "pywsgi" in request.node.callspec.id else ""
        print(
            f"\nDurable Streams conformance suite{worker}: {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped of {counts['total']}"
        )
    failures = [ln for ln in _ANSI.sub("", output).splitlines() if ln.startswith(" FAIL ")]
    assert counts["failed"] == 0, "\n".join(failures) or output[-4000:]
    assert counts["passed"] >= 330 and proc.returncode == 0


def _node_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
