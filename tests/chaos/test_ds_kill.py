"""``kill -9`` of a Durable Streams server on SQLite or Redis while clients append: every
append answered 2xx is still there after a restart, once, in each writer's order.

The server is the production recipe (``gunicorn -k gevent -w 2``); the master and both
workers die together, in the middle of the writers' appends, so an append is either
committed before its reply left or it was never acknowledged (docs/durable-streams.md,
"Durability" and "Group commit").
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import servers
from tests.support.chaos import DS_NOT_SERVED
from tests.support.waiting import wait_for
from tests.test_durable_streams_suite import ds_server

WRITERS = 4
#: Acknowledged appends before the kill: enough that several group commits have run.
ACKED_BEFORE_KILL = 200
CONTENT_TYPE = "text/plain"
MESSAGE = re.compile(rb"w(\d+)-(\d+)\n")


@dataclass
class Writer:
    """One client on one keep-alive connection; what it sent and what was acknowledged."""

    index: int
    sent: list[bytes] = field(default_factory=list)
    acked: list[bytes] = field(default_factory=list)
    ended_by: BaseException | None = None


def _pids_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def _write(
    server: servers.Server,
    stream: str,
    writer: Writer,
    lock: threading.Lock,
    stop: threading.Event,
) -> None:
    """Append numbered messages until the connection breaks (the kill) or ``stop`` is set."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        n = 0
        while not stop.is_set():
            body = b"w%d-%d\n" % (writer.index, n)
            with lock:
                writer.sent.append(body)
            conn.request("POST", stream, body=body, headers={"Content-Type": CONTENT_TYPE})
            reply = conn.getresponse()
            reply.read()
            if 200 <= reply.status < 300:
                with lock:
                    writer.acked.append(body)
            n += 1
    except (OSError, http.client.HTTPException) as exc:
        writer.ended_by = exc
    finally:
        conn.close()


def _read_all(server: servers.Server, stream: str) -> bytes:
    """The whole stream, from offset -1, following Stream-Next-Offset until up to date."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        body, offset = b"", "-1"
        while True:
            conn.request("GET", f"{stream}?offset={offset}")
            reply = conn.getresponse()
            data = reply.read()
            assert reply.status == 200, (reply.status, data[:500])
            body += data
            offset = reply.headers["Stream-Next-Offset"]
            if reply.headers.get("Stream-Up-To-Date") == "true":
                return body
    finally:
        conn.close()


KILLED = (
    "kill -9 of a Durable Streams server while 4 clients append: every acknowledged append"
    " kept, once, in order"
)


@pytest.mark.chaos_case(
    KILLED,
    na={
        "memory": "the streams live in the killed processes",
        "firestore": DS_NOT_SERVED,
        "rtdb": DS_NOT_SERVED,
    },
)
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_acknowledged_appends_survive_kill_9_of_every_process(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Redis outlives the servers (only they are killed); a stream of its own on the
    # session's Redis. SQLite: the file in tmp_path is the storage that outlives them.
    redis = request.getfixturevalue("redis_server") if backend == "redis" else None
    stream = f"/ds/v1/stream/kill-during-appends-{uuid.uuid4().hex[:12]}"
    started: list[servers.Server] = []
    stop = threading.Event()
    lock = threading.Lock()
    writers = [Writer(i) for i in range(WRITERS)]
    threads: list[threading.Thread] = []
    try:
        first = ds_server(backend, tmp_path, redis, workers=2)
        started.append(first)
        conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=60)
        conn.request("PUT", stream, headers={"Content-Type": CONTENT_TYPE})
        created = conn.getresponse()
        created.read()
        conn.close()
        assert created.status == 201, created.status

        threads = [
            threading.Thread(target=_write, args=(first, stream, w, lock, stop), daemon=True)
            for w in writers
        ]
        for t in threads:
            t.start()

        def acked() -> int:
            with lock:
                return sum(len(w.acked) for w in writers)

        wait_for(lambda: acked() >= ACKED_BEFORE_KILL, f"{ACKED_BEFORE_KILL} acknowledged appends")
        assert all(t.is_alive() for t in threads), [w.ended_by for w in writers]

        pgid = first.proc.pid  # start_new_session: the master leads the group its workers share
        os.killpg(pgid, signal.SIGKILL)
        wait_for(lambda: not _pids_in_group(pgid), "the gunicorn master and workers to be gone")
        first.stop(signal.SIGKILL)  # reaps the master

        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a writer outlived the server"
        # Every writer was still appending when the server died: none stopped on its own.
        assert all(w.ended_by is not None for w in writers), [w.ended_by for w in writers]

        second = ds_server(backend, tmp_path, redis, workers=2)
        started.append(second)
        stored = _read_all(second, stream).split(b"\n")
        assert stored[-1] == b"", "the stream does not end with a whole message"
        stored = [line + b"\n" for line in stored[:-1]]
    finally:
        stop.set()
        for server in started:
            server.stop(signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)

    sent = {m for w in writers for m in w.sent}
    never_sent = [m for m in stored if m not in sent]
    assert not never_sent, f"messages that were never sent: {never_sent[:10]}"
    duplicated = sorted(m for m, count in Counter(stored).items() if count > 1)
    assert not duplicated, f"messages stored more than once: {duplicated[:10]}"
    present = set(stored)
    lost = [m for w in writers for m in w.acked if m not in present]
    assert not lost, f"{len(lost)} acknowledged appends lost after kill -9: {lost[:10]}"
    order: dict[int, list[int]] = {w.index: [] for w in writers}
    for m in stored:
        match = MESSAGE.fullmatch(m)
        assert match, m
        order[int(match.group(1))].append(int(match.group(2)))
    for index, numbers in order.items():
        assert numbers == sorted(numbers), f"writer {index}'s messages are out of its send order"
    total_acked = sum(len(w.acked) for w in writers)
    assert total_acked >= ACKED_BEFORE_KILL
