"""The one Server-Sent Events decoder, by the WHATWG parsing rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

Lines end with CRLF, LF or CR (also when a CRLF is split across two reads);
``field:value`` and ``field: value`` are the same (one leading space is
dropped); several ``data`` lines join with ``\\n``; an ``id`` containing NUL is
ignored and the last good id carries over to later events; ``retry`` counts
only when it is all ASCII digits; lines starting with ``:`` are comments; a
block without ``data`` dispatches nothing; an unfinished block at the end of
the stream is dropped. Used by the Python client, the Realtime Database reader
and the tests.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. ``id`` is the stream's last event id at that point ("" if none)."""

    event: str = "message"
    data: str = ""
    id: str = ""

    def json(self) -> Any:
        return json.loads(self.data)


class SSEDecoder:
    """Incremental: :meth:`feed` text as it arrives, get the events it completes.

    ``on_comment`` and ``on_retry`` see comments (without the colon and one
    leading space) and valid ``retry`` values, in stream order.
    """

    def __init__(
        self,
        *,
        on_comment: Callable[[str], None] | None = None,
        on_retry: Callable[[int], None] | None = None,
    ) -> None:
        self.on_comment = on_comment
        self.on_retry = on_retry
        #: The last valid ``retry`` value, in milliseconds.
        self.retry: int | None = None
        #: The last valid ``id``; it carries over to events without one.
        self.last_event_id = ""
        self._event = ""
        self._data: list[str] = []
        self._buffer = ""
        self._started = False
        self._skip_lf = False  # the last feed ended with CR: a LF that follows belongs to it

    def feed(self, text: str) -> Iterator[ServerSentEvent]:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf and text:
            self._skip_lf = False
            text = text.removeprefix("\n")
        buffer = self._buffer + text
        start = 0
        for match in _EOL.finditer(buffer):
            line = buffer[start : match.start()]
            start = match.end()
            if start == len(buffer) and match.group() == "\r":
                self._skip_lf = True
            event = self.line(line)
            if event is not None:
                yield event
        self._buffer = buffer[start:]

    def line(self, line: str) -> ServerSentEvent | None:
        """Process one line (without its end); return the event a blank line dispatches."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            if self.on_comment is not None:
                self.on_comment(line[1:].removeprefix(" "))
            return None
        field, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
                if self.on_retry is not None:
                    self.on_retry(self.retry)
        return None  # any other field is ignored

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(event or "message", "\n".join(data), self.last_event_id)


def decode(text: str | Iterable[str], decoder: SSEDecoder | None = None) -> list[ServerSentEvent]:
    """Every complete event in ``text`` (a string or its pieces)."""
    decoder = decoder or SSEDecoder()
    pieces = [text] if isinstance(text, str) else text
    return [event for piece in pieces for event in decoder.feed(piece)]


class _Readable(Protocol):
    def read1(self, n: int = ..., /) -> bytes: ...


def iter_text(response: _Readable, *, size: int = 65536) -> Iterator[str]:
    """A byte stream (an ``http.client`` response) as text, piece by piece as it arrives."""
    # Incremental: a read may end inside a character. Bad bytes become U+FFFD (the spec's rule).
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while data := response.read1(size):
        yield utf8.decode(data)


def read_events(
    response: _Readable, decoder: SSEDecoder | None = None
) -> Iterator[ServerSentEvent]:
    """The events of a byte stream (an ``http.client`` response), as they arrive."""
    decoder = decoder or SSEDecoder()
    for text in iter_text(response):
        yield from decoder.feed(text)
