"""The Python client against the example app on a real gevent server, through a cutting proxy."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from flask_durable_stream import (
    DurableStreamClient,
    FlowError,
    SQLiteStreamManager,
    StreamError,
    StreamNotFound,
)
from flask_durable_stream.managers.base import PRODUCER_LOST
from tests.support import servers
from tests.support.proxy import CuttingProxy


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.example_app(servers.sqlite_env(tmp_path_factory, "client"))
    yield server
    server.stop()


@pytest.fixture
def client(server: servers.Server) -> DurableStreamClient:
    return DurableStreamClient(server.url + "/flows", backoff=(0.05, 0.2))


def story(chunks: int, delay: float = 0.01) -> dict[str, float]:
    return {"chunks": chunks, "delay": delay}


def test_stream_yields_chunks_then_has_the_result(client: DurableStreamClient) -> None:
    with client.stream("story", story(10)) as stream:
        chunks = list(stream)
    assert [c["index"] for c in chunks] == list(range(10))
    assert stream.result["words"] == 10
    assert stream.stream_id is not None and len(stream.stream_id) == 32
    assert (stream.reconnects, stream.last_seq, stream.done) == (0, 10, True)


def test_cut_connections_are_resumed_without_loss_or_repeat(server: servers.Server) -> None:
    # The first response (the POST) and the first reconnect are cut mid-stream.
    proxy = CuttingProxy(server.port, cuts=[700, 600])
    try:
        client = DurableStreamClient(f"http://127.0.0.1:{proxy.port}/flows", backoff=(0.05, 0.2))
        stream = client.stream("story", story(30, 0.02))
        chunks = list(stream)
    finally:
        proxy.close()
    assert [c["index"] for c in chunks] == list(range(30))
    assert stream.result["words"] == 30
    assert stream.reconnects == 2 and proxy.connections == 3


def test_the_flows_error_is_raised_after_its_chunks(client: DurableStreamClient) -> None:
    stream = client.stream("throwy", {"count": 2})
    seen = []
    with pytest.raises(FlowError) as info:
        for chunk in stream:
            seen.append(chunk)
    assert seen == [{"count": 0}, {"count": 1}]
    assert (info.value.status, info.value.message) == ("INTERNAL", "Internal Error")


def test_plain_calls_return_or_raise(client: DurableStreamClient) -> None:
    assert client.call("echo", {"x": [1, "é"]}) == {"echo": {"x": [1, "é"]}}
    with pytest.raises(FlowError) as info:
        client.call("story", {"chunks": 0})
    assert info.value.status == "INVALID_ARGUMENT"
    with pytest.raises(
        FlowError, match=r"unknown flow 'no-such-flow': http://127\.0\.0\.1:\d+/flows"
    ):
        client.call("no-such-flow", {})


def test_cancel_from_the_client(client: DurableStreamClient) -> None:
    stream = client.stream("story", story(200, 0.02))
    chunks = iter(stream)
    assert next(chunks)["index"] == 0
    assert stream.cancel() is True
    with pytest.raises(FlowError) as info:
        for _ in chunks:
            pass
    assert info.value.status == "CANCELLED"
    assert stream.cancel() is False  # it has ended
    with pytest.raises(StreamNotFound):
        client.cancel("story", "no-such-stream")
    with pytest.raises(FlowError, match="unknown flow 'nope'") as unknown:
        client.cancel("nope", "no-such-stream")
    assert unknown.value.status == "NOT_FOUND"


def test_resume_an_existing_stream_from_an_offset(client: DurableStreamClient) -> None:
    first = client.stream("story", story(8))
    assert len(list(first)) == 8
    assert first.stream_id is not None
    whole = client.resume("story", first.stream_id)
    assert [c["index"] for c in whole] == list(range(8))
    assert whole.result == first.result
    tail = client.resume("story", first.stream_id, after=5)  # seq 5 is chunk 5
    assert [c["index"] for c in tail] == [6, 7]
    with pytest.raises(StreamNotFound):
        list(client.resume("story", "no-such-stream"))
    with pytest.raises(FlowError, match="unknown flow 'nope'"):
        list(client.stream("nope", {}))
    with pytest.raises(FlowError, match="unknown flow 'nope'"):
        list(client.resume("nope", "no-such-stream"))


def test_a_client_ahead_of_storage_gets_the_stored_failure(
    server: servers.Server, client: DurableStreamClient
) -> None:
    """The client had events that their worker sent and never stored; the stream then
    ended "Producer lost", at a seq the client had as a chunk. Resuming after its last
    seq, it gets that failure (once, though its seq is not new), not a reconnect loop."""
    manager = SQLiteStreamManager(server.env["FLASK_DURABLE_STREAM_SQLITE_PATH"])
    try:
        sid = os.urandom(16).hex()
        writer = manager.open(sid, flow="story")
        writer.write({"index": 0})
        writer.error(PRODUCER_LOST)  # seq 1, as a reader ends a stream whose lease ran out
    finally:
        manager.close()
    for after in (1, 3):
        resumed = client.resume("story", sid, after=after)
        with pytest.raises(FlowError) as failed:
            list(resumed)
        assert (failed.value.status, failed.value.message) == (
            PRODUCER_LOST["status"],
            PRODUCER_LOST["message"],
        )
        assert resumed.reconnects == 0


def test_no_server_is_a_clear_unavailable_error() -> None:
    client = DurableStreamClient(f"http://127.0.0.1:{servers.free_port()}/flows")
    with pytest.raises(StreamError) as info:
        list(client.stream("story", story(1)))
    assert info.value.status == "UNAVAILABLE"


def test_bad_base_url_is_refused() -> None:
    with pytest.raises(ValueError):
        DurableStreamClient("ftp://example.com/flows")


def test_leaving_the_loop_early_closes_the_connection(client: DurableStreamClient) -> None:
    stream = client.stream("story", story(50, 0.02))
    for chunk in stream:
        if chunk["index"] == 2:
            break
    assert stream._conn is None  # closed, not left open until garbage collection
    assert stream.stream_id is not None
    rest = client.resume("story", stream.stream_id, after=stream.last_seq)
    assert [c["index"] for c in rest] == list(range(3, 50))  # it goes on where we left


def test_a_503_on_reconnect_is_retried(server: servers.Server) -> None:
    # Connection 0 is the POST; the first reconnect (1) meets a server restarting behind a
    # proxy, the second (2) gets through.
    unavailable = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    proxy = CuttingProxy(server.port, answers={1: unavailable})
    try:
        client = DurableStreamClient(f"http://127.0.0.1:{proxy.port}/flows", backoff=(0.05, 0.2))
        first = client.stream("story", story(4))
        assert len(list(first)) == 4 and first.stream_id is not None
        again = client.resume("story", first.stream_id)
        chunks = list(again)
    finally:
        proxy.close()
    assert [c["index"] for c in chunks] == list(range(4))
    assert again.reconnects == 1 and proxy.connections == 3
