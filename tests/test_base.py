"""Defaults of the StreamManager base class, for third-party backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flask_durable_stream import Event, StreamManager


class OnlySubscribe(StreamManager):
    def subscribe(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[Event]:
        return iter([Event(0, "chunk", "1"), Event(1, "done", "2")])


class OnlyBatches(StreamManager):
    def subscribe_batches(
        self, stream_id: str, after: int = -1, *, timeout: float | None = None
    ) -> Iterator[list[Event]]:
        return iter([[Event(0, "chunk", "1"), Event(1, "done", "2")]])


def test_either_subscribe_method_gives_the_other() -> None:
    assert [len(b) for b in OnlySubscribe().subscribe_batches("s")] == [1, 1]
    assert [e.seq for e in OnlyBatches().subscribe("s")] == [0, 1]


def test_a_manager_with_neither_says_so() -> None:
    with pytest.raises(NotImplementedError, match="subscribe_batches or subscribe"):
        StreamManager().subscribe("s")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        StreamManager(lease_seconds=0)
    assert StreamManager(lease_seconds=5).heartbeat_interval == 1.0
