"""The one object that talks to Firestore for a stream manager: client, references, writes.

:class:`FirestoreStore` owns the per-process client, builds every document
reference of the layout (see :mod:`.firestore_io`), sends every request with
the manager's deadline and maps every error through :func:`.firestore_io.edge`.
The manager, the reader and the writer depend on it, never on each other's
internals; it depends on none of them. Commit splitting lives here too: how a
run of events becomes batch documents, and how a retried commit that did land
is reconciled with what is stored.

No request is retried by the client library (``retry=None``): the runner
retries a failed append with the same events (see docs/fault-model.md), and
:meth:`FirestoreStore.append` makes a few quick attempts of its own with the
package's one backoff helper (``flask_durable_stream._retry.Backoff``).
``google.api_core.retry`` would also sleep cooperatively under gevent, but it
retries inside one call, where an attempt's error is not yet mapped: an
ALREADY_EXISTS after a commit that landed unseen must end the attempts and be
reconciled, and one policy with jitter then covers every retry loop.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .. import protocol
from .._retry import Backoff
from ..exceptions import (
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
)
from .base import PRODUCER_LOST, Event, ProducerWatches, StreamStatus, status_after
from .firestore_io import (
    BATCHES,
    COMMIT_DOCS,
    COMMIT_WIRE_BYTES,
    FieldFilter,
    at,
    batch_id,
    commit_size,
    edge,
    ensure_grpc_gevent,
    events_of,
    firestore,
    request_bytes,
    seconds,
    sent_once_more_after_fork,
    split,
)

_T = TypeVar("_T")

#: Quick retries of a commit that failed transiently (the runner retries longer).
COMMIT_ATTEMPTS = 3
_QUICK = Backoff(initial=0.05, maximum=0.5)
#: Optimistic read-then-write updates (heartbeat, cancel) give up after this many conflicts.
CONTENTION_ATTEMPTS = 5


class FirestoreStore:
    """Client, references and requests of one manager's collection.

    ``source``: a ``firestore.Client``, a zero-argument callable returning one
    (called once per process), or None for ``firestore.Client(project=...)``
    (or the ``firebase_admin`` app's client). ``now``: the manager's storage
    clock, read for every timestamp written.
    """

    def __init__(
        self,
        *,
        source: Any,
        firebase_app: Any,
        project: str | None,
        collection: str,
        rpc_timeout: float,
        ttl_seconds: float,
        lease_seconds: float,
        producer_watches: ProducerWatches,
        max_stream_seconds: float,
        now: Callable[[], float],
    ) -> None:
        self.collection = collection
        self.rpc_timeout = rpc_timeout
        self.ttl_seconds = ttl_seconds
        self.lease_seconds = lease_seconds
        #: The manager's: what this process's readers saw of each producer, reader to reader.
        self.producer_watches = producer_watches
        self.max_stream_seconds = max_stream_seconds
        self.now = now
        self._project = project
        self._source = source
        self._firebase_app = firebase_app
        self._client: Any = source if isinstance(source, firestore.Client) else None
        self._client_pid = os.getpid()
        self._client_lock = threading.Lock()

    # -- the client ------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The Firestore client of this process, created on first use."""
        ensure_grpc_gevent()
        pid = os.getpid()
        if self._client is not None and self._client_pid == pid:
            return self._client
        with self._client_lock:
            if self._client is not None and self._client_pid != pid:
                if self._client is self._source and getattr(
                    self._client, "_firestore_api_internal", None
                ):
                    raise RuntimeError(
                        "This Firestore client was used before the process forked and cannot "
                        "be used in a worker. Pass client=<a function returning a Client> "
                        "(or create the manager inside each worker)."
                    )
                if self._client is not self._source:
                    self._client = None
            if self._client is None or self._client_pid != pid:
                self._client = self._make_client()
                self._client_pid = pid
            return self._client

    def _make_client(self) -> Any:
        if isinstance(self._source, firestore.Client):
            return self._source
        if callable(self._source):
            return self._source()
        if self._firebase_app is not None:
            from firebase_admin import firestore as admin_firestore

            return admin_firestore.client(self._firebase_app)
        with edge("create client"):
            return firestore.Client(project=self._project)

    # -- references ------------------------------------------------------------
    def streams_ref(self) -> Any:
        return self.client.collection(self.collection)

    def meta_ref(self, stream_id: str) -> Any:
        return self.streams_ref().document(stream_id)

    def batches_ref(self, stream_id: str) -> Any:
        return self.meta_ref(stream_id).collection(BATCHES)

    def batches_after(self, stream_id: str, seq: int) -> Any:
        """The query of a stream's batch documents holding events past ``seq``, in order."""
        return (
            self.batches_ref(stream_id)
            .where(filter=FieldFilter("last_seq", ">", seq))
            .order_by("last_seq")
        )

    def pointer_ref(self, key: str) -> Any:
        """Pointers: one document each, in the collection ``<collection>-pointers``."""
        return self.client.collection(f"{self.collection}-pointers").document(key)

    # -- requests, each with the deadline and the error mapping ----------------
    def request(self, what: str, call: Callable[[], _T], *, conditional: bool = False) -> _T:
        """``call()`` (one RPC, made with ``retry=None`` and the deadline): its errors mapped
        to ours by :func:`edge`, and sent once more if gRPC refused it on a connection from
        before a fork (:func:`sent_once_more_after_fork`)."""
        with edge(what, conditional=conditional):
            return sent_once_more_after_fork(call)

    def get(self, ref: Any, what: str) -> Any:
        return self.request(what, lambda: ref.get(retry=None, timeout=self.rpc_timeout))

    def data(self, ref: Any, what: str) -> tuple[Any, dict[str, Any] | None]:
        """The snapshot and its data (None when the document does not exist)."""
        snap = self.get(ref, what)
        return snap, (snap.to_dict() if snap.exists else None)

    def query(self, query: Any, what: str) -> list[Any]:
        return self.request(what, lambda: list(query.stream(retry=None, timeout=self.rpc_timeout)))

    def create(self, ref: Any, data: dict[str, Any], what: str) -> None:
        """Create ``ref``; :class:`StreamExists` if it exists."""
        self.request(what, lambda: ref.create(data, retry=None, timeout=self.rpc_timeout))

    def set(self, ref: Any, data: dict[str, Any], what: str) -> None:
        self.request(what, lambda: ref.set(data, retry=None, timeout=self.rpc_timeout))

    def unchanged(self, snap: Any) -> Any:
        """The precondition that a document is as ``snap`` read it."""
        return self.client.write_option(last_update_time=snap.update_time)

    def update_unchanged(self, ref: Any, update: dict[str, Any], snap: Any, what: str) -> None:
        """Update unless written since ``snap``; :class:`StreamClosed` if it was."""
        option = self.unchanged(snap)
        self.request(
            what,
            lambda: ref.update(update, option=option, retry=None, timeout=self.rpc_timeout),
            conditional=True,
        )

    def delete_unchanged(self, ref: Any, snap: Any, what: str) -> None:
        """Delete unless written since ``snap``; StreamClosed/StreamNotFound if it was."""
        option = self.unchanged(snap)
        self.request(
            what,
            lambda: ref.delete(option=option, retry=None, timeout=self.rpc_timeout),
            conditional=True,
        )

    def commit(self, write: Any, what: str, *, conditional: bool = False) -> None:
        self.request(
            what,
            lambda: write.commit(retry=None, timeout=self.rpc_timeout),
            conditional=conditional,
        )

    # -- stream metadata -------------------------------------------------------
    def expired(self, data: dict[str, Any], now: float | None = None) -> bool:
        expires = seconds(data.get("expiresAt"))
        return expires is not None and expires <= (self.now() if now is None else now)

    def open_expiry(self, now: float) -> Any:
        """An open stream whose producer stops beating is lost after the lease, then kept
        for the TTL like any finished stream."""
        return at(now + self.lease_seconds + self.ttl_seconds)

    def live_meta(self, stream_id: str) -> dict[str, Any]:
        _, data = self.data(self.meta_ref(stream_id), f"read stream {stream_id}")
        if data is None or self.expired(data):
            raise StreamNotFound(f"stream {stream_id} not found")
        return dict(data)

    def heartbeat(self, stream_id: str, stored_seq: int) -> tuple[bool, float] | None:
        """Refresh the producer's heartbeat: (the cancel flag, when), or None if it ended."""
        ref = self.meta_ref(stream_id)
        for _ in range(CONTENTION_ATTEMPTS):
            snap, data = self.data(ref, f"heartbeat of stream {stream_id}")
            if data is None or data.get("status") != StreamStatus.OPEN.value:
                return None
            now = self.now()
            update = {"heartbeatAt": at(now), "expiresAt": self.open_expiry(now)}
            if stored_seq > int(data.get("last_seq", -1)):
                update["last_seq"] = stored_seq
            try:
                self.update_unchanged(ref, update, snap, f"heartbeat of stream {stream_id}")
            except StreamClosed:
                continue  # changed meanwhile (a cancel, a lease check): read again
            return bool(data.get("cancel_requested")), now
        raise StreamError(
            f"heartbeat of stream {stream_id}: too much contention", status="UNAVAILABLE"
        )

    # -- events ----------------------------------------------------------------
    def stored_events(self, stream_id: str, after: int) -> Iterator[Event]:
        """The stored events past ``after``, contiguous from ``after + 1``."""
        docs = self.query(self.batches_after(stream_id, after), f"read stream {stream_id}")
        expected = after + 1
        for doc in docs:
            for event in events_of(doc.to_dict()):
                if event.seq == expected:
                    yield event
                    expected += 1

    def append(self, stream_id: str, events: list[Event], batch_bytes: int) -> int:
        """Commit contiguous events as new batch documents; return the last stored seq.

        Large buffers take several commits, each under gRPC's message limit and
        Firestore's write count. Document boundaries depend only on the events, and
        documents are *created*, so a retry after any failure (even of a commit
        that landed unseen) meets ALREADY_EXISTS and is reconciled by reading back.
        """
        stored = events[0].seq - 1 if events else -1
        docs = split(events, batch_bytes)
        while docs:
            count = commit_size(docs)
            while True:
                write = self._batch_write(stream_id, docs[:count])
                if count == 1 or request_bytes(write) <= COMMIT_WIRE_BYTES:
                    break
                count = max(1, count // 2)  # the estimate was short: never send an oversized one
            try:
                self._commit_quickly(write, f"append to stream {stream_id}")
                stored = docs[count - 1][0][-1].seq
                docs = docs[count:]
            except StreamExists:  # a retry of a commit that landed, or someone else wrote
                before, stored = stored, self._reconcile(stream_id, events)
                if stored <= before:  # what is in the way is not ours: the same commit would
                    raise StreamClosed(f"stream {stream_id} already ended") from None  # loop
                docs = split([e for e in events if e.seq > stored], batch_bytes)
            except StreamNotFound:
                raise StreamClosed(f"stream {stream_id} no longer exists") from None
        return stored

    def _batch_write(self, stream_id: str, docs: list[tuple[list[Event], int]]) -> Any:
        batches = self.batches_ref(stream_id)
        now = self.now()
        expires = at(now + self.ttl_seconds + self.max_stream_seconds)
        write = self.client.batch()
        for part, _ in docs:
            write.create(
                batches.document(batch_id(part[0].seq)),
                {
                    "first_seq": part[0].seq,
                    "last_seq": part[-1].seq,
                    "events": [{"seq": e.seq, "kind": e.kind, "payload": e.payload} for e in part],
                    "expiresAt": expires,
                },
            )
        last = docs[-1][0][-1]
        if last.terminal:
            write.update(
                self.meta_ref(stream_id),
                {
                    "status": status_after(last).value,
                    "last_seq": last.seq,
                    "updatedAt": at(now),
                    "heartbeatAt": at(now),
                    "expiresAt": at(now + self.ttl_seconds),
                },
            )
        return write

    def _commit_quickly(self, write: Any, what: str) -> None:
        """Commit, retrying a transient failure a few times: creates are idempotent
        (a retry of a commit that did land gets ALREADY_EXISTS and is reconciled)."""
        delays = _QUICK.delays()
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                self.commit(write, what)
                return
            except StorageUnavailable:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(next(delays))

    def _reconcile(self, stream_id: str, events: list[Event]) -> int:
        """How far ``events`` are already stored, identically; StreamClosed if they differ."""
        stored = events[0].seq - 1
        mine = {e.seq: e for e in events}
        for event in self.stored_events(stream_id, events[0].seq - 1):
            if event.seq not in mine:
                break
            if mine[event.seq] != event:
                raise StreamClosed(f"stream {stream_id} already ended")
            stored = event.seq
        if stored < events[0].seq:
            raise StreamClosed(f"stream {stream_id} already ended")
        return stored

    # -- ending and removing streams -------------------------------------------
    def mark_lost(self, stream_id: str) -> None:
        """Store the PRODUCER_LOST error if the producer's lease really expired."""
        ref = self.meta_ref(stream_id)
        snap, data = self.data(ref, f"lease of stream {stream_id}")
        if data is None or data.get("status") != StreamStatus.OPEN.value:
            return
        newest = self.batches_ref(stream_id).order_by("last_seq", direction="DESCENDING").limit(1)
        docs = self.query(newest, f"lease of stream {stream_id}")
        last_seq = docs[0].get("last_seq") if docs else -1
        alive_at = max(
            seconds(data.get("heartbeatAt")) or 0.0,
            docs[0].update_time.timestamp() if docs else 0.0,
        )
        now = self.now()
        if now - alive_at <= self.lease_seconds:
            return
        seq = last_seq + 1
        error = {"seq": seq, "kind": protocol.ERROR, "payload": protocol.encode(PRODUCER_LOST)}
        write = self.client.batch()
        write.create(
            self.batches_ref(stream_id).document(batch_id(seq)),
            {
                "first_seq": seq,
                "last_seq": seq,
                "events": [error],
                "expiresAt": at(now + self.ttl_seconds + self.max_stream_seconds),
            },
        )
        write.update(
            ref,
            {
                "status": StreamStatus.ERROR.value,
                "last_seq": seq,
                "updatedAt": at(now),
                "expiresAt": at(now + self.ttl_seconds),
            },
            option=self.unchanged(snap),
        )
        try:
            self.commit(write, f"lease of stream {stream_id}", conditional=True)
        except (StreamExists, StreamClosed):
            pass  # the producer (or another subscriber) moved first: look again later

    def purge(self, meta: Any) -> bool:
        """Delete one stream's batches and metadata unless either changed since read."""
        ref = meta.reference
        batches = self.query(ref.collection(BATCHES).select(["last_seq"]), f"gc of stream {ref.id}")
        refs = [(b.reference, b) for b in batches] + [(ref, meta)]
        for start in range(0, len(refs), COMMIT_DOCS):
            write = self.client.batch()
            for doc, snap in refs[start : start + COMMIT_DOCS]:
                write.delete(doc, option=self.unchanged(snap))
            try:
                self.commit(write, f"gc of stream {ref.id}", conditional=True)
            except (StreamClosed, StreamNotFound):
                return False  # written (re-opened) or deleted meanwhile
        return True
