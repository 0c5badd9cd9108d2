"""``flask durable-stream list|show|gc`` over a SQLite and an in-memory manager.

Streams are written the way a server writes them: for SQLite by another manager on
the same file (another process, as far as the command can tell), for the in-memory
manager by the app's own manager.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from example_app import FLOWS, create_app
from flask_durable_stream import (
    DurableStream,
    InMemoryStreamManager,
    SQLiteStreamManager,
    StreamManager,
    StreamStatus,
)
from flask_durable_stream.testing import ManualClock
from flask_durable_stream.views import runner_for
from tests.support import servers
from tests.support.waiting import wait_for

SHORT_TTL = 30.0  # streams written with this TTL are expired once the clock moves past it


@dataclass
class Setup:
    app: Flask
    cli: FlaskCliRunner
    #: writer(ttl_seconds) -> a manager whose writes the app's commands must see
    writer: Callable[[float], StreamManager]
    #: the storage clock of every manager of the test, moved on instead of sleeping
    clock: ManualClock


@pytest.fixture(params=["sqlite", "memory"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    managers: list[StreamManager] = []
    clock = ManualClock()
    if request.param == "sqlite":
        path = tmp_path / "streams.sqlite3"
        app = create_app({"DURABLE_STREAM_SQLITE_PATH": str(path)})

        def writer(ttl: float) -> StreamManager:
            # Its own sweep would delete expired streams before `gc` gets to count them.
            manager = SQLiteStreamManager(path, ttl_seconds=ttl, sweep_interval=3600)
            manager.clock = clock
            managers.append(manager)
            return manager

    else:
        short = InMemoryStreamManager(SHORT_TTL, sweep_interval=3600)
        short.clock = clock
        app = Flask(__name__)
        DurableStream(app, flows=FLOWS, stream_manager=short)

        def writer(ttl: float) -> StreamManager:
            # One in-memory manager holds everything; only the TTL of its streams differs.
            short.ttl_seconds = ttl
            return short

    app_manager = app.extensions["durable_stream"].manager
    app_manager.clock = clock
    yield Setup(app, app.test_cli_runner(), writer, clock)
    for manager in [*managers, app_manager]:
        runner_for(manager).shutdown(5)
        manager.close()


def write_stream(manager: StreamManager, stream_id: str, chunks: int, end: str | None) -> None:
    writer = manager.open(stream_id, owner="cli-test")
    for i in range(chunks):
        writer.write({"index": i, "text": f"w{i}"})
    if end == "done":
        writer.done({"words": chunks})
    elif end == "error":
        writer.error({"status": "INTERNAL", "message": "Internal Error"})
    writer.close()


def invoke(setup: Setup, *args: str) -> tuple[int, str]:
    result = setup.cli.invoke(args=["durable-stream", *args])
    return result.exit_code, result.output


def test_list_shows_ids_status_and_event_counts(setup: Setup) -> None:
    manager = setup.writer(300)
    write_stream(manager, "finished-1", 3, "done")
    setup.clock.advance(1)  # distinct creation times: the list is newest first
    write_stream(manager, "failed-2", 2, "error")
    setup.clock.advance(1)
    write_stream(manager, "open-3", 5, None)

    code, output = invoke(setup, "list")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split()[:3] == ["STREAM", "ID", "STATUS"]
    rows = [line.split()[:3] for line in lines[1:]]
    assert rows == [
        ["open-3", "open", "5"],
        ["failed-2", "error", "3"],
        ["finished-1", "done", "4"],
    ]

    code, output = invoke(setup, "list", "--limit", "1")
    assert code == 0 and [line.split()[0] for line in output.splitlines()[1:]] == ["open-3"]


def test_list_shows_the_owner(setup: Setup) -> None:
    manager = setup.writer(300)
    manager.open("anyone").done(None)
    setup.clock.advance(1)
    manager.open("alices", owner="alice").done(None)
    code, output = invoke(setup, "list")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split()[-2:] == ["FLOW", "OWNER"]
    assert [(line.split()[0], line.split()[-1]) for line in lines[1:]] == [
        ("alices", "alice"),
        ("anyone", "-"),
    ]


def test_list_and_show_name_the_flow(setup: Setup) -> None:
    manager = setup.writer(300)
    manager.open("unnamed").done(None)
    setup.clock.advance(1)
    writer = manager.open("told", owner="alice", flow="tellStory")
    code, output = invoke(setup, "list")
    assert code == 0, output
    rows = [line.split() for line in output.splitlines()[1:]]
    assert [(row[0], row[-2], row[-1]) for row in rows] == [
        ("told", "tellStory", "alice"),
        ("unnamed", "-", "-"),
    ]
    code, output = invoke(setup, "show", "told")
    assert code == 0, output
    assert json.loads(output)["flow"] == "tellStory"
    writer.done(None)
    code, output = invoke(setup, "show", "unnamed")
    assert code == 0 and json.loads(output)["flow"] is None


def test_a_flow_run_through_the_app_is_listed_under_its_name(setup: Setup) -> None:
    response = setup.app.test_client().post(
        "/flows/echo", json={"data": "hi"}, headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 200 and b'"result"' in response.get_data()
    sid = response.headers["x-genkit-stream-id"]
    # The client has the result from the live path; its storage write may still be on the way.
    manager = setup.app.extensions["durable_stream"].manager
    wait_for(
        lambda: getattr(manager.info(sid), "status", None) is StreamStatus.DONE, "the stored end"
    )
    code, output = invoke(setup, "list")
    assert code == 0, output
    rows = {line.split()[0]: line.split() for line in output.splitlines()[1:]}
    assert rows[sid][1] == "done" and rows[sid][-2:] == ["echo", "-"]


def test_show_prints_the_metadata_as_json(setup: Setup) -> None:
    write_stream(setup.writer(300), "kept", 4, "done")
    code, output = invoke(setup, "show", "kept")
    assert code == 0, output
    info = json.loads(output)
    assert info["stream_id"] == "kept" and info["status"] == "done"
    assert info["last_seq"] == 4 and info["owner"] == "cli-test"
    assert info["expires_at"] > info["created_at"]
    # Times read as in `list`: ISO 8601 in UTC, not epoch floats.
    created = dt.datetime.fromisoformat(info["created_at"].replace("Z", "+00:00"))
    assert abs(created.timestamp() - time.time()) < 600
    assert info["created_at"].endswith("Z") and "T" in info["created_at"]
    code, listed = invoke(setup, "list")
    assert listed.splitlines()[1].split()[3] == info["created_at"]


def test_show_events_of_a_finished_stream(setup: Setup) -> None:
    write_stream(setup.writer(300), "kept", 3, "done")
    code, output = invoke(setup, "show", "kept", "--events")
    assert code == 0, output
    events = output.splitlines()[-4:]
    assert events == [
        '     0 chunk {"index":0,"text":"w0"}',
        '     1 chunk {"index":1,"text":"w1"}',
        '     2 chunk {"index":2,"text":"w2"}',
        '     3 done  {"words":3}',
    ]
    code, again = invoke(setup, "show", "kept", "--no-events")
    assert code == 0 and '"index"' not in again


def test_show_events_of_an_open_stream_prints_what_is_stored_without_waiting(
    setup: Setup,
) -> None:
    manager = setup.writer(300)
    writer = manager.open("running")
    for i in range(3):
        writer.write({"index": i})
    started = time.monotonic()
    code, output = invoke(setup, "show", "running", "--events")
    elapsed = time.monotonic() - started
    assert code == 0, output
    assert '"status": "open"' in output
    assert [line.split()[:2] for line in output.splitlines()[-4:-1]] == [
        ["0", "chunk"],
        ["1", "chunk"],
        ["2", "chunk"],
    ]
    assert output.splitlines()[-1] == "(stream still open: 3 event(s) stored so far)"
    assert elapsed < 10, "show --events waited for the open stream to end"
    writer.done(None)  # the producer is alive and unaffected: it still ends the stream
    info = manager.info("running")
    assert info is not None and info.status.value == "done"


def test_unknown_id_exits_non_zero_with_a_clear_message(setup: Setup) -> None:
    for args in (["show", "nope"], ["show", "nope", "--events"]):
        code, output = invoke(setup, *args)
        assert code != 0
        assert "stream nope not found" in output, output


def test_gc_removes_expired_finished_streams_and_reports_the_count(setup: Setup) -> None:
    short = setup.writer(SHORT_TTL)
    write_stream(short, "old-done", 2, "done")
    write_stream(short, "old-error", 1, "error")
    write_stream(short, "old-but-open", 1, None)  # open streams never expire
    long = setup.writer(300)
    write_stream(long, "fresh", 2, "done")
    setup.clock.advance(SHORT_TTL + 1)

    code, output = invoke(setup, "gc")
    assert code == 0, output
    assert output.strip() == "removed 2 expired stream(s)"
    code, output = invoke(setup, "list")
    assert sorted(line.split()[0] for line in output.splitlines()[1:]) == ["fresh", "old-but-open"]
    code, output = invoke(setup, "show", "old-done")
    assert code != 0 and "not found" in output

    code, output = invoke(setup, "gc")
    assert code == 0 and output.strip() == "removed 0 expired stream(s)"


def test_the_flask_command_on_the_example_app(tmp_path: Path) -> None:
    """The real ``flask --app example_app durable-stream ...`` process on a SQLite file."""
    path = tmp_path / "streams.sqlite3"
    with SQLiteStreamManager(path) as manager:
        write_stream(manager, "from-a-server", 2, "done")
    env = {**os.environ, "FLASK_DURABLE_STREAM_SQLITE_PATH": str(path)}
    flask = [str(servers.BIN / "flask"), "--app", "example_app", "durable-stream"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*flask, *args], cwd=servers.ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == ["from-a-server", "done", "3"]
    shown = run("show", "from-a-server", "--events")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1] == '     2 done  {"words":2}'
    missing = run("show", "missing")
    assert missing.returncode != 0
    assert "stream missing not found" in missing.stderr
