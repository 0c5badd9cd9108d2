"""The chaos and limits suite: the production recipe (``gunicorn -k gevent``, 2 workers where
the backend allows) against every backend, with real storage servers.

Each case carries a ``chaos_case`` marker naming its row in RELIABILITY.md (see
``report.py``); its backend is the ``backend`` parameter of the module's ``app``
fixture. Storage for the modules that never pause it is shared by the session; the
outage module starts its own, so a stopped server disturbs no other test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.chaos import LoggedServer, Storage, start_app, start_storage


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos_case(name, na=None, backend=None): a row of RELIABILITY.md; na maps a"
        " backend the case does not apply to to the reason; backend names the column of a"
        " case whose app fixture has no backend parameter",
    )


@dataclass
class App:
    backend: str
    storage: Storage
    server: LoggedServer

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def shared_storage(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], Storage]]:
    started: dict[str, Storage] = {}

    def get(backend: str) -> Storage:
        if backend not in started:
            started[backend] = start_storage(backend, tmp_path_factory.mktemp(f"chaos-{backend}"))
        return started[backend]

    yield get
    for storage in started.values():
        storage.stop()


def app_on(
    backend: str,
    storage: Storage,
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[App]:
    """A gunicorn of the chaos app on ``storage``, stopped afterwards.

    Its log is not checked for tracebacks: each case asserts what clients get, and a
    failure there is reported on that case, not on whichever case ran last.
    """
    server = start_app(storage, log, env)
    try:
        yield App(backend, storage, server)
    finally:
        server.stop()


def app_on_own_storage(
    backend: str, tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[App]:
    """:func:`app_on`, on storage of its own (started here, stopped afterwards): for the
    modules that pause, kill or fill their storage, so no other test is disturbed.
    A case that stopped the storage for good leaves nothing to stop."""
    storage = start_storage(backend, tmp_path_factory.mktemp(f"{name}-{backend}"))
    try:
        yield from app_on(backend, storage, tmp_path_factory.mktemp("log") / "gunicorn.log")
    finally:
        with contextlib.suppress(ProcessLookupError):
            storage.stop()
