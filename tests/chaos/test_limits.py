"""Limits: big and many events emitted as fast as a flow can, on every backend.

A replay from another worker than the producer's (from storage, then) equals the
live bytes; where the backend cannot store an event, every reader gets the same
RESOURCE_EXHAUSTED frame naming the size (within 2 s on a quiet machine: the target, a benchmark
figure; the test only proves the frame ended them), and never "Producer lost".
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flask_durable_stream import protocol
from tests.chaos.app import filler
from tests.chaos.conftest import App, app_on
from tests.support.chaos import (
    BACKENDS,
    Exchange,
    Reply,
    assert_bytes,
    post,
    reattach_elsewhere,
    summary,
    workers_for,
)

MiB = 1024 * 1024
#: Firestore stores a document of at most 1 MiB; every other backend stores a 5 MiB event
#: (RTDB: a string of up to 10 MB). See docs/backend-limits.md.
MAX_EVENT = {"firestore": MiB}
SIZE_MESSAGE = re.compile(r"\b[\d,]+ bytes\b.*\bat most [\d,]+")
#: Every reader has the terminal error within 2 s on a quiet machine (the target); the test
#: bound only proves the error frame ended them, not their own 60 s inactivity timeout.
BOUND = 20.0


@pytest.fixture(scope="module", params=BACKENDS)
def chaos(
    request: pytest.FixtureRequest, shared_storage: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    log = tmp_path_factory.mktemp("log") / "gunicorn.log"
    yield from app_on(request.param, shared_storage(request.param), log)


def case(name: str, flow: str, data: dict[str, int]) -> Any:
    return pytest.param(flow, data, id=name, marks=pytest.mark.chaos_case(f"limits: {name}"))


def expected_events(flow: str, data: dict[str, int]) -> list[tuple[str, str]]:
    """(kind, payload JSON) of every event the flow emits, in order."""
    if flow == "burst":
        chunks = [
            (protocol.CHUNK, protocol.encode(filler(i, data["size"]))) for i in range(data["count"])
        ]
        return [*chunks, (protocol.DONE, protocol.encode({"count": data["count"]}))]
    return [(protocol.DONE, protocol.encode(filler(0, data["size"])))]


def follow(exchange: Exchange, into: list[Reply | BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            into.append(exchange.read())
        except BaseException as exc:  # reported by the test
            into.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("flow", "data"),
    [
        case("10,000 x 1 KiB chunks", "burst", {"count": 10_000, "size": 1024}),
        case("100,000 x 16 B chunks", "burst", {"count": 100_000, "size": 16}),
        case("1 x 2 MiB chunk", "burst", {"count": 1, "size": 2 * MiB}),
        case("5 MiB output", "output", {"size": 5 * MiB}),
    ],
)
def test_replay_from_another_worker_equals_the_live_bytes(
    chaos: App, flow: str, data: dict[str, int]
) -> None:
    events = expected_events(flow, data)
    limit = MAX_EVENT.get(chaos.backend)
    too_large = [
        i for i, (_, payload) in enumerate(events) if limit and len(payload.encode()) > limit
    ]
    live_exchange = post(chaos.url, flow, data)
    started = time.monotonic()  # the run exists once its headers are in
    assert live_exchange.reply.status == 200, live_exchange.reply
    stream_id = live_exchange.reply.stream_id
    assert stream_id
    other = live_exchange.reply.pid if workers_for(chaos.backend) > 1 else None
    # A follower on the other worker while the flow runs, then a replay once it is over.
    followed: list[Reply | BaseException] = []
    thread = follow(reattach_elsewhere(chaos.url, flow, stream_id, other), followed)
    live = live_exchange.read()
    thread.join(300)
    assert not thread.is_alive(), "the follower never ended"
    follower = followed[0]
    assert isinstance(follower, Reply), follower
    replay_started = time.monotonic()
    replay = reattach_elsewhere(chaos.url, flow, stream_id, other).read()

    if not too_large:
        expected = b"".join(protocol.frame(kind, payload).encode() for kind, payload in events)
        assert_bytes("the live client", live.raw, expected)
        assert_bytes("the follower on another worker", follower.raw, expected)
        assert_bytes("the replay from another worker", replay.raw, expected)
        return
    first = too_large[0]
    body = live.terminal[1] if live.terminal else None
    if not (
        live.terminal is not None
        and live.terminal[0] == protocol.ERROR
        and body["status"] == "RESOURCE_EXHAUSTED"
        and SIZE_MESSAGE.search(body["message"])
    ):
        raise AssertionError(
            f"event {first} is over the backend's {limit:,} bytes: expected a RESOURCE_EXHAUSTED"
            f" frame naming the size; the live client got {summary(live.raw)}"
        )
    stored = b"".join(protocol.frame(k, p).encode() for k, p in events[:first])
    assert_bytes("the live client", live.raw, stored + protocol.error_frame(body).encode())
    assert_bytes("the follower on another worker", follower.raw, live.raw)
    assert_bytes("the replay from another worker", replay.raw, live.raw)
    for name, reply, since in (
        ("live", live, started),
        ("follower", follower, started),
        ("replay", replay, replay_started),
    ):
        took = reply.ended_at - since
        assert took <= BOUND, f"the {name} reader got the terminal error after {took:.1f} s"
