"""Firebase Realtime Database stream storage, on ``firebase_admin.db``.

Layout under ``{ref_prefix}`` (stream ids with ``.`` are stored with ``,``,
which RTDB keys allow and stream ids never contain)::

    {id}/meta    {status, createdAt, updatedAt, heartbeatAt, lastSeq, cancel, owner,
                  flow, expiresAt, lost}
    {id}/events/s0000000042  {kind, payload}     payload: the event's JSON text, byte for byte
    _index/{id}            {createdAt, expiresAt} what list_streams() and gc() query

Event keys are ``s`` + the zero-padded seq: ``$key`` order is seq order, and the
letter keeps them from being read as integer keys (sorted apart) or arrays.

Writes: one multi-path PATCH per batch of events, and a batch waits up to
``linger`` seconds after the previous write so that a producer that keeps
writing (the runner hands over everything that piled up) costs one write per
``linger``. Metadata is written on open, heartbeat, cancel and the terminal
event only; the terminal event and the status change go in the same PATCH.
``open``, heartbeats, cancel and the lease are conditional writes on the small
meta node (ETag ``if-match``). A producer only appends blindly within
``lease_seconds / 2`` of its last successful conditional write, while a reader
only declares it lost once its heartbeat is ``lease_seconds`` old and with a
conditional write, so neither clobbers the other (given clocks within
``lease_seconds / 2``). Reads: existence checks read the meta node only; a
subscriber pages through ``events`` with ``orderBy="$key"&startAt=...`` and then
follows live over the REST streaming API (:mod:`.rtdb_stream`), resuming from
its cursor after a dropped connection.

Modules, each depending only on those after it: this manager; the reader
(:mod:`.rtdb_follow`) and the writer (:mod:`.rtdb_writer`); the storage object
(:mod:`.rtdb_io`: references, error mapping, every read and write); the
streaming client (:mod:`.rtdb_stream`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .._concurrency import TaskGroup
from ..exceptions import InvalidRequest, StreamError, StreamExists, StreamNotFound
from .base import (
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
    check_pointer_key,
    common_options,
    required_setting,
    valid_stream_id,
)
from .common import Sweep, check_sweep_interval
from .rtdb_follow import follow
from .rtdb_io import (
    INDEX,
    MAX_STRING_BYTES,
    OPEN,
    POINTERS,
    Meta,
    RtdbStorage,
    call,
    database_root,
    firebase_app_for,
    node_key,
    stream_id_of,
)
from .rtdb_writer import RtdbWriter

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["RtdbStreamManager", "call", "firebase_app_for"]


class RtdbStreamManager(StreamManager):
    """Streams in a Firebase Realtime Database, shared by every process that uses it.

    ``reference``: the node under which ``ref_prefix`` lives (default: the root
    of ``firebase_app``'s database, or of the default app). ``linger``: how long
    a batch may wait for the previous write, the lever on write count.
    ``sweep_interval``: run :meth:`gc` in the background that often, from the
    first :meth:`open` of the process on (None: half the TTL, between 1 and 60
    seconds; 0: never, for an app that runs ``gc()`` from a scheduled job).
    """

    max_event_bytes = MAX_STRING_BYTES
    backend_name = "Realtime Database"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_RTDB_URL": None,
        "DURABLE_STREAM_RTDB_PREFIX": "durable-streams",
        "DURABLE_STREAM_RTDB_SWEEP_INTERVAL": None,
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> RtdbStreamManager:
        """``DURABLE_STREAM_RTDB_URL`` (required), ``DURABLE_STREAM_RTDB_PREFIX`` and
        ``DURABLE_STREAM_RTDB_SWEEP_INTERVAL`` (seconds; 0 turns the sweep off)."""
        url = required_setting(config, "DURABLE_STREAM_RTDB_URL", "rtdb")
        sweep = config["DURABLE_STREAM_RTDB_SWEEP_INTERVAL"]
        return cls(
            firebase_app=firebase_app_for(url),
            ref_prefix=config["DURABLE_STREAM_RTDB_PREFIX"],
            sweep_interval=None if sweep is None else float(sweep),
            **common_options(config),
        )

    def __init__(
        self,
        *,
        firebase_app: Any = None,
        reference: Any = None,
        ref_prefix: str = "durable-streams",
        timeout: float = 60.0,
        ttl_seconds: float = 300.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
        linger: float = 0.25,
        page_size: int = 1000,
        read_timeout: float = 75.0,
        sweep_interval: float | None = None,
    ) -> None:
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        base = reference if reference is not None else database_root(firebase_app)
        self.linger = linger
        self.page_size = page_size
        self._tasks = TaskGroup()
        self._stopping = threading.Event()
        #: The one object that reads and writes the database (see :mod:`.rtdb_io`).
        self.storage = RtdbStorage(
            base.child(ref_prefix), self, self._tasks, read_timeout=read_timeout
        )
        self.root = self.storage.root
        #: Seconds between two runs of :meth:`gc` in the background; 0: never.
        self.sweep_interval = check_sweep_interval(
            sweep_interval, max(1.0, min(60.0, ttl_seconds / 2))
        )
        self._sweep = Sweep(self._stopping, name="rtdb-sweep", transient=(StreamError,))

    # -- producer ------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        if not valid_stream_id(stream_id):
            raise InvalidRequest(f"invalid stream id {stream_id!r}")
        self._sweep.start(self._tasks.spawn, self.gc, self.sweep_interval)
        key = node_key(stream_id)
        started, now = time.monotonic(), self.now()
        meta = {
            "status": OPEN,
            "createdAt": now,
            "updatedAt": now,
            "heartbeatAt": now,
            "lastSeq": -1,
            "cancel": False,
            "owner": owner,
            "flow": flow,
        }

        def claim(current: Meta | None) -> Meta | None:
            if isinstance(current, dict) and not self.storage.expired(current, now):
                raise StreamExists(f"stream {stream_id} already exists")
            return {k: v for k, v in meta.items() if v is not None}

        self.storage.cas(f"{key}/meta", claim)
        # Events of an expired stream that had this id go; the index learns the new one,
        # with an expiry that the producer's heartbeats push forward (so that a stream
        # whose producer died with nobody reading is collected by gc).
        index_expires = self.storage.open_expiry(now)
        self.storage.update(
            {
                f"{key}/events": None,
                f"{INDEX}/{key}": {"createdAt": now, "expiresAt": index_expires},
            }
        )
        return RtdbWriter(
            self.storage,
            key,
            stream_id,
            confirmed=started,
            index_expires=index_expires,
            linger=self.linger,
        )

    # -- consumer ------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        key = node_key(stream_id)
        meta = self.storage.meta(key)
        if meta is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        timeout = self.timeout if timeout is None else timeout
        return follow(self.storage, key, meta, max(after + 1, 0), timeout, self.page_size)

    # -- metadata ------------------------------------------------------------
    def _info(self, key: str) -> StreamInfo | None:
        meta = self.storage.meta(key)
        if meta is None:
            return None
        last_seq = meta.get("lastSeq", -1)
        if meta.get("status") == OPEN:  # lastSeq is only refreshed by heartbeats
            last_seq = max(last_seq, self.storage.last_seq(key))
        return StreamInfo(
            stream_id_of(key),
            StreamStatus(meta.get("status", OPEN)),
            meta.get("createdAt", 0.0),
            meta.get("updatedAt", 0.0),
            last_seq,
            meta.get("owner"),
            bool(meta.get("cancel")),
            meta.get("heartbeatAt"),
            meta.get("expiresAt"),
            meta.get("flow"),
        )

    def info(self, stream_id: str) -> StreamInfo | None:
        try:
            return self._info(node_key(stream_id))
        except StreamNotFound:
            return None

    def request_cancel(self, stream_id: str) -> bool:
        key = node_key(stream_id)

        def flag(current: Meta | None) -> Meta | None:
            if not isinstance(current, dict) or self.storage.expired(current):
                raise StreamNotFound(f"stream {stream_id} not found")
            if current.get("status") != OPEN or current.get("cancel"):
                return None
            return {**current, "cancel": True, "updatedAt": self.now()}

        meta, _ = self.storage.cas(f"{key}/meta", flag)
        return isinstance(meta, dict) and meta.get("status") == OPEN

    # -- pointers: ``_pointers/<key>`` holds the stream id ("" once cleared) -----------
    def _pointer_path(self, key: str) -> str:
        return f"{POINTERS}/{check_pointer_key(key).replace('.', ',')}"

    def set_pointer(self, key: str, stream_id: str) -> None:
        call(self.storage.ref(self._pointer_path(key)).set, stream_id)

    def get_pointer(self, key: str) -> str | None:
        value = call(self.storage.ref(self._pointer_path(key)).get)
        return value if isinstance(value, str) and value else None

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        # firebase_admin has no conditional delete: an empty string is the conditional
        # "cleared" (a few bytes per key stay behind).
        _, cleared = self.storage.cas(
            self._pointer_path(key), lambda value: "" if value == stream_id else None
        )
        return cleared

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        query = self.storage.ref(INDEX).order_by_child("createdAt").limit_to_last(limit)
        entries = call(query.get) or {}
        keys = sorted(entries, key=lambda k: entries[k].get("createdAt", 0), reverse=True)
        return [info for info in map(self._info, keys) if info is not None]

    # -- expiry --------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        now = self.now() if now is None else now
        query = self.storage.ref(INDEX).order_by_child("expiresAt").start_at(0).end_at(now)
        expired = list(call(query.get) or {})
        for i in range(0, len(expired), 100):
            update: dict[str, Any] = {}
            for key in expired[i : i + 100]:
                update[key] = None
                update[f"{INDEX}/{key}"] = None
            self.storage.update(update)
        return len(expired)

    def close(self) -> None:
        self._stopping.set()
        self.storage.close_watches()
        self._tasks.join(5)
