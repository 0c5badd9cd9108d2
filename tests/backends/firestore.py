"""Backend plugin for the conformance suite: Firestore, on Google's own emulator.

Starts one emulator JVM for the session (``firestore_emulator`` fixture, also
used by other test modules). Each test gets its own collection (shared by the
managers it makes, like two processes), so tests never see each other's streams.
Without java or the emulator JAR the Firestore tests fail loudly, unless
``DURABLE_STREAM_SKIP_FIRESTORE=1`` opts out.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flask_durable_stream import StreamManager
from tests.support.firestore_emulator import (
    SKIP_ENV,
    EmulatorUnavailable,
    FirestoreEmulator,
    find_jar,
    find_java,
)
from tests.support.loud import missing_server_hooks


def _missing() -> str | None:
    try:
        find_jar()
        find_java()
    except EmulatorUnavailable as exc:
        return str(exc)
    return None


pytest_report_header, pytest_terminal_summary = missing_server_hooks(
    "Firestore emulator", "Firestore", _missing, SKIP_ENV
)


class _SessionEmulator:
    """The emulator as tests see it: where it is, a shared client, and a reset."""

    def __init__(self, emulator: FirestoreEmulator) -> None:
        self.emulator = emulator
        self.host = emulator.host
        self.project = emulator.project
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = self.emulator.client()
        return self._client

    def reset(self) -> None:
        self.emulator.reset()


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[_SessionEmulator]:
    missing = _missing()
    if missing is not None:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{SKIP_ENV}=1 and {missing}")
        pytest.fail(f"Firestore emulator unavailable: {missing} (set {SKIP_ENV}=1 to skip)")
    emulator = FirestoreEmulator().start()
    try:
        yield _SessionEmulator(emulator)
    finally:
        emulator.stop()


@pytest.fixture
def backend_firestore(
    firestore_emulator: _SessionEmulator,
) -> Iterator[Callable[..., StreamManager]]:
    from flask_durable_stream import FirestoreStreamManager

    made: list[StreamManager] = []
    collection = f"streams-{uuid.uuid4().hex[:12]}"

    def make(**options: Any) -> StreamManager:
        options.setdefault("collection", collection)
        options.setdefault("client", firestore_emulator.client())
        manager = FirestoreStreamManager(**options)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()
