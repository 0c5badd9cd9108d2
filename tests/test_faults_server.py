"""Storage faults under the production recipe: ``gunicorn -k gevent`` with SQLite storage.

* an event over the manager's size limit ends the stream with the same documented terminal
  frame for the live client and for every replay, never "Producer lost";
* a client that stops reading a 100 MB stream costs its worker a bounded amount of memory
  (read from /proc/<worker pid>/status), is disconnected, and the stored stream is whole;
* bad bodies through a real server: chunked over the limit is 413, JSON too deep is 400.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import servers
from tests.support.client import post_stream

APP = "tests.support.fault_app:create_app()"
LIMIT = 1_046_528
MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads worker memory from /proc (Linux only)"
)


def start(tmp_path: Path, workers: int, **env: str) -> servers.Server:
    return servers.gunicorn(
        APP, workers=workers, env={"FAULT_APP_SQLITE": str(tmp_path / "streams.db"), **env}
    )


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[servers.Server]:
    server = start(tmp_path, 2, FAULT_APP_MAX_EVENT_BYTES=str(LIMIT))
    yield server
    server.stop()


def test_an_oversized_chunk_ends_every_reader_with_the_same_documented_error(
    limited: servers.Server,
) -> None:
    live = post_stream(limited.url, "/flows/big_chunk", {"data": {"size": 2_097_199}})
    message = "Chunk 1 is 2,097,201 bytes; the Limited backend stores at most 1,046,528"
    assert live.events == [
        ("chunk", "before"),
        ("error", {"status": "RESOURCE_EXHAUSTED", "message": message}),
    ]
    assert live.stream_id is not None
    for _ in range(4):  # replays land on either worker: the same bytes, from storage
        replay = post_stream(limited.url, "/flows/big_chunk", {}, stream_id=live.stream_id)
        assert replay.raw == live.raw


def test_bad_bodies_through_a_real_server(limited: servers.Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
    conn.putrequest("POST", "/flows/big_chunk")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    piece = b"x" * 65536
    conn.send(b'%x\r\n{"data":"\r\n' % len(b'{"data":"'))
    try:
        for _ in range(48):  # 3 MiB in chunks; the server may answer before reading them all
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b'2\r\n"}\r\n0\r\n\r\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["status"] == "RESOURCE_EXHAUSTED"
    conn.close()

    depth = 30_000
    conn = http.client.HTTPConnection("127.0.0.1", limited.port, timeout=30)
    conn.request(
        "POST",
        "/flows/big_chunk",
        body=b'{"data":' + b"[" * depth + b"]" * depth + b"}",
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 400
    assert json.loads(response.read()) == {
        "status": "INVALID_ARGUMENT",
        "message": "Request body must be valid JSON.",
    }
    conn.close()


def worker_pid(server: servers.Server) -> int:
    master = server.proc.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def follow_sse_to_the_end(server: servers.Server, stream_id: str) -> tuple[int, bytes]:
    """Read the stored stream to its end (it ends when the flow has), counting its chunks."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("GET", f"/flows/firehose/events?streamId={stream_id}")
    response = conn.getresponse()
    assert response.status == 200
    ids, tail = 0, b""
    while True:
        data = response.read1(1 << 20)
        if not data:
            break
        ids += (tail[-3:] + data).count(b"id: ")  # "id: " may straddle two reads
        tail = (tail + data)[-4096:]
    conn.close()
    return ids, tail


def silent_request(server: servers.Server, request: bytes) -> tuple[socket.socket, bytes]:
    """Send ``request``, read the response headers, then stop reading (a stalled client)."""
    silent = socket.create_connection(("127.0.0.1", server.port))
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    silent.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        head += silent.recv(1)
    return silent, head


def drain(sock: socket.socket) -> int:
    """Read what the server still sends until it closes; the byte count."""
    sock.settimeout(60)
    received = 0
    try:
        while data := sock.recv(1 << 20):
            received += len(data)
    except ConnectionResetError:
        pass
    sock.close()
    return received


@pytest.mark.parametrize("endpoint", ["genkit", "genkit, detached response", "sse"])
def test_a_client_that_stops_reading_costs_a_bounded_buffer(tmp_path: Path, endpoint: str) -> None:
    """The live POST client is disconnected past its buffer; an SSE client's reads just pause.

    With ``DURABLE_STREAM_DETACH_RESPONSE`` the live client's connection is the live fast
    path's, its request long over, when it is cut."""
    detach = endpoint.endswith("detached response")
    server = start(tmp_path, 1, FAULT_APP_DETACH_RESPONSE="1" if detach else "")
    try:
        warm = post_stream(server.url, "/flows/firehose", {"data": {"count": 200, "size": 65536}})
        assert warm.terminal == ("done", "done")
        pid = worker_pid(server)  # it answered, so it exists (the master listens first)
        base = memory_kib(pid)["VmRSS"]

        count, size = 1600, 65536  # 100 MiB of chunks
        body = json.dumps({"data": {"count": count, "size": size}}).encode()
        post = (
            b"POST /flows/firehose HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        live, head = silent_request(server, post)
        stream_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-genkit-stream-id:")
        )
        silent = live
        if endpoint == "sse":  # the live client reads; a follower of storage stalls
            reader = threading.Thread(target=drain, args=(live,))
            reader.start()
            silent, _ = silent_request(
                server,
                b"GET /flows/firehose/events?streamId=%s HTTP/1.1\r\nHost: x\r\n\r\n"
                % stream_id.encode(),
            )

        chunks, tail = follow_sse_to_the_end(server, stream_id)
        assert chunks == count + 1 and b'event: result\ndata: "done"' in tail  # stored whole
        peak = memory_kib(pid)["VmHWM"]
        print(f"{endpoint}: worker RSS base {base // 1024} MiB, peak +{(peak - base) // 1024} MiB")
        assert peak - base < 64 * 1024, f"worker RSS grew {(peak - base) // 1024} MiB"

        if endpoint.startswith("genkit"):  # disconnected: what it can still read ends early
            assert drain(silent) < count * size / 2
        else:
            silent.close()
            reader.join(60)
        assert memory_kib(pid)["VmRSS"] - base < 64 * 1024
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    # A detached response's connection is the sink's: the drop cuts it there.
    assert ("the sink cut the connection it took over" in output) is detach
