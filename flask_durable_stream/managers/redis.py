"""Streams in Redis: a Redis Stream of events and a hash of metadata per stream.

Layout, under ``prefix`` (the ``{id}`` hash tag keeps one stream's keys in one
Redis Cluster slot):

* ``<prefix>:{<id>}:meta``: hash (token, status, owner, flow, created/updated/heartbeat
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

Modules, each depending only on those after it: this manager; the writer
(:mod:`.redis_writer`) and the shared reader (:mod:`.redis_reader`); the
storage object (:mod:`.redis_io`: client, keys, error mapping, scripts).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .. import protocol
from ..exceptions import StreamExists, StreamNotFound, StreamTimeout
from .base import (
    PRODUCER_LOST,
    Event,
    ProducerWatch,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
    check_pointer_key,
    common_options,
    required_setting,
)
from .redis_io import RedisStorage, expired, make_client, text, to_event
from .redis_reader import PAGE, SharedReader, poke_key
from .redis_scripts import INDEX_SWEEP
from .redis_writer import RedisWriter

if TYPE_CHECKING:
    from flask import Flask

    from ..durable_streams.store import DSStore

#: Redis's largest string (``proto-max-bulk-len``, 512 MiB by default): a payload
#: is one argument of the append script and one field of a stream entry.
MAX_EVENT_BYTES = 512 * 1024 * 1024
_LONGEST_WAIT = 1.0  # a blocked follower re-checks heartbeat and lease at least this often


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
        url = required_setting(config, "DURABLE_STREAM_REDIS_URL", "redis")
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
        self.client = make_client(client, url, max_connections, pool_timeout)
        self.prefix = prefix
        #: The one object that calls Redis (see :mod:`.redis_io`).
        self.storage = RedisStorage(self.client, prefix, self)
        self._reader_lock = threading.Lock()
        self._shared: SharedReader | None = None

    def shared_reader(self) -> SharedReader:
        """This process's shared reader (a forked child makes its own)."""
        shared = self._shared
        if shared is not None and shared.pid == os.getpid():
            return shared
        with self._reader_lock:
            if self._shared is None or self._shared.pid != os.getpid():
                self._shared = SharedReader(
                    self.client, poke_key(self.prefix), self.storage.call, to_event
                )
            return self._shared

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
            flow=meta.get("flow") or None,
        )

    # -- producer ----------------------------------------------------------------------------
    def open(
        self, stream_id: str, *, owner: str | None = None, flow: str | None = None
    ) -> StreamWriter:
        token = os.urandom(12).hex()
        storage = self.storage
        keys = [*storage.keys(stream_id), storage.index, storage.index_sweep]
        args = [stream_id, token, owner or "", repr(self.now()), flow or "", storage.abandon_ms()]
        args += [*storage.meta_key_parts(), INDEX_SWEEP]
        if not int(storage.script("open", keys, args)):
            raise StreamExists(f"stream {stream_id} already exists")
        return RedisWriter(storage, stream_id, token)

    # -- consumer ----------------------------------------------------------------------------
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        meta = self.storage.meta(stream_id)
        if meta is None:
            raise StreamNotFound(f"stream {stream_id} not found")
        return self._follow(
            stream_id, meta["token"], max(after, -1), self.timeout if timeout is None else timeout
        )

    def _follow(
        self, stream_id: str, token: str, cursor: int, timeout: float
    ) -> Iterator[list[Event]]:
        with self.producer_watches.watch(stream_id, self.lease_seconds) as watch:
            yield from self._watched(stream_id, token, cursor, timeout, watch)

    def _watched(
        self, stream_id: str, token: str, cursor: int, timeout: float, watch: ProducerWatch
    ) -> Iterator[list[Event]]:
        events_key = self.storage.keys(stream_id)[1]
        last_activity = time.monotonic()
        seen_heartbeat = None
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
                if len(batch) >= PAGE:  # more may be stored: read on without waiting
                    batch = self._range(events_key, cursor)
                    continue
                # The producer just wrote, so its lease is fresh; it is checked when quiet.
            else:
                meta = self.storage.meta(stream_id)
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
            batch = self.shared_reader().wait(events_key, cursor, wait)
            if not batch:  # nothing came, or the reader asks us to look ourselves
                batch = self._range(events_key, cursor)

    def _range(self, events_key: str, cursor: int) -> list[Event]:
        entries = self.storage.call(
            self.client.xrange, events_key, f"(0-{cursor + 1}", "+", count=PAGE
        )
        return [to_event(entry_id, fields) for entry_id, fields in entries]

    def _mark_lost(self, stream_id: str, meta: dict[str, str], now: float) -> None:
        """End an open stream whose producer stopped beating (only if still so, atomically)."""
        ttl_ms, expires = self.storage.ttl_args(now)
        self.storage.script(
            "mark_lost",
            self.storage.keys(stream_id),
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
        meta = self.storage.meta(stream_id)
        return None if meta is None else self._info(stream_id, meta)

    def request_cancel(self, stream_id: str) -> bool:
        keys = self.storage.keys(stream_id)[:1]
        result = int(self.storage.script("cancel", keys, [repr(self.now())]))
        if result < 0:
            raise StreamNotFound(f"stream {stream_id} not found")
        return result == 1

    def list_streams(self, *, limit: int = 100) -> list[StreamInfo]:
        infos: list[StreamInfo] = []
        start = 0
        while len(infos) < limit:
            ids = self.storage.call(
                self.client.zrevrange, self.storage.index, start, start + limit - 1
            )
            if not ids:
                break
            start += len(ids)
            for raw in ids:
                stream_id = text(raw)
                meta = self.storage.meta(stream_id)
                if meta is not None:
                    infos.append(self._info(stream_id, meta))
        return infos[:limit]

    # -- expiry ------------------------------------------------------------------------------
    def gc(self, now: float | None = None) -> int:
        """Drop index entries of streams Redis has expired; end abandoned open streams."""
        now = self.now() if now is None else now
        removed = 0
        storage = self.storage
        for raw in storage.call(self.client.zrange, storage.index, 0, -1):
            stream_id = text(raw)
            meta = storage.stored_meta(stream_id)
            if not meta or expired(meta, now):
                if meta:  # Redis has not deleted it yet
                    storage.call(self.client.delete, *storage.keys(stream_id))
                removed += int(storage.call(self.client.zrem, storage.index, stream_id))
                continue
            stale = float(meta["heartbeat_at"]) + self.lease_seconds < now
            if meta["status"] == StreamStatus.OPEN.value and stale:
                self._mark_lost(stream_id, meta, now)
        return removed

    # -- pointers --------------------------------------------------------------------------
    def _pointer_key(self, key: str) -> str:
        return self.storage.pointer_key(check_pointer_key(key))

    def set_pointer(self, key: str, stream_id: str) -> None:
        self.storage.call(self.client.set, self._pointer_key(key), stream_id)

    def get_pointer(self, key: str) -> str | None:
        value = self.storage.call(self.client.get, self._pointer_key(key))
        return None if value is None else text(value)

    def clear_pointer(self, key: str, stream_id: str) -> bool:
        return bool(self.storage.script("clear_pointer", [self._pointer_key(key)], [stream_id]))

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
