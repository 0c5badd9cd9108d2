"""Through ``gunicorn -k gevent``: a keep-alive connection whose request the fast path answered
is served on by gevent's handler, under gunicorn's rules (``flask_durable_stream/_handover.py``).

Which server answered shows in the ``Server`` header: gunicorn's own responses carry
``Server: gunicorn``, gevent's handler sends none.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import servers
from tests.support.chaos import worker_pids

TEXT = {"Content-Type": "text/plain"}


def _call(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response, response.read()


def _by_gunicorn(response: http.client.HTTPResponse) -> bool:
    return (response.getheader("Server") or "").startswith("gunicorn")


def _wait_for_eof(sock: socket.socket, timeout: float = 20) -> bytes:
    """What the server sends until it closes the connection (its close is awaited)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _handed_over(server: servers.Server, path: str) -> tuple[http.client.HTTPConnection, str]:
    """A connection that created ``path`` and appended twice: handed over after the first
    append. Also the stream's next offset."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    assert _call(conn, "PUT", path, **TEXT)[0].status == 201
    for part in (b"a;", b"b;"):
        response, _ = _call(conn, "POST", path, part, **TEXT)
        assert response.status == 204
    assert not _by_gunicorn(response)  # handed over
    return conn, response.getheader("Stream-Next-Offset") or ""


@pytest.mark.parametrize("handover", [True, False], ids=["handover", "off"])
def test_every_request_after_a_fast_answer_is_served_on_the_same_connection(
    handover: bool,
) -> None:
    """Appends, reads, errors, a preflight and a flow's stream, one after the other on one
    connection: each answered as before; with the handover, every request after the first
    that the fast path answered comes from gevent's handler; without it, from gunicorn."""
    env = {"DS_HANDOVER": "1" if handover else "0"}
    server = servers.gunicorn("tests.support.ds_app:app", env=env, extra=["--keep-alive", "30"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        served: list[bool] = []  # by gunicorn?

        def call(method: str, path: str, body: bytes = b"", **headers: str) -> Any:
            response, data = _call(conn, method, path, body, **headers)
            served.append(_by_gunicorn(response))
            assert not response.will_close, (method, path)
            return response.status, data, response

        assert call("PUT", "/ds/s", **TEXT)[0] == 201  # Flask's: gunicorn's connection still
        sock = conn.sock
        assert call("POST", "/ds/s", b"one;", **TEXT)[0] == 204  # the fast path's first answer
        assert call("POST", "/ds/s", b"two;", **TEXT)[0] == 204
        status, data, response = call("GET", "/ds/s?offset=-1")
        assert (status, data) == (200, b"one;two;")
        assert response.getheader("Stream-Up-To-Date") == "true"
        assert call("GET", "/ds/missing?offset=-1")[0] == 404
        assert call("GET", "/ds/s?offset=nonsense")[0] == 400
        preflight = call("OPTIONS", "/ds/s", Origin="https://app.example",
                         **{"Access-Control-Request-Method": "POST"})  # fmt: skip
        assert preflight[0] == 204
        assert preflight[2].getheader("Access-Control-Allow-Origin")
        assert call("HEAD", "/ds/s")[0] == 200
        status, data, response = call(
            "POST", "/flows/echo", json.dumps({"data": {"chunks": 3}}).encode(),
            **{"Content-Type": "application/json", "Accept": "text/event-stream"},
        )  # fmt: skip
        assert status == 200
        lines = data.decode().splitlines()
        frames = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert frames == [{"message": {"i": i}} for i in range(3)] + [{"result": {"done": 3}}]
        assert call("POST", "/ds/s", b"three;", **TEXT)[0] == 204
        assert call("GET", "/ds/s?offset=-1")[1] == b"one;two;three;"
        assert conn.sock is sock  # one connection throughout
        conn.close()
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    if handover:
        assert served == [True, True] + [False] * (len(served) - 2)
    else:
        assert all(served)


def test_requests_pipelined_behind_the_first_are_answered_in_order() -> None:
    """Requests sent together with the first: the ones gunicorn's parser read ahead are
    handed over with the connection, none lost or answered twice."""
    server = servers.gunicorn("tests.support.ds_app:app")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        assert _call(conn, "PUT", "/ds/p", **TEXT)[0].status == 201
        conn.close()
        requests = (
            b"".join(
                b"POST /ds/p HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(part), part)
                for part in (b"a;", b"b;", b"c;")
            )
            + b"GET /ds/p?offset=-1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(requests)  # one write: the first recv holds them all
            answers = _wait_for_eof(sock)
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
    heads = [part for part in answers.split(b"HTTP/1.1 ")[1:]]
    assert [head[:3] for head in heads] == [b"204", b"204", b"204", b"200"]
    assert answers.endswith(b"\r\n\r\na;b;c;")
    assert b"Server: gunicorn" in heads[0] and all(b"Server:" not in h for h in heads[1:])


def test_a_handed_over_connection_idle_past_keepalive_is_closed() -> None:
    """gunicorn's ``--keep-alive`` still bounds the wait for a next request."""
    server = servers.gunicorn("tests.support.ds_app:app", extra=["--keep-alive", "1"])
    try:
        conn, _ = _handed_over(server, "/ds/k")
        assert conn.sock is not None
        assert _wait_for_eof(conn.sock) == b""  # closed by the server, with nothing sent
        conn.close()
    finally:
        server.stop()


def test_max_requests_counts_the_handed_over_requests(tmp_path: Path) -> None:
    """``--max-requests`` counts every request of the connection: the last one's answer says
    ``Connection: close``, the connection closes and gunicorn starts a new worker (which reads
    the stream from SQLite)."""
    env = {"DS_BACKEND": "sqlite", "DS_SQLITE_PATH": str(tmp_path / "ds.sqlite3")}
    server = servers.gunicorn("tests.support.ds_app:app", env=env, extra=["--max-requests", "4"])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        statuses = []
        for method, body in (("PUT", b""), ("POST", b"a;"), ("POST", b"b;")):
            response, _ = _call(conn, method, "/ds/m", body, **TEXT)
            statuses.append(response.status)
        # The worker that answered (the port is open, its requests queued, before the
        # master forks it: it may not exist before the first answer).
        (first,) = worker_pids(server)
        assert conn.sock is not None
        kept = conn.sock.dup()  # http.client closes its own socket on "Connection: close"
        response, _ = _call(conn, "POST", "/ds/m", b"c;", **TEXT)
        statuses.append(response.status)
        assert statuses == [201, 204, 204, 204]
        assert not _by_gunicorn(response)
        assert response.getheader("Connection") == "close"
        with kept:
            assert _wait_for_eof(kept) == b""  # and the server closed it
        conn.close()
        deadline = time.monotonic() + 60
        while worker_pids(server) in ([first], []) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker_pids(server) not in ([first], [])  # a new worker took over
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        response, data = _call(conn, "GET", "/ds/m?offset=-1")
        assert (response.status, data) == (200, b"a;b;c;")
        conn.close()
    finally:
        output = server.stop()
    assert "Autorestarting worker after current request." in output


def test_a_stopping_worker_answers_the_request_in_flight_then_closes() -> None:
    """A graceful stop waits for a handed-over connection's request in flight (a long-poll),
    answers it and closes the connection at once, not at the end of a long keep-alive."""
    server = servers.gunicorn(
        "tests.support.ds_app:app",
        env={"DS_LONG_POLL_TIMEOUT": "3"},
        extra=["--keep-alive", "120", "--graceful-timeout", "60"],
    )
    try:
        conn, offset = _handed_over(server, "/ds/g")
        conn.request("GET", f"/ds/g?offset={offset}&live=long-poll")
        time.sleep(0.5)  # the long-poll is waiting (it answers after 3 s, or with data)
        os.kill(server.proc.pid, signal.SIGTERM)  # gunicorn's graceful stop
        response = conn.getresponse()
        assert response.status == 204  # the long-poll's own answer: nothing new
        response.read()
        assert conn.sock is not None
        assert _wait_for_eof(conn.sock, timeout=30) == b""
        conn.close()
        assert server.proc.wait(timeout=60) == 0
    finally:
        output = server.stop()
    assert "Worker graceful timeout" not in output, output


def test_a_trusted_proxys_scheme_header_still_makes_the_url_https() -> None:
    """Behind a proxy that gunicorn trusts (``forwarded_allow_ips``, 127.0.0.1 by default),
    ``X-Forwarded-Proto: https`` makes the request's scheme ``https`` on a handed-over
    connection as under gunicorn: a flow's ``Durable-Stream-Url`` says so."""
    server = servers.gunicorn("tests.support.ds_app:app")
    try:
        conn, _ = _handed_over(server, "/ds/h")
        urls = {}
        for proto in ("https", "http", None):
            headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
            if proto:
                headers["X-Forwarded-Proto"] = proto
            response, _ = _call(conn, "POST", "/flows/echo", b'{"data": {}}', **headers)
            assert response.status == 200 and not _by_gunicorn(response)
            urls[proto] = response.getheader("Durable-Stream-Url")
        assert urls["https"].startswith("https://127.0.0.1:")
        assert urls["http"].startswith("http://127.0.0.1:")
        assert urls[None].startswith("http://127.0.0.1:")
        conn.close()
    finally:
        server.stop()


def test_gunicorns_script_name_keeps_the_connection_with_gunicorn() -> None:
    """An app mounted below ``SCRIPT_NAME`` (gunicorn's environment) is served by gunicorn
    throughout: gevent's handler would not strip the prefix."""
    server = servers.gunicorn("tests.support.ds_app:app", env={"SCRIPT_NAME": "/app"})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        statuses, served = [], []
        for method, body in (("PUT", b""), ("POST", b"a;"), ("POST", b"b;")):
            response, _ = _call(conn, method, "/app/ds/n", body, **TEXT)
            statuses.append(response.status)
            served.append(_by_gunicorn(response))
        response, data = _call(conn, "GET", "/app/ds/n?offset=-1")
        assert (statuses, response.status, data) == ([201, 204, 204], 200, b"a;b;")
        assert all(served) and _by_gunicorn(response)
        conn.close()
    finally:
        server.stop()


def test_a_middleware_that_wraps_the_body_keeps_the_connection_with_gunicorn() -> None:
    """A WSGI middleware that wraps the response's body calls its ``close`` itself, perhaps
    inside state of its own for that request: every request stays with gunicorn."""
    server = servers.gunicorn("tests.support.ds_app:wrapped")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        served = []
        for method, body in (("PUT", b""), ("POST", b"a;"), ("POST", b"b;")):
            response, _ = _call(conn, method, "/ds/w", body, **TEXT)
            served.append((response.status, _by_gunicorn(response)))
        response, data = _call(conn, "GET", "/ds/w?offset=-1")
        assert served == [(201, True), (204, True), (204, True)]
        assert (response.status, data, _by_gunicorn(response)) == (200, b"a;b;", True)
        conn.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /ds/l?offset=-1&pad=" + b"x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ds/l?offset=-1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n",
        b"GET /ds/l?offset=-1 HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: x\r\n" % i for i in range(120))
        + b"\r\n",
    ],
    ids=["request-line", "field-size", "fields"],
)
def test_gunicorns_request_limits_hold_on_a_handed_over_connection(request_head: bytes) -> None:
    """``--limit-request-line``, ``--limit-request-field_size`` and ``--limit-request-fields``
    (gunicorn's defaults: 4094, 8190, 100) refuse a request after the handover with the
    status gunicorn gives it (414, 431) and close the connection."""
    server = servers.gunicorn("tests.support.ds_app:app")
    try:
        conn, _ = _handed_over(server, "/ds/l")
        assert conn.sock is not None
        conn.sock.sendall(request_head)
        answer = _wait_for_eof(conn.sock)
        conn.close()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as fresh:
            fresh.sendall(request_head)  # the same to gunicorn, on a new connection
            by_gunicorn = _wait_for_eof(fresh)
    finally:
        server.stop()
    status = by_gunicorn.partition(b"\r\n")[0]
    assert status in (b"HTTP/1.1 414 URI Too Long", b"HTTP/1.1 431 Request Header Fields Too Large")
    assert answer.partition(b"\r\n")[0] == status, answer[:100]
