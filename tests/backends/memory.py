"""Backend plugin for the conformance suite: the in-memory manager."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from flask_durable_stream import InMemoryStreamManager, StreamManager


@pytest.fixture
def backend_memory() -> Iterator[Callable[..., StreamManager]]:
    made: list[StreamManager] = []

    def make(**options: object) -> StreamManager:
        manager = InMemoryStreamManager(**options)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()
