"""A long-poll in one gunicorn worker hears an append made in the other worker at once.

The readers' polling of the SQLite file is slowed to once an hour
(``tests/support/ds_doorbell_app.py``), so only the doorbell
(:mod:`flask_durable_stream.durable_streams.doorbell`) can answer the reader with the
append: without it the reader has nothing within the minute it is given.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import servers
from tests.test_gunicorn_worker import WORKER


class Conn:
    """One keep-alive connection (it stays with the worker that accepted it)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


def _one_per_worker(port: int) -> tuple[Conn, Conn]:
    """Keep-alive connections stay with the worker that accepted them: one on each.

    While the first connection's worker is held (``/pid?block=1``), the second
    connection can only be accepted by the other worker.
    """
    first = Conn(port)
    _, _, mine = first.call("GET", "/pid")
    for _ in range(20):
        blocked = threading.Thread(target=first.call, args=("GET", "/pid?block=1"))
        blocked.start()
        second = Conn(port)
        _, _, other = second.call("GET", "/pid")
        blocked.join()
        if other != mine:
            return first, second
        second.close()  # the held request had not reached its worker yet: again
    raise AssertionError("no connection reached the second worker")


def _cross_worker_long_polls(tmp_path: Path, worker_class: str) -> None:
    env = {
        "DS_BACKEND": "sqlite",
        "DS_SQLITE_PATH": str(tmp_path / "ds.sqlite3"),
        "DS_LONG_POLL_TIMEOUT": "3600",
        "DS_POLL_SECONDS": "3600",
    }
    port = servers.free_port()
    args = servers.gunicorn_args("tests.support.ds_doorbell_app:app", port, workers=2)
    args[args.index("-k") + 1] = worker_class
    server = servers.Server(args, port, env)
    try:
        reader, writer = _one_per_worker(server.port)
        for i in range(3):
            name = f"/ds/bell-{i}"
            status, _, _ = writer.call("PUT", name, headers={"Content-Type": "text/plain"})
            assert status == 201
            _, head, _ = reader.call("HEAD", name)
            offset = head["stream-next-offset"]
            got: list[tuple[int, bytes]] = []

            def read(name: str = name, offset: str = offset, got: list[Any] = got) -> None:
                status, _, body = reader.call("GET", f"{name}?offset={offset}&live=long-poll")
                got.append((status, body))

            thread = threading.Thread(target=read)
            thread.start()
            time.sleep(0.5)  # the reader is waiting (if not, it reads the append at once)
            status, _, _ = writer.call(
                "POST", name, f"hi {i}".encode(), {"Content-Type": "text/plain"}
            )
            assert status == 204
            thread.join(60)
            assert got == [(200, f"hi {i}".encode())]  # without the doorbell: nothing for an hour
        reader.close()
        writer.close()
    finally:
        server.stop()


def test_a_reader_in_another_worker_is_woken_by_the_append(tmp_path: Path) -> None:
    _cross_worker_long_polls(tmp_path, "gevent")


def test_the_same_under_the_pywsgi_worker(tmp_path: Path) -> None:
    _cross_worker_long_polls(tmp_path, WORKER)


def test_a_writer_not_under_gevent_rings_a_gunicorn_workers_reader(tmp_path: Path) -> None:
    """An append made by a process that is not patched (this one, through the store and the
    engine) wakes a long-poll waiting in a ``gunicorn -k gevent`` worker whose polling is
    slowed to once an hour: only its ring can answer the reader."""
    from flask_durable_stream.durable_streams.engine import Engine
    from flask_durable_stream.durable_streams.sqlite import SQLiteDSStore

    db = tmp_path / "ds.sqlite3"
    env = {
        "DS_BACKEND": "sqlite",
        "DS_SQLITE_PATH": str(db),
        "DS_LONG_POLL_TIMEOUT": "3600",
        "DS_POLL_SECONDS": "3600",
    }
    server = servers.gunicorn("tests.support.ds_doorbell_app:app", env=env)
    store = SQLiteDSStore(str(db))
    reader = Conn(server.port)
    try:
        status, _, _ = reader.call("PUT", "/ds/outside", headers={"Content-Type": "text/plain"})
        assert status == 201
        got: list[tuple[int, bytes]] = []

        def read() -> None:
            status, _, body = reader.call("GET", "/ds/outside?offset=now&live=long-poll")
            got.append((status, body))

        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.5)  # the reader is waiting (if not, it reads the append at once)
        reply = Engine(store).append(
            "outside", content_type="text/plain", record=b"from outside", close=False,
            stream_seq=None, producer=None,
        )  # fmt: skip
        assert reply.status == 204
        thread.join(60)
        assert got == [(200, b"from outside")]  # without the ring: nothing for an hour
    finally:
        reader.close()
        store.close()
        server.stop()


class _Clock:
    """``time.monotonic`` for the store module, moved on by the reader's waits alone."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class _Woken:
    """A reader's wake-up event that is never set: each wait lasts its whole timeout."""

    def __init__(self, clock: _Clock, waits: list[float]) -> None:
        self.clock, self.waits = clock, waits

    def wait(self, timeout: float) -> bool:
        self.waits.append(round(timeout, 6))
        self.clock.now += timeout
        return False


def _waits_of_a_quiet_long_poll(monkeypatch: Any, hears: bool, seconds: float) -> list[float]:
    """The timeouts a reader of an unchanging stream waits with, on a clock moved by them."""
    from flask_durable_stream.durable_streams import store as store_module

    clock, waits = _Clock(), []
    monkeypatch.setattr(store_module, "time", clock)

    class Quiet(store_module.PolledStore):
        def __init__(self) -> None:
            self.wakeups = store_module.Wakeups()
            self.polls = 0

        def hears_others(self) -> bool:
            return hears

        def state(self, path: str) -> tuple[int, bool] | None:
            self.polls += 1
            return (3, False)

    quiet = Quiet()
    monkeypatch.setattr(quiet.wakeups, "register", lambda path: _Woken(clock, waits))
    quiet.wait("s", 3, False, seconds)
    assert quiet.polls == len(waits) + 1  # one look before each wait and one after the last
    return waits


def test_a_process_that_hears_the_others_polls_only_as_a_safety_net(monkeypatch: Any) -> None:
    """Without the doorbell a reader polls every 2 ms for a quarter second, then backs off to
    50 ms; while its process hears the other processes' rings, from 50 ms doubling to 0.5 s:
    a 2 s long-poll of a quiet stream looks at the file 8 times instead of 165."""
    polled = _waits_of_a_quiet_long_poll(monkeypatch, hears=False, seconds=2.0)
    heard = _waits_of_a_quiet_long_poll(monkeypatch, hears=True, seconds=2.0)
    assert polled[:125] == [0.002] * 125 and max(polled) == 0.05
    assert len(polled) == 164  # 126 of 2 ms, 4, 8, 16 and 32 ms, 33 of 50 ms, the rest
    assert heard == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.25]  # the last: what is left of the 2 s


def test_every_process_rings_but_never_into_another_users_directory(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A writer not under gevent rings too (a listening process hears every writer); the paths
    go only to a directory of the writer's own user."""
    import os
    import socket

    from flask_durable_stream.durable_streams.doorbell import Doorbell

    bell = Doorbell(str(tmp_path / "streams.db"), lambda paths: None)
    assert not bell.enabled  # this test process is not patched: it never listens
    os.makedirs(bell.directory, mode=0o700, exist_ok=True)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        peer.bind(os.path.join(bell.directory, "1"))  # another process's socket
        peer.settimeout(5)
        bell.ring(["a/b", "c"])
        assert peer.recv(65536) == b"a/b\nc"
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # the directory is not ours now
        bell.ring(["d"])
        peer.settimeout(0)
        try:
            got = peer.recv(65536)
        except BlockingIOError:
            got = b""
        assert got == b""
    finally:
        peer.close()
        bell.close()
        os.unlink(os.path.join(bell.directory, "1"))
        os.rmdir(bell.directory)
