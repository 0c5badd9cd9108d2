"""The WSGI fast path answers exactly as Flask does, and group commit keeps each append apart."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder, TestResponse

from flask_durable_stream.durable_streams import fast
from flask_durable_stream.durable_streams.blueprint import DurableStreamsView
from flask_durable_stream.durable_streams.engine import Engine
from flask_durable_stream.durable_streams.fast import FastPath
from flask_durable_stream.durable_streams.group_commit import Job
from flask_durable_stream.durable_streams.memory import MemoryDSStore
from flask_durable_stream.durable_streams.server import durable_streams_server
from flask_durable_stream.durable_streams.sqlite import SQLiteDSStore
from flask_durable_stream.durable_streams.store import Meta, Txn
from tests.support import servers
from tests.support.ds import create

#: (method, path, headers, body): every kind of request the fast path serves, errors included.
REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("PUT", "/ds/a", {"Content-Type": "text/plain"}, b""),
    ("PUT", "/ds/j", {"Content-Type": "application/json"}, b""),
    ("POST", "/ds/a", {"Content-Type": "text/plain", "Origin": "http://x"}, b"hello"),
    ("POST", "/ds/a", {"Content-Type": "text/plain", "Stream-Seq": "b"}, b" world"),
    ("POST", "/ds/a", {"Content-Type": "text/plain", "Stream-Seq": "a"}, b"late"),
    ("POST", "/ds/a", {"Content-Type": "application/json"}, b"[1]"),
    ("POST", "/ds/a", {"Content-Type": "text/plain"}, b""),
    ("POST", "/ds/j", {"Content-Type": "application/json"}, b"[1, 2]"),
    ("POST", "/ds/j", {"Content-Type": "application/json"}, b"{nope"),
    (
        "POST",
        "/ds/j",
        {"Content-Type": "application/json", "Producer-Id": "p", "Producer-Epoch": "0"},
        b"[3]",
    ),
    (
        "POST",
        "/ds/j",
        {
            "Content-Type": "application/json",
            "Producer-Id": "p",
            "Producer-Epoch": "0",
            "Producer-Seq": "0",
        },
        b"[3]",
    ),
    ("POST", "/ds/missing", {"Content-Type": "text/plain"}, b"x"),
    ("GET", "/ds/a?offset=-1", {}, b""),
    ("GET", "/ds/a?offset=0000000000000001_0000000000000000", {}, b""),
    ("GET", "/ds/a?offset=now", {}, b""),
    ("GET", "/ds/a?offset=bogus", {}, b""),
    ("GET", "/ds/a?offset=-1&offset=-1", {}, b""),
    ("GET", "/ds/a?offset=-1&live=long-poll", {}, b""),
    ("GET", "/ds/a?live=long-poll", {}, b""),
    ("GET", "/ds/j?offset=-1", {"Origin": "http://y"}, b""),
    ("GET", "/ds/missing?offset=-1", {}, b""),
    ("GET", "/ds/a/../b", {}, b""),
    ("HEAD", "/ds/a", {}, b""),
    ("HEAD", "/ds/missing", {}, b""),
    ("OPTIONS", "/ds/a", {"Origin": "http://x"}, b""),
    ("PATCH", "/ds/a", {}, b""),
    ("POST", "/ds/a", {"Content-Type": "text/plain", "Stream-Closed": "true"}, b""),
    ("GET", "/ds/a?offset=-1&live=long-poll", {}, b""),
    ("DELETE", "/ds/j", {}, b""),
    ("DELETE", "/ds/j", {}, b""),
]


def make_app(*, hook: bool) -> Flask:
    app = Flask(__name__)
    bp = durable_streams_server(MemoryDSStore(), long_poll_timeout=0.2)
    app.register_blueprint(bp, url_prefix="/ds")
    if hook:  # any app-level hook sends every request through Flask

        @app.before_request
        def nothing() -> None:
            return None

    return app


def normalized(response: TestResponse) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body, with what differs by design between two servers blanked."""
    headers = []
    for key, value in response.headers.items():
        if key == "ETag":  # carries the stream's random generation
            value = re.sub(r'^"[0-9a-f]+:', '"gen:', value)
        if key == "Stream-Cursor":  # time-based
            value = "cursor"
        headers.append((key, value))
    return response.status_code, sorted(headers), response.get_data()


def test_the_fast_path_answers_every_request_exactly_as_flask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flask_calls: list[str] = []
    original = DurableStreamsView.__call__

    def counted(self: DurableStreamsView, path: str = "") -> Any:
        flask_calls.append(path)
        return original(self, path)

    monkeypatch.setattr(DurableStreamsView, "__call__", counted)
    fast, slow = make_app(hook=False), make_app(hook=True)
    assert isinstance(fast.wsgi_app, FastPath) and fast.wsgi_app.enabled()
    assert not slow.wsgi_app.enabled()  # type: ignore[attr-defined]
    fast_client, slow_client = fast.test_client(), slow.test_client()
    for method, path, headers, body in REQUESTS:
        # An empty POST says "Content-Length: 0", as real clients do (the test client
        # sends none), so it is the fast path's to answer.
        environ = {"CONTENT_LENGTH": "0"} if method == "POST" and not body else {}
        flask_calls.clear()
        expected = normalized(
            slow_client.open(
                path, method=method, headers=headers, data=body, environ_overrides=environ
            )
        )
        assert flask_calls or path == "/ds/a/../b", (method, path)
        flask_calls.clear()
        got = normalized(
            fast_client.open(
                path, method=method, headers=headers, data=body, environ_overrides=environ
            )
        )
        assert got == expected, (method, path)
        # PUT and PATCH are Flask's; the rest never reach it
        to_flask = method in ("PUT", "PATCH")
        assert bool(flask_calls) == to_flask, (method, path, flask_calls)


def test_flasks_body_limit_and_earlier_middleware_are_never_bypassed() -> None:
    limited = Flask(__name__)
    limited.config["MAX_CONTENT_LENGTH"] = 10
    limited.register_blueprint(durable_streams_server(MemoryDSStore()), url_prefix="/ds")
    client = limited.test_client()
    assert client.put("/ds/a", headers={"Content-Type": "text/plain"}).status_code == 201
    big = client.post("/ds/a", headers={"Content-Type": "text/plain"}, data=b"x" * 100)
    assert big.status_code == 413

    guarded = Flask(__name__)
    inner = guarded.wsgi_app

    def refuse_without_key(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("HTTP_X_KEY") != "k":
            start_response("401 Unauthorized", [("Content-Length", "0")])
            return [b""]
        return inner(environ, start_response)

    guarded.wsgi_app = refuse_without_key  # type: ignore[method-assign]
    guarded.register_blueprint(durable_streams_server(MemoryDSStore()), url_prefix="/ds")
    client = guarded.test_client()
    ok = {"Content-Type": "text/plain", "X-Key": "k"}
    assert client.put("/ds/a", headers=ok).status_code == 201
    plain = {"Content-Type": "text/plain"}
    assert client.post("/ds/a", headers=plain, data=b"x").status_code == 401
    assert client.get("/ds/a?offset=-1").status_code == 401
    assert client.get("/ds/a?offset=-1", headers={"X-Key": "k"}).get_data() == b""


def test_a_route_of_the_app_under_the_prefix_keeps_flask_in_charge() -> None:
    app = make_app(hook=False)

    @app.get("/ds/health")
    def health() -> str:
        return "ok"

    client = app.test_client()
    assert client.get("/ds/health").get_data() == b"ok"
    assert not app.wsgi_app.enabled()  # type: ignore[attr-defined]


def _append(engine: Engine, record: bytes) -> Callable[[Txn], Any]:
    def run(txn: Txn) -> int:
        meta = txn.get("s")
        assert meta is not None
        txn.append("s", meta.tail, [record])
        meta.tail += 1
        txn.put("s", meta)
        return meta.tail

    return run


def test_group_commit_runs_each_job_in_its_own_savepoint(tmp_path: Path) -> None:
    store = SQLiteDSStore(str(tmp_path / "ds.sqlite3"))
    engine = Engine(store)
    assert create(engine, "s") == 201

    def half_then_fail(txn: Txn) -> None:
        meta = txn.get("s")
        assert meta is not None
        txn.append("s", meta.tail, [b"never"])
        raise ValueError("refused half-way")

    jobs = [
        Job(_append(engine, b"one")),
        Job(half_then_fail),
        Job(_append(engine, b"two")),
    ]
    store._commit(jobs)  # one batch, as if the three had arrived together
    assert [j.value for j in jobs] == [1, None, 2]
    assert isinstance(jobs[1].error, ValueError)
    assert jobs[0].error is None and jobs[2].error is None
    meta = store.get("s")
    assert isinstance(meta, Meta) and meta.tail == 2
    assert store.records("s", 0, 10, 1 << 20) == [b"one", b"two"]
    store.close()


def test_concurrent_appends_from_threads_are_each_committed_once(tmp_path: Path) -> None:
    store = SQLiteDSStore(str(tmp_path / "ds.sqlite3"))
    engine = Engine(store)
    assert create(engine, "s") == 201
    offsets: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(50):
            reply = engine.append(
                "s",
                content_type="text/plain",
                record=f"{n}-{i};".encode(),
                close=False,
                stream_seq=None,
                producer=None,
            )
            assert reply.status == 204
            with lock:
                offsets.append(reply.headers["Stream-Next-Offset"])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _each_committed_once(offsets, store.records("s", 0, 1000, 1 << 30), writers=4, appends=50)
    store.close()


def _each_committed_once(
    offsets: list[str], records: list[bytes], *, writers: int, appends: int
) -> None:
    """Writer ``n``'s ``i``-th append was ``b"n-i;"``: each one acknowledged at an offset of
    its own, stored once, and each writer's appends stored in its order."""
    assert len(set(offsets)) == len(offsets) == writers * appends
    expected = [f"{n}-{i};".encode() for n in range(writers) for i in range(appends)]
    assert sorted(records) == sorted(expected)
    for n in range(writers):
        mine = [r for r in records if r.startswith(f"{n}-".encode())]
        assert mine == [f"{n}-{i};".encode() for i in range(appends)]


def test_concurrent_appends_through_gunicorn_are_each_committed_once(tmp_path: Path) -> None:
    """The same through ``gunicorn -k gevent`` on SQLite, where the appends arriving
    together share commits (group commit's queue is guarded by an OS lock there, held by
    greenlets of one thread): four keep-alive writers, 50 appends each."""
    env = {"DS_BACKEND": "sqlite", "DS_SQLITE_PATH": str(tmp_path / "ds.sqlite3")}
    server = servers.gunicorn("tests.support.ds_app:app", env=env)
    offsets: list[str] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def writer(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            for i in range(50):
                conn.request(
                    "POST", "/ds/s", body=f"{n}-{i};".encode(),
                    headers={"Content-Type": "text/plain"},
                )  # fmt: skip
                response = conn.getresponse()
                response.read()
                assert response.status == 204, response.status
                with lock:
                    offsets.append(response.headers["Stream-Next-Offset"])
        except BaseException as exc:  # reported by the test's thread below
            failures.append(exc)
        finally:
            conn.close()

    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("PUT", "/ds/s", headers={"Content-Type": "text/plain"})
        assert conn.getresponse().status == 201
        conn.close()
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures
        body, offset = b"", "-1"  # the whole stream, as a client catches up
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            conn.request("GET", f"/ds/s?offset={offset}")
            response = conn.getresponse()
            body += response.read()
            assert response.status == 200, response.status
            offset = response.headers["Stream-Next-Offset"]
            if response.headers.get("Stream-Up-To-Date") == "true":
                break
        conn.close()
    finally:
        server.stop()
    records = [part + b";" for part in body.split(b";") if part]
    _each_committed_once(offsets, records, writers=4, appends=50)


class _GunicornRequest:
    """What gunicorn's ``Response`` reads of its request."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.version = (1, 1)

    def should_close(self) -> bool:
        return False


class _CountingSocket:
    """One end of a socket pair, counting the writes made to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes = 0
        self.sendalls = 0  # gunicorn's own writes (the fast path's first write is a send)

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self.sendalls += 1
        self.sock.sendall(data)

    def send(self, data: bytes) -> int:
        self.writes += 1
        return self.sock.send(data)


def _through_gunicorn(app: Flask, method: str, path: str, headers: dict[str, str], body: bytes):  # type: ignore[no-untyped-def]
    """What gunicorn's worker writes for one request (its ``handle_request``, in short):
    the bytes, with ``Date`` blanked, and how many writes they took."""
    from gunicorn.config import Config
    from gunicorn.http.wsgi import Response as GunicornResponse

    ours, theirs = socket.socketpair()
    counting = _CountingSocket(ours)
    response = GunicornResponse(_GunicornRequest(method), counting, Config())
    environ = EnvironBuilder(path, method=method, headers=headers, data=body).get_environ()
    if method == "POST" and not body:
        environ["CONTENT_LENGTH"] = "0"
    for item in app.wsgi_app(environ, response.start_response):
        response.write(item)
    response.close()
    ours.close()
    out = b""
    while data := theirs.recv(65536):
        out += data
    theirs.close()
    out = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", out)
    out = re.sub(rb'ETag: "[0-9a-f]+:', b'ETag: "gen:', out)
    out = re.sub(rb"Stream-Cursor: [^\r]*", b"Stream-Cursor: -", out)
    return out, counting, response


def test_under_gunicorn_a_fast_answer_with_a_body_is_one_write_of_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn writes a response's head and body in two writes; the fast path writes what
    gunicorn would have, head and body, in one, and gunicorn's response knows the body is
    out (its keep-alive and access log go on as before)."""
    by_gunicorn, by_fast_path = make_app(hook=False), make_app(hook=False)
    seen_bodies = seen_heads = 0
    for method, path, headers, body in REQUESTS:
        if method in ("PUT", "PATCH"):
            _through_gunicorn(by_gunicorn, method, path, headers, body)
            _through_gunicorn(by_fast_path, method, path, headers, body)
            continue
        with monkeypatch.context() as m:
            m.setattr(fast, "_sent_whole", lambda start_response, body: False)
            expected, by_server, _ = _through_gunicorn(by_gunicorn, method, path, headers, body)
        got, written, response = _through_gunicorn(by_fast_path, method, path, headers, body)
        assert got == expected, (method, path)
        head, _, content = got.partition(b"\r\n\r\n")
        assert b"Connection: keep-alive" in head, (method, path)
        assert response.sent == len(content) and not response.should_close(), (method, path)
        # gunicorn's writes are sendall calls; the fast path's one write is a send
        assert written.sendalls == 0, (method, path)
        if content:  # gunicorn needed two writes; the fast path one
            seen_bodies += 1
            assert (by_server.writes, written.writes) == (2, 1), (method, path)
        else:  # the head alone (an append's 204, a HEAD's answer, an empty read)
            seen_heads += 1
            assert by_server.writes == written.writes == 1, (method, path)
    assert seen_bodies >= 8 and seen_heads >= 3
    # A longer body keeps gunicorn's two writes (joining it to its head would copy it).
    big = b"z" * (fast.ONE_WRITE_BYTES + 1)
    for app in (by_gunicorn, by_fast_path):
        _through_gunicorn(app, "PUT", "/ds/big", {"Content-Type": "text/plain"}, b"")
        _through_gunicorn(app, "POST", "/ds/big", {"Content-Type": "text/plain"}, big)
    with monkeypatch.context() as m:
        m.setattr(fast, "_sent_whole", lambda start_response, body: False)
        expected, by_server, _ = _through_gunicorn(by_gunicorn, "GET", "/ds/big?offset=-1", {}, b"")
    got, written, _ = _through_gunicorn(by_fast_path, "GET", "/ds/big?offset=-1", {}, b"")
    assert got == expected and got.endswith(big) and written.writes == by_server.writes == 2


def test_one_write_answers_keep_gunicorns_connection_and_access_log(tmp_path: Path) -> None:
    """Through ``gunicorn -k gevent``: answers written whole by the fast path leave the
    keep-alive connection open for the next request, and gunicorn's access log records
    each one's status and body bytes (the response was told what went out)."""
    log = tmp_path / "access.log"
    server = servers.gunicorn(
        "tests.support.ds_app:app",
        extra=["--keep-alive", "30", "--access-logfile", str(log), "--access-logformat",
               "%(m)s %(U)s %(s)s %(B)s"],
    )  # fmt: skip
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        bodies: list[tuple[str, str, int, int]] = []  # method, path, status, body bytes

        def call(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            assert not response.will_close, (method, path)
            bodies.append((method, path, response.status, len(data)))
            return data

        call("PUT", "/ds/kept", **{"Content-Type": "text/plain"})
        sock = conn.sock  # every request below goes over this one connection
        for i in range(3):
            call("POST", "/ds/kept", b"part %d;" % i, **{"Content-Type": "text/plain"})
        assert call("GET", "/ds/kept?offset=-1") == b"part 0;part 1;part 2;"
        assert call("GET", "/ds/missing?offset=-1")  # an error answer with a body
        call("HEAD", "/ds/kept")
        assert call("GET", "/ds/kept?offset=-1") == b"part 0;part 1;part 2;"
        assert conn.sock is sock
        conn.close()
    finally:
        server.stop()
    logged = [line.split() for line in log.read_text().splitlines()]
    expected = [
        [method, path.partition("?")[0], str(status), str(size)]
        for method, path, status, size in bodies
    ]
    assert logged == expected


def test_a_json_append_with_a_lone_surrogate_is_stored_and_read_back(tmp_path: Path) -> None:
    """Through ``gunicorn -k gevent`` on SQLite: ``"\\ud800"`` is valid JSON for a string no
    UTF-8 text carries raw; it is stored and read as the escape (as the flow fronts write
    it). A number past a float's range, which would read back as ``Infinity``, is a 400."""
    env = {"DS_BACKEND": "sqlite", "DS_SQLITE_PATH": str(tmp_path / "ds.sqlite3")}
    server = servers.gunicorn("tests.support.ds_app:app", env=env)

    def call(method: str, body: bytes = b"") -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request(method, "/ds/j", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    try:
        assert call("PUT")[0] == 201
        assert call("POST", b'{"text": "a\\ud800"}')[0] == 204
        assert call("POST", b"[1e400]")[0] == 400
        status, body = call("GET")
        assert status == 200
        assert body == b'[{"text":"a\\ud800"}]'
        assert json.loads(body) == [{"text": "a\ud800"}]
    finally:
        server.stop()
