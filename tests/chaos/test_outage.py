"""Storage outages in the middle of a paced stream, with the default ``write_retry_timeout``.

The storage is frozen (SIGSTOP of redis-server, the emulator JVM or the RTDB
server; ``chattr +i`` on the SQLite files) for 5 s and for 60 s. The live client
gets the whole stream; once storage is back, the stored stream equals the live one
byte for byte, and new streams work again, with nothing restarted. This module
starts its own storage servers: a frozen server disturbs no other test.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator

import pytest

from tests.chaos.conftest import App, app_on_own_storage
from tests.chaos.test_kill import paced_bytes
from tests.support.chaos import assert_bytes, post, reattach_elsewhere

DURABLE = ["sqlite", "redis", "firestore", "rtdb"]
NA = {"memory": "the memory backend has no storage outside the worker to take away"}
COUNT = 80  # chunks, one every 50 ms: the outage starts after chunk 10


@pytest.fixture(scope="module", params=DURABLE)
def chaos(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    yield from app_on_own_storage(request.param, tmp_path_factory, "outage")


def outage(chaos: App, seconds: float) -> None:
    live = post(chaos.url, "paced", {"count": COUNT, "delay_ms": 50})
    assert live.reply.status == 200
    stream_id = live.reply.stream_id
    assert stream_id
    assert live.read_chunks(10) == 10
    with chaos.storage.outage():
        frozen_at = time.monotonic()
        try:
            rest = live.read()  # the live client is served from the flow, not from storage
        except (OSError, http.client.HTTPException) as exc:
            raise AssertionError(
                f"the live connection broke ({exc!r}); the server logged: {chaos.server.troubles()}"
            ) from None
        assert_bytes("the live client", rest.raw, paced_bytes(COUNT))
        time.sleep(max(0.0, seconds - (time.monotonic() - frozen_at)))  # the outage itself
    assert chaos.server.proc.poll() is None, f"gunicorn exited: {chaos.server.troubles()}"
    # From the other worker: from storage, then. It follows until the stream is stored.
    stored = reattach_elsewhere(chaos.url, "paced", stream_id, live.reply.pid).read()
    assert_bytes("the stored stream, after the outage", stored.raw, paced_bytes(COUNT))
    fresh = post(chaos.url, "paced", {"count": 5, "delay_ms": 1}).read()
    assert_bytes("a new stream after the outage", fresh.raw, paced_bytes(5))


@pytest.mark.chaos_case("storage outage of 5 s mid-stream: nothing lost", na=NA)
def test_five_second_outage_loses_nothing(chaos: App) -> None:
    outage(chaos, 5)


@pytest.mark.slow
@pytest.mark.chaos_case("storage outage of 60 s mid-stream: nothing lost", na=NA)
def test_sixty_second_outage_loses_nothing(chaos: App) -> None:
    outage(chaos, 60)
