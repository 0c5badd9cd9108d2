"""Several real server processes on one SQLite file: gunicorn workers, kill -9, restarts, SIGTERM.

Which worker served a request is read from gunicorn's access log, written to a file
with the worker pid (``%(p)s``) and the stream id of each request.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from flask_durable_stream import SQLiteStreamManager, protocol
from flask_durable_stream.runner import SHUTDOWN_FLUSH_WAIT
from tests.support import servers
from tests.support.client import StreamCall, post_stream

APP = "example_app:create_app()"
# Longer than anything that can keep a live worker from storing for a while: SQLite's busy
# timeout (10 s, the longest a commit waits for another connection's write lock), so a lock
# wait on a live worker never looks like its death. A killed worker's streams still end
# within the test's reader timeout.
LEASE = 12.0
# The short flow of the SIGTERM test (1 s of delays) finishes well within it, even slowed down.
GRACE = 8.0
ACCESS_FORMAT = "%(p)s %(s)s in=%({x-genkit-stream-id}i)s out=%({x-genkit-stream-id}o)s"
ACCESS_LINE = re.compile(r"<(\d+)> (\d+) in=(\S+) out=(\S+)")
NO_CONTROL_SOCKET = ["--no-control-socket"]  # gunicorn's default is one fixed path per user
PRODUCER_LOST = (
    "error",
    {"status": "UNAVAILABLE", "message": "Producer lost: the flow's worker stopped."},
)
SHUTTING_DOWN = (
    "error",
    {
        "status": "UNAVAILABLE",
        "message": "Server shutting down: the flow did not finish within the grace period.",
    },
)


@dataclass
class Served:
    pid: int
    stream_id: str
    resumed: bool  # a reconnect (x-genkit-stream-id in the request)


def served(log: Path) -> list[Served]:
    rows = []
    for line in log.read_text().splitlines() if log.exists() else []:
        match = ACCESS_LINE.match(line)
        if match and match[4] != "-":
            rows.append(Served(int(match[1]), match[4], match[3] != "-"))
    return rows


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def indexes(call: StreamCall) -> list[int]:
    return [c["index"] for c in call.chunks]


def story(chunks: int, delay: float) -> dict[str, object]:
    return {"data": {"chunks": chunks, "delay": delay}}


def assert_clean(output: str) -> None:
    """No traceback but the one the throwy flow raises on purpose."""
    expected = output.count("RuntimeError: the flow hit an internal problem")
    assert output.count("Traceback") == expected, output


def in_threads(fns: list[Callable[[], StreamCall]]) -> list[StreamCall]:
    results: list[StreamCall | BaseException | None] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        if not isinstance(r, StreamCall):
            raise AssertionError(f"a client failed: {r!r}")
    return results  # type: ignore[return-value]


def attach(base_url: str, stream_id: str) -> http.client.HTTPResponse:
    """Reconnect and return once the headers are in: from then on the server is serving it."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST",
        "/flows/story",
        body=b"{}",
        headers={
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            protocol.STREAM_ID_HEADER: stream_id,
        },
    )
    response = conn.getresponse()
    assert response.status == 200
    return response


def read_all(response: http.client.HTTPResponse) -> StreamCall:
    call = StreamCall(response.status, {k.lower(): v for k, v in response.getheaders()})
    try:
        call.raw = response.read()
    finally:
        response.close()
    call.events, rest = protocol.parse_frames(call.raw.decode())
    assert rest == "", rest
    return call


# -- four gunicorn workers on one file ----------------------------------------------------------


@dataclass
class Cluster:
    server: servers.Server
    log: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = {
        **servers.sqlite_env(tmp_path_factory, "cluster"),
        "FLASK_DURABLE_STREAM_LEASE": str(LEASE),
    }
    log = tmp_path_factory.mktemp("cluster-log") / "access.log"
    server = servers.gunicorn(
        APP,
        workers=4,
        env=env,
        extra=[
            "--access-logfile",
            str(log),
            "--access-logformat",
            ACCESS_FORMAT,
        ],
    )
    yield Cluster(server, log)
    assert_clean(server.stop())


def test_fifty_streams_reconnect_to_any_worker_losing_and_duplicating_nothing(
    cluster: Cluster,
) -> None:
    n = 30

    def client(i: int) -> Callable[[], StreamCall]:
        rnd = random.Random(i)
        k = rnd.randint(1, n - 1)
        body = story(n, rnd.uniform(0.02, 0.03))

        def run() -> StreamCall:
            first = post_stream(cluster.server.url, "/flows/story", body, stop_after=k)
            assert first.status == 200 and first.stream_id, first
            assert indexes(first)[:k] == list(range(k))
            again = post_stream(cluster.server.url, "/flows/story", {}, stream_id=first.stream_id)
            replay = post_stream(cluster.server.url, "/flows/story", {}, stream_id=first.stream_id)
            assert again.status == replay.status == 200
            assert indexes(again) == list(range(n)), f"stream {first.stream_id} lost or repeated"
            assert again.terminal is not None and again.terminal[0] == "done"
            assert again.terminal[1]["words"] == n
            assert replay.raw == again.raw, "two reconnects got different bytes"
            assert again.raw.startswith(first.raw[: first.raw.rfind(b"\n\n") + 2])
            return again

        return run

    calls = in_threads([client(i) for i in range(50)])
    assert len({c.stream_id for c in calls}) == 50

    ids = {c.stream_id for c in calls}
    wait_until(lambda: len([s for s in served(cluster.log) if s.stream_id in ids]) >= 150)
    rows = [s for s in served(cluster.log) if s.stream_id in ids]
    pids = {s.pid for s in rows}
    assert len(pids) > 1, f"one worker served everything: {pids}"
    by_stream: dict[str, set[int]] = {}
    for s in rows:
        by_stream.setdefault(s.stream_id, set()).add(s.pid)
    crossed = [sid for sid, p in by_stream.items() if len(p) > 1]
    assert crossed, "no reconnect landed on another worker than the one running the flow"


def test_killed_worker_streams_end_unavailable_within_the_lease(cluster: Cluster) -> None:
    n, delay = 100, 0.15  # about 15 s per flow: the kill always lands mid-flow
    firsts = in_threads(
        [
            lambda: post_stream(cluster.server.url, "/flows/story", story(n, delay), stop_after=1)
            for _ in range(6)
        ]
    )
    ids = [f.stream_id for f in firsts if f.stream_id is not None]
    assert len(ids) == len(firsts)
    # The starting request is logged once its client is gone (the next write fails).
    wait_until(lambda: {s.stream_id for s in served(cluster.log) if not s.resumed} >= set(ids))
    owner = {
        s.stream_id: s.pid for s in served(cluster.log) if not s.resumed and s.stream_id in ids
    }
    victim = owner[ids[0]]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    ended_at: dict[str, float] = {}

    def reconnect(sid: str) -> Callable[[], StreamCall]:
        def run() -> StreamCall:
            call = post_stream(cluster.server.url, "/flows/story", {}, stream_id=sid, timeout=60)
            ended_at[sid] = time.monotonic()
            return call

        return run

    calls = dict(zip(ids, in_threads([reconnect(sid) for sid in ids]), strict=True))
    for sid, call in calls.items():
        assert call.status == 200
        got = indexes(call)
        assert got == list(range(len(got))), "a gap or a duplicate"
        if owner[sid] == victim:
            assert call.terminal == PRODUCER_LOST
            assert len(got) < n
            # Noticed by the lease, not by the reader's own inactivity timeout (60 s); the
            # margin over the lease is for a loaded machine.
            took = ended_at[sid] - killed_at
            assert took < LEASE + 20, f"producer loss noticed after {took:.1f}s"
        else:  # a flow on another worker does not notice
            assert (
                call.terminal is not None and call.terminal[0] == "done" and got == list(range(n))
            )
        again = post_stream(cluster.server.url, "/flows/story", {}, stream_id=sid)
        assert again.raw == call.raw
    # The master replaced the worker; the server still serves new flows.
    fresh = post_stream(cluster.server.url, "/flows/story", story(3, 0.01))
    assert indexes(fresh) == [0, 1, 2] and fresh.terminal is not None


def started_by(log: Path, stream_id: str) -> int | None:
    """The pid of the worker that started ``stream_id``, once its request is logged."""
    return next((s.pid for s in served(log) if s.stream_id == stream_id and not s.resumed), None)


def cancelled_by(log: Path, stream_id: str) -> int | None:
    """The pid of the worker that answered 202 to a cancel of ``stream_id``, once logged."""
    for line in log.read_text().splitlines() if log.exists() else []:
        match = ACCESS_LINE.match(line)
        if match and match[2] == "202" and match[3] == stream_id:
            return int(match[1])
    return None


def logged(find: Callable[[Path, str], int | None], log: Path, stream_id: str) -> bool:
    return find(log, stream_id) is not None


def test_a_cancel_that_lands_on_another_worker_stops_the_flow(cluster: Cluster) -> None:
    n, delay = 2000, 0.04  # 80 s per flow: the cancel always lands mid-flow
    host, port = cluster.server.url.removeprefix("http://").split(":")
    for _ in range(10):  # until a cancel is answered by a worker that does not run the flow
        first = post_stream(cluster.server.url, "/flows/story", story(n, delay), stop_after=1)
        sid = first.stream_id
        assert sid is not None
        wait_until(partial(logged, started_by, cluster.log, sid))
        producer = started_by(cluster.log, sid)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/flows/story/cancel", headers={protocol.STREAM_ID_HEADER: sid})
        assert conn.getresponse().status == 202
        conn.close()
        wait_until(partial(logged, cancelled_by, cluster.log, sid))
        if cancelled_by(cluster.log, sid) != producer:
            break
    else:
        pytest.fail("no cancel was answered by another worker than the flow's in 10 tries")
    # The flag went through SQLite; the producing worker saw it at its next stored chunk
    # (an append reads the flag back: the flow emits one every 40 ms, so no heartbeat is due).
    call = post_stream(cluster.server.url, "/flows/story", {}, stream_id=sid, timeout=60)
    assert call.terminal == ("error", {"status": "CANCELLED", "message": "Cancelled by client."})
    got = indexes(call)
    assert got == list(range(len(got))) and len(got) < n


# -- restarts and graceful stops on one file ---------------------------------------------------


def gunicorn_with_config(env: dict[str, str], workers: int = 2) -> servers.Server:
    """The example's production gunicorn config, on a free port."""
    port = servers.free_port()
    return servers.Server(config_args(port, workers), port, env)


def config_args(port: int, workers: int) -> list[str]:
    """The command line of gunicorn with the example's production config."""
    return [
        str(servers.BIN / "gunicorn"),
        "-c",
        "example_app/gunicorn.conf.py",
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        str(workers),
        *NO_CONTROL_SOCKET,
    ]


def test_restart_replays_finished_streams_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = servers.sqlite_env(tmp_path_factory, "restart")
    first = servers.gunicorn(APP, workers=2, env=env)
    try:
        live = post_stream(first.url, "/flows/story", story(12, 0.005))
        failed = post_stream(first.url, "/flows/throwy", {"data": {"count": 2}})
        dropped = post_stream(first.url, "/flows/story", story(8, 0.02), stop_after=2)
        finished_alone = post_stream(first.url, "/flows/story", {}, stream_id=dropped.stream_id)
    finally:
        assert_clean(first.stop())
    assert live.terminal is not None and live.terminal[0] == "done" and len(live.chunks) == 12
    assert failed.terminal == ("error", {"status": "INTERNAL", "message": "Internal Error"})

    second = servers.example_app(env)  # another kind of server, same file
    try:
        # Each through its own flow's endpoint: to another flow's, a stream is unknown (204).
        for flow, before in (("story", live), ("throwy", failed), ("story", finished_alone)):
            after = post_stream(second.url, f"/flows/{flow}", {}, stream_id=before.stream_id)
            assert after.status == 200
            assert after.raw == before.raw
    finally:
        output = second.stop()
    assert_clean(output)


@pytest.mark.parametrize(
    "kind",
    [
        "python -m example_app",
        "gunicorn -c gunicorn.conf.py",
        # The flows run in their requests' greenlets (the story flow is a plain function,
        # which keeps its request to its end): the worker still exits by itself.
        "gunicorn -c gunicorn.conf.py, DURABLE_STREAM_FLOW_IN_RESPONSE",
    ],
)
def test_sigterm_finishes_short_flows_and_ends_long_ones_unavailable(
    kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {
        **servers.sqlite_env(tmp_path_factory, "sigterm"),
        "FLASK_DURABLE_STREAM_SHUTDOWN_GRACE": str(GRACE),
    }
    if kind.endswith("FLOW_IN_RESPONSE"):
        env["FLASK_DURABLE_STREAM_FLOW_IN_RESPONSE"] = "true"

    def start() -> servers.Server:
        return servers.example_app(env) if kind.startswith("python") else gunicorn_with_config(env)

    server = start()
    # The long flow cannot finish within the grace (~100 s); the short one sleeps 1 s in
    # all, well within it (one that ends before the stop is fine too).
    long = post_stream(server.url, "/flows/story", story(2000, 0.05), stop_after=1)
    short = post_stream(server.url, "/flows/story", story(10, 0.1), stop_after=1)
    follower: list[StreamCall | BaseException] = []

    def follow_long(response: http.client.HTTPResponse) -> None:
        try:
            follower.append(read_all(response))
        except BaseException as exc:  # a cut connection: reported below, in the test's thread
            follower.append(exc)

    assert long.stream_id is not None
    response = attach(server.url, long.stream_id)  # still connected when the server stops
    follow = threading.Thread(target=follow_long, args=(response,))
    follow.start()

    os.kill(server.proc.pid, signal.SIGTERM)  # the server process (gunicorn: the master) only
    stopping = time.monotonic()
    server.proc.wait(timeout=60)
    took = time.monotonic() - stopping
    output = server.stop()
    assert server.proc.returncode == 0, output
    assert_clean(output)
    if kind.startswith("gunicorn"):  # every worker exited by itself, none was killed
        assert output.count("Worker exiting") == 2, output
        assert "Worker graceful timeout" not in output, output
    # The requests that ended after the long flow's grace ran out: the follower's, and with
    # the flow in its request's greenlet that request too (by default it ended when its
    # client left, seconds before).
    after_grace = output[output.index("did not finish within the grace period") :]
    in_response = kind.endswith("FLOW_IN_RESPONSE")
    if kind.startswith("gunicorn"):  # the access log
        assert after_grace.count("POST /flows/story") == (2 if in_response else 1), output
    # The contract: grace, then at most SHUTDOWN_FLUSH_WAIT to store the ends and send the
    # last frames (gunicorn's graceful_timeout). The margin is for a loaded machine: this
    # catches a stop that waits for the flow or the producer lease, not a slow one.
    assert took < GRACE + SHUTDOWN_FLUSH_WAIT + 20, f"stopping took {took:.1f}s"
    follow.join(60)
    assert len(follower) == 1, "the follower is still connected after the server exited"
    followed = follower[0]
    assert isinstance(followed, StreamCall), f"the follower's connection was cut: {followed!r}"
    assert followed.terminal == SHUTTING_DOWN, (followed.raw, output)

    restarted = start()
    try:
        done = post_stream(restarted.url, "/flows/story", {}, stream_id=short.stream_id)
        # Stored by the stopped server: a lost producer would end it "Producer lost" instead.
        ended = post_stream(restarted.url, "/flows/story", {}, stream_id=long.stream_id)
    finally:
        output = restarted.stop()
    assert_clean(output)
    assert indexes(done) == list(range(10))
    assert (
        done.terminal is not None and done.terminal[0] == "done" and done.terminal[1]["words"] == 10
    )
    assert ended.terminal == SHUTTING_DOWN
    assert indexes(ended) == list(range(len(ended.chunks))) and 1 <= len(ended.chunks) < 2000
    assert ended.raw == followed.raw


def test_sigterm_while_workers_boot_still_stops_them_gracefully(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """gunicorn drops a stop signal that reaches a worker before its own handlers are set;
    the library's post_fork hook keeps it, so no worker is left to the master's SIGKILL."""
    env = {
        **servers.sqlite_env(tmp_path_factory, "boot"),
        "FLASK_DURABLE_STREAM_SHUTDOWN_GRACE": str(GRACE),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        config_args(servers.free_port(), 2),
        cwd=servers.ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[bytes] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the stop comes as soon as the master forked both workers
            lines.append(line)
            if b"".join(lines).count(b"Booting worker") == 2:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    output = (b"".join(lines) + out).decode(errors="replace")
    assert proc.returncode == 0, output
    assert output.count("Worker exiting") == 2, output  # a killed worker does not say it
    assert_clean(output)


# -- storage that cannot be used at startup: the server boots, answers 503, recovers --------------


def start(kind: str, env: dict[str, str]) -> servers.Server:
    if kind == "gunicorn":
        port = servers.free_port()
        return servers.Server(servers.gunicorn_args(APP, port, workers=2), port, env)
    return servers.example_app(env)


@contextlib.contextmanager
def unwritable(db: Path) -> Iterator[Callable[[], None]]:
    """Make ``db`` unwritable (root ignores modes: chattr +i); yield a function that undoes it."""
    immutable = os.geteuid() == 0
    if immutable and shutil.which("chattr") is None:
        pytest.fail("running as root without chattr: cannot make a file read-only")
    state = {"locked": True}

    def unlock() -> None:
        if state["locked"]:
            state["locked"] = False
            if immutable:
                subprocess.run(["chattr", "-i", str(db)], check=True)
            db.chmod(0o644)

    db.chmod(0o444)
    if immutable and subprocess.run(["chattr", "+i", str(db)]).returncode != 0:
        pytest.fail("chattr +i failed (a file system without attributes?)")
    try:
        yield unlock
    finally:
        unlock()


def assert_storage_unavailable(call: StreamCall, db: Path) -> None:
    assert call.status == 503, call.raw
    body = call.raw.decode()
    assert "UNAVAILABLE" in body and "SQLite" in body, body
    assert str(db.parent) not in body, body  # no path reaches a client


@pytest.mark.parametrize("kind", ["example_app", "gunicorn"])
def test_unwritable_database_at_startup_boots_then_recovers(kind: str, tmp_path: Path) -> None:
    db = tmp_path / "streams.sqlite3"
    with SQLiteStreamManager(db) as manager:
        manager.open("before").done(None)
    with unwritable(db) as unlock:
        server = start(kind, {"FLASK_DURABLE_STREAM_SQLITE_PATH": str(db)})
        try:
            assert_storage_unavailable(post_stream(server.url, "/flows/story", story(3, 0)), db)
            unlock()  # the operator fixes the permissions; nothing is restarted
            call = post_stream(server.url, "/flows/story", story(3, 0))
        finally:
            output = server.stop()
    assert indexes(call) == [0, 1, 2] and call.terminal is not None, (call.raw, output)
    assert call.terminal[0] == "done", call.raw


@pytest.mark.parametrize("kind", ["example_app", "gunicorn"])
def test_corrupt_database_at_startup_boots_then_recovers(kind: str, tmp_path: Path) -> None:
    db = tmp_path / "streams.sqlite3"
    db.write_bytes(b"this is not a database" * 300)
    server = start(kind, {"FLASK_DURABLE_STREAM_SQLITE_PATH": str(db)})
    try:
        assert_storage_unavailable(post_stream(server.url, "/flows/story", story(3, 0)), db)
        db.unlink()  # the operator removes the bad file
        call = post_stream(server.url, "/flows/story", story(3, 0))
    finally:
        output = server.stop()
    assert "file is not a database" in output, output  # the reason is in the log
    assert indexes(call) == [0, 1, 2] and call.terminal is not None, (call.raw, output)


@pytest.mark.parametrize("path", ["missing/dir/streams.sqlite3", "."])
def test_bad_sqlite_path_stops_the_server_naming_the_setting(path: str, tmp_path: Path) -> None:
    port = servers.free_port()
    done = subprocess.run(
        [servers.PYTHON, "-m", "example_app", "--port", str(port)],
        cwd=servers.ROOT,
        env={**os.environ, "FLASK_DURABLE_STREAM_SQLITE_PATH": str(tmp_path / path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "DURABLE_STREAM_SQLITE_PATH" in output, output
    assert ("does not exist" if "missing" in path else "is a directory") in output, output
    assert not (tmp_path / "missing").exists()
