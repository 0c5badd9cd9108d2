"""``Admission``: new connections take turns with the running streams while the hub is busy.

The unit cases run greenlets on this process's gevent hub (no patching needed): each
"connection" calls ``admit`` and then keeps the hub busy for a few milliseconds, as a new
request does; a "stream" sleeps on short timers between them. What is checked is the order
of what ran, not how long anything took. The last cases run a burst of real stream requests
through gunicorn's gevent workers with the hook of the production recipe.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from flask_durable_stream import protocol
from flask_durable_stream._admission import Admission
from flask_durable_stream.client import DurableStreamClient
from tests.support import servers

BUSY = 0.005  # what each connection keeps the hub busy for


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _burst(admission: Admission, connections: int, *, kill: int | None = None) -> list[str]:
    """Start ``connections`` greenlets in one turn of the loop, with a stream ticking beside
    them; return what ran, in order: ``c<i>`` for a connection let in, ``tick`` for the stream."""
    log: list[str] = []
    done = [False]

    def stream() -> None:
        while not done[0]:
            log.append("tick")
            gevent.sleep(0.0005)

    def connection(i: int) -> None:
        admission.admit()
        log.append(f"c{i}")
        _busy(BUSY)

    ticker = gevent.spawn(stream)
    gevent.sleep(0)  # the stream is under way before the connections come
    jobs = [gevent.spawn(connection, i) for i in range(connections)]
    if kill is not None:
        gevent.sleep(0)  # the burst has come in; those past the first turn wait
        assert admission.waiting > 0
        jobs[kill].kill()
    gevent.joinall(jobs)
    done[0] = True
    ticker.join()
    return log


def _runs_without_a_tick(log: list[str]) -> list[int]:
    runs, current = [], 0
    for entry in log:
        if entry == "tick":
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    return runs + ([current] if current else [])


def test_a_lone_connection_never_waits() -> None:
    admission = Admission(0.0)  # even with no time to spare in a turn
    for _ in range(5):
        gevent.spawn(admission.admit).join()
        gevent.sleep(0.001)  # a timer: the next connection comes in another turn of the loop
    assert admission.waited == 0
    assert admission.waiting == 0


def test_a_busy_turn_lets_the_running_streams_go_first_and_the_rest_in_order() -> None:
    admission = Admission(0.008)
    log = _burst(admission, 12)
    admitted = [entry for entry in log if entry != "tick"]
    assert admitted == [f"c{i}" for i in range(12)]  # first come, first served
    # 5 ms each against a turn of 8 ms: never more than two in a row before the stream's
    # due timer runs (all twelve in one go without the admission).
    assert max(_runs_without_a_tick(log)) <= 2
    assert admission.waited >= 10
    assert admission.waiting == 0


def test_every_turn_lets_one_in_however_busy() -> None:
    admission = Admission(0.0)
    log = _burst(admission, 6)
    assert [entry for entry in log if entry != "tick"] == [f"c{i}" for i in range(6)]
    assert _runs_without_a_tick(log) == [1] * 6
    assert admission.waited == 5


def test_a_connection_killed_while_it_waits_is_not_let_in() -> None:
    admission = Admission(0.0)
    log = _burst(admission, 5, kill=3)
    assert [entry for entry in log if entry != "tick"] == ["c0", "c1", "c2", "c4"]
    assert admission.waiting == 0


def test_a_turn_below_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        Admission(-0.001)


# Through gunicorn: the production recipe's hook, with a turn of 0 s so that every connection
# of a burst after the first waits for a turn of its own.

WORKERS = ["gevent", "flask_durable_stream.gunicorn_worker.PyWSGIWorker"]
STREAMS = 20
CHUNKS = 5


@pytest.fixture(params=WORKERS, ids=["gevent", "PyWSGIWorker"])
def server(request: Any) -> Iterator[servers.Server]:
    port = servers.free_port()
    conf = ["-c", "tests/support/admission_conf.py", "--backlog", "256"]
    args = servers.gunicorn_args("tests.support.admission_app:app", port, extra=conf)
    args[args.index("-k") + 1] = request.param
    started = servers.Server(args, port)
    yield started
    started.stop()


def _get(server: servers.Server, path: str) -> Any:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.load(response)


def test_a_burst_of_streams_through_gunicorn_waits_its_turn_and_loses_nothing(
    server: servers.Server,
) -> None:
    worker = _get(server, "/admission")
    assert worker["installed"] is True
    pid = worker["pid"]
    request = json.dumps({"data": {"chunks": CHUNKS}}).encode()
    raw = (
        b"POST /flows/count HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nConnection: close\r\n"
        + f"Content-Length: {len(request)}\r\n\r\n".encode()
        + request
    )
    # The worker is stopped while the clients connect and send, so that it takes the whole
    # burst in at once when it runs again, as a worker busy with other streams would.
    os.kill(pid, signal.SIGSTOP)
    try:
        socks = [
            socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(STREAMS)
        ]
        for sock in socks:
            sock.sendall(raw)
    finally:
        os.kill(pid, signal.SIGCONT)
    live: list[tuple[str, list[tuple[str, Any]]]] = []
    for sock in socks:
        with sock:
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200
            frames, rest = protocol.parse_frames(response.read().decode())
            assert rest == ""
            live.append((response.getheader("x-genkit-stream-id", ""), frames))
    assert _get(server, "/admission")["waited"] >= 1
    client = DurableStreamClient(f"{server.url}/flows")
    chunks = [f"chunk {i}" for i in range(CHUNKS)]
    for stream_id, frames in live:
        assert frames == [(protocol.CHUNK, chunk) for chunk in chunks] + [(protocol.DONE, "done")]
        replay = client.resume("count", stream_id)
        assert list(replay) == chunks
        assert replay.result == "done"
