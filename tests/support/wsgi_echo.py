"""A bare WSGI app that answers with what the server gave it: for tests of worker classes.

``/stream`` answers in three parts without a length (the server then chunks it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

#: The environ keys a worker class must fill the same way (besides every ``HTTP_*``).
KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_PROTOCOL",
    "wsgi.url_scheme",
)


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _parts()
    body = environ["wsgi.input"].read()
    seen = {k: environ.get(k) for k in KEYS}
    seen.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
    seen["body"] = body.decode("latin-1")
    data = json.dumps(seen, sort_keys=True).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def _parts() -> Iterator[bytes]:
    yield from (b"one ", b"two ", b"three")
