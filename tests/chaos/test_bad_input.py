"""Bad input gets a 4xx JSON error, never a 500, however it is framed, on every backend."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.conftest import App, app_on
from tests.support.chaos import BACKENDS, Exchange, post

JSON = {"Content-Type": "application/json"}
STREAM = {**JSON, "Accept": "text/event-stream"}
#: Integers Python's int() takes that are not the canonical spelling of an event id, and
#: misspellings of the end's (``<seq>-end``).
NON_CANONICAL = ["01", "+1", " 1", "1 ", "1_0", "\u0661", "-0", "0x1", "1.0", "1e0"]
NON_CANONICAL += ["1-END", "01-end", "-end", "1end", "1-end-end"]


@pytest.fixture(scope="module", params=BACKENDS)
def chaos(
    request: pytest.FixtureRequest, shared_storage: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    log = tmp_path_factory.mktemp("log") / "gunicorn.log"
    yield from app_on(request.param, shared_storage(request.param), log)


def error_of(exchange: Exchange) -> tuple[int, str]:
    """HTTP status and error status name of a JSON error reply; anything else fails."""
    reply = exchange.read()
    try:
        body = reply.json()
        assert isinstance(body, dict) and isinstance(body["message"], str) and body["message"]
    except (ValueError, KeyError, AssertionError):
        raise AssertionError(
            f"expected a JSON error; got HTTP {reply.status} {reply.raw[:200]!r}"
        ) from None
    return reply.status, str(body.get("status", ""))


@pytest.mark.chaos_case("bad input: JSON nested 50,000 deep -> 400 INVALID_ARGUMENT")
@pytest.mark.parametrize("headers", [JSON, STREAM], ids=["plain", "streaming"])
def test_deeply_nested_json_is_invalid_argument(chaos: App, headers: dict[str, str]) -> None:
    depth = 50_000
    body = b'{"data":' + b"[" * depth + b"]" * depth + b"}"
    exchange = Exchange(chaos.url, "POST", "/flows/echo", body, headers)
    assert error_of(exchange) == (400, "INVALID_ARGUMENT")


def chunked(body: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.chaos_case("bad input: 3 MB body -> 413, Content-Length or chunked")
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_body_is_413_however_framed(chaos: App, framing: str) -> None:
    body = json.dumps({"data": "x" * 3_000_000}).encode()
    if framing == "chunked":
        exchange = Exchange(chaos.url, "POST", "/flows/echo", chunked(body), JSON, chunked=True)
    else:
        exchange = Exchange(chaos.url, "POST", "/flows/echo", body, JSON)
    status, _ = error_of(exchange)
    assert status == 413


@pytest.mark.chaos_case("bad input: non-canonical Last-Event-ID / after -> 400")
@pytest.mark.parametrize("value", NON_CANONICAL, ids=repr)
def test_event_ids_are_canonical_integers(chaos: App, value: str) -> None:
    done = post(chaos.url, "paced", {"count": 2, "delay_ms": 1}).read()
    assert done.terminal is not None and done.terminal[0] == "done"
    path = f"/flows/paced/events?streamId={done.stream_id}"
    # The control: the canonical spelling is served.
    ok = Exchange(chaos.url, "GET", path, headers={"Last-Event-ID": "0"}).read()
    assert ok.status == 200 and b"id: 1\n" in ok.raw, ok
    assert b"id: 2-end\nevent: result\n" in ok.raw, ok  # the end's id, which is read back:
    had_end = Exchange(chaos.url, "GET", path, headers={"Last-Event-ID": "2-end"}).read()
    assert had_end.status == 204, had_end
    # A header value cannot carry surrounding spaces (HTTP strips them) or non-Latin-1 text.
    if value == value.strip() and value.isascii():
        by_header = Exchange(chaos.url, "GET", path, headers={"Last-Event-ID": value})
        assert error_of(by_header) == (400, "INVALID_ARGUMENT")
    by_query = Exchange(chaos.url, "GET", f"{path}&after={quote(value)}")
    assert error_of(by_query) == (400, "INVALID_ARGUMENT")


def quote(value: str) -> str:
    from urllib.parse import quote as url_quote

    return url_quote(value, safe="")
