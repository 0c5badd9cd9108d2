"""Streams in Redis: a Redis Stream of events and a hash of metadata per stream.

Layout, under ``prefix`` (the ``{id}`` hash tag keeps one stream's keys in one
Redis Cluster slot):

* ``<prefix>:{<id>}:meta``: hash (token, status, owner, created/updated/heartbeat
  times, expires_at, cancel flag, last_seq);
* ``<prefix>:{<id>}:events``: a Redis Stream whose entry ids are ``0-<seq + 1>``,
  fields ``k`` (kind) and ``p`` (payload);
* ``<prefix>:index``: sorted set of stream ids by creation time, for
  ``list_streams`` and ``gc``.

Every write is one Lua script, so its checks (token, status, contiguous seq, a
retried batch identical to what is stored) and its effects are atomic. A
finished stream's keys get a Redis TTL, so Redis itself deletes them; ``gc()``
tidies the index and ends abandoned open streams. Subscribers read stored events
with ``XRANGE``, then wait in a blocking ``XREAD`` that returns the new entries
themselves; when nothing came for a second they check the producer's heartbeat
and the lease. The waiting is shared: one reader task per process blocks on
every watched stream and hands the entries to the followers
(:mod:`.redis_reader`), so followers hold no connection while they wait.

Connection budget, per process: one connection for the shared reader, plus
one per Redis command in flight (each taken from the pool for that command
only). Built from a URL, the pool is a ``BlockingConnectionPool`` of
``max_connections`` (50): a burst past it waits up to ``pool_timeout`` seconds
for a free connection instead of failing, and only then raises
:class:`StorageUnavailable`, which the runner retries. Plan
``workers x max_connections`` below Redis's ``maxclients`` (10,000 by default).
See ``docs/redis.md`` and ``docs/backend-limits.md``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .. import protocol
from ..exceptions import (
    StoragePermanentError,
    StorageUnavailable,
    StreamClosed,
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
    payload_bytes,
    status_after,
)
from .redis_reader import PAGE as _PAGE
from .redis_reader import SharedReader, poke_key
from .redis_scripts import _APPEND, _CANCEL, _CLEAR_POINTER, _HEARTBEAT, _MARK_LOST, _OPEN

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

_APPEND_PAGE = 1000  # events per append script
#: Payload bytes per append script: a script blocks Redis while it runs, and its
#: arguments are one request in Redis's query buffer (1 GiB at most by default).
_APPEND_PAGE_BYTES = 8 * 1024 * 1024
#: Redis's largest string (``proto-max-bulk-len``, 512 MiB by default): a payload
#: is one argument of the append script and one field of a stream entry.
MAX_EVENT_BYTES = 512 * 1024 * 1024
#: Replies of a Redis that is busy or failing over: the same command may work later.
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "OOM", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
_LONGEST_WAIT = 1.0  # a blocked follower re-checks heartbeat and lease at least this often


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _expired(meta: dict[str, str], now: float) -> bool:
    return bool(meta.get("expires_at")) and float(meta["expires_at"]) <= now


def _event(entry_id: Any, fields: dict[Any, Any]) -> Event:
    """An event from a stream entry (``0-<seq + 1>``, fields k and p), str or bytes alike."""
    kind = fields["k"] if "k" in fields else fields[b"k"]
    payload = fields["p"] if "p" in fields else fields[b"p"]
    return Event(int(_text(entry_id).split("-", 1)[1]) - 1, _text(kind), _text(payload))


if TYPE_CHECKING:
    from ..durable_streams.store import DSStore


class RedisStreamManager(StreamManager):
    """Durable streams in Redis, shared by every worker of every host that reaches it.

    ``client``: a ``redis.Redis`` (or a factory of one); else one is built from
    ``url`` (``redis://host:6379/0``) on a ``BlockingConnectionPool`` of
    ``max_connections`` that waits up to ``pool_timeout`` seconds for a free
    connection. ``prefix`` namespaces the keys. Nothing is sent to Redis here:
    a server that is down at startup makes calls raise StorageUnavailable until
    it is back.
    """

    max_event_bytes = MAX_EVENT_BYTES
    backend_name = "Redis"
    config_defaults: ClassVar[Mapping[str, Any]] = {
        "DURABLE_STREAM_REDIS_URL": None,
        "DURABLE_STREAM_REDIS_PREFIX": "durable-streams",
    }

    @classmethod
    def from_config(cls, config: Mapping[str, Any], app: Flask) -> RedisStreamManager:
        """``DURABLE_STREAM_REDIS_URL`` (required) and ``DURABLE_STREAM_REDIS_PREFIX``."""
        url = config["DURABLE_STREAM_REDIS_URL"]
        if not url:
            raise ValueError("DURABLE_STREAM_BACKEND='redis' needs DURABLE_STREAM_REDIS_URL")
        return cls(url=url, prefix=config["DURABLE_STREAM_REDIS_PREFIX"], **common_options(config))

    def __init__(
        self,
        client: Any = None,
        *,
        url: str | None = None,
        prefix: str = "durable-streams",
        timeout: float = 60.0,
        ttl_seconds: float = 300.0,
        lease_seconds: float = 10.0,
        heartbeat_interval: float | None = None,
        max_connections: int = 50,
        pool_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        import redis

        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._reply_error = redis.exceptions.ResponseError
        if client is None:
            if url is None:
                raise ValueError("RedisStreamManager needs a client or a url")
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=pool_timeout
            )
            client = redis.Redis(connection_pool=pool)
        elif callable(client) and not isinstance(client, redis.Redis):
            client = client()
        self.client = client
        self.prefix = prefix
        self._index = f"{prefix}:index"
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("open", _OPEN),
                ("append", _APPEND),
                ("heartbeat", _HEARTBEAT),
                ("cancel", _CANCEL),
                ("mark_lost", _MARK_LOST),
                ("clear_pointer", _CLEAR_POINTER),
            )
        }
        self._reader_lock = threading.Lock()
        self._shared: SharedReader | None = None

    def _reader(self) -> SharedReader:
        """This process's shared reader (a forked child makes its own)."""
        shared = self._shared
        if shared is not None and shared.pid == os.getpid():
            return shared
        with self._reader_lock:
            if self._shared is None or self._shared.pid != os.getpid():
                self._shared = SharedReader(self.client, poke_key(self.prefix), self._call, _event)
            return self._shared

    # -- plumbing --------------------------------------------------------------------------
    def _keys(self, stream_id: str) -> list[str]:
        base = f"{self.prefix}:{{{stream_id}}}"
        return [f"{base}:meta", f"{base}:events"]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call, mapping its errors to the fault model.

        Unreachable, timed out, pool exhausted, busy, loading or failing over:
        :class:`StorageUnavailable` (retried). Any other error reply (an
        argument Redis refuses): :class:`StoragePermanentError`. Redis's own
        text, which can name the host, goes to the log, not to clients.
        """
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            log.warning("Redis unavailable: %s", exc)
            raise StorageUnavailable(f"Redis unavailable ({type(exc).__name__})") from exc
        except self._reply_error as exc:
            code = str(exc).split(" ", 1)[0].upper()
            if code in _TRANSIENT_REPLIES:
                log.warning("Redis is busy: %s", exc)
                raise StorageUnavailable(f"Redis is busy ({code})") from exc
            log.error("Redis refused a command: %s", exc)
            raise StoragePermanentError(f"Redis refused the command ({code})") from exc

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(self._scripts[name], keys=keys, args=args)

    def _ttl_args(self, now: float) -> tuple[int, str]:
        return max(1, int(self.ttl_seconds * 1000)), repr(now + self.ttl_seconds)

    def _meta(self, stream_id: str) -> dict[str, str] | None:
        """The stream's metadata; None when it does not exist or has expired."""
        meta = _decode(self._call(self.client.hgetall, self._keys(stream_id)[0]))
        return None if not meta or _expired(meta, self.now()) else meta

    @staticmethod
    def _info(stream_id: str, meta: dict[str, str]) -> StreamInfo:
        return StreamInfo(
            stream_id=stream_id,
            status=StreamStatus(meta["status"]),
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            last_seq=int(meta["last_seq"]),
            owner=meta.get("owner") or None,
            cancel_requested=meta.get("cancel") == "1",
            heartbeat_at=float(meta["heartbeat_at"]) if meta.get("heartbeat_at") else None,
            expires_at=float(meta["expires_at"]) if meta.get("expires_at") else None,
        )

    # -- producer ----------------------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        token = os.urandom(12).hex()
        meta, events = self._keys(stream_id)
        created = self._script(
            "open", [meta, events, self._index], [stream_id, token, owner or "", repr(self.now())]
        )
        if not int(created):
            raise StreamExists(f"stream {stream_id} already exists")
        return _RedisWriter(self, stream_id, token)

    # -- consumer ----------------------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        meta = self._meta(stream_id)
        if meta is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        return self._follow(
            stream_id, meta["token"], max(after, -1), self.timeout if timeout is None else timeout
        )

    def _follow(
        self, stream_id: str, token: str, cursor: int, timeout: float
    ) -> Iterator[list[Event]]:
        events_key = self._keys(stream_id)[1]
        last_activity = time.monotonic()
        seen_heartbeat = None
        watch = ProducerWatch(self.lease_seconds)
        # Stored events first; then the shared reader hands over new entries as they
        # come, from a producer in any process, with no connection held meanwhile.
        batch = self._range(events_key, cursor)
        while True:
            wait = _LONGEST_WAIT
            if batch:
                yield batch  # a page at a time: the HTTP layer sends it in one write
                if batch[-1].terminal:
                    return
                cursor = batch[-1].seq
                last_activity = time.monotonic()
                if len(batch) >= _PAGE:  # more may be stored: read on without waiting
                    batch = self._range(events_key, cursor)
                    continue
                # The producer just wrote, so its lease is fresh; it is checked when quiet.
            else:
                meta = self._meta(stream_id)
                if meta is None or meta["token"] != token:
                    raise StreamNotFound(f"stream {stream_id} not found")
                last_seq = int(meta["last_seq"])
                if last_seq > cursor:  # written since our read: read, do not wait
                    batch = self._range(events_key, cursor)
                    if batch:
                        continue
                if meta["status"] != StreamStatus.OPEN.value and last_seq <= cursor:
                    return  # the caller already has the terminal event
                heartbeat = float(meta["heartbeat_at"])
                if heartbeat != seen_heartbeat:
                    seen_heartbeat, last_activity = heartbeat, time.monotonic()
                now = self.now()
                lease_left = watch.observe(heartbeat, now)
                if lease_left <= 0 and last_seq <= cursor:
                    self._mark_lost(stream_id, meta, now)  # then the reader hands us its event
                    lease_left = 0.0
                remaining = timeout - (time.monotonic() - last_activity)
                if remaining <= 0:
                    raise StreamTimeout("Stream timed out.")
                wait = min(wait, remaining, lease_left + 0.001)
            batch = self._reader().wait(events_key, cursor, wait)
            if not batch:  # nothing came, or the reader asks us to look ourselves
                batch = self._range(events_key, cursor)

    def _range(self, events_key: str, cursor: int) -> list[Event]:
        entries = self._call(self.client.xrange, events_key, f"(0-{cursor + 1}", "+", count=_PAGE)
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def _mark_lost(self, stream_id: str, meta: dict[str, str], now: float) -> None:
        """End an open stream whose producer stopped beating (only if still so, atomically)."""
        ttl_ms, expires = self._ttl_args(now)
        self._script(
            "mark_lost",
            self._keys(stream_id),
            [
                meta["token"],
                meta["last_seq"],
                repr(now),
                repr(self.lease_seconds),
                protocol.encode(PRODUCER_LOST),
                ttl_ms,
                expires,
            ],
        )

    # -- metadata ----------------------------------------------------------------------------
    def info(self, stream_id: str) -> StreamInfo | None:
        meta = self._meta(stream_id)
        return None if meta is None else self._info(stream_id, meta)

    def request_cancel(self, stream_id: str) -> bool:
        result = int(self._script("cancel", self._keys(stream_id)[:1], [repr(self.now())]))
        if result < 0:
            raise StreamNotFound(f"stream {stream_id} not found")
        return result == 1

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        infos: list[StreamInfo] = []
        start = 0
        while len(infos) < limit:
            ids = self._call(self.client.zrevrange, self._index, start, start + limit - 1)
            if not ids:
                break
            start += len(ids)
            for raw in ids:
                stream_id = _text(raw)
                meta = self._meta(stream_id)
                if meta is not None:
                    infos.append(self._info(stream_id, meta))
        return infos[:limit]

    # -- expiry ------------------------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        """Drop index entries of streams Redis has expired; end abandoned open streams."""
        now = self.now() if now is None else now
        removed = 0
        for raw in self._call(self.client.zrange, self._index, 0, -1):
            stream_id = _text(raw)
            meta = _decode(self._call(self.client.hgetall, self._keys(stream_id)[0]))
            if not meta or _expired(meta, now):
                if meta:  # Redis has not deleted it yet
                    self._call(self.client.delete, *self._keys(stream_id))
                removed += int(self._call(self.client.zrem, self._index, stream_id))
                continue
            stale = float(meta["heartbeat_at"]) + self.lease_seconds < now
            if meta["status"] == StreamStatus.OPEN.value and stale:
                self._mark_lost(stream_id, meta, now)
        return removed

    # -- pointers --------------------------------------------------------------------------
    def _pointer_key(self, key: str) -> str:
        return f"{self.prefix}:pointer:{check_pointer_key(key)}"

    def set_pointer(self, key: str, stream_id: str) -> None:
        self._call(self.client.set, self._pointer_key(key), stream_id)

    def get_pointer(self, key: str) -> str | None:
        value = self._call(self.client.get, self._pointer_key(key))
        return None if value is None else _text(value)

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        return bool(self._script("clear_pointer", [self._pointer_key(key)], [stream_id]))

    def close(self) -> None:
        with self._reader_lock:
            shared, self._shared = self._shared, None
        if shared is not None and shared.pid == os.getpid():
            shared.close()
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    def durable_streams_store(self) -> DSStore:
        """Durable Streams kept next to this manager's streams (see docs/durable-streams.md)."""
        store: DSStore | None = getattr(self, "_ds_store", None)
        if store is None:
            from ..durable_streams.redis import RedisDSStore

            store = self._ds_store = RedisDSStore(self.client, prefix=self.prefix)
        return store


class _RedisWriter(StreamWriter):
    def __init__(self, manager: RedisStreamManager, stream_id: str, token: str) -> None:
        super().__init__(stream_id)
        self._manager = manager
        self._token = token

    def store(self, events: Sequence[Event]) -> None:
        # A script blocks Redis while it runs: long batches go in pages. A failure
        # part-way leaves a stored prefix, which the retry of the batch finds identical.
        check_event_sizes(events, self._manager.max_event_bytes, self._manager.display_name)
        start = 0
        while start < len(events):
            end, size = start, 0
            while end < len(events) and end - start < _APPEND_PAGE:
                size += payload_bytes(events[end].payload)
                if end > start and size > _APPEND_PAGE_BYTES:
                    break
                end += 1
            self._append_page(events[start:end])
            start = end

    def _append_page(self, events: Sequence[Event]) -> None:
        manager = self._manager
        now = manager.now()
        ttl_ms, expires = manager._ttl_args(now)
        last = events[-1]
        terminal = status_after(last).value if last.terminal else ""
        args: list[Any] = [self._token, repr(now), ttl_ms, expires, terminal, events[0].seq]
        for event in events:
            args.append(event.kind)
            args.append(event.payload)
        result = _text(manager._script("append", manager._keys(self.stream_id), args))
        if result == "gone":
            raise StreamClosed(f"stream {self.stream_id} no longer exists")
        if result == "ended":
            raise StreamClosed(f"stream {self.stream_id} already ended")
        if result == "conflict":
            raise StreamClosed(f"stream {self.stream_id}: conflicting event at an existing seq")

    def heartbeat(self) -> bool:
        manager = self._manager
        result = int(
            manager._script(
                "heartbeat", manager._keys(self.stream_id)[:1], [self._token, repr(manager.now())]
            )
        )
        return result == 1
