"""The RTDB protocol test server against the documented REST API (plain HTTP, firebase_admin.db)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.rtdb_server import RtdbProtocolServer


@pytest.fixture(scope="module")
def proto() -> Iterator[RtdbProtocolServer]:
    with RtdbProtocolServer(namespace="proto", keepalive=0.2) as server:
        yield server


@pytest.fixture
def base(proto: RtdbProtocolServer) -> str:
    """A fresh node URL prefix (without .json) for one test."""
    return f"{proto.url}/t-{uuid.uuid4().hex[:8]}"


def url(base: str, path: str = "", **params: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{base}{path}.json" + (f"?{query}" if query else "")


class Sse:
    """A streaming GET read with requests, independent of the library's reader."""

    def __init__(self, target: str) -> None:
        self.response = requests.get(
            target, headers={"Accept": "text/event-stream"}, stream=True, timeout=5
        )
        self.lines = self.response.iter_lines(decode_unicode=True)

    def next(self) -> tuple[str, Any]:
        event = ""
        for line in self.lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                return event, json.loads(line[6:])
        raise EOFError("stream ended")

    def next_change(self) -> tuple[str, Any]:
        while True:
            event, data = self.next()
            if event != "keep-alive":
                return event, data

    def close(self) -> None:
        self.response.close()


def test_put_get_patch_delete_and_print_silent(base: str) -> None:
    reply = requests.put(url(base), json={"a": 1, "b": {"c": "x"}})
    assert reply.status_code == 200 and reply.json() == {"a": 1, "b": {"c": "x"}}
    assert requests.get(url(base, "/b/c")).json() == "x"
    assert requests.patch(url(base), json={"a": 2}).json() == {"a": 2}
    assert requests.get(url(base)).json() == {"a": 2, "b": {"c": "x"}}
    silent = requests.put(url(base, "/d", print="silent"), json=True)
    assert silent.status_code == 204 and silent.content == b""
    assert requests.delete(url(base, "/a")).json() is None
    assert requests.get(url(base)).json() == {"b": {"c": "x"}, "d": True}
    assert requests.get(url(base, "/missing")).json() is None
    assert requests.put(url(base), data=b"{not json").status_code == 400
    assert requests.put(url(base, "/bad.key"), json=1).status_code == 400


def test_namespaces_are_separate_trees(base: str) -> None:
    requests.put(url(base, ns="one"), json="first")
    requests.put(url(base, ns="two"), json="second")
    assert requests.get(url(base, ns="one")).json() == "first"
    assert requests.get(url(base, ns="two")).json() == "second"
    assert requests.get(url(base, ns="three")).json() is None


def test_push_ids_sort_chronologically(base: str) -> None:
    names = [requests.post(url(base), json=i).json()["name"] for i in range(30)]
    assert all(len(n) == 20 for n in names)
    assert sorted(names) == names and len(set(names)) == 30
    stored = requests.get(url(base)).json()
    assert [stored[n] for n in sorted(stored)] == list(range(30))


def test_shallow_lists_keys_only(base: str) -> None:
    requests.put(url(base), json={"a": {"deep": 1}, "b": 2})
    assert requests.get(url(base, shallow="true")).json() == {"a": True, "b": True}
    assert requests.get(url(base, "/b", shallow="true")).json() == 2


def test_queries_order_filter_and_limit(base: str) -> None:
    requests.put(
        url(base),
        json={
            "s3": {"n": 3, "v": "c"},
            "s1": {"n": 1, "v": "a"},
            "s2": {"n": 2, "v": "b"},
            "s4": {"n": 4, "v": "d"},
            "10": {"n": 0},
            "9": {"n": 5},
        },
    )

    def get(**params: Any) -> Any:
        return requests.get(url(base, **params)).json()

    key = '"$key"'
    assert set(get(orderBy=key, startAt='"s2"')) == {"s2", "s3", "s4"}
    assert set(get(orderBy=key, startAt='"s2"', limitToFirst=1)) == {"s2"}
    assert set(get(orderBy=key, limitToFirst=2)) == {"9", "10"}  # integer keys first, numerically
    assert set(get(orderBy=key, endAt='"s1"', limitToLast=1)) == {"s1"}
    assert set(get(orderBy='"n"', startAt=2, endAt=4)) == {"s2", "s3", "s4"}
    assert set(get(orderBy='"n"', equalTo=3)) == {"s3"}
    assert set(get(orderBy='"n"', limitToLast=2)) == {"s4", "9"}
    assert set(get(orderBy='"v"', startAt='"b"', limitToFirst=2)) == {"s2", "s3"}
    requests.put(url(base, "/vals"), json={"x": 3, "y": 1, "z": 2})
    by_value = requests.get(url(base, "/vals", orderBy='"$value"', limitToFirst=2))
    assert by_value.json() == {"y": 1, "z": 2}
    assert requests.get(url(base, startAt=1)).status_code == 400  # filters need orderBy
    assert requests.get(url(base, orderBy=key, startAt=1)).status_code == 400  # $key needs strings


def test_etags_and_conditional_writes(base: str) -> None:
    requests.put(url(base), json={"v": 1})
    first = requests.get(url(base), headers={"X-Firebase-ETag": "true"})
    etag = first.headers["ETag"]
    assert etag and first.json() == {"v": 1}
    ok = requests.put(url(base), json={"v": 2}, headers={"if-match": etag})
    assert ok.status_code == 200 and ok.headers["ETag"] != etag
    stale = requests.put(url(base), json={"v": 3}, headers={"if-match": etag})
    assert stale.status_code == 412
    assert stale.json() == {"v": 2} and stale.headers["ETag"] == ok.headers["ETag"]
    assert requests.get(url(base)).json() == {"v": 2}
    missing = requests.get(url(base, "/nothing"), headers={"X-Firebase-ETag": "true"})
    if_absent = {"if-match": missing.headers["ETag"]}
    created = requests.put(url(base, "/nothing"), json=1, headers=if_absent)
    assert created.status_code == 200
    again = requests.put(url(base, "/nothing"), json=2, headers=if_absent)
    assert again.status_code == 412 and again.json() == 1


def test_server_values_and_null_deletes(base: str) -> None:
    before = int(time.time() * 1000)
    stored = requests.put(url(base), json={"at": {".sv": "timestamp"}, "n": {"keep": 1}}).json()
    assert before <= stored["at"] <= int(time.time() * 1000) + 1
    requests.patch(url(base), json={"n/keep": None, "count": {".sv": {"increment": 2}}})
    requests.patch(url(base), json={"count": {".sv": {"increment": 3}}})
    # the emptied parent "n" is pruned
    assert requests.get(url(base)).json() == {"at": stored["at"], "count": 5}
    requests.put(url(base), json=None)
    assert requests.get(url(base)).json() is None


def test_multi_path_patch_is_atomic_at_any_node(proto: RtdbProtocolServer, base: str) -> None:
    node = base.rsplit("/", 1)[1]
    root = requests.patch(f"{proto.url}/.json", json={f"{node}/a/b": 1, f"{node}/c/d": 2})
    assert root.status_code == 200
    assert requests.patch(url(base), json={"a/e": 3, "c": {"f": 4}}).status_code == 200
    assert requests.get(url(base)).json() == {"a": {"b": 1, "e": 3}, "c": {"f": 4}}
    overlap = requests.patch(url(base), json={"a": 9, "a/b": 10})
    assert overlap.status_code == 400
    assert requests.get(url(base, "/a")).json() == {"b": 1, "e": 3}  # nothing of it applied


def test_arrays_round_trip(base: str) -> None:
    requests.put(url(base), json=["a", "b", "c"])
    assert requests.get(url(base)).json() == ["a", "b", "c"]
    requests.delete(url(base, "/1"))
    assert requests.get(url(base)).json() == ["a", None, "c"]


def test_streaming_put_patch_and_keep_alive(base: str) -> None:
    requests.put(url(base), json={"x": 1})
    sse = Sse(url(base))
    try:
        assert sse.next() == ("put", {"path": "/", "data": {"x": 1}})
        requests.put(url(base, "/y"), json={"z": 2})
        assert sse.next_change() == ("put", {"path": "/y", "data": {"z": 2}})
        requests.patch(url(base), json={"x": 5, "y/w": 3})
        assert sse.next_change() == ("patch", {"path": "/", "data": {"x": 5, "y/w": 3}})
        requests.patch(url(base, "/y"), json={"z": None})
        assert sse.next_change() == ("patch", {"path": "/y", "data": {"z": None}})
        requests.put(url(base.rsplit("/", 1)[0] + "/elsewhere"), json=1)  # not under the watch
        requests.delete(url(base))
        assert sse.next_change() == ("put", {"path": "/", "data": None})
        assert sse.next() == ("keep-alive", None)
    finally:
        sse.close()


def test_streaming_query_sends_only_matching_children(base: str) -> None:
    requests.put(url(base), json={"s1": "a", "s2": "b"})
    sse = Sse(url(base, orderBy='"$key"', startAt='"s2"'))
    try:
        assert sse.next() == ("put", {"path": "/", "data": {"s2": "b"}})
        requests.patch(url(base), json={"s0": "old", "s3": "c"})
        assert sse.next_change() == ("put", {"path": "/s3", "data": "c"})
        requests.delete(url(base, "/s2"))
        assert sse.next_change() == ("put", {"path": "/s2", "data": None})
    finally:
        sse.close()


def test_dropping_streams_cuts_connections(proto: RtdbProtocolServer, base: str) -> None:
    sse = Sse(url(base))
    try:
        sse.next()
        deadline = time.monotonic() + 5
        while proto.stream_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proto.drop_streams() >= 1
        with pytest.raises((EOFError, requests.exceptions.ChunkedEncodingError)):
            while True:
                sse.next()
        assert proto.stream_count() == 0
    finally:
        sse.close()


@pytest.mark.parametrize("event", ["cancel", "auth_revoked"])
def test_control_events_then_close(proto: RtdbProtocolServer, base: str, event: str) -> None:
    sse = Sse(url(base))
    try:
        sse.next()
        while proto.stream_count() == 0:
            time.sleep(0.01)
        proto.send_to_streams(event, "permission denied" if event == "cancel" else "token expired")
        assert sse.next_change()[0] == event
    finally:
        sse.close()


def test_control_endpoints_count_writes(proto: RtdbProtocolServer, base: str) -> None:
    requests.post(f"{proto.url}/.control/reset-log")
    requests.put(url(base), json=1)
    requests.patch(f"{proto.url}/.json", json={"x/y": 1})
    requests.get(url(base))
    stats = requests.get(f"{proto.url}/.control/stats").json()
    assert stats["writes"] == 2 and stats["methods"]["GET"] == 1


# firebase_admin's listener thread raises when its registration is closed (one reason the
# manager has its own reader); that thread's exception is not what this test is about.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_firebase_admin_db_as_a_client(
    proto: RtdbProtocolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import firebase_admin
    from firebase_admin import db

    monkeypatch.setenv("FIREBASE_DATABASE_EMULATOR_HOST", f"{proto.host}:{proto.port}")
    app = firebase_admin.initialize_app(
        options={"databaseURL": "https://proto-admin.firebaseio.com"},
        name=f"admin-{uuid.uuid4().hex}",
    )
    try:
        ref = db.reference(f"admin-{uuid.uuid4().hex[:8]}", app=app)
        ref.set({"a": 1, "items": {"k2": {"n": 2}, "k1": {"n": 1}, "k3": {"n": 3}}})
        assert ref.child("a").get() == 1
        assert proto.requests("GET")[-1][1] == "proto-admin"  # namespace from the URL
        ref.update({"a": 2, "b/c": 3})
        assert ref.get()["b"] == {"c": 3}
        pushed = ref.child("log").push({"v": 1})
        assert ref.child(f"log/{pushed.key}/v").get() == 1
        items = ref.child("items")
        assert list(items.order_by_key().start_at("k2").get()) == ["k2", "k3"]
        assert list(items.order_by_child("n").limit_to_last(2).get()) == ["k2", "k3"]
        value, etag = ref.child("a").get(etag=True)
        assert value == 2
        assert ref.child("a").set_if_unchanged(etag, 10)[0] is True
        ok, current, _ = ref.child("a").set_if_unchanged(etag, 11)
        assert ok is False and current == 10
        assert ref.child("a").transaction(lambda v: v + 1) == 11
        seen: list[Any] = []
        got = threading.Event()

        def callback(event: Any) -> None:
            seen.append((event.event_type, event.path, event.data))
            if len(seen) == 2:
                got.set()

        registration = ref.child("live").listen(callback)
        ref.child("live/x").set(7)
        assert got.wait(5)
        registration.close()
        assert seen == [("put", "/", None), ("put", "/x", 7)]
        ref.delete()
        assert ref.get() is None
    finally:
        firebase_admin.delete_app(app)


# -- the real service's documented limits ---------------------------------------------------------


def test_a_write_over_256_mb_gets_the_services_error(proto: RtdbProtocolServer) -> None:
    import http.client

    conn = http.client.HTTPConnection(proto.host, proto.port, timeout=10)
    conn.putrequest("PATCH", "/big.json")
    conn.putheader("Content-Length", str(256 * 1024 * 1024 + 1))
    conn.endheaders()  # refused on the length alone, before any byte of the body
    response = conn.getresponse()
    assert response.status == 400
    error = "Data to write exceeds the maximum size that can be modified with a single request."
    assert json.loads(response.read()) == {"error": error}
    conn.close()


def test_a_string_over_10_mb_is_invalid_data_and_10_mb_is_fine(base: str) -> None:
    limit = 10 * 1024 * 1024
    fine = requests.put(url(base, "/s"), data=json.dumps("é" * (limit // 2)), timeout=30)
    assert fine.status_code == 200
    over = requests.put(url(base, "/s"), data=json.dumps("é" * (limit // 2) + "x"), timeout=30)
    assert over.status_code == 400
    assert over.json()["error"].startswith("Invalid data;")
    assert requests.get(url(base, "/s"), timeout=30).json() == "é" * (limit // 2)  # unchanged


def test_keys_over_768_bytes_and_paths_32_deep_are_invalid_data(base: str) -> None:
    long_key = "k" * 769
    assert requests.put(url(base, "/" + "k" * 768), data="1", timeout=5).status_code == 200
    assert requests.put(url(base, "/" + long_key), data="1", timeout=5).status_code == 400
    patch = requests.patch(url(base), data=json.dumps({"a": {long_key: 1}}), timeout=5)
    assert patch.status_code == 400
    depth = len(base.split("/")) - 3  # the node of this test is one level below the root
    nested: Any = 1
    for _ in range(31 - depth - 1):  # a leaf 31 levels deep: base, "ok", then "n"s
        nested = {"n": nested}
    assert requests.put(url(base, "/ok"), data=json.dumps(nested), timeout=5).status_code == 200
    too_deep = requests.put(url(base, "/no"), data=json.dumps({"n": nested}), timeout=5)
    assert too_deep.status_code == 400 and too_deep.json()["error"].startswith("Invalid data;")
