"""Parsing of the protocol's headers, query parameters and bodies; each failure is a 400.

Offsets are ``<record index, 16 digits>_<16 digits>``: fixed width, so their
lexicographic order is their numeric order, and never ``-1`` or ``now``. The
second field is zero for the streams of this server's store; it keeps the shape
other servers use, so the all-zero offset names the start of a stream everywhere.
A flow stream's offset past its end event has ``1`` there (:data:`END_MARK`): a
position must say whether it includes the end, since a stream whose producer was
lost ends at the next stored seq, which a client ahead of storage had as a chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any
from urllib.parse import parse_qs

from .. import protocol

START = -1
NOW = -2
MAX_SAFE_INT = 2**53 - 1

_OFFSET_RE = re.compile(r"^(\d{16})_(\d{16})$")
_TTL_RE = re.compile(r"^(0|[1-9]\d{0,15})$")
_INT_RE = re.compile(r"^(0|[1-9]\d{0,15})$")
_RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


class Headers:
    """Request headers read straight from the WSGI environ.

    Werkzeug's ``request.headers.get`` builds an exception for every header that
    is absent, and an append asks for half a dozen that usually are.
    """

    __slots__ = ("_environ",)

    def __init__(self, environ: dict[str, Any]) -> None:
        self._environ = environ

    def get(self, name: str) -> str | None:
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            if len(_ENVIRON_KEYS) < 256:  # the views' own names, not every name ever asked
                _ENVIRON_KEYS[name] = key
        value = self._environ.get(key)
        return value if value is None or isinstance(value, str) else str(value)


#: Header name -> its WSGI environ key, worked out once per name.
_ENVIRON_KEYS: dict[str, str] = {}


#: What a view answers on the fast path when only Flask can serve the request.
FLASK = object()


class Req:
    """One request as the views need it: straight from the WSGI environ, with or without Flask.

    ``stream`` is the body; ``fast`` is True on the WSGI fast path (:mod:`.fast`),
    where the views hand back :data:`FLASK` for what needs Flask's request.
    """

    __slots__ = ("environ", "method", "headers", "stream", "fast", "at", "_args")

    def __init__(self, environ: dict[str, Any], stream: IO[bytes], *, fast: bool = False) -> None:
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET").upper()
        self.headers = Headers(environ)
        self.stream = stream
        self.fast = fast
        #: When the request arrived, on the store's clock: expiry is decided at this time.
        self.at: float | None = None
        self._args: dict[str, list[str]] | None = None

    @property
    def args(self) -> dict[str, list[str]]:
        if self._args is None:
            query = self.environ.get("QUERY_STRING", "").encode("latin-1").decode(errors="replace")
            self._args = parse_qs(query, keep_blank_values=True)
        return self._args

    def arg(self, name: str) -> str | None:
        values = self.args.get(name)
        return values[0] if values else None

    @property
    def content_length(self) -> int | None:
        value = self.environ.get("CONTENT_LENGTH")
        if not value:
            return None
        try:
            return max(0, int(value))
        except ValueError:
            return None


class BadRequest(ValueError):
    """The request is malformed: the reply is 400 with this message."""


#: The second field of a flow stream's offset that includes the stream's end.
END_MARK = 1
_NO_MARK = f"{0:016d}"
_END_MARK = f"{END_MARK:016d}"


def format_offset(index: int, end: bool = False) -> str:
    """The offset of record ``index``; ``end``: a flow stream's, past its end event."""
    return f"{index:016d}_{_END_MARK if end else _NO_MARK}"


def offset_has_end(value: str) -> bool:
    """Whether a flow stream's offset includes the stream's end (its second field is
    :data:`END_MARK`); False for ``-1`` and ``now``. Any other second field is a 400:
    a flow stream's offsets come from this server, which writes only these two."""
    match = _OFFSET_RE.match(value)
    if match is None:
        return False
    mark = match.group(2)
    if mark == _NO_MARK:
        return False
    if mark == _END_MARK:
        return True
    raise BadRequest(
        f"malformed offset {value!r}: a flow stream's ends in _{_NO_MARK} or _{_END_MARK}"
    )


def parse_offset(value: str) -> int:
    """An offset token to a record index, or :data:`START` / :data:`NOW`."""
    if value == "-1":
        return START
    if value == "now":
        return NOW
    match = _OFFSET_RE.match(value)
    if match is None:
        raise BadRequest(f"malformed offset {value!r}")
    return int(match.group(1))


def parse_ttl(value: str) -> int:
    if not _TTL_RE.match(value):
        raise BadRequest("Stream-TTL must be a non-negative integer without leading zeros")
    return int(value)


def parse_expires_at(value: str) -> float:
    if not _RFC3339_RE.match(value.strip()):
        raise BadRequest("Stream-Expires-At must be an RFC 3339 timestamp")
    text = value.strip().replace("z", "Z").replace("Z", "+00:00")
    text = text[:10] + "T" + text[11:]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise BadRequest("Stream-Expires-At must be an RFC 3339 timestamp") from exc


def parse_int(name: str, value: str) -> int:
    if not _INT_RE.match(value) or int(value) > MAX_SAFE_INT:
        raise BadRequest(f"{name} must be a non-negative integer <= 2^53-1")
    return int(value)


@dataclass(frozen=True, slots=True)
class Producer:
    id: str
    epoch: int
    seq: int


def parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> Producer | None:
    given = [v is not None for v in (pid, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise BadRequest("Producer-Id, Producer-Epoch and Producer-Seq go together")
    assert pid is not None and epoch is not None and seq is not None
    if not pid.strip():
        raise BadRequest("Producer-Id must not be empty")
    return Producer(pid, parse_int("Producer-Epoch", epoch), parse_int("Producer-Seq", seq))


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def media_type(content_type: str | None) -> str:
    """The comparable part of a Content-Type: type/subtype, lower case, no parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


_MEDIA_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


def valid_media_type(content_type: str) -> bool:
    return _MEDIA_TYPE_RE.match(media_type(content_type)) is not None


def is_json(content_type: str) -> bool:
    return media_type(content_type) == "application/json"


def is_text(content_type: str) -> bool:
    return is_json(content_type) or media_type(content_type).startswith("text/")


def json_record(body: bytes, *, allow_empty: bool) -> bytes | None:
    """An append's body in JSON mode to one record (the compact array of its messages).

    A top-level array is flattened one level. None when there is no message
    (an empty body, or ``[]`` where allowed).
    """
    if not body.strip():
        if allow_empty:
            return None
        raise BadRequest("empty body")
    try:
        value: Any = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest("body is not valid JSON") from exc
    messages = value if isinstance(value, list) else [value]
    if not messages:
        if allow_empty:
            return None
        raise BadRequest("an empty JSON array appends nothing")
    try:
        return encode_messages(messages)
    except ValueError as exc:  # a number past a float's range (1e400) reads as infinity
        raise BadRequest("body is not valid JSON") from exc


def _no_constant(name: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON: readers in other languages would choke on them."""
    raise ValueError(f"{name} is not JSON")


def encode_messages(messages: list[Any]) -> bytes:
    """The messages as one JSON record, written as the flow fronts write JSON
    (:func:`..protocol.encode`: a lone surrogate as an escape, no ``NaN`` or ``Infinity``)."""
    return protocol.encode(messages).encode()


def join_json(records: list[bytes]) -> bytes:
    """Records (each a JSON array) to one JSON array of all their messages."""
    inner = b",".join(r[1:-1] for r in records if len(r) > 2)
    return b"[" + inner + b"]"
