"""The Durable Streams protocol over a :class:`~.store.DSStore`, without Flask.

Each operation validates first and writes last inside one store transaction,
so a refusal never leaves a partial change, and answers with a :class:`Reply`
whose status and headers are the ones the protocol names.

A little over ~400 lines: every operation of the protocol is here, side by side, because they
share the validation order and the expiry decision; split by operation they would repeat it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import partial

from .cache import RecordCache
from .replies import CLOSED, OFFSET, Chunk, Gone, Reply
from .request import (
    NOW,
    START,
    BadRequest,
    Producer,
    encode_messages,
    format_offset,
    is_json,
    media_type,
)
from .store import DSStore, Meta, Txn, Wakeups, yield_to_greenlets


def _closed_headers(meta: Meta) -> dict[str, str]:
    headers = {OFFSET: format_offset(meta.tail)}
    if meta.closed:
        headers[CLOSED] = "true"
    return headers


def _producer_headers(epoch: int, seq: int) -> dict[str, str]:
    return {"Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


class Engine:
    """The protocol's operations on one store. ``max_read_bytes`` bounds one response."""

    def __init__(
        self, store: DSStore, *, max_read_bytes: int = 1 << 20, cache_bytes: int = 64 << 20
    ) -> None:
        self.store = store
        self.max_read_bytes = max_read_bytes
        # Stores outside the process: recent records are read from here, not from storage.
        self.cache = RecordCache(cache_bytes) if store.remote and cache_bytes else None
        self.wakeups: Wakeups | None = getattr(store, "wakeups", None)

    # -- lifecycle ----------------------------------------------------------------------
    def _live(self, txn: Txn, path: str, now: float) -> Meta | None:
        """The stream's metadata, expiring it first if its time is up."""
        meta = txn.get(path)
        if meta is not None and not meta.deleted and meta.expired(now):
            self._remove(txn, path, meta)
            meta = txn.get(path)
        return meta

    def _remove(self, txn: Txn, path: str, meta: Meta) -> None:
        if meta.refs > 0:  # forks still read it: soft delete
            meta.deleted = True
            txn.put(path, meta)
            return
        txn.drop(path)
        source = meta.fork_of
        while source is not None:  # release the fork chain, cascading
            parent = txn.get(source)
            if parent is None:
                return
            parent.refs -= 1
            if parent.deleted and parent.refs <= 0:
                txn.drop(source)
                source = parent.fork_of
            else:
                txn.put(source, parent)
                return

    def _at(self, at: float | None) -> float:
        """When a request's expiry is decided: when it arrived, if the view said.

        A loaded process may take a while to reach the store; a stream that was
        alive when the request arrived answers as alive, and one whose time was
        up by then as gone, however long the request then waited for a CPU or a
        lock. Sliding TTLs are restarted from the moment of the write instead
        (later, never earlier than the request).
        """
        now = self.store.now()
        return now if at is None else min(at, now)

    def current(self, path: str, at: float | None = None) -> Meta | None:
        """Metadata for a reader; raises :class:`Gone` for a soft-deleted stream."""
        now = self._at(at)
        meta = self.store.get(path)
        if meta is not None and not meta.deleted and meta.expired(now):
            meta = self.store.transact(lambda txn: self._live(txn, path, now))
        if meta is not None and meta.deleted:
            raise Gone(path)
        return meta

    def gc(self, pause: Callable[[], None] = yield_to_greenlets, every: int = 32) -> int:
        """Expire every stream whose time is up, touched or not; return how many.

        The sweep runs in the background of a worker that serves requests: it
        calls ``pause`` every ``every`` streams, so that under gevent a sweep over
        thousands of streams on a blocking store (SQLite) never holds the other
        requests back for long (which, on a loaded machine, made sliding TTLs run
        out while their renewing request waited).
        """
        now = self.store.now()
        count = 0
        for i, path in enumerate(self.store.paths()):
            if i and i % every == 0:
                pause()
            meta = self.store.get(path)
            if meta is not None and not meta.deleted and meta.expired(now):
                self.store.transact(partial(self._live, path=path, now=now))
                count += 1
        return count

    def touch(self, path: str, at: float | None = None) -> None:
        """Restart a sliding TTL: reads count as activity."""

        def run(txn: Txn) -> None:
            meta = self._live(txn, path, self._at(at))
            if meta is not None and meta.ttl is not None and not meta.deleted:
                meta.touched = self.store.now()  # when it is written, not when it was asked
                txn.put(path, meta)

        self.store.transact(run)

    def _writable(
        self, txn: Txn, path: str, now: float, check: Callable[[Meta], Reply | None] | None
    ) -> Meta | Reply:
        """The stream a write may change, or the refusal (404, 410, or ``check``'s)."""
        meta = self._live(txn, path, now)
        if meta is None:
            return Reply(404, body=b"stream not found")
        if meta.deleted:
            return Reply(410, body=b"stream is deleted")
        refusal = check(meta) if check is not None else None
        return refusal if refusal is not None else meta

    # -- create -------------------------------------------------------------------------
    def create(
        self,
        path: str,
        *,
        content_type: str | None,
        ttl: int | None,
        expires_at: str | None,
        expires_ts: float | None,
        closed: bool,
        record: bytes | None,
        fork_of: str | None = None,
        fork_offset: int | None = None,
        fork_sub: int = 0,
        owner: str | None = None,
        at: float | None = None,
    ) -> Reply:
        def run(txn: Txn) -> Reply:
            now = self.store.now()  # the new stream's life starts at its commit
            alive_at = self._at(at)
            want_ct = content_type
            want_ttl, want_exp, want_ts = ttl, expires_at, expires_ts
            inherited: list[bytes] = []
            base = 0
            source: Meta | None = None
            if fork_of is not None:
                source = self._live(txn, fork_of, alive_at)
                if source is None:
                    return Reply(404, body=b"source stream not found")
                if source.deleted:
                    return Reply(409, body=b"source stream is deleted")
                if want_ct is None:
                    want_ct = source.content_type
                elif media_type(want_ct) != media_type(source.content_type):
                    return Reply(409, body=b"content type differs from the source stream")
                if want_ttl is None and want_exp is None:
                    want_ttl, want_exp, want_ts = source.ttl, source.expires_at, source.expires_ts
                base = source.tail if fork_offset is None else fork_offset
                if base > source.tail:
                    return Reply(400, body=b"fork offset is beyond the source's tail")
                if fork_sub:
                    if base >= source.tail:
                        raise BadRequest("no data past the fork offset for a sub-offset")
                    [anchor] = self._read(fork_of, source, base, base + 1, 1)
                    inherited = [_prefix(anchor, fork_sub, source.content_type)]
            ct = want_ct or "application/octet-stream"
            existing = self._live(txn, path, alive_at)
            if existing is not None:
                same = (
                    not existing.deleted
                    and media_type(existing.content_type) == media_type(ct)
                    and existing.ttl == want_ttl
                    and existing.expires_ts == want_ts
                    and existing.closed == closed
                    and existing.fork_of == fork_of
                    and (fork_of is None or existing.fork_offset == base)
                    and existing.fork_sub == fork_sub
                )
                if not same:
                    return Reply(409, body=b"stream exists with a different configuration")
                return Reply(
                    200, {"Content-Type": existing.content_type, **_closed_headers(existing)}
                )
            meta = Meta(
                gen=uuid.uuid4().hex[:16],
                content_type=ct,
                created=now,
                touched=now,
                tail=base,
                base=base,
                closed=closed,
                ttl=want_ttl,
                expires_at=want_exp,
                expires_ts=want_ts,
                fork_of=fork_of,
                fork_offset=base if fork_of is not None else None,
                fork_sub=fork_sub,
                owner=owner,
            )
            own = inherited + ([record] if record is not None else [])
            if own:
                txn.append(path, 0, own)
                meta.tail += len(own)
            if source is not None and fork_of is not None:
                source.refs += 1
                txn.put(fork_of, source)
            txn.put(path, meta)
            return Reply(201, {"Content-Type": ct, **_closed_headers(meta)})

        return self.store.transact(run)

    # -- append / close -----------------------------------------------------------------
    def append(
        self,
        path: str,
        *,
        content_type: str | None,
        record: bytes | None,
        close: bool,
        stream_seq: str | None,
        producer: Producer | None,
        may_write: Callable[[Meta], Reply | None] | None = None,
        at: float | None = None,
    ) -> Reply:
        stored: list[tuple[str, int, bytes]] = []  # for the cache, once committed

        def run(txn: Txn) -> Reply:
            stored.clear()  # a store may run this again (optimistic transactions)
            meta = self._writable(txn, path, self._at(at), may_write)
            if isinstance(meta, Reply):
                return meta
            if meta.ttl is not None:
                meta.touched = self.store.now()
            p = producer
            if meta.closed:
                if p is not None and meta.closed_by == [p.id, p.epoch, p.seq]:
                    txn.put(path, meta)
                    return Reply(
                        204, {**_closed_headers(meta), **_producer_headers(p.epoch, p.seq)}
                    )
                state = meta.producers.get(p.id) if p is not None else None
                if p is not None and state is not None and p.epoch < state[0]:
                    return Reply(403, {"Producer-Epoch": str(state[0])}, b"stale producer epoch")
                if record is None and p is None:
                    txn.put(path, meta)
                    return Reply(204, _closed_headers(meta))
                return Reply(409, _closed_headers(meta), b"stream is closed")
            if record is not None and media_type(content_type) != media_type(meta.content_type):
                return Reply(409, body=b"content type does not match the stream's")
            extra: dict[str, str] = {}
            if p is not None:
                state = meta.producers.get(p.id)
                if state is None:
                    if p.seq != 0:
                        return _gap(0, p.seq)
                elif p.epoch < state[0]:
                    return Reply(403, {"Producer-Epoch": str(state[0])}, b"stale producer epoch")
                elif p.epoch > state[0]:
                    if p.seq != 0:
                        raise BadRequest("a new producer epoch starts at Producer-Seq 0")
                elif p.seq <= state[1]:
                    return Reply(
                        204, {**_closed_headers(meta), **_producer_headers(state[0], state[1])}
                    )
                elif p.seq != state[1] + 1:
                    return _gap(state[1] + 1, p.seq)
                meta.producers[p.id] = [p.epoch, p.seq]
                extra = _producer_headers(p.epoch, p.seq)
            if stream_seq is not None:
                if meta.stream_seq is not None and stream_seq <= meta.stream_seq:
                    return Reply(409, body=b"Stream-Seq must increase")
                meta.stream_seq = stream_seq
            if record is not None:
                txn.append(path, meta.tail - meta.base, [record])
                stored.append((meta.gen, meta.tail, record))
                meta.tail += 1
            if close:
                meta.closed = True
                if p is not None:
                    meta.closed_by = [p.id, p.epoch, p.seq]
            txn.put(path, meta)
            status = 200 if p is not None and record is not None else 204
            return Reply(status, {**_closed_headers(meta), **extra})

        reply = self.store.transact(run)
        if stored and self.cache is not None:  # a live reader is about to ask for it
            gen, index, data = stored[0]
            self.cache.put(gen, index, [data])
        if self.wakeups is not None and self.wakeups.waiting(path):
            # Live readers in this process first: under gevent they answer before
            # this writer's reply goes out.
            yield_to_greenlets()
        return reply

    # -- delete -------------------------------------------------------------------------
    def delete(
        self,
        path: str,
        may_delete: Callable[[Meta], Reply | None] | None = None,
        at: float | None = None,
    ) -> Reply:
        def run(txn: Txn) -> Reply:
            meta = self._writable(txn, path, self._at(at), may_delete)
            if isinstance(meta, Reply):
                return meta
            self._remove(txn, path, meta)
            return Reply(204)

        return self.store.transact(run)

    # -- read ---------------------------------------------------------------------------
    def _read(self, path: str, meta: Meta, start: int, end: int, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        while start < end and (not out or size < max_bytes):
            if start < meta.base:
                if meta.fork_of is None:
                    break
                source = self.store.get(meta.fork_of)
                if source is None:
                    raise Gone(meta.fork_of)
                part = self._read(
                    meta.fork_of, source, start, min(end, meta.base), max(1, max_bytes - size)
                )
            else:
                part = self._own_records(path, meta, start, end, max(1, max_bytes - size))
            if not part:
                break
            out.extend(part)
            size += sum(map(len, part))
            start += len(part)
        return out

    def _own_records(
        self, path: str, meta: Meta, start: int, end: int, max_bytes: int
    ) -> list[bytes]:
        cache = self.cache
        if cache is not None:
            part = cache.get(meta.gen, start, end, max_bytes)
            if part:
                return part
        part = self.store.records(path, start - meta.base, end - meta.base, max_bytes)
        if cache is not None:
            cache.put(meta.gen, start, part)
        return part

    def chunk(self, path: str, meta: Meta, offset: int) -> Chunk:
        """Records from ``offset`` (the start for -1, the tail for now), one response's worth."""
        start = start_of(meta, offset)
        records = self._read(path, meta, start, meta.tail, self.max_read_bytes)
        return Chunk(meta, start, start + len(records), records)

    def wait(self, path: str, meta: Meta, deadline: float) -> Meta | None:
        """Block until the stream grows, closes or goes; None if it went."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return meta
            fresh = self.store.wait(path, meta.tail, meta.closed, remaining)
            if fresh is None:
                fresh = self.store.get(path)
            if fresh is None or fresh.deleted:
                return None
            if fresh.tail != meta.tail or fresh.closed != meta.closed:
                return fresh
            meta = fresh


def start_of(meta: Meta, offset: int) -> int:
    """The record a read from ``offset`` starts at: -1 is the start, now (and past it) the tail."""
    if offset == NOW:
        return meta.tail
    if offset == START:
        return 0
    return min(offset, meta.tail)


def _gap(expected: int, received: int) -> Reply:
    return Reply(
        409,
        {"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
        b"producer sequence gap",
    )


def _prefix(record: bytes, count: int, content_type: str) -> bytes:
    """The first ``count`` messages (JSON) or bytes of a record, for a sub-offset fork."""
    if is_json(content_type):
        import json

        messages = json.loads(record)
        if count > len(messages):
            raise BadRequest("Stream-Fork-Sub-Offset is past the next append's messages")
        return encode_messages(messages[:count])
    if count > len(record):
        raise BadRequest("Stream-Fork-Sub-Offset is past the next append's bytes")
    return record[:count]
