"""The Durable Streams blueprint in-process: flow streams' refusals, owners, bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_durable_stream import (
    DurableStream,
    InMemoryStreamManager,
    StreamManager,
    durable_streams_server,
    protocol,
)
from flask_durable_stream.durable_streams import MemoryDSStore
from flask_durable_stream.flows import FlowContext, RequestData
from flask_durable_stream.managers.base import PRODUCER_LOST
from flask_durable_stream.testing import MakeManager
from tests.support.ds import sse_events


def owner_from_header(data: RequestData) -> dict[str, Any]:
    user = data.headers.get("x-user")
    return {"owner": user} if user else {}


@pytest.fixture
def client() -> Iterator[FlaskClient]:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_DS_URL_PREFIX"] = "/ds"
    manager = InMemoryStreamManager()
    ext = DurableStream(stream_manager=manager, context_provider=owner_from_header)

    @ext.flow("count")
    def count(data: Any, ctx: FlowContext) -> Any:
        for i in range(int(data)):
            ctx.send_chunk(i)
        return "done"

    ext.init_app(app)
    yield app.test_client()
    app.extensions["durable_stream"].runner.shutdown()
    manager.close()


def run_flow(client: FlaskClient, user: str | None = None) -> tuple[str, str]:
    headers = {"Accept": "text/event-stream", **({"x-user": user} if user else {})}
    response = client.post("/flows/count", json={"data": 2}, headers=headers)
    assert response.status_code == 200
    assert "Durable-Stream-Url" in response.headers["Access-Control-Expose-Headers"]
    return response.headers[protocol.STREAM_ID_HEADER], response.headers["Durable-Stream-Url"]


def test_a_finished_flow_reads_as_a_closed_json_stream(client: FlaskClient) -> None:
    stream_id, url = run_flow(client)
    assert url == f"http://localhost/ds/{stream_id}"
    response = client.get(f"/ds/{stream_id}?offset=-1")
    assert response.json == [{"message": 0}, {"message": 1}, {"result": "done"}]
    assert response.headers["Stream-Closed"] == "true"
    assert response.headers["Content-Type"] == "application/json"
    head = client.head(f"/ds/{stream_id}")
    assert head.status_code == 200 and head.headers["Stream-Closed"] == "true"
    middle = client.get(f"/ds/{stream_id}?offset=0000000000000001_0000000000000000")
    assert middle.json == [{"message": 1}, {"result": "done"}]
    poll = client.get(
        f"/ds/{stream_id}?offset={response.headers['Stream-Next-Offset']}&live=long-poll"
    )
    assert poll.status_code == 204 and poll.headers["Stream-Closed"] == "true"


def test_flow_streams_are_read_only(client: FlaskClient) -> None:
    stream_id, _ = run_flow(client)
    post = client.post(f"/ds/{stream_id}", data=b"[1]", content_type="application/json")
    assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert client.delete(f"/ds/{stream_id}").status_code == 405
    malformed = client.post(f"/ds/{stream_id}", data=b"{bad", content_type="application/json")
    assert malformed.status_code == 405  # read-only first, whatever the body
    assert client.put(f"/ds/{stream_id}").status_code == 409
    assert client.get(f"/ds/{stream_id}").status_code == 200


def test_owned_streams_are_their_owners_only(client: FlaskClient) -> None:
    stream_id, _ = run_flow(client, user="alice")
    assert client.get(f"/ds/{stream_id}", headers={"x-user": "bob"}).status_code == 403
    assert client.get(f"/ds/{stream_id}").status_code == 403
    assert client.head(f"/ds/{stream_id}", headers={"x-user": "bob"}).status_code == 403
    assert client.post(f"/ds/{stream_id}", headers={"x-user": "bob"}).status_code == 403
    assert client.get(f"/ds/{stream_id}", headers={"x-user": "alice"}).status_code == 200
    alice = {"x-user": "alice", "Content-Type": "text/plain"}
    assert client.put("/ds/notes", headers=alice, data=b"hi").status_code == 201
    bob = {"x-user": "bob", "Content-Type": "text/plain"}
    assert client.get("/ds/notes", headers=bob).status_code == 403
    assert client.post("/ds/notes", headers=bob, data=b"x").status_code == 403
    assert client.delete("/ds/notes", headers=bob).status_code == 403
    assert client.get("/ds/notes", headers=alice).data == b"hi"


BAD_REQUESTS = [
    ("GET", "/ds/s?offset=abc", {}, b"", 400),
    ("GET", "/ds/s?offset=", {}, b"", 400),
    ("GET", "/ds/s?offset=-1&offset=now", {}, b"", 400),
    ("GET", "/ds/s?live=long-poll", {}, b"", 400),
    ("GET", "/ds/s?offset=-1&live=websocket", {}, b"", 400),
    ("PUT", "/ds/t", {"Stream-TTL": "1.5"}, b"", 400),
    ("PUT", "/ds/t", {"Stream-TTL": "5", "Stream-Expires-At": "2030-01-01T00:00:00Z"}, b"", 400),
    ("PUT", "/ds/t", {"Stream-Expires-At": "tomorrow"}, b"", 400),
    ("PUT", "/ds/t", {"Content-Type": "not a type"}, b"", 400),
    ("PUT", "/ds/t", {"Content-Type": "application/json"}, b"{nope", 400),
    ("PUT", "/ds/t", {"Stream-Fork-Offset": "0000000000000000_0000000000000000"}, b"", 400),
    ("PUT", "/ds/t", {"Stream-Forked-From": "/s", "Stream-Fork-Sub-Offset": "-1"}, b"", 400),
    ("PUT", "/ds/t", {"Stream-Forked-From": "/nowhere"}, b"", 404),
    ("POST", "/ds/s", {"Content-Type": "text/plain"}, b"", 400),
    ("POST", "/ds/s", {}, b"data", 400),
    ("POST", "/ds/s", {"Content-Type": "text/plain", "Producer-Id": "p"}, b"x", 400),
    ("POST", "/ds/s", {"Content-Type": "text/plain", "Producer-Id": "p", "Producer-Epoch": "x",
                       "Producer-Seq": "0"}, b"x", 400),
    ("POST", "/ds/s", {"Content-Type": "application/json"}, b"x", 400),
    ("POST", "/ds/s", {"Content-Type": "application/json"}, b"[NaN]", 400),
    ("POST", "/ds/s", {"Content-Type": "application/json"}, b"[" * 100000, 400),
    ("POST", "/ds/s", {"Content-Type": "application/json"}, b"\xff\xfe[", 400),
    ("POST", "/ds/s", {"Content-Type": "application/json"}, b"[]", 400),
    ("PUT", "/ds/t", {"Stream-Forked-From": "/s", "Stream-Fork-Offset": "now"}, b"", 400),
    ("PUT", "/ds/t", {"Stream-Expires-At": "2030-13-45T00:00:00Z"}, b"", 400),
    ("GET", "/ds/a%00b", {}, b"", 400),
    ("POST", "/ds/s", {"Content-Type": "text/plain"}, b"x", 409),
    ("POST", "/ds/nowhere", {"Content-Type": "text/plain"}, b"x", 404),
    ("PATCH", "/ds/s", {}, b"", 405),
    ("GET", "/ds/a/../s", {}, b"", 400),
]  # fmt: skip


@pytest.mark.parametrize(("method", "url", "headers", "body", "status"), BAD_REQUESTS)
def test_bad_input_gets_the_status_the_spec_names(
    client: FlaskClient, method: str, url: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    assert client.put("/ds/s", headers={"Content-Type": "application/json"}).status_code == 201
    response = client.open(url, method=method, headers=headers, data=body)
    assert response.status_code == status, response.data
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_standalone_blueprint_on_a_store() -> None:
    app = Flask(__name__)
    app.register_blueprint(durable_streams_server(MemoryDSStore()), url_prefix="/v1/stream")
    client = app.test_client()
    assert client.put("/v1/stream/a/b", data=b"x", content_type="text/plain").status_code == 201
    fork = client.put("/v1/stream/c", headers={"Stream-Forked-From": "/v1/stream/a/b"})
    assert fork.status_code == 201
    assert client.get("/v1/stream/c").data == b"x"
    preflight = client.options("/v1/stream/a/b", headers={"Origin": "https://example.com"})
    assert preflight.status_code == 204
    assert "If-None-Match" in preflight.headers["Access-Control-Allow-Headers"]


def test_backends_without_durable_streams_say_so() -> None:
    from flask_durable_stream.managers.firestore import FirestoreStreamManager
    from flask_durable_stream.managers.rtdb import RtdbStreamManager

    for cls in (FirestoreStreamManager, RtdbStreamManager):
        assert cls.durable_streams_store is StreamManager.durable_streams_store
    with pytest.raises(NotImplementedError, match="does not support Durable Streams"):
        StreamManager().durable_streams_store()


def test_a_slow_request_is_judged_at_its_arrival() -> None:
    """A request that waits a second for the store (a loaded machine, a busy lock) after
    arriving before the TTL ran out finds its stream: expiry is not decided by the delay."""
    store = MemoryDSStore()
    clock = [1000.0]
    store.now = lambda: clock[0]  # type: ignore[method-assign]
    transact = store.transact

    def slow_transact(fn: Any) -> Any:
        clock[0] += 1.0
        return transact(fn)

    app = Flask(__name__)
    app.register_blueprint(durable_streams_server(store), url_prefix="/s")
    client = app.test_client()
    headers = {"Stream-TTL": "2", "Content-Type": "text/plain"}
    assert client.put("/s/t", headers=headers).status_code == 201  # lives from 1000
    store.transact = slow_transact  # type: ignore[method-assign]
    clock[0] = 1001.5  # arrives in time, reaches the store at 1002.5
    assert client.post("/s/t", data=b"x", content_type="text/plain").status_code == 204
    clock[0] = 1004.4  # within 2 s of the append's write
    assert client.head("/s/t").status_code == 200
    assert client.get("/s/t").status_code == 200  # touched at 1005.4
    clock[0] = 1007.3
    assert client.head("/s/t").status_code == 200
    clock[0] = 1007.5
    assert client.head("/s/t").status_code == 404


# -- Offsets that say whether they include a flow stream's end -------------------------------

END = "_0000000000000001"
NO_END = "_0000000000000000"


def test_a_flow_streams_offsets_past_its_end_say_so(client: FlaskClient) -> None:
    stream_id, _ = run_flow(client)
    read = client.get(f"/ds/{stream_id}?offset=-1")
    assert read.json == [{"message": 0}, {"message": 1}, {"result": "done"}]
    assert read.headers["Stream-Next-Offset"] == "0000000000000003" + END
    assert client.head(f"/ds/{stream_id}").headers["Stream-Next-Offset"] == "0000000000000003" + END
    part = client.get(f"/ds/{stream_id}?offset=0000000000000001{NO_END}")
    assert part.json == [{"message": 1}, {"result": "done"}]
    assert part.headers["Stream-Next-Offset"] == "0000000000000003" + END
    # Before the end, the offset has no mark; from the end's offset nothing more.
    for offset in ("0000000000000003" + END, "0000000000000003" + NO_END):
        # (a stream that ended well: a client at its tail cannot have been ahead of storage)
        at_end = client.get(f"/ds/{stream_id}?offset={offset}")
        assert at_end.json == [] and at_end.headers["Stream-Closed"] == "true"
        assert at_end.headers["Stream-Next-Offset"] == "0000000000000003" + END
        poll = client.get(f"/ds/{stream_id}?offset={offset}&live=long-poll")
        assert poll.status_code == 204 and poll.headers["Stream-Closed"] == "true"
        assert poll.headers["Stream-Next-Offset"] == "0000000000000003" + END


def test_a_flow_streams_offset_with_another_mark_is_a_400(client: FlaskClient) -> None:
    stream_id, _ = run_flow(client)
    bad = client.get(f"/ds/{stream_id}?offset=0000000000000001_0000000000000002")
    assert bad.status_code == 400
    assert b"_0000000000000000 or _0000000000000001" in bad.data
    # The store's own streams keep their offsets as they were.
    alice = {"Content-Type": "text/plain"}
    assert client.put("/ds/notes", headers=alice, data=b"hi").status_code == 201
    notes = client.get("/ds/notes?offset=-1")
    assert notes.data == b"hi" and notes.headers["Stream-Next-Offset"].endswith(NO_END)


def _ds_app(manager: StreamManager) -> FlaskClient:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_DS_URL_PREFIX"] = "/ds"
    DurableStream(app, flows={}, stream_manager=manager)
    return app.test_client()


@pytest.fixture(params=["memory", "sqlite", "redis"])  # the backends with Durable Streams
def make_ds_manager(request: pytest.FixtureRequest) -> MakeManager:
    make: MakeManager = request.getfixturevalue(f"backend_{request.param}")
    return make


@pytest.fixture
def ds_manager(make_ds_manager: MakeManager) -> StreamManager:
    return make_ds_manager()


def test_a_reader_one_message_ahead_of_a_lost_flow_stream_reads_how_it_ended(
    ds_manager: StreamManager,
) -> None:
    """A client counted the messages it had live into an offset (the offset after message
    n names the same position on every read), but its producer died before storing the
    last of them, and the stored "Producer lost" took that message's seq. At the stored
    end without the end's mark, every kind of read gives it the stored end, not "closed,
    nothing more" (every backend with Durable Streams)."""
    manager = ds_manager
    client = _ds_app(manager)
    sid = os.urandom(16).hex()
    writer = manager.open(sid, flow="count")
    for i in range(3):
        writer.write(i)
    writer.error(PRODUCER_LOST)  # as a reader ends a stream whose producer's lease ran out
    end = {"error": PRODUCER_LOST}
    tail = "0000000000000004"
    for had in (4, 5, 9):  # the client had chunks 0..3, or more: one, two, six ahead
        offset = f"{had:016d}{NO_END}"
        read = client.get(f"/ds/{sid}?offset={offset}")
        assert read.status_code == 200 and read.json == [end], (had, read.data)
        assert read.headers["Stream-Closed"] == "true"
        assert read.headers["Stream-Next-Offset"] == tail + END
        poll = client.get(f"/ds/{sid}?offset={offset}&live=long-poll")
        assert poll.status_code == 200 and poll.json == [end]
        assert poll.headers["Stream-Next-Offset"] == tail + END
        sse = client.get(f"/ds/{sid}?offset={offset}&live=sse")
        assert list(sse_events(sse.data.decode().splitlines())) == [
            ("data", [end]),
            ("control", {"streamNextOffset": tail + END, "streamClosed": True, "upToDate": True}),
        ]
    # The offset the reads gave out includes the end: nothing more.
    done = client.get(f"/ds/{sid}?offset={tail}{END}")
    assert done.json == [] and done.headers["Stream-Closed"] == "true"
    poll = client.get(f"/ds/{sid}?offset={tail}{END}&live=long-poll")
    assert poll.status_code == 204 and poll.headers["Stream-Next-Offset"] == tail + END
    # Not ahead: the stream's messages, then its end.
    whole = client.get(f"/ds/{sid}?offset=0000000000000002{NO_END}")
    assert whole.json == [{"message": 2}, end]


def test_long_polls_shorter_than_the_lease_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Readers in different workers do not count toward a lease together: with long-polls
    shorter than it, a client whose every long-poll goes to another worker would never see a
    dead flow's stream end. The server says so as it starts, and only then."""
    manager = InMemoryStreamManager(lease_seconds=10.0)
    with caplog.at_level("WARNING", logger="flask_durable_stream"):
        durable_streams_server(manager, long_poll_timeout=20.0)
        durable_streams_server(manager, long_poll_timeout=10.0)
        durable_streams_server(MemoryDSStore(), long_poll_timeout=2.0)  # no flow streams
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="flask_durable_stream"):
        durable_streams_server(manager, long_poll_timeout=2.0)
    assert [r.getMessage()[:63] for r in caplog.records] == [
        "Durable Streams long-polls of 2 s are shorter than the producer"
    ]


def test_polling_long_polls_of_a_dead_flow_end_it_producer_lost(
    make_ds_manager: MakeManager,
) -> None:
    """Without gevent a live read polls the manager's ``info``. It judges the producer's
    lease too, long-poll after long-poll (each shorter than the lease), and once it has run
    out a subscription marks the stream lost: the client gets "Producer lost", not 204s for
    ever (every backend with Durable Streams)."""
    from flask_durable_stream._concurrency import gevent_patched

    assert not gevent_patched(), "this case is about the path without gevent"
    manager = make_ds_manager(lease_seconds=1.0, heartbeat_interval=0.1)
    app = Flask(__name__)
    app.config["DURABLE_STREAM_DS_URL_PREFIX"] = "/ds"
    app.config["DURABLE_STREAM_DS_LONG_POLL_TIMEOUT"] = 0.3
    DurableStream(app, flows={}, stream_manager=manager)
    client = app.test_client()
    sid = os.urandom(16).hex()
    writer = manager.open(sid, flow="count")
    writer.write(0)  # then the producer is gone, without a terminal event
    offset, polls, messages = f"{1:016d}{NO_END}", 0, []
    while polls < 50:  # 15 s: fifteen leases
        polls += 1
        poll = client.get(f"/ds/{sid}?offset={offset}&live=long-poll")
        assert poll.status_code in (200, 204), poll.data
        if poll.status_code == 200:
            messages += poll.json
        offset = poll.headers["Stream-Next-Offset"]
        if poll.headers.get("Stream-Closed") == "true":
            break
    assert messages == [{"error": PRODUCER_LOST}], (polls, messages)
    assert polls > 1, "one long-poll saw the lease end: the case proves nothing"
    assert offset == f"{2:016d}{END}"
