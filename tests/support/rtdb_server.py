"""A Realtime Database REST + streaming *protocol* test server. Not a database.

It speaks the documented REST API closely enough to test clients against it
(``firebase_admin.db`` included) on 127.0.0.1, where the real emulator cannot
run: GET/PUT/PATCH/POST/DELETE on ``/<path>.json``, ``?ns=`` namespaces,
``print=silent``, ``shallow``, ``orderBy`` with ``startAt``/``endAt``/
``equalTo``/``limitToFirst``/``limitToLast``, ETags and ``if-match``, server
values, multi-path PATCH, and ``Accept: text/event-stream`` streaming
(``put``/``patch``/``keep-alive``, plus ``cancel``/``auth_revoked`` on demand).
It enforces the size limits the real service documents ("Realtime Database
limits", https://firebase.google.com/docs/database/usage/limits): a write
request of at most 256 MB over REST (the real reply, verbatim: 400 ``{"error":
"Data to write exceeds the maximum size that can be modified with a single
request."}``), string values of at most 10 MB (10,485,760 UTF-8 bytes), keys of
at most 768 UTF-8 bytes, paths less than 32 levels deep (400 ``{"error":
"Invalid data; ..."}``, the service's shape). It has no rules, no auth, no
persistence; for a streaming query
with a limit it re-evaluates the window on each change and sends one ``put``
per child that entered, changed or left.

Tests use it in-process (:class:`RtdbProtocolServer`) and can drop every
streaming connection, count requests, or send control events; the same hooks are
reachable over HTTP under ``/.control/`` for a server run as
``python -m tests.support.rtdb_server --port N``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import json
import queue
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_BAD_KEY_CHARS = set(".$#[]/") | {chr(c) for c in range(32)} | {chr(127)}
#: The real service's limits (see the module docstring).
MAX_WRITE_BYTES = 256 * 1024 * 1024
MAX_STRING_BYTES = 10 * 1024 * 1024
MAX_KEY_BYTES = 768
MAX_DEPTH = 32
WRITE_TOO_BIG = "Data to write exceeds the maximum size that can be modified with a single request."
_PUSH_CHARS = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_DROP = object()


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _segments(path: str) -> list[str]:
    segs = [s for s in path.split("/") if s]
    for seg in segs:
        if set(seg) & _BAD_KEY_CHARS:
            raise ApiError(400, f"Invalid path: {path!r}")
    return segs


def _int_key(key: str) -> int | None:
    """Keys that parse as 32-bit integers sort first, numerically (as RTDB does)."""
    if (
        key == "0"
        or (key[:1] in "123456789" and key.isdigit())
        or (key[:1] == "-" and key[1:2] in "123456789" and key[1:].isdigit())
    ):
        number = int(key)
        if -(2**31) <= number < 2**31:
            return number
    return None


def key_order(key: str) -> tuple[int, int, str]:
    number = _int_key(key)
    return (0, number, "") if number is not None else (1, 0, key)


def value_order(value: Any) -> tuple[Any, ...]:
    if value is None:
        return (0,)
    if value is False or value is True:
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    return (4,)


def export(node: Any) -> Any:
    """Stored form -> JSON form: objects with dense integer keys come back as arrays."""
    if not isinstance(node, dict):
        return node
    out = {k: export(v) for k, v in node.items()}
    numbers = [_int_key(k) for k in out]
    if out and all(n is not None and n >= 0 for n in numbers):
        top = max(n for n in numbers if n is not None)
        if len(out) * 2 > top + 1:
            return [out.get(str(i)) for i in range(top + 1)]
    return out


def etag_of(node: Any) -> str:
    return base64.b64encode(hashlib.sha1(_dumps(export(node)).encode()).digest()).decode()


def _get(root: dict[str, Any], segs: list[str]) -> Any:
    node: Any = root
    for seg in segs:
        if not isinstance(node, dict) or seg not in node:
            return None
        node = node[seg]
    return node


def _set(root: dict[str, Any], segs: list[str], value: Any) -> None:
    """Set (or with None delete) ``segs``, creating and pruning parents."""
    if not segs:
        root.clear()
        if isinstance(value, dict):
            root.update(value)
        return
    trail = [root]
    node = root
    for seg in segs[:-1]:
        child = node.get(seg)
        if not isinstance(child, dict):
            if value is None:
                return
            child = node[seg] = {}
        node = child
        trail.append(node)
    if value is None:
        node.pop(segs[-1], None)
        for depth in range(len(segs) - 1, 0, -1):  # prune emptied parents
            if trail[depth]:
                break
            trail[depth - 1].pop(segs[depth - 1], None)
    else:
        node[segs[-1]] = value


_TOO_DEEP = f"Invalid data; a path is {MAX_DEPTH} or more levels deep"


def check_limits(segs: list[str], value: Any) -> None:
    """The data-tree limits: key length, string length, depth (a path of 32 levels fails)."""
    for key in segs:
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise ApiError(400, f"Invalid data; a key is longer than {MAX_KEY_BYTES} bytes")
    stack = [(value, len(segs))]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if len(node) * 4 > MAX_STRING_BYTES and len(node.encode("utf-8")) > MAX_STRING_BYTES:
                raise ApiError(
                    400, f"Invalid data; a string is longer than {MAX_STRING_BYTES} bytes"
                )
        elif isinstance(node, (dict, list)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if len(str(key).encode("utf-8")) > MAX_KEY_BYTES:
                    raise ApiError(400, f"Invalid data; a key is longer than {MAX_KEY_BYTES} bytes")
                stack.append((child, depth + 1))
        if depth >= MAX_DEPTH:
            raise ApiError(400, _TOO_DEEP)


def normalize(value: Any, current: Any, now_ms: int) -> Any:
    """Incoming JSON -> stored form: arrays become objects, server values resolve, nulls vanish."""
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        if ".sv" in value:
            sv = value[".sv"]
            if sv == "timestamp":
                return now_ms
            if isinstance(sv, dict) and isinstance(sv.get("increment"), (int, float)):
                base = current if isinstance(current, (int, float)) and current is not True else 0
                return base + sv["increment"]
            raise ApiError(400, f"Invalid server value: {_dumps(sv)}")
        out = {}
        for key, child in value.items():
            if key in (".priority", ".value"):
                continue  # accepted and ignored
            if not key or set(key) & _BAD_KEY_CHARS:
                raise ApiError(400, f"Invalid data; invalid key {key!r}")
            below = current.get(key) if isinstance(current, dict) else None
            stored = normalize(child, below, now_ms)
            if stored is not None:
                out[key] = stored
        return out or None
    return value


@dataclass
class Query:
    order_by: str
    start: Any = None
    end: Any = None
    equal: Any = None
    first: int | None = None
    last: int | None = None
    has: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, params: dict[str, str]) -> Query | None:
        names = {"startAt", "endAt", "equalTo", "limitToFirst", "limitToLast"}
        given = names & params.keys()
        if "orderBy" not in params:
            if given:
                raise ApiError(
                    400, "orderBy must be defined when other query parameters are defined"
                )
            return None
        if params.get("shallow") == "true":
            raise ApiError(400, "Mixing 'shallow' and querying parameters is not supported")
        try:
            parsed = {name: json.loads(params[name]) for name in given | {"orderBy"}}
        except ValueError as exc:
            raise ApiError(400, f"Constraint index field must be a JSON primitive: {exc}") from exc
        order_by = parsed["orderBy"]
        if not isinstance(order_by, str):
            raise ApiError(400, "orderBy must be a string")
        if "limitToFirst" in given and "limitToLast" in given:
            raise ApiError(400, "Only one of limitToFirst and limitToLast may be specified")
        for name in given & {"limitToFirst", "limitToLast"}:
            if not isinstance(parsed[name], int) or parsed[name] < 0:
                raise ApiError(400, f"{name} must be a non-negative integer")
        if order_by == "$key":
            for name in given & {"startAt", "endAt", "equalTo"}:
                if not isinstance(parsed[name], str):
                    raise ApiError(400, "orderBy $key needs string startAt/endAt/equalTo")
        return cls(
            order_by,
            parsed.get("startAt"),
            parsed.get("endAt"),
            parsed.get("equalTo"),
            parsed.get("limitToFirst"),
            parsed.get("limitToLast"),
            given,
        )

    @property
    def limited(self) -> bool:
        return self.first is not None or self.last is not None

    def _index(self, key: str, child: Any) -> tuple[Any, ...]:
        if self.order_by == "$key":
            return key_order(key)
        if self.order_by == "$value":
            return value_order(child)
        if self.order_by == "$priority":
            return value_order(None)
        nested = _get(child, _segments(self.order_by)) if isinstance(child, dict) else None
        return value_order(nested)

    def _bound(self, value: Any) -> tuple[Any, ...]:
        return key_order(value) if self.order_by == "$key" else value_order(value)

    def matches(self, key: str, child: Any) -> bool:
        index = self._index(key, child)
        if "equalTo" in self.has and index != self._bound(self.equal):
            return False
        if "startAt" in self.has and index < self._bound(self.start):
            return False
        return not ("endAt" in self.has and index > self._bound(self.end))

    def apply(self, node: Any) -> Any:
        """The children the query selects, in its order (indexes computed once per child)."""
        if not isinstance(node, dict):
            return node
        bounds = {
            name: self._bound(getattr(self, attr)) for name, attr in _BOUNDS if name in self.has
        }
        by_key = self.order_by == "$key"
        selected = []
        for key, child in node.items():
            index = self._index(key, child)
            if "equalTo" in bounds and index != bounds["equalTo"]:
                continue
            if "startAt" in bounds and index < bounds["startAt"]:
                continue
            if "endAt" in bounds and index > bounds["endAt"]:
                continue
            selected.append(((index, ()) if by_key else (index, key_order(key)), key))
        if self.first is not None:
            chosen = heapq.nsmallest(self.first, selected)
        elif self.last is not None:
            chosen = sorted(heapq.nlargest(self.last, selected)) if self.last else []
        else:
            chosen = sorted(selected)
        return {key: node[key] for _, key in chosen}


_BOUNDS = (("startAt", "start"), ("endAt", "end"), ("equalTo", "equal"))


@dataclass(eq=False)
class _Watcher:
    ns: str
    segs: list[str]
    query: Query | None
    events: queue.Queue[Any]
    connection: socket.socket
    sent: set[str] = field(default_factory=set)


def _under(path: list[str], base: list[str]) -> bool:
    return path[: len(base)] == base


def _rel(path: list[str], base: list[str]) -> str:
    return "/" + "/".join(path[len(base) :])


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {_dumps(data)}\n\n".encode()


class RtdbProtocolServer:
    """The protocol server. ``start()`` serves in a thread; ``stop()`` ends it and every stream."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        namespace: str = "test",
        keepalive: float = 30.0,
    ) -> None:
        self.namespace = namespace
        self.keepalive = keepalive
        self.lock = threading.RLock()
        self.trees: dict[str, dict[str, Any]] = {}
        self.watchers: list[_Watcher] = []
        self.log: list[tuple[str, str, str]] = []  # (method, ns, path) of every data request
        self.body_sizes: list[int] = []  # request body sizes, in bytes, of every request
        self._push_last = (0, [0] * 12)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.rtdb = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def database_url(self, namespace: str | None = None) -> str:
        return f"{self.url}?ns={namespace or self.namespace}"

    def start(self) -> RtdbProtocolServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="rtdb-protocol-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.drop_streams()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> RtdbProtocolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test hooks ----------------------------------------------------------
    def drop_streams(self) -> int:
        """Cut every streaming connection abruptly (no final chunk); return how many."""
        with self.lock:
            dropped, self.watchers = self.watchers, []
        for watcher in dropped:
            watcher.events.put(_DROP)
            try:
                watcher.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(dropped)

    def send_to_streams(self, event: str, data: Any = None) -> int:
        """Send ``cancel`` or ``auth_revoked`` to every stream, then close them as RTDB does."""
        with self.lock:
            ended, self.watchers = self.watchers, []
        for watcher in ended:
            watcher.events.put(sse(event, data))
            watcher.events.put(_DROP)
        return len(ended)

    def stream_count(self) -> int:
        with self.lock:
            return len(self.watchers)

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.body_sizes.clear()

    def requests(self, method: str | None = None) -> list[tuple[str, str, str]]:
        with self.lock:
            return [r for r in self.log if method is None or r[0] == method]

    def writes(self) -> int:
        return sum(1 for r in self.requests() if r[0] in ("PUT", "PATCH", "POST", "DELETE"))

    # -- data ----------------------------------------------------------------
    def tree(self, ns: str) -> dict[str, Any]:
        return self.trees.setdefault(ns, {})

    def push_id(self) -> str:
        now = int(time.time() * 1000)
        last, rand = self._push_last
        if now == last:
            for i in range(11, -1, -1):  # same millisecond: increment, so ids still sort
                if rand[i] < 63:
                    rand[i] += 1
                    break
                rand[i] = 0
        else:
            rand = [random.randrange(64) for _ in range(12)]
        self._push_last = (now, rand)
        stamp = ""
        for _ in range(8):
            stamp = _PUSH_CHARS[now % 64] + stamp
            now //= 64
        return stamp + "".join(_PUSH_CHARS[r] for r in rand)

    def write(self, ns: str, kind: str, base: list[str], entries: dict[str, Any]) -> dict[str, Any]:
        """Apply ``entries`` (relative path -> value) under ``base`` atomically; notify streams."""
        now_ms = int(time.time() * 1000)
        root = self.tree(ns)
        paths = {rel: base + _segments(rel) for rel in entries}
        ordered = sorted(paths.values())
        for a, b in zip(ordered, ordered[1:], strict=False):
            if _under(b, a):
                message = f"Invalid data; path {'/'.join(a)} is an ancestor of {'/'.join(b)}"
                raise ApiError(400, message)
        for rel, value in entries.items():
            check_limits(paths[rel], value)
        stored = {
            rel: normalize(value, _get(root, paths[rel]), now_ms) for rel, value in entries.items()
        }
        for rel, value in stored.items():
            _set(root, paths[rel], value)
        self._notify(ns, kind, base, [paths[rel] for rel in entries])
        return stored

    def _notify(self, ns: str, kind: str, base: list[str], touched: list[list[str]]) -> None:
        root = self.tree(ns)
        for watcher in self.watchers:
            w = watcher.segs
            related = [t for t in touched if _under(t, w) or _under(w, t)]
            if not related:
                continue
            node = _get(root, w)
            if watcher.query is not None:
                self._notify_query(watcher, node, related)
            elif any(_under(w, t) for t in related):
                watcher.events.put(sse("put", {"path": "/", "data": export(node)}))
            elif kind == "patch" and _under(base, w):
                data = {_rel(t, base)[1:]: export(_get(root, t)) for t in related}
                watcher.events.put(sse("patch", {"path": _rel(base, w), "data": data}))
            elif kind == "patch":
                data = {_rel(t, w)[1:]: export(_get(root, t)) for t in related}
                watcher.events.put(sse("patch", {"path": "/", "data": data}))
            else:
                (t,) = related
                watcher.events.put(sse("put", {"path": _rel(t, w), "data": export(_get(root, t))}))

    @staticmethod
    def _notify_query(watcher: _Watcher, node: Any, related: list[list[str]]) -> None:
        query = watcher.query
        assert query is not None
        children = node if isinstance(node, dict) else {}
        w = len(watcher.segs)
        if query.limited or any(len(t) <= w for t in related):
            view = query.apply(children)
            changed = {t[w] for t in related if len(t) > w} | (view.keys() ^ watcher.sent)
            if any(len(t) <= w for t in related):
                changed |= view.keys() | watcher.sent
        else:
            changed = {t[w] for t in related}
            view = {
                k: children[k] for k in changed if k in children and query.matches(k, children[k])
            }
        for key in sorted(changed, key=key_order):
            if key in view:
                watcher.sent.add(key)
                watcher.events.put(sse("put", {"path": "/" + key, "data": export(view[key])}))
            elif key in watcher.sent:
                watcher.sent.discard(key)
                watcher.events.put(sse("put", {"path": "/" + key, "data": None}))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rtdb-protocol-server"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    @property
    def rtdb(self) -> RtdbProtocolServer:
        return self.server.rtdb  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if status in (204, 304) else _dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        path = unquote(url.path)
        if length > MAX_WRITE_BYTES:  # refused before reading, as a front end would
            self.close_connection = True
            return self._reply(400, {"error": WRITE_TOO_BIG})
        raw = self.rfile.read(length) if length else b""
        self.rtdb.body_sizes.append(length)
        try:
            if path.startswith("/.control/"):
                return self._control(path[len("/.control/") :])
            if not path.endswith(".json"):
                raise ApiError(404, "Not found: use /<path>.json")
            segs = _segments(path[: -len(".json")])
            ns = params.get("ns") or self.rtdb.namespace
            body = None
            if method in ("PUT", "PATCH", "POST"):
                try:
                    body = json.loads(raw or b"null")
                except ValueError as exc:
                    raise ApiError(400, "Invalid data; couldn't parse JSON object.") from exc
            wants_stream = "text/event-stream" in (self.headers.get("Accept") or "").lower()
            if method == "GET" and wants_stream:
                return self._stream(ns, segs, Query.parse(params))
            with self.rtdb.lock:
                self.rtdb.log.append((method, ns, "/" + "/".join(segs)))
                status, reply, headers = self._handle(method, ns, segs, params, body)
        except ApiError as exc:
            return self._reply(exc.status, {"error": str(exc)})
        if params.get("print") == "silent" and status == 200 and method != "GET":
            status = 204
        self._reply(status, reply, headers)

    def _handle(
        self, method: str, ns: str, segs: list[str], params: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        rtdb = self.rtdb
        current = _get(rtdb.tree(ns), segs)
        want_etag = (self.headers.get("X-Firebase-ETag") or "").lower() == "true"
        if_match = self.headers.get("if-match")
        if if_match is not None and method in ("PUT", "DELETE") and if_match != etag_of(current):
            return 412, export(current), {"ETag": etag_of(current)}
        if method == "GET":
            query = Query.parse(params)
            if want_etag and (query is not None or params.get("shallow") == "true"):
                raise ApiError(400, "ETag is not supported with queries or shallow reads")
            none_match = self.headers.get("if-none-match")
            if none_match is not None and none_match == etag_of(current):
                return 304, None, {"ETag": etag_of(current)}
            value = query.apply(current) if query is not None else current
            if params.get("shallow") == "true" and isinstance(value, dict):
                value = {k: True for k in value}
            return 200, export(value), {"ETag": etag_of(current)} if want_etag else {}
        if method == "PATCH":
            if not isinstance(body, dict) or not body:
                raise ApiError(400, "Invalid data; PATCH needs a non-empty JSON object.")
            stored = rtdb.write(ns, "patch", segs, body)
            return 200, {k: export(v) for k, v in stored.items()}, {}
        if method == "POST":
            segs = segs + [rtdb.push_id()]
            rtdb.write(ns, "put", segs, {"": body})
            return 200, {"name": segs[-1]}, {}
        stored = rtdb.write(ns, "put", segs, {"": body if method == "PUT" else None})
        headers = {"ETag": etag_of(_get(rtdb.tree(ns), segs))} if want_etag or if_match else {}
        return 200, export(stored[""]), headers

    def _stream(self, ns: str, segs: list[str], query: Query | None) -> None:
        rtdb = self.rtdb
        events: queue.Queue[Any] = queue.Queue()
        watcher = _Watcher(ns, segs, query, events, self.connection)
        with rtdb.lock:
            rtdb.log.append(("STREAM", ns, "/" + "/".join(segs)))
            node = _get(rtdb.tree(ns), segs)
            if query is not None:
                node = query.apply(node)
                watcher.sent = set(node) if isinstance(node, dict) else set()
            events.put(sse("put", {"path": "/", "data": export(node)}))
            rtdb.watchers.append(watcher)
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for data in self._drain(events):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
        except OSError:
            pass
        finally:
            with rtdb.lock:
                if watcher in rtdb.watchers:
                    rtdb.watchers.remove(watcher)

    def _drain(self, events: queue.Queue[Any]) -> Iterator[bytes]:
        while True:
            try:
                item = events.get(timeout=self.rtdb.keepalive)
            except queue.Empty:
                item = sse("keep-alive", None)
            if item is _DROP:
                return
            parts = [item]
            while not events.empty():  # send what piled up in one chunk
                more = events.get_nowait()
                if more is _DROP:
                    yield b"".join(parts)
                    return
                parts.append(more)
            yield b"".join(parts)

    def _control(self, action: str) -> None:
        rtdb = self.rtdb
        if action == "drop-streams":
            return self._reply(200, {"dropped": rtdb.drop_streams()})
        if action == "stats":
            methods: dict[str, int] = {}
            for method, _, _ in rtdb.requests():
                methods[method] = methods.get(method, 0) + 1
            return self._reply(
                200, {"writes": rtdb.writes(), "methods": methods, "streams": rtdb.stream_count()}
            )
        if action == "reset-log":
            rtdb.reset_log()
            return self._reply(200, {"ok": True})
        raise ApiError(404, f"unknown control action {action!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--namespace", default="test")
    parser.add_argument("--keepalive", type=float, default=30.0)
    args = parser.parse_args(argv)
    server = RtdbProtocolServer(
        args.host, args.port, namespace=args.namespace, keepalive=args.keepalive
    )
    print(f"RTDB protocol test server (not a database) on {server.url}", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.drop_streams()
        server.httpd.server_close()


if __name__ == "__main__":
    main()
