"""The HTTP layer through Flask's test client: Genkit's protocol, bad input, redaction, auth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    DurableStream,
    FlowContext,
    FlowError,
    InMemoryStreamManager,
    RequestData,
    durable_stream_blueprint,
    flow_view,
    protocol,
)

SSE = {"Accept": "text/event-stream"}


def story(data: Any, ctx: FlowContext) -> Any:
    for i in range(int(data.get("n", 3))):
        ctx.send_chunk({"i": i})
    return {"n": data.get("n", 3)}


def boom(data: Any) -> Iterator[Any]:
    yield "one"
    raise KeyError("secret-token-123")


def public_error(data: Any) -> Any:
    raise FlowError("INVALID_ARGUMENT", "topic is required", details={"field": "topic"})


def echo(data: Any) -> Any:
    return data


FLOWS = {"story": story, "boom": boom, "public": public_error, "echo": echo}
STATUSES = sorted(
    protocol_status
    for protocol_status in __import__(
        "flask_durable_stream.exceptions", fromlist=["HTTP_STATUS"]
    ).HTTP_STATUS
)


@pytest.fixture
def manager(memory_manager: InMemoryStreamManager) -> InMemoryStreamManager:
    return memory_manager


@pytest.fixture
def app(manager: InMemoryStreamManager) -> Flask:
    def provider(req: RequestData) -> dict[str, Any]:
        if req.headers.get("authorization") == "Bearer nope":
            raise FlowError("PERMISSION_DENIED", "not allowed")
        return {"auth": req.headers.get("authorization"), "stream_id": req.stream_id}

    app = Flask(__name__)
    app.register_blueprint(
        durable_stream_blueprint(
            FLOWS, stream_manager=manager, context_provider=provider, max_content_length=64 * 1024
        ),
        url_prefix="/api",
    )
    return app


def frames(data: bytes) -> list[tuple[str, Any]]:
    events, rest = protocol.parse_frames(data.decode())
    assert rest == ""
    return events


def test_plain_call_returns_result(client: FlaskClient) -> None:
    response = client.post("/api/echo", json={"data": {"x": [1, "é"]}})
    assert response.status_code == 200
    assert response.data == '{"result":{"x":[1,"é"]}}'.encode()
    assert response.mimetype == "application/json"


def test_stream_frames_and_headers(client: FlaskClient) -> None:
    response = client.post("/api/story", json={"data": {"n": 2}}, headers=SSE)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert len(response.headers["x-genkit-stream-id"]) == 32
    assert response.data == (
        b'data: {"message":{"i":0}}\n\ndata: {"message":{"i":1}}\n\ndata: {"result":{"n":2}}\n\n'
    )


@pytest.mark.parametrize(
    ("accept", "query"),
    [
        ("Text/Event-Stream, */*", ""),
        ("application/json, TEXT/EVENT-STREAM;q=0.9", ""),
        (None, "?stream=true"),
    ],
)
def test_streaming_is_negotiated_like_genkit(
    client: FlaskClient, accept: str | None, query: str
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.post(f"/api/story{query}", json={"data": {"n": 1}}, headers=headers)
    assert response.data.startswith(b'data: {"message":{"i":0}}\n\n')


def test_reconnect_replays_identical_bytes(client: FlaskClient) -> None:
    live = client.post("/api/story", json={"data": {"n": 5}}, headers=SSE)
    sid = live.headers["x-genkit-stream-id"]
    for body in ({}, None):  # Genkit's client sends {}; an empty body is accepted too
        kwargs = {"json": body} if body is not None else {}
        again = client.post("/api/story", headers={**SSE, "x-genkit-stream-id": sid}, **kwargs)
        assert again.status_code == 200
        assert again.headers["x-genkit-stream-id"] == sid
        assert again.data == live.data


def test_reconnect_without_streaming_returns_the_result(client: FlaskClient) -> None:
    sid = client.post("/api/story", json={"data": {"n": 2}}, headers=SSE).headers[
        "x-genkit-stream-id"
    ]
    response = client.post("/api/story", json={}, headers={"x-genkit-stream-id": sid})
    assert response.status_code == 200 and response.json == {"result": {"n": 2}}


def test_unknown_stream_id_is_204(client: FlaskClient) -> None:
    response = client.post("/api/story", json={}, headers={**SSE, "x-genkit-stream-id": "a" * 32})
    assert response.status_code == 204 and response.data == b""


def test_errors_are_redacted_live_and_replayed_identically(
    client: FlaskClient, caplog: Any
) -> None:
    live = client.post("/api/boom", json={"data": None}, headers=SSE)
    assert frames(live.data) == [
        ("chunk", "one"),
        ("error", {"status": "INTERNAL", "message": "Internal Error"}),
    ]
    assert live.data.endswith(
        b'error: {"error":{"status":"INTERNAL","message":"Internal Error"}}\n\n'
    )
    assert b"secret-token-123" not in live.data
    assert "secret-token-123" in caplog.text  # the traceback is logged for operators
    sid = live.headers["x-genkit-stream-id"]
    replay = client.post("/api/boom", json={}, headers={**SSE, "x-genkit-stream-id": sid})
    assert replay.data == live.data


def test_public_errors_reach_the_client(client: FlaskClient) -> None:
    live = client.post("/api/public", json={"data": 1}, headers=SSE)
    assert live.data == (
        b'error: {"error":{"status":"INVALID_ARGUMENT","message":"topic is required",'
        b'"details":{"field":"topic"}}}\n\n'
    )
    plain = client.post("/api/public", json={"data": 1})
    assert plain.status_code == 400
    assert plain.json == {
        "status": "INVALID_ARGUMENT",
        "message": "topic is required",
        "details": {"field": "topic"},
    }
    assert client.post("/api/boom", json={"data": 1}).json == {
        "status": "INTERNAL",
        "message": "Internal Error",
    }


@pytest.mark.parametrize("status", STATUSES)
def test_plain_call_error_status_mapping(manager: InMemoryStreamManager, status: str) -> None:
    from flask_durable_stream.exceptions import HTTP_STATUS

    def fail(data: Any) -> Any:
        raise FlowError(status, "m")

    app = Flask(__name__)
    app.add_url_rule("/f", view_func=flow_view(fail, stream_manager=manager), methods=["POST"])
    response = app.test_client().post("/f", json={"data": 1})
    assert response.status_code == HTTP_STATUS[status]
    assert response.json == {"status": status, "message": "m"}


def test_context_provider_runs_on_new_and_reconnecting_requests(client: FlaskClient) -> None:
    denied = client.post(
        "/api/story", json={"data": {}}, headers={**SSE, "Authorization": "Bearer nope"}
    )
    assert denied.status_code == 403
    assert denied.json == {"status": "PERMISSION_DENIED", "message": "not allowed"}
    sid = client.post("/api/story", json={"data": {"n": 1}}, headers=SSE).headers[
        "x-genkit-stream-id"
    ]
    again = client.post(
        "/api/story",
        json={},
        headers={**SSE, "x-genkit-stream-id": sid, "Authorization": "Bearer nope"},
    )
    assert again.status_code == 403


def test_flow_sees_context_and_stream_id(manager: InMemoryStreamManager) -> None:
    seen: dict[str, Any] = {}

    def spy(data: Any, ctx: FlowContext) -> Any:
        seen.update(stream_id=ctx.stream_id, context=ctx.context)
        return None

    app = Flask(__name__)
    app.register_blueprint(
        durable_stream_blueprint(
            {"spy": spy},
            stream_manager=manager,
            context_provider=lambda r: {"user": r.headers.get("x-user")},
        )
    )
    response = app.test_client().post("/spy", json={"data": 1}, headers={**SSE, "X-User": "ada"})
    assert response.data == b'data: {"result":null}\n\n'
    assert seen == {"stream_id": response.headers["x-genkit-stream-id"], "context": {"user": "ada"}}


# -- bad input: each has a defined answer, none is a 500 ------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{not json", "application/json", "Request body must be valid JSON."),
        (b"\xff\xfe", "application/json", "Request body must be valid JSON."),
        (b"[1, 2]", "application/json", 'Request body must be a JSON object with a "data" field.'),
        (b'"data"', "application/json", 'Request body must be a JSON object with a "data" field.'),
        (b"{}", "application/json", 'Request body must be a JSON object with a "data" field.'),
        (
            b'{"input": 1}',
            "application/json",
            'Request body must be a JSON object with a "data" field.',
        ),
        (b"", "application/json", "Request body must be valid JSON."),
    ],
)
@pytest.mark.parametrize("headers", [SSE, {}])
def test_bad_bodies_are_400(
    client: FlaskClient, body: bytes, content_type: str, message: str, headers: dict[str, str]
) -> None:
    response = client.post("/api/story", data=body, content_type=content_type, headers=headers)
    assert response.status_code == 400
    assert response.json == {"status": "INVALID_ARGUMENT", "message": message}


def test_oversized_body_is_413(client: FlaskClient) -> None:
    big = b'{"data":"' + b"x" * (10 * 1024 * 1024) + b'"}'
    response = client.post("/api/story", data=big, content_type="application/json", headers=SSE)
    assert response.status_code == 413
    assert response.json == {
        "status": "RESOURCE_EXHAUSTED",
        "message": f"Request body exceeds {64 * 1024} bytes.",
    }


def test_unknown_flow_is_json_404(client: FlaskClient) -> None:
    response = client.post("/api/nope", json={"data": 1}, headers=SSE)
    assert response.status_code == 404
    assert response.json == {"status": "NOT_FOUND", "message": "Unknown flow."}


@pytest.mark.parametrize(
    "stream_id",
    [
        "../../etc/passwd",
        "a/b",
        "a b",
        "x" * 10_000,
        "ünïcödé",
        "",
        ".hidden",
        "a..b",
        "%2e%2e",
        "a\tb",
    ],
)
def test_hostile_stream_ids_are_400(client: FlaskClient, stream_id: str) -> None:
    response = client.post("/api/story", json={}, headers={**SSE, "x-genkit-stream-id": stream_id})
    assert response.status_code == 400
    assert response.json["status"] == "INVALID_ARGUMENT"


def test_stream_id_with_crlf_is_400(app: Flask) -> None:
    # Werkzeug's test client refuses to send CR/LF in a header, so build the environ directly.
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/story",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "2",
        "HTTP_ACCEPT": "text/event-stream",
        "HTTP_X_GENKIT_STREAM_ID": "abc\r\nSet-Cookie: x=1",
        "wsgi.input": __import__("io").BytesIO(b"{}"),
    }
    captured: dict[str, Any] = {}
    body = b"".join(
        app.wsgi_app(environ, lambda s, h, e=None: captured.update(status=s) or (lambda d: None))
    )
    assert captured["status"].startswith("400")
    assert b"INVALID_ARGUMENT" in body


def test_non_serializable_chunk_fails_the_flow_not_the_server(
    manager: InMemoryStreamManager,
) -> None:
    def bad(data: Any) -> Iterator[Any]:
        yield {"ok": 1}
        yield object()

    app = Flask(__name__)
    app.register_blueprint(durable_stream_blueprint({"bad": bad}, stream_manager=manager))
    response = app.test_client().post("/bad", json={"data": 1}, headers=SSE)
    assert frames(response.data) == [
        ("chunk", {"ok": 1}),
        ("error", {"status": "INTERNAL", "message": "Internal Error"}),
    ]


# -- the extension -------------------------------------------------------------


def test_extension_registers_flows_with_config(manager: InMemoryStreamManager) -> None:
    ext = DurableStream(stream_manager=manager)

    @ext.flow()
    def shout(data: Any) -> Any:
        return str(data).upper()

    app = Flask(__name__)
    app.config["DURABLE_STREAM_URL_PREFIX"] = "/v1"
    ext.init_app(app)
    assert app.extensions["durable_stream"].manager is manager
    assert app.test_client().post("/v1/shout", json={"data": "hi"}).json == {"result": "HI"}
    with pytest.raises(RuntimeError, match="Import and use that instance instead"):
        ext.init_app(app)


def test_extension_builds_the_configured_backend() -> None:
    app = Flask(__name__)
    app.config.update(DURABLE_STREAM_TTL=12.0, DURABLE_STREAM_TIMEOUT=7.0)
    DurableStream(app, flows={"echo": echo})
    manager = app.extensions["durable_stream"].manager
    try:
        assert isinstance(manager, InMemoryStreamManager)
        assert (manager.ttl_seconds, manager.timeout) == (12.0, 7.0)
    finally:
        manager.close()
    bad = Flask(__name__)
    bad.config["DURABLE_STREAM_BACKEND"] = "carrier-pigeon"
    with pytest.raises(ValueError, match="carrier-pigeon"):
        DurableStream(bad, flows={"echo": echo})


def test_durability_can_be_turned_off() -> None:
    app = Flask(__name__)
    app.add_url_rule("/s", view_func=flow_view(story, stream_manager=False), methods=["POST"])
    client = app.test_client()
    live = client.post("/s", json={"data": {"n": 1}}, headers=SSE)
    assert "x-genkit-stream-id" not in live.headers
    assert frames(live.data)[-1] == ("done", {"n": 1})
    assert (
        client.post("/s", json={}, headers={**SSE, "x-genkit-stream-id": "abc"}).status_code == 204
    )


def test_slow_first_chunk_still_sends_headers_first(manager: InMemoryStreamManager) -> None:
    """The response is started (status + id) before the flow produces anything."""
    gate = __import__("threading").Event()

    def slow(data: Any, ctx: FlowContext) -> Any:
        gate.wait(10)
        ctx.send_chunk("late")
        return "end"

    app = Flask(__name__)
    app.register_blueprint(durable_stream_blueprint({"slow": slow}, stream_manager=manager))
    started: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append(status)
        return lambda data: started.append(f"write:{data!r}")

    environ = (
        __import__("werkzeug.test", fromlist=["EnvironBuilder"])
        .EnvironBuilder(method="POST", path="/slow", json={"data": 1}, headers=SSE)
        .get_environ()
    )
    body = app.wsgi_app(environ, start_response)
    assert started == ["200 OK", "write:b''"]  # headers flushed, no chunk yet
    gate.set()
    assert b"".join(body).endswith(b'data: {"result":"end"}\n\n')


def test_a_failing_context_provider_is_a_redacted_json_500(
    manager: InMemoryStreamManager, caplog: Any
) -> None:
    def broken(req: RequestData) -> dict[str, Any]:
        raise RuntimeError("db password=hunter2")

    app = Flask(__name__)
    app.register_blueprint(
        durable_stream_blueprint({"echo": echo}, stream_manager=manager, context_provider=broken)
    )
    response = app.test_client().post("/echo", json={"data": 1}, headers=SSE)
    assert response.status_code == 500
    assert response.json == {"status": "INTERNAL", "message": "Internal Error"}
    assert "hunter2" in caplog.text and b"hunter2" not in response.data


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/nope/events?streamId=abc"),
        ("POST", "/api/nope/events"),
        ("POST", "/api/nope/cancel"),
        ("GET", "/api/nope/cancel"),
        ("GET", "/api/nope"),
        ("DELETE", "/api/nope"),
        ("PUT", "/api/nope"),
    ],
)
def test_an_unknown_flow_is_json_404_on_every_method_and_path(
    client: FlaskClient, method: str, path: str
) -> None:
    response = client.open(path, method=method, headers=SSE)
    assert response.status_code == 404
    assert response.json == {"status": "NOT_FOUND", "message": "Unknown flow."}


def test_a_known_flow_with_the_wrong_method_is_405(client: FlaskClient) -> None:
    for method, path, allowed in [
        ("GET", "/api/story", "POST"),
        ("POST", "/api/story/events", "GET"),
        ("GET", "/api/story/cancel", "POST"),
    ]:
        response = client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        assert allowed in response.headers["Allow"]


def test_without_a_prefix_the_app_routes_keep_their_405(manager: InMemoryStreamManager) -> None:
    app = Flask(__name__)

    @app.get("/login")
    def login() -> str:
        return "login page"

    @app.get("/reports/<name>/events")
    def report_events(name: str) -> str:
        return name

    app.register_blueprint(durable_stream_blueprint(FLOWS, stream_manager=manager))
    client = app.test_client()
    assert client.get("/login").data == b"login page"
    refused = client.post("/login", json={"data": 1})
    assert refused.status_code == 405 and "GET" in refused.headers["Allow"]
    assert client.post("/reports/x/events").status_code == 405
    assert client.get("/reports/x/events").data == b"x"
    unknown = client.post("/nope", json={"data": 1})
    assert (unknown.status_code, unknown.json["message"]) == (404, "Unknown flow.")
    known = client.post("/echo", json={"data": 7})
    assert known.json == {"result": 7}


def test_a_flow_decorated_after_init_app_is_routed(manager: InMemoryStreamManager) -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_URL_PREFIX"] = "/v1/"
    ext = DurableStream(app, flows={"echo": echo}, stream_manager=manager)

    @ext.flow()
    def late(data: Any, ctx: FlowContext) -> Any:
        ctx.send_chunk({"got": data})
        return "late"

    client = app.test_client()
    live = client.post("/v1/late", json={"data": 1}, headers=SSE)
    assert frames(live.data) == [("chunk", {"got": 1}), ("done", "late")]
    sid = live.headers["x-genkit-stream-id"]
    events = client.get(f"/v1/late/events?streamId={sid}")
    assert events.status_code == 200 and b"event: result" in events.data
    ended = client.post("/v1/late/cancel", headers={"x-genkit-stream-id": sid})
    assert ended.status_code == 409
    assert client.get("/v1/late").status_code == 405
    assert app.extensions["durable_stream"].flows.keys() == {"echo", "late"}
    from flask import url_for

    with app.test_request_context():
        assert url_for("durable_stream.late") == "/v1/late"
    with pytest.raises(ValueError, match="already registered"):
        ext.flow("late")(echo)
    # Like @app.route: once the app served a request, its routes are fixed, and it says so.
    with pytest.raises(AssertionError, match="first request"):
        ext.flow("later")(echo)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_a_json_body_in_any_encoding_json_reads(client: FlaskClient, encoding: str) -> None:
    """UTF-8 is read without asking json which encoding it is; the others as json reads them."""
    body = '{"data": {"x": "é€"}}'.encode(encoding)
    response = client.post("/api/echo", data=body, content_type="application/json")
    assert response.status_code == 200, response.data
    assert response.json == {"result": {"x": "é€"}}


@pytest.mark.parametrize("body", [b'{"data": "\xff"}', b"{", b'{"data": 1} trailing'])
def test_a_body_that_is_not_json_is_a_400(client: FlaskClient, body: bytes) -> None:
    response = client.post("/api/echo", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json == {
        "status": "INVALID_ARGUMENT",
        "message": "Request body must be valid JSON.",
    }


@pytest.mark.parametrize("accept", [{}, SSE])
def test_a_lone_surrogate_in_the_input_comes_back_escaped(
    client: FlaskClient, accept: dict[str, str]
) -> None:
    """``"\\ud800"`` is a JSON string no UTF-8 text can carry raw: the flow's output with it
    is sent and stored as an escape (as JSON.stringify writes it), not a 500 or a stream
    that storage cannot take."""
    body = b'{"data": {"x": "a\\ud800"}}'
    live = client.post("/api/echo", data=body, content_type="application/json", headers=accept)
    assert live.status_code == 200
    if not accept:
        assert live.data == b'{"result":{"x":"a\\ud800"}}'
        return
    assert frames(live.data) == [("done", {"x": "a\ud800"})]
    sid = live.headers["x-genkit-stream-id"]
    again = client.post("/api/echo", json={}, headers={**SSE, "x-genkit-stream-id": sid})
    assert again.data == live.data
