"""The public surface: ``__all__`` is sorted, complete and importable."""

from __future__ import annotations

import sys

import pytest

import flask_durable_stream


def test_all_is_sorted_and_importable() -> None:
    names = flask_durable_stream.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(flask_durable_stream, name) is not None


def test_every_public_class_is_exported() -> None:
    from flask_durable_stream import exceptions, managers

    public = {n for n in vars(exceptions) if n[0].isupper() and n not in {"HTTP_STATUS", "Any"}}
    public |= set(managers.__all__)
    missing = public - set(flask_durable_stream.__all__) - {"InvalidRequest"}
    assert not missing


def test_optional_backends_load_lazily() -> None:
    from flask_durable_stream.managers.sqlite import SQLiteStreamManager

    assert flask_durable_stream.SQLiteStreamManager is SQLiteStreamManager
    with pytest.raises(AttributeError):
        flask_durable_stream.NoSuchThing  # noqa: B018


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("flask_durable_stream.managers.rtdb"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "firebase_admin", None)
    with pytest.raises(ImportError, match=r"flask_durable_stream\[rtdb\]"):
        flask_durable_stream.__getattr__("RtdbStreamManager")
