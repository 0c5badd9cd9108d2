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
