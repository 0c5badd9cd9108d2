"""Streams in Cloud Firestore: one metadata document plus batch documents per stream.

Genkit's Firestore manager keeps a whole stream in one document's array: it
stops at Firestore's 1 MiB document limit, rewrites that document for every
chunk (Firestore sustains about one write per second per document) and sends
the whole array to every listener on every chunk. Here each stream is a
metadata document and a ``batches`` subcollection of documents holding
contiguous seq ranges (see :mod:`.firestore_io` for the layout). The producer
coalesces chunks for ``linger`` seconds per commit (:mod:`.firestore_writer`);
the metadata document is written at open, on heartbeats, on cancel and
together with the terminal event, in one atomic commit. Subscribers replay
stored batches and then listen for new ones (:mod:`.firestore_reader`).

gevent: once the process is monkey-patched, gRPC must be told
(``grpc.experimental.gevent.init_gevent()``) or every Firestore call hangs; the
manager does that itself before each use of the client. Under gunicorn with
``--preload``, pass ``client=`` a factory (or nothing) so each worker creates
its own client after the fork.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import protocol
from .._concurrency import TaskGroup
from ..exceptions import (
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
)
from .base import (
    PRODUCER_LOST,
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    check_pointer_key,
    common_options,
)
from .firestore_io import (
    BATCHES,
    COMMIT_DOCS,
    DOC_LIMIT,
    MAX_EVENT_BYTES,
    FieldFilter,
    at,
    batch_id,
    edge,
    ensure_grpc_gevent,
    events_of,
    firestore,
    seconds,
)
from .firestore_reader import follow
from .firestore_writer import FirestoreStreamWriter

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["FirestoreStreamManager", "FirestoreStreamWriter"]


def check_default_credentials(project: str | None) -> None:
    """Fail now, naming the settings, if ``firestore.Client()`` could never be created.

    ``firestore.Client()`` resolves credentials and the project when it is
    created (nothing is sent to Firestore), so the same lookup here costs nothing
    more and turns a 500 on every request into one clear startup error.
    """
    if os.environ.get("FIRESTORE_EMULATOR_HOST"):
        return  # the emulator needs neither credentials nor a real project
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        _, found = google.auth.default()
    except DefaultCredentialsError as exc:
        raise ValueError(
            "Firestore needs credentials: set GOOGLE_APPLICATION_CREDENTIALS (or run where "
            "Application Default Credentials exist), or FIRESTORE_EMULATOR_HOST for the emulator"
        ) from exc
    if not (project or found or os.environ.get("GOOGLE_CLOUD_PROJECT")):
        raise ValueError(
            "Firestore needs a project: set DURABLE_STREAM_FIRESTORE_PROJECT (project=) "
            "or GOOGLE_CLOUD_PROJECT"
        )


def _env_project() -> str | None:
    """The project Google's client libraries would pick from the environment."""
    return os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT")


class FirestoreStreamManager(StreamManager):
    """Durable streams in Firestore, shared by every worker and host of an app.

    ``client``: a ``google.cloud.firestore.Client``, or a zero-argument callable
    returning one (called lazily, once per process: the gunicorn ``--preload``
    recipe). ``firebase_app``: a ``firebase_admin`` App to take the client from.
    With neither, ``firestore.Client()`` is created on first use (honours
    ``FIRESTORE_EMULATOR_HOST``). ``linger``: seconds a chunk may wait to share
    a commit with the next ones. ``batch_bytes``: flush once this much is
    buffered (also the size of a batch document). ``rpc_timeout``: seconds per
    Firestore call before StorageUnavailable. ``max_stream_seconds``: longest a
    stream may run; batch documents carry ``expiresAt = written + ttl_seconds +
    max_stream_seconds`` for the TTL policy. ``project``: the Google Cloud
    project of the client created when neither ``client`` nor ``firebase_app``
    is given; credentials are checked here (the same lookup ``firestore.Client()``
    makes, with no request sent), so a deployment that can never work fails at
    startup with the setting to fix, not on every request.
    """

    max_event_bytes = MAX_EVENT_BYTES
    backend_name = "Firestore"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_FIRESTORE_PROJECT": None,
        "DURABLE_STREAM_FIRESTORE_COLLECTION": "durable-streams",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> FirestoreStreamManager:
        """``DURABLE_STREAM_FIRESTORE_PROJECT`` (or the environment's) and ``_COLLECTION``.

        The client is created lazily in each worker process (safe with gunicorn
        ``--preload``); the project and credentials are checked now.
        """
        project = config["DURABLE_STREAM_FIRESTORE_PROJECT"] or _env_project()
        if not project:
            raise ValueError(
                "DURABLE_STREAM_BACKEND='firestore' needs a Google Cloud project: set"
                " DURABLE_STREAM_FIRESTORE_PROJECT (or GOOGLE_CLOUD_PROJECT in the environment)"
            )
        return cls(
            project=project,
            collection=config["DURABLE_STREAM_FIRESTORE_COLLECTION"],
            **common_options(config),
        )

    def __init__(
        self,
        *,
        client: Any = None,
        firebase_app: Any = None,
        project: str | None = None,
        collection: str = "durable-streams",
        timeout: float = 60.0,
        ttl_seconds: float = 300.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
        linger: float = 0.25,
        batch_bytes: int = 512 * 1024,
        rpc_timeout: float = 10.0,
        max_stream_seconds: float = 24 * 3600.0,
    ) -> None:
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        if client is not None and firebase_app is not None:
            raise ValueError("pass either client or firebase_app, not both")
        if linger < 0 or not 0 < batch_bytes <= DOC_LIMIT // 2 or rpc_timeout <= 0:
            raise ValueError("linger >= 0, 0 < batch_bytes <= 512 KiB, rpc_timeout > 0")
        self.collection = collection
        self.linger = linger
        self.batch_bytes = batch_bytes
        self.rpc_timeout = rpc_timeout
        self.max_stream_seconds = max_stream_seconds
        self.project = project
        if client is None and firebase_app is None:
            check_default_credentials(project)
        self._source = client
        self._firebase_app = firebase_app
        self._client: Any = client if isinstance(client, firestore.Client) else None
        self._client_pid = os.getpid()
        self._client_lock = threading.Lock()
        self._tasks = TaskGroup()

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
            return firestore.Client(project=self.project)

    def _meta_ref(self, stream_id: str) -> Any:
        return self.client.collection(self.collection).document(stream_id)

    def _batches_ref(self, stream_id: str) -> Any:
        return self._meta_ref(stream_id).collection(BATCHES)

    def _expired(self, data: dict[str, Any], now: float | None = None) -> bool:
        expires = seconds(data.get("expiresAt"))
        return expires is not None and expires <= (self.now() if now is None else now)

    def _open_expiry(self, now: float) -> Any:
        # An open stream whose producer stops heartbeating is lost after the lease,
        # then kept for the TTL like any finished stream.
        return at(now + self.lease_seconds + self.ttl_seconds)

    # -- producer --------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> FirestoreStreamWriter:
        ref = self._meta_ref(stream_id)
        for _ in range(3):
            now = self.now()
            data = {
                "status": StreamStatus.OPEN.value,
                "last_seq": -1,
                "owner": owner,
                "flow": flow,
                "cancel_requested": False,
                "createdAt": at(now),
                "updatedAt": at(now),
                "heartbeatAt": at(now),
                "expiresAt": self._open_expiry(now),
            }
            try:
                with edge(f"open stream {stream_id}"):
                    ref.create(data, retry=None, timeout=self.rpc_timeout)
                return FirestoreStreamWriter(self, stream_id)
            except StreamExists:
                snap = self._get(ref, f"open stream {stream_id}")
                if snap.exists and not self._expired(snap.to_dict()):
                    raise StreamExists(f"stream {stream_id} already exists") from None
                if snap.exists:
                    self._purge(snap)  # an expired id is free again
        raise StreamExists(f"stream {stream_id} is being created concurrently")

    def _write_heartbeat(self, writer: FirestoreStreamWriter) -> bool | None:
        """Refresh the producer's heartbeat; the cancel flag, or None if the stream ended."""
        ref = self._meta_ref(writer.stream_id)
        for _ in range(5):
            snap = self._get(ref, f"heartbeat of stream {writer.stream_id}")
            data = snap.to_dict() if snap.exists else None
            if data is None or data.get("status") != StreamStatus.OPEN.value:
                return None
            now = self.now()
            update = {"heartbeatAt": at(now), "expiresAt": self._open_expiry(now)}
            if writer.stored_seq > int(data.get("last_seq", -1)):
                update["last_seq"] = writer.stored_seq
            try:
                with edge(f"heartbeat of stream {writer.stream_id}", conditional=True):
                    ref.update(
                        update,
                        option=self.client.write_option(last_update_time=snap.update_time),
                        retry=None,
                        timeout=self.rpc_timeout,
                    )
            except StreamClosed:
                continue  # changed meanwhile (a cancel, a lease check): read again
            writer._alive_at = now
            return bool(data.get("cancel_requested"))
        raise StreamError(
            f"heartbeat of stream {writer.stream_id}: too much contention", status="UNAVAILABLE"
        )

    # -- consumer --------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        data = self._live_meta(stream_id)
        return follow(self, stream_id, data, after, self.timeout if timeout is None else timeout)

    def _stored_events(self, stream_id: str, after: int) -> Iterator[Event]:
        query = (
            self._batches_ref(stream_id)
            .where(filter=FieldFilter("last_seq", ">", after))
            .order_by("last_seq")
        )
        with edge(f"read stream {stream_id}"):
            docs = list(query.stream(retry=None, timeout=self.rpc_timeout))
        expected = after + 1
        for doc in docs:
            for event in events_of(doc.to_dict()):
                if event.seq == expected:
                    yield event
                    expected += 1

    def _mark_lost(self, stream_id: str) -> None:
        """Store the PRODUCER_LOST error if the producer's lease really expired."""
        ref = self._meta_ref(stream_id)
        snap = self._get(ref, f"lease of stream {stream_id}")
        data = snap.to_dict() if snap.exists else None
        if data is None or data.get("status") != StreamStatus.OPEN.value:
            return
        newest = self._batches_ref(stream_id).order_by("last_seq", direction="DESCENDING").limit(1)
        with edge(f"lease of stream {stream_id}"):
            docs = list(newest.stream(retry=None, timeout=self.rpc_timeout))
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
            self._batches_ref(stream_id).document(batch_id(seq)),
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
            option=self.client.write_option(last_update_time=snap.update_time),
        )
        try:
            with edge(f"lease of stream {stream_id}", conditional=True):
                write.commit(retry=None, timeout=self.rpc_timeout)
        except (StreamExists, StreamClosed):
            pass  # the producer (or another subscriber) moved first: look again later

    # -- metadata --------------------------------------------------------------
    def _get(self, ref: Any, what: str) -> Any:
        with edge(what):
            return ref.get(retry=None, timeout=self.rpc_timeout)

    def _live_meta(self, stream_id: str) -> dict[str, Any]:
        snap = self._get(self._meta_ref(stream_id), f"read stream {stream_id}")
        data = snap.to_dict() if snap.exists else None
        if data is None or self._expired(data):
            raise StreamNotFound(f"stream {stream_id} not found")
        return dict(data)

    def _info(self, stream_id: str, data: dict[str, Any]) -> StreamInfo:
        status = StreamStatus(data.get("status", StreamStatus.OPEN.value))
        return StreamInfo(
            stream_id,
            status,
            seconds(data.get("createdAt")) or 0.0,
            seconds(data.get("updatedAt")) or 0.0,
            int(data.get("last_seq", -1)),
            data.get("owner"),
            bool(data.get("cancel_requested")),
            seconds(data.get("heartbeatAt")),
            seconds(data.get("expiresAt")),
            flow=data.get("flow"),
        )

    def info(self, stream_id: str) -> StreamInfo | None:
        try:
            return self._info(stream_id, self._live_meta(stream_id))
        except StreamNotFound:
            return None

    def request_cancel(self, stream_id: str) -> bool:
        ref = self._meta_ref(stream_id)
        for _ in range(5):
            snap = self._get(ref, f"cancel stream {stream_id}")
            data = snap.to_dict() if snap.exists else None
            if data is None or self._expired(data):
                raise StreamNotFound(f"stream {stream_id} not found")
            if data.get("status") != StreamStatus.OPEN.value:
                return False
            try:
                with edge(f"cancel stream {stream_id}", conditional=True):
                    ref.update(
                        {"cancel_requested": True, "updatedAt": at(self.now())},
                        option=self.client.write_option(last_update_time=snap.update_time),
                        retry=None,
                        timeout=self.rpc_timeout,
                    )
                return True
            except StreamClosed:
                continue
        raise StreamError(f"cancel stream {stream_id}: too much contention", status="UNAVAILABLE")

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        found: list[StreamInfo] = []
        query = (
            self.client.collection(self.collection)
            .order_by("createdAt", direction="DESCENDING")
            .limit(max(limit, 50))
        )
        last = None
        now = self.now()
        while len(found) < limit:
            page_query = query.start_after(last) if last is not None else query
            with edge("list streams"):
                page = list(page_query.stream(retry=None, timeout=self.rpc_timeout))
            for snap in page:
                data = snap.to_dict()
                if not self._expired(data, now):
                    found.append(self._info(snap.id, data))
            if len(page) < max(limit, 50):
                break
            last = page[-1]
        return found[:limit]

    # -- expiry ----------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        now = self.now() if now is None else now
        expired = (
            self.client.collection(self.collection)
            .where(filter=FieldFilter("expiresAt", "<=", at(now)))
            .limit(200)
        )
        removed = 0
        while True:
            with edge("gc"):
                page = list(expired.stream(retry=None, timeout=self.rpc_timeout))
            removed += sum(1 for snap in page if self._purge(snap))
            if len(page) < 200:
                return removed

    def _purge(self, meta: Any) -> bool:
        """Delete one stream's batches and metadata unless either changed since read."""
        ref = meta.reference
        with edge(f"gc of stream {ref.id}"):
            batches = list(
                ref.collection(BATCHES)
                .select(["last_seq"])
                .stream(retry=None, timeout=self.rpc_timeout)
            )
        refs = [(b.reference, b.update_time) for b in batches] + [(ref, meta.update_time)]
        for start in range(0, len(refs), COMMIT_DOCS):
            write = self.client.batch()
            for doc, updated in refs[start : start + COMMIT_DOCS]:
                write.delete(doc, option=self.client.write_option(last_update_time=updated))
            try:
                with edge(f"gc of stream {ref.id}", conditional=True):
                    write.commit(retry=None, timeout=self.rpc_timeout)
            except (StreamClosed, StreamNotFound):
                return False  # written (re-opened) or deleted meanwhile
        return True

    # -- pointers: one document each, in the collection ``<collection>-pointers`` -----
    def _pointer_ref(self, key: str) -> Any:
        return self.client.collection(f"{self.collection}-pointers").document(
            check_pointer_key(key)
        )

    def set_pointer(self, key: str, stream_id: str) -> None:
        ref = self._pointer_ref(key)
        with edge(f"set pointer {key}"):
            ref.set({"stream_id": stream_id}, retry=None, timeout=self.rpc_timeout)

    def get_pointer(self, key: str) -> str | None:
        snap = self._get(self._pointer_ref(key), f"read pointer {key}")
        data = snap.to_dict() if snap.exists else None
        return None if not data else data.get("stream_id")

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        ref = self._pointer_ref(key)
        for _ in range(5):
            snap = self._get(ref, f"read pointer {key}")
            data = snap.to_dict() if snap.exists else None
            if not data or data.get("stream_id") != stream_id:
                return False
            try:
                with edge(f"clear pointer {key}", conditional=True):
                    ref.delete(
                        option=self.client.write_option(last_update_time=snap.update_time),
                        retry=None,
                        timeout=self.rpc_timeout,
                    )
                return True
            except (StreamClosed, StreamNotFound):
                continue  # changed or removed meanwhile: look again
        raise StorageUnavailable(f"clear pointer {key}: too much contention")

    def close(self) -> None:
        self._tasks.join(self.linger + self.rpc_timeout)
