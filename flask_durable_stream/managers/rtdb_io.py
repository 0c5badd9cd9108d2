"""The Realtime Database under one prefix: references, error mapping, every read and write.

:class:`RtdbStorage` is the one object that talks to the database. The
manager (:mod:`.rtdb`), the live reader (:mod:`.rtdb_follow`) and the writer
(:mod:`.rtdb_writer`) each call its public methods; it calls none of them, and
reads only the public settings of the manager it serves (``now()``,
``ttl_seconds``, ``lease_seconds``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
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
from .._concurrency import TaskGroup
from ..exceptions import StoragePermanentError, StorageUnavailable, StreamError, StreamNotFound
from .base import PRODUCER_LOST, Event, StreamManager, StreamStatus, status_after, valid_stream_id
from .rtdb_stream import Watch

log = logging.getLogger("flask_durable_stream.managers.rtdb")

INDEX = "_index"
POINTERS = "_pointers"
#: The service's documented limits ("Realtime Database limits"): a string value
#: holds at most 10 MB (UTF-8), and a write request carries at most 256 MB over
#: REST (16 MB from the SDKs). An event is one string; a batch of events is
#: split into PATCH requests of at most MAX_WRITE_BYTES, the SDKs' figure, which
#: keeps each one quick and far from the REST limit.
MAX_STRING_BYTES = 10 * 1024 * 1024
MAX_WRITE_BYTES = 16 * 1024 * 1024
OPEN = StreamStatus.OPEN.value
#: Conditional writes tried before contention counts as storage being unavailable.
CAS_ATTEMPTS = 25
T = TypeVar("T")
Meta = dict[str, Any]
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


def stream_id_of(key: str) -> str:
    """:func:`node_key`'s inverse (stream ids have no commas)."""
    return key.replace(",", ".")


def to_event(key: str, node: Any) -> Event | None:
    """The event stored at ``events/<key>``, or None while it is incomplete."""
    if not isinstance(node, dict) or not isinstance(node.get("payload"), str):
        return None
    kind = node.get("kind")
    if kind not in (protocol.CHUNK, protocol.DONE, protocol.ERROR):
        return None
    return Event(int(key[1:]), kind, node["payload"])


def event_node(event: Event) -> dict[str, str]:
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


def database_root(firebase_app: Any = None) -> Any:
    """The root reference of ``firebase_app``'s database (default: the default app's)."""
    return db.reference("/", app=firebase_app)


class RtdbStorage:
    """Everything under ``root`` (a ``db.Reference``), for the ``manager`` whose clock it reads."""

    def __init__(
        self, root: Any, manager: StreamManager, tasks: TaskGroup, *, read_timeout: float
    ) -> None:
        self.root = root
        self.manager = manager
        self.read_timeout = read_timeout
        self._tasks = tasks
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()

    def ref(self, path: str) -> Any:
        return self.root.child(path)

    def update(self, values: dict[str, Any]) -> None:
        """One multi-path PATCH under ``root``."""
        call(self.root.update, values)

    def expired(self, meta: Meta, now: float | None = None) -> bool:
        expires = meta.get("expiresAt")
        return expires is not None and expires <= (self.manager.now() if now is None else now)

    def meta(self, key: str) -> Meta | None:
        """The meta node, or None when missing or expired: the one existence check."""
        meta = call(self.ref(f"{key}/meta").get)
        return meta if isinstance(meta, dict) and not self.expired(meta) else None

    def page(self, key: str, start: int, limit: int) -> list[Event]:
        query = self.ref(f"{key}/events").order_by_key().start_at(event_key(start))
        found = call(query.limit_to_first(limit).get) or {}
        events = [to_event(k, v) for k, v in sorted(found.items())]
        return [e for e in events if e is not None]

    def last_seq(self, key: str) -> int:
        found = call(self.ref(f"{key}/events").order_by_key().limit_to_last(1).get) or {}
        return max((int(k[1:]) for k in found), default=-1)

    def write(self, key: str, events: Sequence[Event]) -> None:
        """Multi-path PATCHes of at most MAX_WRITE_BYTES, in order; the last one carries,
        for a terminal event, the status change. Event nodes have fixed paths, so a
        retry after a failure part-way rewrites the same values."""
        parts: list[dict[str, Any]] = []
        update: dict[str, Any] = {}
        size = 0
        for event in events:
            path = f"{key}/events/{event_key(event.seq)}"
            node = event_node(event)
            # Its share of the JSON body, exactly as the client encodes it.
            n = len(path) + len(json.dumps(node)) + 6
            if update and size + n > MAX_WRITE_BYTES:
                parts.append(update)
                update, size = {}, 0
            update[path] = node
            size += n
        last = events[-1]
        if last.terminal:
            now = self.manager.now()
            expires = now + self.manager.ttl_seconds
            update.update(
                {
                    f"{key}/meta/status": status_after(last).value,
                    f"{key}/meta/lastSeq": last.seq,
                    f"{key}/meta/updatedAt": now,
                    f"{key}/meta/expiresAt": expires,
                    f"{INDEX}/{key}/expiresAt": expires,
                }
            )
        parts.append(update)
        for part in parts:
            self.update(part)

    def cas(self, path: str, change: Callable[[Any], Any]) -> tuple[Any, bool]:
        """Conditionally rewrite the node at ``path`` (ETag ``if-match``).

        ``change(current)`` returns the new value, or None to leave it; returns
        the value now stored and whether this call wrote it.
        """
        ref = self.ref(path)
        value, etag = call(ref.get, etag=True)
        for _ in range(CAS_ATTEMPTS):
            new = change(value)
            if new is None:
                return value, False
            ok, value, etag = call(ref.set_if_unchanged, etag, new)
            if ok:
                return new, True
        raise StorageUnavailable(f"Realtime Database: too much contention on {path}")

    def open_expiry(self, now: float) -> float:
        """Index expiry of an open stream: past lease and TTL, with slack so that
        heartbeats need to refresh it only about every ``slack / 2`` seconds."""
        ttl = self.manager.ttl_seconds
        return now + self.manager.lease_seconds + ttl + min(60.0, ttl)

    # -- the producer lease ----------------------------------------------------------------
    def mark_lost(self, key: str) -> None:
        """Declare a silent producer lost, unless it (or anyone) wrote meanwhile."""
        manager = self.manager

        def lose(current: Meta | None) -> Meta | None:
            if not isinstance(current, dict) or current.get("status") != OPEN:
                return None
            now = manager.now()
            if now - current.get("heartbeatAt", 0) <= manager.lease_seconds:
                return None
            return {
                **current,
                "status": StreamStatus.ERROR.value,
                "lost": True,
                "lastSeq": self.last_seq(key) + 1,
                "updatedAt": now,
                "expiresAt": now + manager.ttl_seconds,
            }

        meta, changed = self.cas(f"{key}/meta", lose)
        if changed and meta is not None:
            self.write_lost_event(key, meta)

    def write_lost_event(self, key: str, meta: Meta) -> None:
        # Deterministic content: a reader that repairs a half-done marking writes the same bytes.
        event = Event(meta["lastSeq"], protocol.ERROR, protocol.encode(PRODUCER_LOST))
        self.update(
            {
                f"{key}/events/{event_key(event.seq)}": event_node(event),
                f"{INDEX}/{key}/expiresAt": meta["expiresAt"],
            }
        )

    # -- live reads: the REST streaming API ---------------------------------------------------
    def watch(
        self, path: str, query: Callable[[], dict[str, str]], inbox: queue.Queue[Any], source: str
    ) -> Watch:
        """Stream ``path`` into ``inbox`` as ``(source, event, data)`` until :meth:`unwatch`."""
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

    def unwatch(self, watch: Watch) -> None:
        watch.close()
        with self._lock:
            self._watches.discard(watch)

    def close_watches(self) -> None:
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.close()

    def _stream_url(self, path: str, query: dict[str, str]) -> str:
        client = self.root._client  # the app's configured URL, namespace and auth override
        params = {**client.params, **query}
        location = quote(f"{self.root.path}/{path}.json", safe="/,")
        return f"{client.base_url}{location}?{urlencode(params)}"

    def _stream_headers(self) -> dict[str, str]:
        credential = self.root._client.credential
        if not credential.valid:
            import google.auth.transport.requests

            credential.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {credential.token}"}
