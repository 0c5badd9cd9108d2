"""Firebase Realtime Database stream storage, on ``firebase_admin.db``.

Layout under ``{ref_prefix}`` (stream ids with ``.`` are stored with ``,``,
which RTDB keys allow and stream ids never contain)::

    {id}/meta    {status, createdAt, updatedAt, heartbeatAt, lastSeq, cancel, owner,
                  expiresAt, lost}
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
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import quote, urlencode

try:
    import firebase_admin
    from firebase_admin import db
    from firebase_admin import exceptions as fb_exceptions
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "RtdbStreamManager needs firebase-admin: pip install flask_durable_stream[rtdb]"
    ) from exc

from .. import protocol
from .._concurrency import TaskGroup, sleep
from ..exceptions import (
    InvalidRequest,
    StoragePermanentError,
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
    StreamTimeout,
)
from .base import (
    PRODUCER_LOST,
    Event,
    ProducerWatch,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
    check_event_sizes,
    check_pointer_key,
    common_options,
    status_after,
    valid_stream_id,
)
from .rtdb_stream import Mirror, Watch

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

INDEX = "_index"
#: The service's documented limits ("Realtime Database limits"): a string value
#: holds at most 10 MB (UTF-8), and a write request carries at most 256 MB over
#: REST (16 MB from the SDKs). An event is one string; a batch of events is
#: split into PATCH requests of at most MAX_WRITE_BYTES, the SDKs' figure, which
#: keeps each one quick and far from the REST limit.
MAX_STRING_BYTES = 10 * 1024 * 1024
MAX_WRITE_BYTES = 16 * 1024 * 1024
POINTERS = "_pointers"
OPEN = StreamStatus.OPEN.value
T = TypeVar("T")
_UNAVAILABLE = (
    fb_exceptions.UnavailableError,
    fb_exceptions.DeadlineExceededError,
    fb_exceptions.InternalError,
    fb_exceptions.UnknownError,
)


def event_key(seq: int) -> str:
    return f"s{seq:010d}"


def node_key(stream_id: str) -> str:
    if not valid_stream_id(stream_id):
        raise StreamNotFound(f"stream {stream_id} not found")
    return stream_id.replace(".", ",")


def to_event(key: str, node: Any) -> Event | None:
    """The event stored at ``events/<key>``, or None while it is incomplete."""
    if not isinstance(node, dict) or not isinstance(node.get("payload"), str):
        return None
    kind = node.get("kind")
    if kind not in (protocol.CHUNK, protocol.DONE, protocol.ERROR):
        return None
    return Event(int(key[1:]), kind, node["payload"])


def _node(event: Event) -> dict[str, str]:
    return {"kind": event.kind, "payload": event.payload}


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one firebase_admin call, mapping its errors to the fault model at the edge.

    Unreachable, 5xx, throttled: :class:`StorageUnavailable` (retried). A
    request the database refuses (400: invalid data, a write over its size
    limit): :class:`StoragePermanentError`. The service's text (which may name
    the database URL) goes to the log; clients see the status only.
    """
    try:
        return fn(*args, **kwargs)
    except fb_exceptions.FirebaseError as exc:
        code = getattr(getattr(exc, "http_response", None), "status_code", 0) or 0
        if isinstance(exc, _UNAVAILABLE) or code >= 500 or code == 429:
            log.warning("Realtime Database unavailable: %s", exc)
            raise StorageUnavailable(f"Realtime Database unavailable ({exc.code})") from exc
        log.error("Realtime Database refused a request: %s", exc)
        if isinstance(exc, fb_exceptions.PermissionDeniedError):
            raise StoragePermanentError(
                "Realtime Database denied access", status="PERMISSION_DENIED"
            ) from exc
        if isinstance(exc, fb_exceptions.UnauthenticatedError):
            raise StoragePermanentError(
                "Realtime Database rejected the credentials", status="UNAUTHENTICATED"
            ) from exc
        if code == 400 or isinstance(exc, fb_exceptions.InvalidArgumentError):
            raise StoragePermanentError(f"Realtime Database refused the data ({exc.code})") from exc
        raise StreamError(f"Realtime Database error ({exc.code})", status="INTERNAL") from exc
    except OSError as exc:
        log.warning("Realtime Database unreachable: %s", exc)
        raise StorageUnavailable("Realtime Database unreachable") from exc


def firebase_app_for(database_url: str) -> Any:
    """The firebase_admin App this package uses for ``database_url`` (created once per process).

    Credentials come from the environment as usual (Application Default
    Credentials; emulator credentials when FIREBASE_DATABASE_EMULATOR_HOST is set).
    """
    name = "flask-durable-stream:" + database_url
    try:
        return firebase_admin.get_app(name)
    except ValueError:
        return firebase_admin.initialize_app(options={"databaseURL": database_url}, name=name)


class RtdbStreamManager(StreamManager):
    """Streams in a Firebase Realtime Database, shared by every process that uses it.

    ``reference``: the node under which ``ref_prefix`` lives (default: the root
    of ``firebase_app``'s database, or of the default app). ``linger``: how long
    a batch may wait for the previous write, the lever on write count.
    ``sweep_interval``: run :meth:`gc` in the background that often (off by
    default: call ``gc()`` from a scheduled job).
    """

    max_event_bytes = MAX_STRING_BYTES
    backend_name = "Realtime Database"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_RTDB_URL": None,
        "DURABLE_STREAM_RTDB_PREFIX": "durable-streams",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> RtdbStreamManager:
        """``DURABLE_STREAM_RTDB_URL`` (required) and ``DURABLE_STREAM_RTDB_PREFIX``."""
        url = config["DURABLE_STREAM_RTDB_URL"]
        if not url:
            raise ValueError("DURABLE_STREAM_BACKEND='rtdb' needs DURABLE_STREAM_RTDB_URL")
        return cls(
            firebase_app=firebase_app_for(url),
            ref_prefix=config["DURABLE_STREAM_RTDB_PREFIX"],
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
        base = reference if reference is not None else db.reference("/", app=firebase_app)
        self.root = base.child(ref_prefix)
        self.linger = linger
        self.page_size = page_size
        self.read_timeout = read_timeout
        self._tasks = TaskGroup()
        self._stopping = threading.Event()
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        if sweep_interval:
            self._tasks.spawn(self._sweep, sweep_interval, name="rtdb-sweep")

    # -- helpers -------------------------------------------------------------
    def _ref(self, path: str) -> Any:
        return self.root.child(path)

    def _expired(self, meta: dict[str, Any], now: float | None = None) -> bool:
        expires = meta.get("expiresAt")
        return expires is not None and expires <= (self.now() if now is None else now)

    def _meta(self, key: str) -> dict[str, Any] | None:
        """The meta node, or None when missing or expired: the one existence check."""
        meta = call(self._ref(f"{key}/meta").get)
        return meta if isinstance(meta, dict) and not self._expired(meta) else None

    def _page(self, key: str, start: int, limit: int) -> list[Event]:
        query = self._ref(f"{key}/events").order_by_key().start_at(event_key(start))
        found = call(query.limit_to_first(limit).get) or {}
        events = [to_event(k, v) for k, v in sorted(found.items())]
        return [e for e in events if e is not None]

    def _last_seq(self, key: str) -> int:
        found = call(self._ref(f"{key}/events").order_by_key().limit_to_last(1).get) or {}
        return max((int(k[1:]) for k in found), default=-1)

    def _write(self, key: str, events: Sequence[Event]) -> None:
        """Multi-path PATCHes of at most MAX_WRITE_BYTES, in order; the last one carries,
        for a terminal event, the status change. Event nodes have fixed paths, so a
        retry after a failure part-way rewrites the same values."""
        parts: list[dict[str, Any]] = []
        update: dict[str, Any] = {}
        size = 0
        for event in events:
            path = f"{key}/events/{event_key(event.seq)}"
            node = _node(event)
            # Its share of the JSON body, exactly as the client encodes it.
            n = len(path) + len(json.dumps(node)) + 6
            if update and size + n > MAX_WRITE_BYTES:
                parts.append(update)
                update, size = {}, 0
            update[path] = node
            size += n
        last = events[-1]
        if last.terminal:
            now = self.now()
            update.update(
                {
                    f"{key}/meta/status": status_after(last).value,
                    f"{key}/meta/lastSeq": last.seq,
                    f"{key}/meta/updatedAt": now,
                    f"{key}/meta/expiresAt": now + self.ttl_seconds,
                    f"{INDEX}/{key}/expiresAt": now + self.ttl_seconds,
                }
            )
        parts.append(update)
        for part in parts:
            call(self.root.update, part)

    def _cas(
        self, key: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> tuple[dict[str, Any] | None, bool]:
        """Conditionally rewrite meta: ``change(current)`` returns the new value or None."""
        ref = self._ref(f"{key}/meta")
        value, etag = call(ref.get, etag=True)
        for _ in range(25):
            new = change(value)
            if new is None:
                return value, False
            ok, value, etag = call(ref.set_if_unchanged, etag, new)
            if ok:
                return new, True
        raise StorageUnavailable(f"stream {key}: too much contention on its metadata")

    # -- producer ------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        if not valid_stream_id(stream_id):
            raise InvalidRequest(f"invalid stream id {stream_id!r}")
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
        }

        def claim(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if isinstance(current, dict) and not self._expired(current, now):
                raise StreamExists(f"stream {stream_id} already exists")
            return {k: v for k, v in meta.items() if v is not None}

        self._cas(key, claim)
        # Events of an expired stream that had this id go; the index learns the new one,
        # with an expiry that the producer's heartbeats push forward (so that a stream
        # whose producer died with nobody reading is collected by gc).
        index_expires = self._open_expiry(now)
        call(
            self.root.update,
            {
                f"{key}/events": None,
                f"{INDEX}/{key}": {"createdAt": now, "expiresAt": index_expires},
            },
        )
        return _RtdbWriter(self, key, stream_id, started, index_expires)

    def _open_expiry(self, now: float) -> float:
        """Index expiry of an open stream: past lease and TTL, with slack so that
        heartbeats need to refresh it only about every ``slack / 2`` seconds."""
        return now + self.lease_seconds + self.ttl_seconds + min(60.0, self.ttl_seconds)

    # -- consumer ------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        key = node_key(stream_id)
        meta = self._meta(key)
        if meta is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        timeout = self.timeout if timeout is None else timeout
        return self._follow(key, meta, max(after + 1, 0), timeout)

    def _follow(
        self, key: str, meta: dict[str, Any], cursor: int, timeout: float
    ) -> Iterator[list[Event]]:
        while True:  # replay what is stored, a page at a time
            page = self._page(key, cursor, self.page_size)
            batch = [e for i, e in enumerate(page) if e.seq == cursor + i]
            if batch:
                yield batch
                if batch[-1].terminal:
                    return
                cursor = batch[-1].seq + 1
            if len(page) < self.page_size or len(batch) < len(page):
                break
        if meta.get("status") != OPEN and meta.get("lastSeq", -1) < cursor:
            return  # the caller already has the terminal event
        yield from _Follower(self, key, meta, cursor, timeout).run()

    def _stream_url(self, path: str, query: dict[str, str] | None = None) -> str:
        client = self.root._client  # the app's configured URL, namespace and auth override
        params = {**client.params, **(query or {})}
        location = quote(f"{self.root.path}/{path}.json", safe="/,")
        return f"{client.base_url}{location}?{urlencode(params)}"

    def _stream_headers(self) -> dict[str, str]:
        credential = self.root._client.credential
        if not credential.valid:
            import google.auth.transport.requests

            credential.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {credential.token}"}

    def _watch(
        self, path: str, query: Callable[[], dict[str, str]], inbox: queue.Queue[Any], source: str
    ) -> Watch:
        watch = Watch(
            self._tasks,
            lambda: self._stream_url(path, query()),
            self._stream_headers,
            lambda event, data: inbox.put((source, event, data)),
            read_timeout=self.read_timeout,
            name=f"rtdb-watch:{source}",
        )
        with self._lock:
            self._watches.add(watch)
        return watch

    def _unwatch(self, watch: Watch) -> None:
        watch.close()
        with self._lock:
            self._watches.discard(watch)

    def _mark_lost(self, key: str) -> None:
        """Declare a silent producer lost, unless it (or anyone) wrote meanwhile."""

        def lose(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if not isinstance(current, dict) or current.get("status") != OPEN:
                return None
            if self.now() - current.get("heartbeatAt", 0) <= self.lease_seconds:
                return None
            now = self.now()
            return {
                **current,
                "status": StreamStatus.ERROR.value,
                "lost": True,
                "lastSeq": self._last_seq(key) + 1,
                "updatedAt": now,
                "expiresAt": now + self.ttl_seconds,
            }

        meta, changed = self._cas(key, lose)
        if changed and meta is not None:
            self._write_lost_event(key, meta)

    def _write_lost_event(self, key: str, meta: dict[str, Any]) -> None:
        # Deterministic content: a reader that repairs a half-done marking writes the same bytes.
        event = Event(meta["lastSeq"], protocol.ERROR, protocol.encode(PRODUCER_LOST))
        call(
            self.root.update,
            {
                f"{key}/events/{event_key(event.seq)}": _node(event),
                f"{INDEX}/{key}/expiresAt": meta["expiresAt"],
            },
        )

    # -- metadata ------------------------------------------------------------
    def _info(self, key: str) -> StreamInfo | None:
        meta = self._meta(key)
        if meta is None:
            return None
        last_seq = meta.get("lastSeq", -1)
        if meta.get("status") == OPEN:  # lastSeq is only refreshed by heartbeats
            last_seq = max(last_seq, self._last_seq(key))
        return StreamInfo(
            key.replace(",", "."),
            StreamStatus(meta.get("status", OPEN)),
            meta.get("createdAt", 0.0),
            meta.get("updatedAt", 0.0),
            last_seq,
            meta.get("owner"),
            bool(meta.get("cancel")),
            meta.get("heartbeatAt"),
            meta.get("expiresAt"),
        )

    def info(self, stream_id: str) -> StreamInfo | None:
        try:
            return self._info(node_key(stream_id))
        except StreamNotFound:
            return None

    def request_cancel(self, stream_id: str) -> bool:
        key = node_key(stream_id)

        def flag(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if not isinstance(current, dict) or self._expired(current):
                raise StreamNotFound(f"stream {stream_id} not found")
            if current.get("status") != OPEN or current.get("cancel"):
                return None
            return {**current, "cancel": True, "updatedAt": self.now()}

        meta, _ = self._cas(key, flag)
        return meta is not None and meta.get("status") == OPEN

    # -- pointers: ``_pointers/<key>`` holds the stream id ("" once cleared) -----------
    def _pointer_ref(self, key: str) -> Any:
        return self._ref(f"{POINTERS}/{check_pointer_key(key).replace('.', ',')}")

    def set_pointer(self, key: str, stream_id: str) -> None:
        call(self._pointer_ref(key).set, stream_id)

    def get_pointer(self, key: str) -> str | None:
        value = call(self._pointer_ref(key).get)
        return value if isinstance(value, str) and value else None

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        # firebase_admin has no conditional delete: an empty string is the conditional
        # "cleared" (a few bytes per key stay behind).
        ref = self._pointer_ref(key)
        value, etag = call(ref.get, etag=True)
        for _ in range(25):
            if value != stream_id:
                return False
            ok, value, etag = call(ref.set_if_unchanged, etag, "")
            if ok:
                return True
        raise StorageUnavailable(f"pointer {key}: too much contention")

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        query = self._ref(INDEX).order_by_child("createdAt").limit_to_last(limit)
        entries = call(query.get) or {}
        keys = sorted(entries, key=lambda k: entries[k].get("createdAt", 0), reverse=True)
        return [info for info in map(self._info, keys) if info is not None]

    # -- expiry --------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        now = self.now() if now is None else now
        query = self._ref(INDEX).order_by_child("expiresAt").start_at(0).end_at(now)
        expired = list(call(query.get) or {})
        for i in range(0, len(expired), 100):
            update: dict[str, Any] = {}
            for key in expired[i : i + 100]:
                update[key] = None
                update[f"{INDEX}/{key}"] = None
            call(self.root.update, update)
        return len(expired)

    def _sweep(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            try:
                self.gc()
            except StreamError:
                pass  # storage down: try again next time

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.close()
        self._tasks.join(5)


class _Follower:
    """The live part of one subscription: two watched locations, one cursor."""

    def __init__(
        self,
        manager: RtdbStreamManager,
        key: str,
        meta: dict[str, Any],
        cursor: int,
        timeout: float,
    ) -> None:
        self.m = manager
        self.key = key
        self.meta = meta
        self.cursor = cursor
        self.timeout = timeout
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.events = Mirror()
        self.pending: dict[int, Event] = {}
        self.watch = ProducerWatch(manager.lease_seconds)

    def run(self) -> Iterator[list[Event]]:
        m, lease = self.m, self.m.lease_seconds
        watches = [
            m._watch(
                f"{self.key}/events",
                lambda: {"orderBy": '"$key"', "startAt": json.dumps(event_key(self.cursor))},
                self.inbox,
                "events",
            ),
            m._watch(f"{self.key}/meta", dict, self.inbox, "meta"),
        ]
        meta_mirror = Mirror()
        meta_mirror.value = self.meta
        beat = self.meta.get("heartbeatAt")
        last_activity = time.monotonic()
        down_since: float | None = None
        next_check = 0.0
        try:
            while True:
                remaining = self.timeout - (time.monotonic() - last_activity)
                if remaining <= 0:
                    if down_since is not None:
                        raise StorageUnavailable("Realtime Database stream unavailable.")
                    raise StreamTimeout("Stream timed out.")
                try:
                    items = [self.inbox.get(timeout=min(remaining, max(0.05, lease / 4)))]
                except queue.Empty:
                    items = []
                while not self.inbox.empty():
                    items.append(self.inbox.get_nowait())
                for source, event, data in items:
                    if event == "disconnected":
                        down_since = down_since or time.monotonic()
                        self.watch.storage_failed()  # the producer may be cut off too
                    elif event == "denied":
                        raise StreamError(str(data), status="PERMISSION_DENIED")
                    elif event == "closed":
                        raise StorageUnavailable("The stream manager was closed.")
                    elif event in ("put", "patch"):
                        down_since = None
                        if source == "events":
                            self._take(self.events.apply(event, data))
                        else:
                            meta_mirror.apply(event, data)
                            if not isinstance(meta_mirror.value, dict):
                                raise StreamNotFound(f"stream {self.key} was deleted")
                            self.meta = meta_mirror.value
                            if self.meta.get("heartbeatAt") != beat:
                                beat = self.meta.get("heartbeatAt")
                                last_activity = time.monotonic()
                batch: list[Event] = []
                while self.cursor in self.pending:
                    event_ = self.pending.pop(self.cursor)
                    batch.append(event_)
                    self.cursor += 1
                    if event_.terminal:
                        break
                if batch:
                    last_activity = time.monotonic()
                    yield batch
                    if batch[-1].terminal:
                        return
                meta = self.meta
                if meta.get("status") != OPEN and meta.get("lastSeq", -1) < self.cursor:
                    return
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + max(0.05, lease / 4)
                    self._check_lease(meta, time.monotonic() - last_activity)
        finally:
            for watch in watches:
                self.m._unwatch(watch)

    def _take(self, touched: set[str] | None) -> None:
        tree = self.events.value if isinstance(self.events.value, dict) else {}
        for k in list(tree) if touched is None else touched:
            event = to_event(k, tree.get(k))
            if event is not None:
                self.events.pop(k)
                if event.seq >= self.cursor:
                    self.pending[event.seq] = event

    def _check_lease(self, meta: dict[str, Any], idle: float) -> None:
        m = self.m
        try:
            if meta.get("status") == OPEN:
                if self.watch.observe(meta.get("heartbeatAt", 0), m.now()) <= 0:
                    m._mark_lost(self.key)
            elif meta.get("lost") and meta.get("lastSeq") == self.cursor:
                if idle > m.lease_seconds / 2:  # the marker stopped half-way: finish its work
                    m._write_lost_event(self.key, meta)
        except StorageUnavailable:
            self.watch.storage_failed()  # the inactivity timeout decides


class _RtdbWriter(StreamWriter):
    def __init__(
        self,
        manager: RtdbStreamManager,
        key: str,
        stream_id: str,
        confirmed: float,
        index_expires: float,
    ) -> None:
        super().__init__(stream_id)
        self._m = manager
        self._key = key
        self._index_expires = index_expires
        # monotonic start of the last conditional write that found the stream open
        self._confirmed = confirmed
        self._last_write = 0.0

    def store(self, events: Sequence[Event]) -> None:
        m = self._m
        check_event_sizes(events, m.max_event_bytes, m.display_name)
        if not events[-1].terminal and m.linger > 0:
            wait = self._last_write + m.linger - time.monotonic()
            if wait > 0:
                sleep(wait)
        if time.monotonic() - self._confirmed > m.lease_seconds / 2:
            meta = self._confirm()
            if not isinstance(meta, dict) or meta.get("status") != OPEN:
                if self._stored(events):
                    return  # a retry of events that did reach storage
                raise StreamClosed(f"stream {self.stream_id} already ended")
        self._last_write = time.monotonic()
        m._write(self._key, events)

    def _stored(self, events: Sequence[Event]) -> bool:
        found = self._m._page(self._key, events[0].seq, len(events))
        return found == list(events)

    def _confirm(self) -> dict[str, Any] | None:
        """Refresh the heartbeat with a conditional write; return the meta it saw or wrote."""
        started = time.monotonic()

        def beat(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if not isinstance(current, dict) or current.get("status") != OPEN:
                return None
            now = self._m.now()
            last = max(current.get("lastSeq", -1), self.next_seq - 1)
            return {**current, "heartbeatAt": now, "updatedAt": now, "lastSeq": last}

        meta, changed = self._m._cas(self._key, beat)
        if changed:
            self._confirmed = started
        return meta

    def heartbeat(self) -> bool:
        meta = self._confirm()
        if not isinstance(meta, dict) or meta.get("status") != OPEN:
            return True  # ended elsewhere (lease): the flow should stop
        m, now = self._m, self._m.now()
        slack = min(60.0, m.ttl_seconds)
        if self._index_expires - now < m.lease_seconds + m.ttl_seconds + slack / 2:
            self._index_expires = m._open_expiry(now)
            call(m._ref(f"{INDEX}/{self._key}/expiresAt").set, self._index_expires)
        return bool(meta.get("cancel"))
