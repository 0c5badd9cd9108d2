"""Streams in Cloud Firestore: one metadata document plus batch documents per stream.

Genkit's Firestore manager keeps a whole stream in one document's array: it
stops at Firestore's 1 MiB document limit, rewrites that document for every
chunk (Firestore sustains about one write per second per document) and sends
the whole array to every listener on every chunk. Here each stream is a
metadata document and a ``batches`` subcollection of documents holding
contiguous seq ranges (see :mod:`.firestore_io` for the layout). Every request
goes through one :class:`~.firestore_store.FirestoreStore` (client, references,
error mapping, commit splitting). The producer coalesces chunks for ``linger``
seconds per commit (:mod:`.firestore_writer`);
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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .._concurrency import TaskGroup
from ..exceptions import StorageUnavailable, StreamClosed, StreamError, StreamExists, StreamNotFound
from .base import (
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    check_pointer_key,
    common_options,
)
from .firestore_io import DOC_LIMIT, MAX_EVENT_BYTES, FieldFilter, at, seconds
from .firestore_reader import follow
from .firestore_store import CONTENTION_ATTEMPTS, FirestoreStore
from .firestore_writer import FirestoreStreamWriter, WriterOptions

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
        self._tasks = TaskGroup()
        #: Every request of this manager, its reader and its writers goes through it.
        self.store = FirestoreStore(
            source=client,
            firebase_app=firebase_app,
            project=project,
            collection=collection,
            rpc_timeout=rpc_timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            producer_watches=self.producer_watches,
            max_stream_seconds=max_stream_seconds,
            now=self.now,
        )

    @property
    def client(self) -> Any:
        """The Firestore client of this process, created on first use."""
        return self.store.client

    # -- producer --------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> FirestoreStreamWriter:
        store = self.store
        ref = store.meta_ref(stream_id)
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
                "expiresAt": store.open_expiry(now),
            }
            try:
                store.create(ref, data, f"open stream {stream_id}")
                return FirestoreStreamWriter(store, stream_id, self._writer_options())
            except StreamExists:
                snap = store.get(ref, f"open stream {stream_id}")
                if snap.exists and not store.expired(snap.to_dict()):
                    raise StreamExists(f"stream {stream_id} already exists") from None
                if snap.exists:
                    store.purge(snap)  # an expired id is free again
        raise StreamExists(f"stream {stream_id} is being created concurrently")

    def _writer_options(self) -> WriterOptions:
        return WriterOptions(
            tasks=self._tasks,
            linger=self.linger,
            batch_bytes=self.batch_bytes,
            rpc_timeout=self.rpc_timeout,
            lease_seconds=self.lease_seconds,
            max_event_bytes=self.max_event_bytes,
            backend=self.display_name,
        )

    # -- consumer --------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        data = self.store.live_meta(stream_id)
        return follow(
            self.store, stream_id, data, after, self.timeout if timeout is None else timeout
        )

    # -- metadata --------------------------------------------------------------
    @staticmethod
    def _info(stream_id: str, data: dict[str, Any]) -> StreamInfo:
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
            return self._info(stream_id, self.store.live_meta(stream_id))
        except StreamNotFound:
            return None

    def request_cancel(self, stream_id: str) -> bool:
        store = self.store
        ref = store.meta_ref(stream_id)
        what = f"cancel stream {stream_id}"
        for _ in range(CONTENTION_ATTEMPTS):
            snap, data = store.data(ref, what)
            if data is None or store.expired(data):
                raise StreamNotFound(f"stream {stream_id} not found")
            if data.get("status") != StreamStatus.OPEN.value:
                return False
            try:
                store.update_unchanged(
                    ref, {"cancel_requested": True, "updatedAt": at(self.now())}, snap, what
                )
                return True
            except StreamClosed:
                continue
        raise StreamError(f"{what}: too much contention", status="UNAVAILABLE")

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        found: list[StreamInfo] = []
        page_size = max(limit, 50)
        query = self.store.streams_ref().order_by("createdAt", direction="DESCENDING")
        query = query.limit(page_size)
        last = None
        now = self.now()
        while len(found) < limit:
            page_query = query.start_after(last) if last is not None else query
            page = self.store.query(page_query, "list streams")
            for snap in page:
                data = snap.to_dict()
                if not self.store.expired(data, now):
                    found.append(self._info(snap.id, data))
            if len(page) < page_size:
                break
            last = page[-1]
        return found[:limit]

    # -- expiry ----------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        now = self.now() if now is None else now
        expired = (
            self.store.streams_ref()
            .where(filter=FieldFilter("expiresAt", "<=", at(now)))
            .limit(200)
        )
        removed = 0
        while True:
            page = self.store.query(expired, "gc")
            removed += sum(1 for snap in page if self.store.purge(snap))
            if len(page) < 200:
                return removed

    # -- pointers --------------------------------------------------------------
    def set_pointer(self, key: str, stream_id: str) -> None:
        ref = self.store.pointer_ref(check_pointer_key(key))
        self.store.set(ref, {"stream_id": stream_id}, f"set pointer {key}")

    def get_pointer(self, key: str) -> str | None:
        ref = self.store.pointer_ref(check_pointer_key(key))
        _, data = self.store.data(ref, f"read pointer {key}")
        return None if not data else data.get("stream_id")

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        store = self.store
        ref = store.pointer_ref(check_pointer_key(key))
        for _ in range(CONTENTION_ATTEMPTS):
            snap, data = store.data(ref, f"read pointer {key}")
            if not data or data.get("stream_id") != stream_id:
                return False
            try:
                store.delete_unchanged(ref, snap, f"clear pointer {key}")
                return True
            except (StreamClosed, StreamNotFound):
                continue  # changed or removed meanwhile: look again
        raise StorageUnavailable(f"clear pointer {key}: too much contention")

    def close(self) -> None:
        self._tasks.join(self.linger + self.rpc_timeout)
