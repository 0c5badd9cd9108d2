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
themselves (one round trip per live chunk, from a producer in any process); when
nothing came for a second they check the producer's heartbeat and the lease.
Each waiting follower holds one connection of the pool.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..exceptions import (
    StorageUnavailable,
    StreamClosed,
    StreamExists,
    StreamNotFound,
    StreamTimeout,
)
from .base import (
    PRODUCER_LOST,
    Event,
    StreamInfo,
    StreamManager,
    StreamStatus,
    StreamWriter,
    status_after,
)

_PAGE = 1000
_APPEND_PAGE = 1000  # events per append script
_LONGEST_WAIT = 1.0  # a blocked follower re-checks heartbeat and lease at least this often

# KEYS: meta, events, index. ARGV: id, token, owner ("" for none), now.
_OPEN = """
local expires = redis.call('HGET', KEYS[1], 'expires_at')
if redis.call('EXISTS', KEYS[1]) == 1 then
  if expires == false or expires == '' or tonumber(expires) > tonumber(ARGV[4]) then
    return 0
  end
  redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'status', 'open', 'owner', ARGV[3],
  'created_at', ARGV[4], 'updated_at', ARGV[4], 'heartbeat_at', ARGV[4], 'expires_at', '',
  'cancel', '0', 'last_seq', '-1')
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""

# KEYS: meta, events. ARGV: token, now, ttl_ms, expires_at, terminal_status ('' if none),
# first_seq, then kind, payload pairs. Returns 'ok', 'gone', 'ended' or 'conflict'.
_APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'last_seq')
if meta[1] == false or meta[1] ~= ARGV[1] then return 'gone' end
local last = tonumber(meta[3])
local first = tonumber(ARGV[6])
local count = (#ARGV - 6) / 2
local stored = math.max(0, math.min(count, last + 1 - first))
if stored > 0 then
  local have = redis.call('XRANGE', KEYS[2], '0-' .. (first + 1), '0-' .. (first + stored))
  if #have ~= stored then return 'conflict' end
  for i = 1, stored do
    local fields = have[i][2]
    if fields[2] ~= ARGV[5 + 2 * i] or fields[4] ~= ARGV[6 + 2 * i] then return 'conflict' end
  end
end
if stored == count then return 'ok' end
if meta[2] ~= 'open' then return 'ended' end
for i = stored + 1, count do
  redis.call('XADD', KEYS[2], '0-' .. (first + i), 'k', ARGV[5 + 2 * i], 'p', ARGV[6 + 2 * i])
end
local seq = first + count - 1
redis.call('HSET', KEYS[1], 'last_seq', seq, 'updated_at', ARGV[2], 'heartbeat_at', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[5], 'expires_at', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 'ok'
"""

# KEYS: meta. ARGV: token, now. Returns 1 (cancel requested), 0, or -1 (not this producer's).
_HEARTBEAT = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'cancel')
if meta[1] == false or meta[1] ~= ARGV[1] or meta[2] ~= 'open' then return -1 end
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[2])
return tonumber(meta[3])
"""

# KEYS: meta. ARGV: now. Returns 1 (raised), 0 (already ended) or -1 (unknown/expired).
_CANCEL = """
local meta = redis.call('HMGET', KEYS[1], 'status', 'expires_at')
if meta[1] == false then return -1 end
if meta[2] ~= '' and tonumber(meta[2]) <= tonumber(ARGV[1]) then return -1 end
if meta[1] ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1', 'updated_at', ARGV[1])
return 1
"""

# KEYS: meta, events. ARGV: token, last_seq seen, now, lease, payload, ttl_ms, expires_at.
# Ends the stream with the "producer lost" event only if it is still open, at the same
# seq, and its heartbeat is still stale. Returns 1 if it did.
_MARK_LOST = """
local meta = redis.call('HMGET', KEYS[1], 'token', 'status', 'last_seq', 'heartbeat_at')
if meta[1] == false or meta[1] ~= ARGV[1] or meta[2] ~= 'open' then return 0 end
if meta[3] ~= ARGV[2] then return 0 end
if tonumber(meta[4]) + tonumber(ARGV[4]) >= tonumber(ARGV[3]) then return 0 end
local seq = tonumber(meta[3]) + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'k', 'error', 'p', ARGV[5])
redis.call('HSET', KEYS[1], 'last_seq', seq, 'status', 'error', 'updated_at', ARGV[3],
  'expires_at', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""


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
    ``url`` (``redis://host:6379/0``). ``prefix`` namespaces the keys.
    """

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
    ) -> None:
        super().__init__(
            timeout=timeout,
            ttl_seconds=ttl_seconds,
            lease_seconds=lease_seconds,
            heartbeat_interval=heartbeat_interval,
        )
        import redis

        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        if client is None:
            if url is None:
                raise ValueError("RedisStreamManager needs a client or a url")
            client = redis.Redis.from_url(url)
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
            )
        }

    # -- plumbing --------------------------------------------------------------------------
    def _keys(self, stream_id: str) -> list[str]:
        base = f"{self.prefix}:{{{stream_id}}}"
        return [f"{base}:meta", f"{base}:events"]

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call; connection trouble becomes :class:`StorageUnavailable`."""
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise StorageUnavailable(f"Redis unavailable: {exc}") from exc

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
    def open(self, stream_id: str, *, owner: str | None = None) -> StreamWriter:
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
        meta_key, events_key = self._keys(stream_id)
        last_activity = time.monotonic()
        seen_heartbeat = None
        # Stored events first; from then on one blocking XREAD per wake-up delivers the
        # new entries themselves, so a live chunk costs a follower one round trip.
        entries = self._call(self.client.xrange, events_key, f"(0-{cursor + 1}", "+", count=_PAGE)
        while True:
            wait = _LONGEST_WAIT
            if entries:
                batch = [_event(entry_id, fields) for entry_id, fields in entries]
                yield batch  # a page at a time: the HTTP layer sends it in one write
                if batch[-1].terminal:
                    return
                cursor = batch[-1].seq
                last_activity = time.monotonic()
                if len(entries) == _PAGE:  # more may be stored: read on without waiting
                    entries = self._call(
                        self.client.xrange, events_key, f"(0-{cursor + 1}", "+", count=_PAGE
                    )
                    continue
                # The producer just wrote, so its lease is fresh; it is checked when quiet.
            else:
                meta = self._meta(stream_id)
                if meta is None or meta["token"] != token:
                    raise StreamNotFound(f"stream {stream_id} not found")
                last_seq = int(meta["last_seq"])
                if meta["status"] != StreamStatus.OPEN.value and last_seq <= cursor:
                    return  # the caller already has the terminal event
                heartbeat = float(meta["heartbeat_at"])
                if heartbeat != seen_heartbeat:
                    seen_heartbeat, last_activity = heartbeat, time.monotonic()
                now = self.now()
                lease_left = heartbeat + self.lease_seconds - now
                if lease_left < 0 and last_seq <= cursor:
                    self._mark_lost(stream_id, meta, now)  # then the XREAD gets its event
                    lease_left = 0.0
                remaining = timeout - (time.monotonic() - last_activity)
                if remaining <= 0:
                    raise StreamTimeout("Stream timed out.")
                wait = min(wait, remaining, lease_left + 0.001)
            # Returns at once with the entries after the cursor, from any process, or
            # with nothing once the wait is over.
            reply = self._call(
                self.client.xread,
                {events_key: f"0-{cursor + 1}"},
                count=_PAGE,
                block=max(1, int(wait * 1000)),
            )
            entries = reply[0][1] if reply else []

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

    def close(self) -> None:
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

    def _append(self, events: Sequence[Event]) -> None:
        # A script blocks Redis while it runs: long batches go in pages. A failure
        # part-way leaves a stored prefix, which the retry of the batch finds identical.
        for start in range(0, len(events), _APPEND_PAGE):
            self._append_page(events[start : start + _APPEND_PAGE])

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
