"""A client that never reads while a fast flow produces 300 MB: the worker that serves it
holds a bounded buffer, not the stream (VmRSS under its baseline + 64 MiB), and the
flow and its durable record are unaffected."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from flask_durable_stream import protocol
from tests.chaos.app import filler
from tests.chaos.conftest import App, app_on_own_storage
from tests.support.chaos import BACKENDS, Exchange, Reply, post, rss_bytes, worker_pids

MiB = 1024 * 1024
SIZE = 64 * 1024
COUNT = 4800  # x 64 KiB = 300 MiB
BOUND = 64 * MiB


@pytest.fixture(scope="module", params=BACKENDS)
def chaos(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    # Storage of its own: 300 MB in a shared server would weigh on every later test.
    yield from app_on_own_storage(request.param, tmp_path_factory, "slow")


def non_reading_request(url: str, data: dict[str, int]) -> tuple[socket.socket, dict[str, str]]:
    """Send a streaming POST, read its headers, and never read again."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # no room to hide 300 MB
    sock.connect((host, int(port)))
    body = protocol.encode({"data": data}).encode()
    sock.sendall(
        b"POST /flows/burst HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        data_in = sock.recv(1)  # byte by byte: nothing of the body is taken
        if not data_in:
            raise AssertionError(f"connection closed before the headers: {head!r}")
        head += data_in
    lines = head.decode().split("\r\n")
    assert lines[0].split()[1] == "200", lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return sock, headers


@pytest.mark.chaos_case("a non-reading client on a 300 MB flow: worker RSS under base + 64 MiB")
def test_a_client_that_never_reads_costs_a_bounded_buffer(chaos: App) -> None:
    for _ in range(6):  # every worker has served a stream: imports and pools are warm
        assert post(chaos.url, "burst", {"count": 3, "size": SIZE}).read().status == 200
    base = {pid: rss_bytes(pid) for pid in worker_pids(chaos.server)}
    sock, headers = non_reading_request(chaos.url, {"count": COUNT, "size": SIZE})
    pid, stream_id = int(headers["x-worker-pid"]), headers[protocol.STREAM_ID_HEADER]
    # The memory backend keeps the durable record in the worker itself.
    allowance = BOUND + (COUNT * SIZE if chaos.backend == "memory" else 0)
    # The end of the stream, from storage, followed by another connection.
    tail: list[Reply | BaseException] = []

    def follow_the_end() -> None:
        path = f"/flows/burst/events?streamId={stream_id}&after={COUNT - 11}"
        try:
            tail.append(Exchange(chaos.url, "GET", path, timeout=300).read())
        except BaseException as exc:  # reported below
            tail.append(exc)

    follower = threading.Thread(target=follow_the_end)
    follower.start()
    peak = 0
    try:
        while follower.is_alive():
            try:
                peak = max(peak, rss_bytes(pid))
            except (OSError, RuntimeError):  # gone, or a zombie (no VmRSS)
                raise AssertionError(
                    f"the worker running the flow ({pid}) died; gunicorn logged:"
                    f" {chaos.server.troubles()}"
                ) from None
            assert peak <= base[pid] + allowance, (
                f"worker RSS grew by {(peak - base[pid]) / MiB:.0f} MiB over"
                f" {base[pid] / MiB:.0f} MiB (the bound is {allowance / MiB:.0f} MiB)"
            )
            time.sleep(0.05)
        follower.join()
    finally:
        sock.close()
    end = tail[0]
    assert isinstance(end, Reply), end
    expected = [(seq, "message", filler(seq, SIZE)) for seq in range(COUNT - 10, COUNT)]
    assert end.events == [*expected, (COUNT, "result", {"count": COUNT})], (
        f"the stored stream ends {[e[:2] for e in end.events][-3:]}"
    )
