"""``-k flask_durable_stream.gunicorn_worker.PyWSGIWorker`` serves like gunicorn's own
``gevent_pywsgi`` worker: the same requests, over real sockets, give the app the same environ
and the client the same responses; header lines gevent would guess at get a 400.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from flask_durable_stream.gunicorn_worker import MAX_HEADERS, parse_headers
from tests.support import servers

WORKER = "flask_durable_stream.gunicorn_worker.PyWSGIWorker"


def _server(worker_class: str) -> servers.Server:
    port = servers.free_port()
    args = servers.gunicorn_args("tests.support.wsgi_echo:app", port, extra=["--keep-alive", "30"])
    args[args.index("-k") + 1] = worker_class
    return servers.Server(args, port)


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, servers.Server]]:
    started = {"ours": _server(WORKER), "gunicorn": _server("gevent_pywsgi")}
    yield started
    for server in started.values():
        server.stop()


def _exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[str, dict[str, str], bytes]]:
    """Send ``raw`` (one or more requests) on one connection; read ``responses`` answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        f = sock.makefile("rb")
        out = []
        for _ in range(responses):
            status = f.readline().decode().strip()
            while status.startswith("HTTP/1.1 100"):  # an interim answer to Expect
                f.readline()
                status = f.readline().decode().strip()
            headers: dict[str, str] = {}
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            if "content-length" in headers:
                body = f.read(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while size := int(f.readline().strip(), 16):
                    body += f.read(size)
                    f.readline()
                f.readline()
            else:
                body = f.read()
            out.append((status, headers, body))
        return out


REQUESTS = [
    b"GET /a%20b/c?x=1&y=%32 HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nX-Dup: 2\r\n"
    b"X_Under: dropped\r\nX-Space:   padded  \r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n",
]


@pytest.mark.parametrize(
    "raw", REQUESTS, ids=["headers", "body", "chunked", "expect", "stream", "head"]
)
def test_the_same_request_gets_the_same_answer_as_from_gevent_pywsgi(
    pair: dict[str, servers.Server], raw: bytes
) -> None:
    answers = {}
    for name, server in pair.items():
        [(status, headers, body)] = _exchange(server.port, raw)
        headers.pop("date", None)
        answers[name] = (status, headers, json.loads(body) if body.startswith(b"{") else body)
    assert answers["ours"] == answers["gunicorn"]
    status, _, body = answers["ours"]
    assert status == "HTTP/1.1 200 OK"
    if isinstance(body, dict) and raw.startswith(b"GET /a"):
        assert body["HTTP_X_DUP"] == "1,2" and body["HTTP_X_SPACE"] == "padded"
        assert "HTTP_X_UNDER" not in body and body["PATH_INFO"] == "/a b/c"


def test_keep_alive_serves_every_request_of_a_connection(pair: dict[str, servers.Server]) -> None:
    raw = b"".join(REQUESTS[:4])
    answers = _exchange(pair["ours"].port, raw, responses=4)
    bodies = [json.loads(body)["body"] for _, _, body in answers]
    assert bodies == ["", "hello", "abcde", "ok"]


@pytest.mark.parametrize(
    "line",
    [
        b"X-Folded: a\r\n  b",
        b"no colon here",
        b" X-Lead: space",
        b"X-Name : x",
        b"X: " + b"y" * 70000,
    ],
    ids=["folded", "no-colon", "leading-space", "space-before-colon", "too-long"],
)
def test_header_lines_that_would_be_guessed_at_get_a_400(
    pair: dict[str, servers.Server], line: bytes
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n\r\n"
    [(status, _, _)] = _exchange(pair["ours"].port, raw)
    assert status.startswith("HTTP/1.1 400")


def test_parse_headers_keeps_order_and_the_first_of_duplicates() -> None:
    headers = parse_headers(io.BytesIO(b"A: 1\r\nb: 2\r\nA: 3\r\n\r\nbody"))
    assert headers.status == "" and headers.items() == [("A", "1"), ("b", "2"), ("A", "3")]
    assert headers.get("a") == "1" and headers.get("B") == "2" and headers.get("c", "-") == "-"
    del headers["a"]
    assert headers.items() == [("b", "2")] and headers.get("A") is None
    many = b"".join(b"H%d: x\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n"
    assert parse_headers(io.BytesIO(many)).status == "Too many headers"


def test_a_short_body_leaves_with_its_head_in_one_write() -> None:
    """The same bytes as gunicorn's ``gevent_pywsgi`` handler writes, in one write fewer for
    a short first body write (a long-poll's answer; the first chunk of a chunked body); a body
    over ``ONE_WRITE_BYTES`` and a response without a body are written as gevent writes them.
    An answer written whole (``Handler.send_whole_response``) is the same bytes too."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.pywsgi_one_write_check"],
        cwd=servers.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    written_whole = report.pop("written whole")
    for case, answers in report.items():
        assert answers["ours"][1] == answers["theirs"][1], case
    assert report["short"]["ours"][1].endswith("\r\n\r\nping")
    assert report["big"]["ours"][1].endswith("z" * 1000)
    writes = {case: (a["theirs"][0], a["ours"][0]) for case, a in report.items()}
    assert writes["short"] == (2, 1)
    assert writes["chunked"][1] == writes["chunked"][0] - 1
    assert writes["big"] == (2, 2) and writes["empty"] == (1, 1)
    # An answer the application has whole (send_whole_response): the same bytes, one write.
    assert report["whole/body"]["ours"][1].endswith("\r\nDate: -\r\n\r\nping")
    assert writes["whole/body"] == (2, 1) and writes["whole/204"] == (1, 1)
    assert writes["whole/big"] == (2, 2)  # a body over ONE_WRITE_BYTES: gevent's two writes
    assert written_whole == ["/whole/body", "/whole/204"]
    # A header gevent refuses is refused the same way (its 500), never written.
    assert report["whole/injected"]["ours"][1].startswith("HTTP/1.1 500")
    assert "Set-Cookie" not in report["whole/injected"]["ours"][1]
