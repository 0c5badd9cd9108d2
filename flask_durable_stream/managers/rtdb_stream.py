"""A Realtime Database REST streaming reader that is safe under gevent and closes at once.

``firebase_admin.db.Reference.listen()`` is unusable here: its reader thread
only notices ``close()`` when the next byte arrives, and under gevent its close
raises. :class:`EventSource` is one ``Accept: text/event-stream`` connection
over :mod:`http.client` (so it is cooperative once gevent has patched
:mod:`socket`, and plain blocking I/O in threads otherwise); :meth:`close` shuts
the socket down from any greenlet or thread, which wakes the reader at once.
:class:`Watch` keeps one location watched: it reconnects with backoff after a
dropped connection (asking ``url()`` again, so the caller can resume from where
it is) and hands every ``put``/``patch`` to a callback. :class:`Mirror` applies
those events to a local copy of the watched node.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

from .._concurrency import TaskGroup
from .._retry import Backoff


class StreamDenied(Exception):
    """The database refused or cancelled the stream (rules, revoked access): do not retry."""


class EventSource:
    """One streaming GET. Iterate for ``(event, data)``; ``close()`` from anywhere ends it."""

    def __init__(self, url: str, headers: dict[str, str], *, read_timeout: float = 75.0) -> None:
        self.url = url
        self.headers = headers
        self.read_timeout = read_timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        # Kept: http.client forgets conn.sock once a response says "Connection: close".
        self._sock: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        self.closed = False

    def _connect(self) -> http.client.HTTPResponse:
        url = self.url
        for _ in range(5):  # the database may redirect a stream to another server
            parts = urlsplit(url)
            conn_type: type[http.client.HTTPConnection] = http.client.HTTPConnection
            if parts.scheme == "https":
                conn_type = http.client.HTTPSConnection
            conn = conn_type(parts.netloc, timeout=self.read_timeout)
            conn.connect()
            with self._lock:
                self._conn, self._sock = conn, conn.sock
                if self.closed:
                    raise ConnectionError("stream closed")
            target = parts.path + ("?" + parts.query if parts.query else "")
            conn.request("GET", target, headers={**self.headers, "Accept": "text/event-stream"})
            response = conn.getresponse()
            with self._lock:
                self._response = response
            if response.status in (301, 302, 303, 307, 308):
                url = urljoin(url, response.getheader("Location") or "")
                response.close()
                self._release()
                continue
            if response.status == 200:
                return response
            body = response.read(2048).decode("utf-8", "replace")
            self._release()
            if response.status in (401, 403):
                raise StreamDenied(f"{response.status}: {body}")
            raise ConnectionError(f"stream refused with {response.status}: {body}")
        raise ConnectionError("too many redirects")

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        try:
            response = self._connect()
            event, data = "", []
            while True:
                line = response.readline()
                if not line:
                    return  # the server (or close()) ended the stream
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("event:"):
                    event = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].lstrip(" "))
                elif not text and event:
                    yield event, json.loads("\n".join(data) or "null")
                    event, data = "", []
        except Exception:
            if self.closed:
                return  # whatever the shut-down socket raised
            raise
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            conn, response = self._conn, self._response
            self._conn = self._sock = self._response = None
        if response is not None:
            response.close()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """End the stream now: shut the socket down so a blocked read returns at once."""
        with self._lock:
            self.closed = True
            sock = self._sock
            if sock is not None:
                try:
                    # A duplicate descriptor shuts the connection down without touching
                    # the TLS object the reading side is using.
                    dup = socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
                    try:
                        dup.shutdown(socket.SHUT_RDWR)
                    finally:
                        dup.close()
                except (OSError, ValueError):
                    pass


class Watch:
    """Keeps one location streamed in a library task, reconnecting until closed.

    ``url()`` and ``headers()`` are asked again on each connection. ``on_event``
    gets ``("put" | "patch", {"path", "data"})``, ``("connected", None)`` before
    each new connection's first event, ``("disconnected", exc)`` after a lost one,
    ``("denied", message)`` when the database ends it for good and ``("closed",
    None)`` when :meth:`close` is called.
    """

    def __init__(
        self,
        tasks: TaskGroup,
        url: Callable[[], str],
        headers: Callable[[], dict[str, str]],
        on_event: Callable[[str, Any], None],
        *,
        read_timeout: float = 75.0,
        max_backoff: float = 5.0,
        name: str = "rtdb-watch",
    ) -> None:
        self._url = url
        self._headers = headers
        self._on_event = on_event
        self._read_timeout = read_timeout
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._source: EventSource | None = None
        self._lock = threading.Lock()
        self.task = tasks.spawn(self._run, name=name)

    def _run(self) -> None:
        backoff = Backoff(initial=0.05, maximum=self._max_backoff)
        delays = backoff.delays()
        while not self._stop.is_set():
            try:
                source = EventSource(self._url(), self._headers(), read_timeout=self._read_timeout)
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._source = source
                self._on_event("connected", None)
                for event, data in source:
                    delays = backoff.delays()  # connected: the next drop starts over
                    if event in ("put", "patch"):
                        self._on_event(event, data)
                    elif event == "cancel":
                        raise StreamDenied(f"stream cancelled by the database: {data}")
                    elif event == "auth_revoked":
                        break  # reconnect with fresh credentials
                if self._stop.is_set():
                    return
                self._on_event("disconnected", ConnectionError("stream ended"))
            except StreamDenied as exc:
                self._on_event("denied", str(exc))
                return
            except Exception as exc:  # connection refused, reset, timeout, bad frame
                if self._stop.is_set():
                    return
                self._on_event("disconnected", exc)
            if self._stop.wait(next(delays)):  # jittered: many followers reconnect spread out
                return

    def close(self, wait: float = 5.0) -> None:
        if not self._stop.is_set():
            self._on_event("closed", None)
        self._stop.set()
        with self._lock:
            source = self._source
        if source is not None:
            source.close()
        self.task.join(wait)


class Mirror:
    """A local copy of a watched node, kept by applying ``put``/``patch`` events.

    :meth:`apply` returns the top-level child keys it touched (``None`` when the
    whole node was replaced), so a caller can look only at what changed.
    """

    def __init__(self) -> None:
        self.value: Any = None

    def apply(self, event: str, message: dict[str, Any]) -> set[str] | None:
        segs = [s for s in str(message.get("path", "/")).split("/") if s]
        data = message.get("data")
        if event == "patch":
            touched: set[str] | None = set()
            for rel, value in (data or {}).items():
                more = self._put(segs + [s for s in rel.split("/") if s], value)
                touched = None if more is None or touched is None else touched | more
            return touched
        return self._put(segs, data)

    def _put(self, segs: list[str], value: Any) -> set[str] | None:
        if not segs:
            self.value = _as_tree(value)
            return None
        if not isinstance(self.value, dict):
            self.value = {}
        node = self.value
        for seg in segs[:-1]:
            child = node.get(seg)
            if not isinstance(child, dict):
                child = node[seg] = {}
            node = child
        if value is None:
            node.pop(segs[-1], None)
        else:
            node[segs[-1]] = _as_tree(value)
        return {segs[0]}

    def pop(self, key: str) -> Any:
        return self.value.pop(key, None) if isinstance(self.value, dict) else None


def _as_tree(value: Any) -> Any:
    if isinstance(value, list):
        return {str(i): _as_tree(v) for i, v in enumerate(value) if v is not None}
    if isinstance(value, dict):
        return {k: _as_tree(v) for k, v in value.items()}
    return value
