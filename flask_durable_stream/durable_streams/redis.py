"""Durable Streams in the Redis of a :class:`~..managers.redis.RedisStreamManager`.

Per stream, under the manager's prefix (the ``{path}`` hash tag keeps both keys
in one Redis Cluster slot): ``<prefix>:ds:{<path>}:m``, a hash with the
metadata as JSON (``j``) plus ``t`` (tail) and ``c`` (closed) for cheap
polling, and ``<prefix>:ds:{<path>}:r``, a list of the stream's own records.

A write is optimistic: the engine's function reads the metadata it needs
under ``WATCH``, its writes go out in one ``MULTI``/``EXEC``, and the whole
function runs again if another client changed a watched key in between (every
write to a stream changes its metadata, so two appends cannot both win).
Readers poll ``t``/``c`` of the one stream they follow: every 2 ms for the
first quarter second of a wait, then backing off to 50 ms; readers in the
writing process are woken at once (:class:`~.store.Wakeups`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..exceptions import StorageUnavailable
from .store import Meta, PolledStore, Txn, Wakeups

_T = TypeVar("_T")
_PAGE = 512


class _RedisTxn(Txn):
    def __init__(self, store: RedisDSStore, pipe: Any) -> None:
        self._store = store
        self._pipe = pipe
        self._seen: dict[str, Meta | None] = {}
        self.writes: list[Callable[[Any], None]] = []
        self.touched: set[str] = set()

    def get(self, path: str) -> Meta | None:
        if path not in self._seen:
            key = self._store.meta_key(path)
            self._pipe.watch(key)
            raw = self._pipe.hget(key, "j")
            self._seen[path] = Meta.from_dict(json.loads(raw)) if raw else None
        meta = self._seen[path]
        return Meta.from_dict(meta.to_dict()) if meta is not None else None

    def put(self, path: str, meta: Meta) -> None:
        self._seen[path] = Meta.from_dict(meta.to_dict())
        key = self._store.meta_key(path)
        mapping = {"j": json.dumps(meta.to_dict()), "t": meta.tail, "c": int(meta.closed)}
        self.touched.add(path)
        self.writes.append(lambda pipe: pipe.hset(key, mapping=mapping))

    def append(self, path: str, first: int, records: Sequence[bytes]) -> None:
        key = self._store.records_key(path)
        items = list(records)
        self.touched.add(path)
        if first == 0:
            self.writes.append(lambda pipe: pipe.delete(key))
        self.writes.append(lambda pipe: pipe.rpush(key, *items))

    def drop(self, path: str) -> None:
        self._seen[path] = None
        keys = (self._store.meta_key(path), self._store.records_key(path))
        self.touched.add(path)
        self.writes.append(lambda pipe: pipe.delete(*keys))


class RedisDSStore(PolledStore):
    """``client``: a ``redis.Redis`` (the manager's); ``prefix``: the manager's key prefix."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "durable-streams",
        poll_interval: tuple[float, float] = (0.002, 0.05),
        fast_poll_seconds: float = 0.25,
    ) -> None:
        import redis

        self.client = client
        self.prefix = prefix
        self.poll_interval = poll_interval
        self.fast_poll_seconds = fast_poll_seconds
        self.wakeups = Wakeups()
        self._watch_error = redis.WatchError
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def meta_key(self, path: str) -> str:
        return f"{self.prefix}:ds:{{{path}}}:m"

    def records_key(self, path: str) -> str:
        return f"{self.prefix}:ds:{{{path}}}:r"

    def transact(self, fn: Callable[[Txn], _T]) -> _T:
        try:
            while True:
                with self.client.pipeline() as pipe:
                    txn = _RedisTxn(self, pipe)
                    try:
                        result = fn(txn)
                        if not txn.writes:
                            pipe.reset()
                            return result
                        pipe.multi()
                        for write in txn.writes:
                            write(pipe)
                        pipe.execute()
                        self.wakeups.wake(txn.touched)
                        return result
                    except self._watch_error:
                        continue
        except self._errors as exc:
            raise StorageUnavailable(f"Redis: {exc}") from exc

    def get(self, path: str) -> Meta | None:
        try:
            raw = self.client.hget(self.meta_key(path), "j")
        except self._errors as exc:
            raise StorageUnavailable(f"Redis: {exc}") from exc
        return Meta.from_dict(json.loads(raw)) if raw else None

    def records(self, path: str, start: int, end: int, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        key = self.records_key(path)
        try:
            while start < end:
                page = self.client.lrange(key, start, min(end, start + _PAGE) - 1)
                if not page:
                    return out
                for data in page:
                    if out and size + len(data) > max_bytes:
                        return out
                    out.append(data)
                    size += len(data)
                start += len(page)
        except self._errors as exc:
            raise StorageUnavailable(f"Redis: {exc}") from exc
        return out

    def paths(self) -> Iterator[str]:
        head, tail = f"{self.prefix}:ds:{{", "}:m"
        try:
            keys = list(self.client.scan_iter(match=f"{self.prefix}:ds:*:m", count=1000))
        except self._errors as exc:
            raise StorageUnavailable(f"Redis: {exc}") from exc
        for key in keys:
            text = key.decode() if isinstance(key, bytes) else key
            if text.startswith(head) and text.endswith(tail):
                yield text[len(head) : -len(tail)]

    def state(self, path: str) -> tuple[int, bool] | None:
        try:
            t, c = self.client.hmget(self.meta_key(path), "t", "c")
        except self._errors as exc:
            raise StorageUnavailable(f"Redis: {exc}") from exc
        return None if t is None else (int(t), bool(int(c)))
