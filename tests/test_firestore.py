"""Firestore-specific behaviour, beyond the conformance suite, on the real emulator."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore
from google.cloud.firestore_v1.types import CommitRequest

from flask_durable_stream import (
    DurableStream,
    Event,
    EventTooLarge,
    FirestoreStreamManager,
    StorageUnavailable,
    StreamClosed,
    StreamManager,
    StreamWriter,
)
from flask_durable_stream._retry import Backoff
from flask_durable_stream.managers import firestore_reader
from flask_durable_stream.managers.firestore_reader import Listener
from tests.support.firestore_emulator import FirestoreEmulator

ROOT = Path(__file__).resolve().parents[1]
MakeManager = Callable[..., FirestoreStreamManager]


@pytest.fixture
def make(backend_firestore: Callable[..., StreamManager]) -> MakeManager:
    return backend_firestore  # type: ignore[return-value]


def new_id() -> str:
    return uuid.uuid4().hex


def store_events(manager: FirestoreStreamManager, sid: str, events: list[Event]) -> int:
    """The storage layer's append, as the writer calls it."""
    return manager.store.append(sid, events, manager.batch_bytes)


def batch_docs(manager: FirestoreStreamManager, sid: str) -> list[dict[str, Any]]:
    docs = manager.store.batches_ref(sid).order_by("last_seq").stream()
    return [{"id": d.id, **d.to_dict()} for d in docs]


class CommitSpy:
    """Counts commit RPCs (every Firestore write goes through one) and the documents they touch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Any) -> None:
        self.calls: list[list[str]] = []
        self.sizes: list[int] = []
        gapic = type(client._firestore_api)
        original = gapic.commit

        def commit(api: Any, request: Any = None, **kwargs: Any) -> Any:
            writes = request["writes"] if isinstance(request, dict) else request.writes
            self.calls.append([w.update.name or w.delete for w in writes])
            message = CommitRequest(request) if isinstance(request, dict) else request
            self.sizes.append(CommitRequest.pb(message).ByteSize())
            return original(api, request=request, **kwargs)

        monkeypatch.setattr(gapic, "commit", commit)

    def touching(self, suffix: str) -> int:
        return sum(1 for names in self.calls if any(n.endswith(suffix) for n in names))


def test_ten_mib_stream_completes_and_replays_byte_for_byte(make: MakeManager) -> None:
    """Genkit's manager keeps a stream in one document and loses everything past 1 MiB."""
    manager = make()
    sid = new_id()
    writer = manager.open(sid)
    live = manager.subscribe(sid)
    received: list[Event] = []
    reader = threading.Thread(target=lambda: received.extend(live), daemon=True)
    reader.start()
    payloads = [json.dumps({"i": i, "text": f"{i:06d}" + "x" * 1024}) for i in range(10_000)]
    for seq, payload in enumerate(payloads):
        writer.append([Event(seq, "chunk", payload)])
    writer.done({"chunks": 10_000})
    writer.close()
    reader.join(60)
    expected = [*payloads, '{"chunks":10000}']
    assert sum(map(len, payloads)) > 10 * 1024 * 1024
    assert [e.payload for e in manager.subscribe(sid)] == expected
    assert [e.payload for e in received] == expected
    docs = batch_docs(manager, sid)
    assert 20 <= len(docs) <= 200  # up to 512 KiB each: full ones plus lingered partial ones
    sizes = [sum(len(e["payload"]) for e in d["events"]) for d in docs]
    assert max(sizes) <= 512 * 1024  # half of Firestore's 1 MiB document limit


def test_writes_per_chunk_well_below_one_at_a_steady_rate(
    make: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = make(linger=0.2)
    spy = CommitSpy(monkeypatch, manager.client)
    sid = new_id()
    writer = manager.open(sid)
    for i in range(100):  # 200 chunks/s for half a second
        writer.write({"token": i})
        time.sleep(0.005)
    writer.done("end")
    writer.close()
    assert len(spy.calls) <= 25  # 0.25 writes per chunk at most; Genkit's manager does 1
    assert spy.touching(f"/{sid}") == 2  # metadata written at open and with the terminal event only
    assert [e.seq for e in manager.subscribe(sid)] == list(range(101))


def test_batch_documents_hold_contiguous_ranges_with_sortable_ids(make: MakeManager) -> None:
    manager = make(batch_bytes=400, linger=0)
    sid = new_id()
    writer = manager.open(sid)
    for i in range(30):
        writer.write("y" * 100 + str(i))
    writer.done(None)
    writer.close()
    docs = batch_docs(manager, sid)
    assert len(docs) > 5
    assert [d["id"] for d in docs] == sorted(d["id"] for d in docs)
    assert all(d["id"] == f"{d['first_seq']:012d}" for d in docs)
    assert [d["first_seq"] for d in docs[1:]] == [d["last_seq"] + 1 for d in docs[:-1]]
    assert all(
        [e["seq"] for e in d["events"]] == list(range(d["first_seq"], d["last_seq"] + 1))
        for d in docs
    )
    assert all("expiresAt" in d for d in docs)


def test_the_flow_name_is_a_field_of_the_stream_and_older_documents_have_none(
    make: MakeManager,
) -> None:
    manager = make()
    named, older = new_id(), new_id()
    manager.open(named, owner="alice", flow="story").done("end")
    manager.open(older).write("x")
    # A stream written before streams kept their flow: its document has no such field.
    manager.store.meta_ref(older).update({"flow": firestore.DELETE_FIELD})
    assert "flow" not in (manager.store.meta_ref(older).get().to_dict() or {})
    assert manager.store.meta_ref(named).get().to_dict()["flow"] == "story"
    info = make().info(named)  # another manager (process) on the same collection
    assert info is not None and info.flow == "story" and info.owner == "alice"
    older_info = manager.info(older)
    assert older_info is not None and older_info.flow is None
    listed = {i.stream_id: i.flow for i in manager.list_streams()}
    assert listed == {named: "story", older: None}


def test_subscribe_from_every_offset_across_batch_boundaries(make: MakeManager) -> None:
    manager = make(batch_bytes=300, linger=0)
    sid = new_id()
    writer = manager.open(sid)
    for i in range(12):
        writer.write("z" * 80 + str(i))
    boundaries = {d["first_seq"] for d in batch_docs(manager, sid)}
    assert len(boundaries) >= 3
    live = {after: manager.subscribe(sid, after=after) for after in range(-1, 12)}
    writer.done("end")
    writer.close()
    for after, events in live.items():
        assert [e.seq for e in events] == list(range(after + 1, 13)), after
        assert [e.seq for e in manager.subscribe(sid, after=after)] == list(range(after + 1, 13))


def test_live_subscriber_survives_listener_reanchoring(make: MakeManager) -> None:
    manager = make(batch_bytes=200, linger=0)
    sid = new_id()
    writer = manager.open(sid)
    live = manager.subscribe(sid)
    received: list[int] = []
    reader = threading.Thread(target=lambda: received.extend(e.seq for e in live), daemon=True)
    reader.start()
    for i in range(150):  # one batch document each: past two listener re-anchorings
        writer.write("w" * 150 + str(i))
    writer.done(None)
    writer.close()
    reader.join(30)
    assert received == list(range(151))


def _first_event_followed(make: MakeManager) -> tuple[str, StreamWriter, Iterator[Event]]:
    """A new stream, a subscriber of it, and its first chunk written and received (replayed,
    or heard): the subscriber then listens to the batches. The writer makes no heartbeats,
    so its lease is long: a slow first snapshot (the emulator, on a loaded machine, has
    taken 11 s) must not end it as lost."""
    manager = make(batch_bytes=200, linger=0, lease_seconds=120)
    sid = new_id()
    writer = manager.open(sid)
    live = iter(manager.subscribe(sid))
    writer.write("stored")
    assert next(live).seq == 0
    return sid, writer, live


def test_listeners_the_server_ends_are_replaced_and_the_subscriber_misses_nothing(
    make: MakeManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A listen stream that ends with CANCELLED (the emulator once reset one with
    RST_STREAM CANCEL): the client library closes its listener for good and raises the
    error on a thread of its own, which pytest reports as an unhandled thread exception."""
    listeners: list[Listener] = []

    class Recorded(Listener):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            listeners.append(self)

    monkeypatch.setattr(firestore_reader, "Listener", Recorded)
    sid, writer, live = _first_event_followed(make)
    writer.write("live")
    assert next(live).seq == 1
    assert len(listeners) == 2  # the metadata document's and the batches'
    ended = [listener._watch for listener in listeners]
    for watch in ended:
        watch._rpc.call.cancel()  # the RPC ends with CANCELLED, as on a server's reset
    deadline = time.monotonic() + 10
    while any(listener.reopened == 0 for listener in listeners) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [listener.reopened for listener in listeners] == [1, 1]
    assert all(watch._closed for watch in ended)
    for i in range(3):
        writer.write(f"after {i}")
    writer.done("end")
    writer.close()
    received: list[Event] = []
    reader = threading.Thread(target=lambda: received.extend(live), daemon=True)
    reader.start()
    reader.join(30)
    assert [(e.seq, e.payload) for e in received] == [
        (2, '"after 0"'),
        (3, '"after 1"'),
        (4, '"after 2"'),
        (5, '"end"'),
    ]
    ours = [r.getMessage() for r in caplog.records if r.name == "flask_durable_stream"]
    # Each ended listener is said once. On a loaded machine the metadata document's snapshot
    # can come before the batches' (the live event above): the reader then reads what its
    # listeners missed from storage and says that too; nothing else may be logged.
    healed = [m for m in ours if " missed stored events " in m and m.endswith("listening anew")]
    ours = [m for m in ours if m not in healed]
    assert [m.split(" (")[0] for m in ours] == ["A Firestore listener ended"] * 2


def test_a_subscriber_whose_listener_hears_nothing_reads_the_batches_from_storage(
    make: MakeManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a loaded machine the emulator has sent a new listener's first snapshot 11 s late,
    and once not within a minute (the subscriber's timeout). A quiet subscriber reads the
    stored batches itself."""
    monkeypatch.setattr(firestore_reader, "QUIET_READ", 0.2)
    deaf: list[int] = []
    listen = firestore_reader._listen

    def first_deaf(store: Any, stream_id: str, cursor: int, inbox: Any) -> Listener:
        if not deaf:  # the first batches' listener delivers nothing
            deaf.append(cursor)
            return Listener(store.batches_after(stream_id, cursor), lambda *args: None)
        return listen(store, stream_id, cursor, inbox)

    monkeypatch.setattr(firestore_reader, "_listen", first_deaf)
    sid, writer, live = _first_event_followed(make)  # seq 0 read past the deaf listener
    for i in range(3):
        writer.write(f"live {i}")
    received: list[Event] = []
    reader = threading.Thread(
        target=lambda: received.extend(next(live) for _ in range(3)), daemon=True
    )
    reader.start()
    reader.join(30)
    assert [(e.seq, e.payload) for e in received] == [
        (1, '"live 0"'),
        (2, '"live 1"'),
        (3, '"live 2"'),
    ]
    assert len(deaf) == 1
    # Once: the events past the deaf listener's cursor (0, when the replay came before the
    # first write's commit, else 1-3); the listener that replaces it hears the rest.
    ours = [r.getMessage() for r in caplog.records if r.name == "flask_durable_stream"]
    assert len(ours) == 1, ours
    assert ours[0].startswith(f"Firestore listeners of stream {sid} missed stored events ")
    writer.write("after")  # heard by the listener that replaced the deaf one
    assert next(live).payload == '"after"'
    writer.done("end")
    writer.close()
    assert [e.payload for e in live] == ['"end"']


def test_oversized_event_is_too_large_and_large_ones_fit(make: MakeManager) -> None:
    manager = make()
    sid = new_id()
    writer = manager.open(sid)
    chunk = "x" * (2 * 1024 * 1024 + 49)  # 2,097,201 bytes of JSON with its quotes
    with pytest.raises(EventTooLarge) as info:
        writer.write(chunk)
    assert info.value.status == "RESOURCE_EXHAUSTED"
    assert info.value.message == (
        "Chunk 0 is 2,097,203 bytes; the Firestore backend stores at most 1,046,528"
    )
    largest = "y" * (manager.max_event_bytes - 2)  # exactly the limit, quotes included
    writer.write(largest)
    writer.done("end")
    assert [e.payload for e in manager.subscribe(sid)] == [f'"{largest}"', '"end"']


def _fast(manager: FirestoreStreamManager, sid: str, chunks: int, size: int) -> list[Event]:
    """Append as a runner does when the flow outpaces storage: big batches, back to back."""
    writer = manager.open(sid)
    text = "z" * (size - 2)
    events = [Event(seq, "chunk", f'"{text}"') for seq in range(chunks)]
    events.append(Event(chunks, "done", '"fin"'))
    for start in range(0, len(events), 5000):
        writer.append(events[start : start + 5000])
    writer.close()
    return events


@pytest.mark.parametrize(("chunks", "size"), [(10_000, 1024), (100_000, 16)])
def test_fast_large_stream_commits_under_the_grpc_limit_and_replays(
    make: MakeManager, monkeypatch: pytest.MonkeyPatch, chunks: int, size: int
) -> None:
    manager = make()
    spy = CommitSpy(monkeypatch, manager.client)
    sid = new_id()
    events = _fast(manager, sid, chunks, size)
    assert list(manager.subscribe(sid)) == events
    assert len(spy.sizes) > 1  # the buffer could not go in one commit
    assert max(spy.sizes) < 4 * 1024 * 1024
    assert max(map(len, spy.calls)) <= 500


def test_a_retried_split_append_stores_each_event_once(make: MakeManager) -> None:
    manager = make()
    sid = new_id()
    manager.open(sid)
    events = [Event(seq, "chunk", '"' + "q" * 300 + '"') for seq in range(20_000)]
    half = events[:12_000]
    assert store_events(manager, sid, half) == 11_999  # several commits
    # A retry that resends everything, as after a failure whose success went unseen.
    assert store_events(manager, sid, events) == 19_999
    stored = [e for doc in batch_docs(manager, sid) for e in doc["events"]]
    assert [e["seq"] for e in stored] == list(range(20_000))


def test_storage_level_retry_is_idempotent_and_detects_conflicts(make: MakeManager) -> None:
    manager = make()
    sid = new_id()
    manager.open(sid)
    events = [Event(0, "chunk", '"a"'), Event(1, "chunk", '"b"')]
    assert store_events(manager, sid, events) == 1
    assert store_events(manager, sid, events + [Event(2, "chunk", '"c"')]) == 2  # landed + one more
    with pytest.raises(StreamClosed):  # someone else extended the stream first
        store_events(
            manager,
            sid,
            [Event(3, "chunk", '"mine"')]
            if store_events(manager, sid, [Event(3, "chunk", '"theirs"')]) == 3
            else [],
        )
    stored = [e.payload for e in manager.store.stored_events(sid, -1)]
    assert stored == ['"a"', '"b"', '"c"', '"theirs"']


def test_closing_a_subscription_stops_its_listeners(make: MakeManager) -> None:
    from google.api_core.bidi import _BIDIRECTIONAL_CONSUMER_NAME as CONSUMER

    def listener_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == CONSUMER and t.is_alive()}

    manager = make()
    sid = new_id()
    writer = manager.open(sid)
    writer.write(0)
    writer.close()  # flushed: the first event comes from the replay query
    before = listener_threads()
    subscriptions = [manager.subscribe(sid) for _ in range(3)]
    for sub in subscriptions:
        assert next(sub).seq == 0
    writer.write(1)
    for sub in subscriptions:
        assert next(sub).seq == 1  # from the batch listener
    ours = listener_threads() - before
    assert len(ours) == 6  # a batch listener and a metadata listener each
    for sub in subscriptions:
        sub.close()  # type: ignore[attr-defined]
    for thread in ours:
        thread.join(10)
    assert not [t for t in ours if t.is_alive()]
    writer.done(None)


def test_client_factory_is_called_lazily_once(firestore_emulator: Any) -> None:
    calls: list[int] = []

    def factory() -> Any:
        calls.append(1)
        return firestore_emulator.client()

    manager = FirestoreStreamManager(client=factory, collection=f"c-{new_id()}")
    assert calls == []
    sid = new_id()
    manager.open(sid).done("x")
    assert [e.payload for e in manager.subscribe(sid)] == ['"x"']
    assert calls == [1]
    manager.close()


def test_firebase_admin_app_is_accepted(
    firestore_emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import firebase_admin
    from firebase_admin import credentials
    from google.auth.credentials import AnonymousCredentials

    class Anonymous(credentials.Base):
        def get_credential(self) -> Any:
            return AnonymousCredentials()

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    app = firebase_admin.initialize_app(
        Anonymous(), {"projectId": firestore_emulator.project}, name=new_id()
    )
    try:
        manager = FirestoreStreamManager(firebase_app=app, collection=f"c-{new_id()}")
        sid = new_id()
        manager.open(sid).done({"via": "firebase_admin"})
        assert [e.payload for e in manager.subscribe(sid)] == ['{"via":"firebase_admin"}']
        manager.close()
    finally:
        firebase_admin.delete_app(app)


@pytest.fixture
def private_emulator(firestore_emulator: Any) -> Iterator[FirestoreEmulator]:
    # firestore_emulator: fails (or skips, when asked to) loudly without java or the JAR
    emulator = FirestoreEmulator().start()
    try:
        warm = emulator.client().collection("warm-up").document("jvm")
        warm.set({"ok": True})  # the first calls of a fresh JVM are slow: keep them out of tests
        warm.get()
        yield emulator
    finally:
        emulator.stop()


def test_emulator_paused_then_back_nothing_lost(private_emulator: FirestoreEmulator) -> None:
    """A timed-out commit raises StorageUnavailable; retrying the same events stores them once."""
    manager = FirestoreStreamManager(
        client=private_emulator.client(), collection="paused", rpc_timeout=1.0
    )
    sid = new_id()
    writer = manager.open(sid)
    for i in range(5):
        writer.write(i)
    assert private_emulator.process is not None
    os.killpg(private_emulator.process.pid, signal.SIGSTOP)
    try:
        terminal = [Event(5, "done", '"end"')]
        for _ in range(2):
            with pytest.raises(StorageUnavailable) as info:
                writer.append(terminal)
            assert info.value.status == "UNAVAILABLE"
            assert writer.next_seq == 5
    finally:
        os.killpg(private_emulator.process.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while True:  # what the runner does: retry the same events with backoff
        try:
            writer.append(terminal)
            break
        except StorageUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    writer.close()
    assert [(e.seq, e.payload) for e in manager.subscribe(sid)] == [
        (0, "0"),
        (1, "1"),
        (2, "2"),
        (3, "3"),
        (4, "4"),
        (5, '"end"'),
    ]
    manager.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_emulator_gone_is_storage_unavailable_at_the_edge(
    private_emulator: FirestoreEmulator,
) -> None:
    client = private_emulator.client()
    manager = FirestoreStreamManager(client=client, collection="gone", rpc_timeout=2.0)
    reading = FirestoreStreamManager(client=client, collection="gone", lease_seconds=0.5)
    sid = new_id()
    writer = manager.open(sid)
    writer.write("stored")
    writer.close()
    live = reading.subscribe(sid)
    assert next(live).seq == 0
    private_emulator.stop()
    with pytest.raises(StorageUnavailable):
        writer.done("lost")
    with pytest.raises(StorageUnavailable):
        next(live)  # the lease check has to ask storage, which is gone
    with pytest.raises(StorageUnavailable) as info:
        manager.open(new_id())
    assert str(private_emulator.port) not in info.value.message  # hosts stay in the log
    with pytest.raises(StorageUnavailable):
        manager.subscribe(sid)
    with pytest.raises(StorageUnavailable):
        manager.info(sid)
    with pytest.raises(StorageUnavailable):
        manager.gc()
    with pytest.raises(StorageUnavailable):
        writer.close()  # the unflushed terminal event is reported, not dropped
    live.close()
    reading.close()
    manager.close()


def test_a_listener_of_an_unreachable_emulator_backs_off_and_stops_when_closed(
    private_emulator: FirestoreEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The client library alone, once its listener is unsubscribed while Firestore is
    unreachable, re-opens the stream at once and forever, a new thread each time: over a
    thousand live threads within a second, until Firestore is back."""
    snapshots = threading.Event()
    doc = private_emulator.client().collection("unreachable").document("d")
    doc.set({"n": 1})
    before = threading.active_count()
    listener = Listener(doc, lambda docs, changes, read_time: snapshots.set())
    assert snapshots.wait(10), "the listener never delivered the first snapshot"
    private_emulator.stop()
    peak = 0

    def watch_threads(seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        nonlocal peak
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            peak = max(peak, threading.active_count())
            time.sleep(0.02)

    watch_threads(2)  # unreachable, still subscribed
    listener.unsubscribe()

    def consumer_gone() -> bool:
        return not any(t.name == "Thread-ConsumeBidirectionalStream" for t in threading.enumerate())

    watch_threads(5, until=consumer_gone)
    assert peak <= before + 10, f"{peak} threads while Firestore was unreachable ({before} before)"
    assert consumer_gone(), "the listener's consumer thread outlived unsubscribe() by 5 s"
    noisy = [r for r in caplog.records if r.name.startswith("google") and r.levelname == "ERROR"]
    assert not noisy, [r.getMessage() for r in noisy]


GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()

import json, os, sys
import gevent
from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore
from grpc._cython import cygrpc

from flask_durable_stream import FirestoreStreamManager

host, project = sys.argv[1:3]
os.environ["FIRESTORE_EMULATOR_HOST"] = host
manager = FirestoreStreamManager(
    client=lambda: firestore.Client(project=project, credentials=AnonymousCredentials()),
    collection="gevent",
)
writer = manager.open("s1")
ticks = [0]

def ticker():
    while True:
        ticks[0] += 1
        gevent.sleep(0.01)

def produce():
    for i in range(40):
        writer.write(i)
        gevent.sleep(0.01)
        if i % 10 == 0:
            writer.heartbeat()
    writer.done("end")
    writer.close()

def consume():
    return [e.seq for e in manager.subscribe("s1")]

tick = gevent.spawn(ticker)
readers = [gevent.spawn(consume) for _ in range(3)]
gevent.sleep(0.2)
producer = gevent.spawn(produce)
gevent.joinall(readers + [producer], timeout=60, raise_error=True)
late = consume()
tick.kill()
manager.close()
print(json.dumps({
    "readers": [r.value for r in readers],
    "late": late,
    "ticks": ticks[0],
    "grpc_gevent": bool(cygrpc.g_gevent_activated),
}))
"""


def test_gevent_patched_process_uses_the_manager_without_hanging(
    firestore_emulator: Any, tmp_path: Path
) -> None:
    """The script never calls grpc's init_gevent itself: the manager must."""
    script = tmp_path / "gevent_firestore.py"
    script.write_text(GEVENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), firestore_emulator.host, firestore_emulator.project],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["readers"] == [list(range(41))] * 3
    assert report["late"] == list(range(41))
    assert report["grpc_gevent"] is True
    assert report["ticks"] > 10  # other greenlets ran while Firestore calls were in flight


FORK_SCRIPT = r"""
import os, sys
from google.auth.credentials import AnonymousCredentials
from google.cloud import firestore
from flask_durable_stream import FirestoreStreamManager

host, project = sys.argv[1:3]
os.environ["FIRESTORE_EMULATOR_HOST"] = host
def make():
    return firestore.Client(project=project, credentials=AnonymousCredentials())
used = FirestoreStreamManager(client=make(), collection="fork")
used.info("x")  # gRPC channel created before the fork
unused = FirestoreStreamManager(client=make(), collection="fork")
factory = FirestoreStreamManager(client=make, collection="fork")
factory.info("x")
pid = os.fork()
if pid == 0:
    import traceback
    try:
        try:
            used.info("x")
            verdict = 3
        except RuntimeError as exc:
            ok = "client=<a function returning a Client>" in str(exc)
            verdict = 0 if ok and unused.info("x") is None and factory.info("x") is None else 4
    except BaseException:
        traceback.print_exc()  # the parent's stderr: the test shows it
        verdict = 5
    sys.stderr.flush()
    os._exit(verdict)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_client_used_before_fork_fails_fast_in_the_child(
    firestore_emulator: Any, tmp_path: Path
) -> None:
    script = tmp_path / "fork_firestore.py"
    script.write_text(FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), firestore_emulator.host, firestore_emulator.project],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The child's verdict: 3 the used client worked, 4 wrong message or a fresh client failed,
    # 5 an exception (its traceback is in stderr).
    assert result.stdout.strip().splitlines()[-1] == "0", result.stderr[-3000:]


class Refusing:
    """A document reference (and write batch) whose first ``refusals`` calls fail with ``error``."""

    def __init__(self, error: Exception, refusals: int = 1) -> None:
        self.error = error
        self.refusals = refusals
        self.calls = 0

    def _call(self, result: Any = None) -> Any:
        self.calls += 1
        if self.calls <= self.refusals:
            raise self.error
        return result

    def get(self, **kwargs: Any) -> str:
        return self._call("snapshot")

    def commit(self, **kwargs: Any) -> None:
        return self._call()


INHERITED = "Stream removed (sendmsg: Wrong file descriptor generation)"


@pytest.mark.parametrize(
    ("error", "refusals", "calls", "outcome"),
    [
        (gexc.ServiceUnavailable(INHERITED), 1, 2, "snapshot"),
        (gexc.ServiceUnavailable(INHERITED), 2, 2, StorageUnavailable),
        (gexc.ServiceUnavailable("Connection reset by peer"), 1, 1, StorageUnavailable),
        (gexc.DeadlineExceeded("Wrong file descriptor generation"), 1, 1, StorageUnavailable),
    ],
    ids=["inherited-once", "inherited-twice", "other-unavailable", "other-code"],
)
def test_a_request_refused_on_a_connection_from_before_fork_is_sent_once_more(
    error: Exception, refusals: int, calls: int, outcome: Any
) -> None:
    """A channel created after ``fork()`` can be handed the parent's connection; gRPC then
    refuses the first call before sending anything. The store sends it once more, and only then."""
    client = firestore.Client(project="demo-fork", credentials=AnonymousCredentials())
    store = FirestoreStreamManager(client=client, collection="fork").store
    ref = Refusing(error, refusals)
    write = Refusing(error, refusals)
    if outcome is StorageUnavailable:
        with pytest.raises(StorageUnavailable):
            store.get(ref, "read stream x")
        with pytest.raises(StorageUnavailable):
            store.commit(write, "append to stream x")
    else:
        assert store.get(ref, "read stream x") == outcome
        store.commit(write, "append to stream x")
    assert (ref.calls, write.calls) == (calls, calls)


def test_missing_google_cloud_firestore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("flask_durable_stream.managers.firestore"):
            monkeypatch.delitem(sys.modules, name)
    import google.cloud

    monkeypatch.delattr(google.cloud, "firestore", raising=False)
    monkeypatch.setitem(sys.modules, "google.cloud.firestore", None)
    with pytest.raises(ImportError) as info:
        importlib.import_module("flask_durable_stream.managers.firestore")
    assert "pip install flask_durable_stream[firestore]" in str(info.value)


def test_runner_stores_a_flow_in_firestore(make: MakeManager) -> None:
    from flask_durable_stream import FlowContext
    from flask_durable_stream.runner import Runner

    manager = make(heartbeat_interval=0.05)
    runner = Runner(manager, write_retry_timeout=5)

    def flow(data: Any, ctx: FlowContext) -> Any:
        for i in range(30):
            ctx.send_chunk({"n": i})
            time.sleep(0.01)
        return {"total": 30}

    try:
        run = runner.start("count", flow, None, live=True)
        live = [(e.seq, e.kind, e.payload) for b in run.batches(reader=run.live) for e in b]
        assert run.wait(20) is not None
        assert runner.tasks.join(20)
        stored = [(e.seq, e.kind, e.payload) for e in manager.subscribe(run.stream_id)]
        assert stored == live
        assert stored[-1] == (30, "done", '{"total":30}')
    finally:
        runner.shutdown(5)


def test_cancel_stored_by_another_process_reaches_the_flow(make: MakeManager) -> None:
    from flask_durable_stream import FlowContext
    from flask_durable_stream.runner import Runner

    manager = make(heartbeat_interval=0.05)
    elsewhere = make(collection=manager.collection)  # another worker's manager
    runner = Runner(manager, write_retry_timeout=5)

    def flow(data: Any, ctx: FlowContext) -> Any:
        ctx.send_chunk("started")
        ctx.wait_cancelled(20)
        ctx.raise_if_cancelled()
        return "not cancelled"

    try:
        run = runner.start("wait", flow, None)
        events = elsewhere.subscribe(run.stream_id)
        assert next(events).payload == '"started"'
        assert elsewhere.request_cancel(run.stream_id) is True
        terminal = next(events)
        assert terminal.kind == "error" and '"CANCELLED"' in terminal.payload
        assert runner.tasks.join(20)
    finally:
        runner.shutdown(5)


def test_firestore_down_at_startup_then_up_needs_no_restart(firestore_emulator: Any) -> None:
    # firestore_emulator: fails (or skips, when asked to) loudly without java or the JAR
    emulator = FirestoreEmulator()  # its port, before anything listens there
    manager = FirestoreStreamManager(client=emulator.client, collection="late", rpc_timeout=2.0)
    try:
        with pytest.raises(StorageUnavailable) as info:
            manager.open("s")
        assert str(emulator.port) not in info.value.message
        emulator.start()
        try:
            writer = None
            delays = Backoff(initial=0.2, maximum=2.0).delays()
            # gRPC reconnects with its own backoff, which grew while the emulator was down
            # and starting (1 s, x1.6 per attempt, at most 120 s): recovery comes within 120 s
            # of the emulator being up, however long its start took (54 s in one full run).
            deadline = time.monotonic() + 150
            while writer is None:  # as a client retries a 503: gRPC reconnects with backoff
                sid = new_id()  # a new stream each time, as a client's new POST: a timed-out
                try:  # create may have landed
                    writer = manager.open(sid)
                except StorageUnavailable:
                    assert time.monotonic() < deadline, "never recovered"
                    time.sleep(next(delays))
            writer.done("ok")
            assert [e.payload for e in manager.subscribe(sid)] == ['"ok"']
        finally:
            emulator.stop()
    finally:
        manager.close()


def test_without_credentials_or_project_construction_names_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        FirestoreStreamManager()
    app = Flask(__name__)
    app.config.update(DURABLE_STREAM_BACKEND="firestore", DURABLE_STREAM_FIRESTORE_PROJECT="p")
    with pytest.raises(ValueError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        DurableStream(app, flows={})
