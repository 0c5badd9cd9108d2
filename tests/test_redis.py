"""Redis beyond the conformance suite: key TTLs, cross-manager follow, outages, config."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_durable_stream import (
    DurableStream,
    StoragePermanentError,
    StorageUnavailable,
    StreamNotFound,
    StreamStatus,
)
from flask_durable_stream.managers.base import Event
from flask_durable_stream.managers.redis import RedisStreamManager
from tests.support import servers
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_for


@pytest.fixture
def manager(redis_server: RedisServer) -> Any:
    manager = RedisStreamManager(url=redis_server.url, prefix=f"t-{uuid.uuid4().hex[:8]}")
    yield manager
    manager.close()


def test_finished_streams_get_the_ttl_open_ones_lease_and_ttl_from_each_write(
    manager: RedisStreamManager,
) -> None:
    finished = manager.open("finished")
    finished.write("a")
    finished.done("b")
    for key in manager.storage.keys("finished"):
        assert 0 < manager.client.pttl(key) <= manager.ttl_seconds * 1000
    abandon = (manager.lease_seconds + manager.ttl_seconds) * 1000
    meta, events = manager.storage.keys("open")
    still_open = manager.open("open")
    assert abandon - 5000 < manager.client.pttl(meta) <= abandon  # no events key yet

    def renewed_by(write: Any) -> None:
        for key in (meta, events):
            manager.client.pexpire(key, 1000)
        write()
        for key in (meta, events):
            assert abandon - 5000 < manager.client.pttl(key) <= abandon

    renewed_by(lambda: still_open.write("a"))
    renewed_by(still_open.heartbeat)
    renewed_by(lambda: still_open.append([Event(1, "chunk", '"b"')]))


def test_a_dead_producers_stream_is_deleted_by_redis_with_no_gc(redis_server: RedisServer) -> None:
    """A producer that died with nobody reading (its worker killed): Redis deletes its
    stream the lease and then the TTL after its last write, as it deletes a finished one;
    a producer that keeps beating keeps its stream."""
    manager = RedisStreamManager(
        url=redis_server.url,
        prefix=f"t-{uuid.uuid4().hex[:8]}",
        lease_seconds=0.3,
        ttl_seconds=0.3,
    )
    try:
        manager.open("abandoned").write("last words")  # and nothing after it
        written = time.monotonic()
        alive = manager.open("alive")
        alive.write("first")
        deadline = written + 30
        while manager.client.exists(*manager.storage.keys("abandoned")):
            assert time.monotonic() < deadline, "Redis never deleted the abandoned stream"
            alive.heartbeat()
            time.sleep(0.05)
        assert time.monotonic() - written >= 0.5  # not before the lease and the TTL
        assert manager.info("abandoned") is None
        with pytest.raises(StreamNotFound):
            manager.subscribe("abandoned")
        info = manager.info("alive")
        assert info is not None and info.status is StreamStatus.OPEN
        alive.done("end")
        assert [e.payload for e in manager.subscribe("alive")] == ['"first"', '"end"']
    finally:
        manager.close()


def test_the_index_forgets_streams_redis_deleted_as_new_ones_open(
    redis_server: RedisServer,
) -> None:
    """Redis deletes a stream's keys, not its entry in the index that ``list_streams``
    reads: each ``open`` looks at a few entries on from where the last one stopped and
    drops those of deleted streams, passing by live ones, with no gc job."""
    manager = RedisStreamManager(
        url=redis_server.url, prefix=f"t-{uuid.uuid4().hex[:8]}", ttl_seconds=0.2
    )
    try:
        long_lived = manager.open("long-lived")  # the index's first entry, open throughout
        for i in range(10):
            manager.open(f"old-{i}").done("x")
        deadline = time.monotonic() + 30
        while any(manager.client.exists(manager.storage.keys(f"old-{i}")[0]) for i in range(10)):
            assert time.monotonic() < deadline, "Redis never deleted the ended streams"
            time.sleep(0.05)
        index = manager.storage.index
        assert manager.client.zcard(index) == 11  # the keys are gone, their entries not
        new = [f"new-{i}" for i in range(5)]
        for stream_id in new:
            manager.open(stream_id)
        entries = {raw.decode() for raw in manager.client.zrange(index, 0, -1)}
        assert entries == {"long-lived", *new}
        assert {info.stream_id for info in manager.list_streams()} == entries
        long_lived.done("end")
    finally:
        manager.close()


def test_a_follower_of_another_manager_is_woken_by_new_entries(
    redis_server: RedisServer,
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    producer = RedisStreamManager(url=redis_server.url, prefix=prefix)
    follower = RedisStreamManager(url=redis_server.url, prefix=prefix)
    try:
        writer = producer.open("s")
        received: list[str] = []
        waiting = threading.Event()

        def follow() -> None:
            for event in follower.subscribe("s"):
                received.append(event.payload)
                waiting.set()

        thread = threading.Thread(target=follow)
        thread.start()
        writer.write(0)
        assert waiting.wait(5)
        for i in range(1, 50):
            writer.write(i)
        writer.done("end")
        thread.join(10)
        assert received == [str(i) for i in range(50)] + ['"end"']
        info = follower.info("s")
        assert info is not None and info.status is StreamStatus.DONE
    finally:
        producer.close()
        follower.close()


def test_an_unreachable_server_is_storage_unavailable() -> None:
    manager = RedisStreamManager(url=f"redis://127.0.0.1:{servers.free_port()}/0")
    with pytest.raises(StorageUnavailable) as info:
        manager.open("x")
    assert info.value.status == "UNAVAILABLE"
    manager.close()


def test_the_extension_builds_it_from_config(redis_server: RedisServer) -> None:
    app = Flask(__name__)
    app.config.update(
        DURABLE_STREAM_BACKEND="redis",
        DURABLE_STREAM_REDIS_URL=redis_server.url,
        DURABLE_STREAM_REDIS_PREFIX="from-config",
    )
    DurableStream(app, flows={"echo": lambda data: data})
    manager = app.extensions["durable_stream"].manager
    assert isinstance(manager, RedisStreamManager) and manager.prefix == "from-config"
    manager.close()
    without_url = Flask(__name__)
    without_url.config["DURABLE_STREAM_BACKEND"] = "redis"
    with pytest.raises(ValueError, match="DURABLE_STREAM_REDIS_URL"):
        DurableStream(without_url, flows={})


def test_a_long_batch_that_fails_part_way_is_retried_without_duplicates(
    manager: RedisStreamManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask_durable_stream import Event

    writer = manager.open("long")
    events = [Event(seq, "chunk", str(seq)) for seq in range(2500)]  # three append pages
    real_script = manager.storage.script
    calls = []

    def failing_second_page(name: str, keys: list[str], args: list[Any]) -> Any:
        calls.append(name)
        if name == "append" and calls.count("append") == 2:
            raise StorageUnavailable("Redis unavailable: connection reset")
        return real_script(name, keys, args)

    monkeypatch.setattr(manager.storage, "script", failing_second_page)
    with pytest.raises(StorageUnavailable):
        writer.append(events)
    assert writer.next_seq == 0  # the writer's state did not move
    info = manager.info("long")
    assert info is not None and info.last_seq == 999  # the first page was stored
    writer.append(events)  # the runner's retry: the same batch
    writer.done("end")
    stored = [e.payload for e in manager.subscribe("long")]
    assert stored == [str(seq) for seq in range(2500)] + ['"end"']


def test_waiting_followers_hold_no_pooled_connection(redis_server: RedisServer) -> None:
    """300 followers wait on a pool of 4 connections; new streams still open and complete.

    Each follower used to block in an XREAD of its own, one pooled connection each:
    past the pool's size, "Too many connections" for everyone, new streams too.
    """
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    manager = RedisStreamManager(
        url=redis_server.url, prefix=prefix, max_connections=4, pool_timeout=10
    )
    producer = RedisStreamManager(url=redis_server.url, prefix=prefix)
    try:
        writers = [producer.open(f"s{i}") for i in range(300)]
        for writer in writers:
            writer.write("first")
        got: dict[int, list[str]] = {i: [] for i in range(300)}

        def follow(i: int) -> None:
            for event in manager.subscribe(f"s{i}"):
                got[i].append(event.payload)

        threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(300)]
        for t in threads:
            t.start()

        def waiting() -> int:
            return manager.shared_reader().waiting()

        deadline = time.monotonic() + 60
        while waiting() < 300 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waiting() == 300  # every follower is caught up and waiting
        fresh = manager.open("fresh")  # the pool still has room for real work
        fresh.done("ok")
        assert [e.payload for e in manager.subscribe("fresh")] == ['"ok"']
        for writer in writers:
            writer.write("second")
            writer.done("end")
        for t in threads:
            t.join(60)
        assert all(p == ['"first"', '"second"', '"end"'] for p in got.values())
        assert len(manager.client.connection_pool._connections) <= 4
    finally:
        manager.close()
        producer.close()


def test_oversized_command_is_permanent_busy_redis_transient(manager: RedisStreamManager) -> None:
    from redis.exceptions import ResponseError

    def busy() -> None:
        raise ResponseError("BUSY Redis is busy running a script.")

    def refused() -> None:
        raise ResponseError("ERR Protocol error: invalid bulk length at 127.0.0.1")

    with pytest.raises(StorageUnavailable, match="busy"):
        manager.storage.call(busy)
    with pytest.raises(StoragePermanentError) as info:
        manager.storage.call(refused)
    assert "127.0.0.1" not in info.value.message


def test_unreachable_message_names_no_host() -> None:
    port = servers.free_port()
    manager = RedisStreamManager(url=f"redis://127.0.0.1:{port}/0")
    with pytest.raises(StorageUnavailable) as info:
        manager.open("x")
    assert "127.0.0.1" not in info.value.message and str(port) not in info.value.message
    manager.close()


def test_redis_down_at_startup_then_up_needs_no_restart(tmp_path: Path) -> None:
    port = servers.free_port()
    manager = RedisStreamManager(url=f"redis://127.0.0.1:{port}/0", pool_timeout=1)
    try:
        with pytest.raises(StorageUnavailable):  # constructed fine; calls fail meanwhile
            manager.open("s")
        server = RedisServer(tmp_path, port=port)
        try:
            writer = manager.open("s")
            writer.write("back")
            writer.done(None)
            assert [e.payload for e in manager.subscribe("s")] == ['"back"', "null"]
        finally:
            server.stop()
    finally:
        manager.close()


def test_a_redis_cluster_client_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A cluster refuses a script whose keys hash to different slots, as ``open``'s do (the
    stream's keys and the index): the manager refuses a cluster client when it is made."""
    import redis
    from redis.cluster import RedisCluster

    from flask_durable_stream.managers.redis_scripts import _OPEN

    nodes = ("--cluster-config-file", str(tmp_path / "nodes.conf"))
    # The cluster bus's port is the server's + 10,000 unless set: past 55,535 there is none.
    port = servers.free_port()
    bus = next(p for p in iter(servers.free_port, None) if p != port)
    extra = ("--cluster-enabled", "yes", *nodes, "--cluster-port", str(bus))
    server = RedisServer(tmp_path, port, extra=extra)
    try:
        node = redis.Redis(port=server.port)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # a cluster of one node
        info = lambda: node.execute_command("CLUSTER", "INFO")  # noqa: E731
        wait_for(lambda: b"cluster_state:ok" in info(), "the cluster to be up")
        keys = ["p:{s}:meta", "p:{s}:events", "p:index", "p:index:sweep"]
        with pytest.raises(redis.exceptions.ResponseError, match="hash to the same slot"):
            node.eval(_OPEN, len(keys), *keys, "s", "t", "", "1.0", "", 1000, "p:{", "}:meta", 4)
        cluster = RedisCluster(host="127.0.0.1", port=server.port)
        try:
            for client in (cluster, lambda: cluster):  # the client, or a factory of it
                with pytest.raises(ValueError, match="not a Redis Cluster"):
                    RedisStreamManager(client=client)
        finally:
            cluster.close()
        node.close()
    finally:
        server.stop()
