"""The public surface: ``__all__`` is sorted, complete and importable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import flask_durable_stream

ROOT = Path(__file__).resolve().parents[1]


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


def test_version_comes_from_the_package_metadata() -> None:
    import re
    from importlib.metadata import version

    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    assert declared is not None
    assert flask_durable_stream.__version__ == version("flask_durable_stream") == declared[1]


def test_the_sdist_is_the_library_and_its_docs_without_tests(tmp_path: Path) -> None:
    # Built offline from a copy of the tree, so the checkout gets no egg-info.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "node_modules", "__pycache__", "*.egg-info", ".*_cache", "dist"
        ),
    )
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(f"{sdist.name[: -len('.tar.gz')]}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    library = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "flask_durable_stream").rglob("*")
        if path.suffix in (".py", ".typed")
    }
    assert library <= names
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "docs/sqlite.md"} <= names
    shipped_dirs = {name.split("/")[0] for name in names if "/" in name}
    assert not shipped_dirs & {"tests", "bench", "example_app", "scripts", ".ci"}, shipped_dirs
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    for label in ("Homepage", "Documentation", "Changelog", "Issues"):
        assert f"Project-URL: {label}, https://github.com/flask-durable-stream/" in metadata
