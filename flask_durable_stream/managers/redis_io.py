"""The Redis of one manager: the client, key names, error mapping and the write scripts.

:class:`RedisStorage` is what the manager (:mod:`.redis`), the writer
(:mod:`.redis_writer`) and the shared reader (:mod:`.redis_reader`) call; it
calls none of them, and reads only the public settings of the manager it serves
(``now()``, ``ttl_seconds``, ``lease_seconds``).
"""

from __future__ import annotations

import logging
from typing import Any

from ..exceptions import StoragePermanentError, StorageUnavailable
from .base import Event, StreamManager
from .redis_scripts import _APPEND, _CANCEL, _CLEAR_POINTER, _HEARTBEAT, _MARK_LOST, _OPEN

log = logging.getLogger("flask_durable_stream.managers.redis")

#: Replies of a Redis that is busy or failing over: the same command may work later.
TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "OOM", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
SCRIPTS = {
    "open": _OPEN,
    "append": _APPEND,
    "heartbeat": _HEARTBEAT,
    "cancel": _CANCEL,
    "mark_lost": _MARK_LOST,
    "clear_pointer": _CLEAR_POINTER,
}


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def expired(meta: dict[str, str], now: float) -> bool:
    return bool(meta.get("expires_at")) and float(meta["expires_at"]) <= now


def to_event(entry_id: Any, fields: dict[Any, Any]) -> Event:
    """An event from a stream entry (``0-<seq + 1>``, fields k and p), str or bytes alike."""
    kind = fields["k"] if "k" in fields else fields[b"k"]
    payload = fields["p"] if "p" in fields else fields[b"p"]
    return Event(int(text(entry_id).split("-", 1)[1]) - 1, text(kind), text(payload))


def make_client(client: Any, url: str | None, max_connections: int, pool_timeout: float) -> Any:
    """``client`` (a ``redis.Redis`` or a factory of one), else a blocking pool's for ``url``."""
    import redis
    from redis.cluster import RedisCluster

    if client is None:
        if url is None:
            raise ValueError("RedisStreamManager needs a client or a url")
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout
        )
        return redis.Redis(connection_pool=pool)
    if callable(client) and not isinstance(client, (redis.Redis, RedisCluster)):
        client = client()
    if isinstance(client, RedisCluster):
        raise ValueError(
            "RedisStreamManager needs one Redis server (a primary), not a Redis Cluster:"
            " a stream's open and the shared XREAD span hash slots, which a cluster refuses"
            " (see docs/redis.md)"
        )
    return client


class RedisStorage:
    """Keys under ``prefix`` in ``client``, for the ``manager`` whose clock and TTL it reads."""

    def __init__(self, client: Any, prefix: str, manager: StreamManager) -> None:
        import redis

        self.client = client
        self.prefix = prefix
        self.manager = manager
        self.index = f"{prefix}:index"
        #: Where ``open`` goes on looking through the index for deleted streams.
        self.index_sweep = f"{prefix}:index:sweep"
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._reply_error = redis.exceptions.ResponseError
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def keys(self, stream_id: str) -> list[str]:
        """The stream's meta hash and events stream (one hash tag: one Cluster slot)."""
        base = f"{self.prefix}:{{{stream_id}}}"
        return [f"{base}:meta", f"{base}:events"]

    def meta_key_parts(self) -> list[str]:
        """What goes before and after a stream's id in its meta key (for a script that
        builds the key of an id it read)."""
        return [f"{self.prefix}:{{", "}:meta"]

    def pointer_key(self, key: str) -> str:
        return f"{self.prefix}:pointer:{key}"

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
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
            if code in TRANSIENT_REPLIES:
                log.warning("Redis is busy: %s", exc)
                raise StorageUnavailable(f"Redis is busy ({code})") from exc
            log.error("Redis refused a command: %s", exc)
            raise StoragePermanentError(f"Redis refused the command ({code})") from exc

    def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self.call(self._scripts[name], keys=keys, args=args)

    def ttl_args(self, now: float) -> tuple[int, str]:
        """The key TTL (ms) and ``expires_at`` of a stream that ends at ``now``."""
        ttl = self.manager.ttl_seconds
        return max(1, int(ttl * 1000)), repr(now + ttl)

    def abandon_ms(self) -> int:
        """The key TTL (ms) an open stream's keys get from each of its producer's writes:
        the lease, then the TTL of a stream that ended. Redis deletes the stream of a
        producer that died with nobody reading by then, as it deletes a finished one."""
        manager = self.manager
        return max(1, int((manager.lease_seconds + manager.ttl_seconds) * 1000))

    def stored_meta(self, stream_id: str) -> dict[str, str]:
        """The meta hash as stored, expired or not ({} when Redis has none)."""
        return decode(self.call(self.client.hgetall, self.keys(stream_id)[0]))

    def meta(self, stream_id: str) -> dict[str, str] | None:
        """The stream's metadata; None when it does not exist or has expired."""
        meta = self.stored_meta(stream_id)
        return None if not meta or expired(meta, self.manager.now()) else meta
