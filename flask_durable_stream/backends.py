"""Storage backends by name: what ``DURABLE_STREAM_BACKEND`` selects.

The bundled backends are listed here; any installed package adds its own
through the ``flask_durable_stream.backends`` entry-point group::

    [project.entry-points."flask_durable_stream.backends"]
    mystore = "mystore_backend:MyStreamManager"

A backend is a :class:`~flask_durable_stream.StreamManager` subclass: the
extension sets its :attr:`~StreamManager.config_defaults` on the app and calls
its :meth:`~StreamManager.from_config`. Classes are imported only when selected,
so a backend's dependencies stay optional. See docs/backends.md.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from .managers.base import StreamManager

if TYPE_CHECKING:
    from flask import Flask

ENTRY_POINT_GROUP = "flask_durable_stream.backends"

#: The bundled backends: name -> (module, class). An installed package cannot
#: replace these names.
BUILTIN: dict[str, tuple[str, str]] = {
    "memory": ("flask_durable_stream.managers.memory", "InMemoryStreamManager"),
    "sqlite": ("flask_durable_stream.managers.sqlite", "SQLiteStreamManager"),
    "firestore": ("flask_durable_stream.managers.firestore", "FirestoreStreamManager"),
    "rtdb": ("flask_durable_stream.managers.rtdb", "RtdbStreamManager"),
    "redis": ("flask_durable_stream.managers.redis", "RedisStreamManager"),
}


def _plugins() -> dict[str, EntryPoint]:
    # Read on every call (cheap, once per init_app): a package installed while
    # the process runs is found, and nothing is cached across apps or tests.
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.lower(), ep)
    return found


def names() -> list[str]:
    """Every backend name that can be selected: the bundled ones, then installed packages'."""
    return [*BUILTIN, *sorted(set(_plugins()) - set(BUILTIN))]


def load(name: str) -> type[StreamManager]:
    """The backend class for ``name`` (case-insensitive); ``ValueError`` listing the known names."""
    key = name.strip().lower()
    if key in BUILTIN:
        module, attr = BUILTIN[key]
        cls = getattr(importlib.import_module(module), attr)
        where = f"{module}:{attr}"
    else:
        ep = _plugins().get(key)
        if ep is None:
            known = ", ".join(repr(n) for n in names())
            raise ValueError(
                f"DURABLE_STREAM_BACKEND={name!r} is not a known backend: use one of {known},"
                f" install a package that registers it in the {ENTRY_POINT_GROUP!r}"
                " entry-point group, or pass stream_manager= to DurableStream()"
            )
        cls = ep.load()
        where = ep.value
    if not (isinstance(cls, type) and issubclass(cls, StreamManager)):
        raise TypeError(f"backend {name!r} ({where}) is not a StreamManager subclass")
    return cls


def build_manager(app: Flask) -> StreamManager:
    """The manager ``DURABLE_STREAM_BACKEND`` names, built from the app's config.

    A configuration that can never work raises ``ValueError`` here, at
    ``init_app``, naming the setting to fix. Storage that is only unreachable
    for now does not: requests that need it get ``503 UNAVAILABLE`` until it
    comes back.
    """
    cls = load(str(app.config["DURABLE_STREAM_BACKEND"]))
    for key, value in cls.config_defaults.items():
        app.config.setdefault(key, value)
    return cls.from_config(app.config, app)
