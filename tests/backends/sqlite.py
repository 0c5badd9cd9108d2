"""Backend plugin for the conformance suite: the SQLite manager, one database file per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flask_durable_stream import StreamManager
from flask_durable_stream.managers.sqlite import SQLiteStreamManager


@pytest.fixture
def backend_sqlite(tmp_path: Path) -> Iterator[Callable[..., StreamManager]]:
    made: list[StreamManager] = []

    def make(**options: object) -> StreamManager:
        manager = SQLiteStreamManager(tmp_path / "streams.db", **options)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()
