"""Third-party backends: a package made here, registered only through its entry point.

The package lives in a temporary directory with a ``.dist-info`` that declares
``toy = fds_toy_backend:ToyStreamManager`` in the ``flask_durable_stream.backends``
group, exactly what ``pip install`` of a package with that ``pyproject.toml``
entry point leaves behind. It is selected with ``DURABLE_STREAM_BACKEND="toy"``
and passes the shipped conformance kit, built through the extension.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_durable_stream import DurableStream, FlowContext, StreamManager, backends
from flask_durable_stream.extension import State
from flask_durable_stream.testing import MakeManager, StreamManagerContract

TOY_MODULE = '''
"""A backend of its own: the in-memory manager under another name and setting."""

from typing import Any, ClassVar, Mapping

from flask_durable_stream import InMemoryStreamManager
from flask_durable_stream.managers.base import common_options


class ToyStreamManager(InMemoryStreamManager):
    backend_name = "toy"
    config_defaults: ClassVar[Mapping[str, Any]] = {"TOY_HEARTBEAT_INTERVAL": 0.5}

    @classmethod
    def from_config(cls, config, app):
        if config.get("TOY_BROKEN"):
            raise ValueError("the toy backend needs TOY_BROKEN unset")
        interval = float(config["TOY_HEARTBEAT_INTERVAL"])
        return cls(heartbeat_interval=interval, **common_options(config))
'''


def make_distribution(root: Path) -> Path:
    """What ``pip install`` of the toy package leaves in site-packages."""
    (root / "fds_toy_backend").mkdir(parents=True)
    (root / "fds_toy_backend" / "__init__.py").write_text(textwrap.dedent(TOY_MODULE))
    info = root / "fds_toy_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fds-toy-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[flask_durable_stream.backends]\ntoy = fds_toy_backend:ToyStreamManager\n"
    )
    return root


@pytest.fixture(scope="module")
def toy_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = make_distribution(tmp_path_factory.mktemp("site"))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        yield root
    sys.modules.pop("fds_toy_backend", None)


def story(data: Any, ctx: FlowContext) -> Any:
    for i in range(3):
        ctx.send_chunk(i)
    return f"told {data}"


def state_of(app: Flask) -> State:
    state: State = app.extensions["durable_stream"]
    return state


def shut_down(app: Flask) -> None:
    state = state_of(app)
    state.runner.shutdown(5)
    assert state.manager is not None
    state.manager.close()


def test_an_unknown_backend_fails_at_init_app_listing_the_known_names() -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_BACKEND"] = "nosuch"
    with pytest.raises(ValueError) as info:
        DurableStream(app, flows={"story": story})
    message = str(info.value)
    assert "DURABLE_STREAM_BACKEND='nosuch' is not a known backend" in message
    assert "'memory', 'sqlite', 'firestore', 'rtdb', 'redis'" in message
    assert "flask_durable_stream.backends" in message
    assert "durable_stream" not in app.extensions


def test_an_installed_backend_is_listed_and_selected_by_name(toy_installed: Path) -> None:
    assert backends.names()[-1] == "toy"
    with pytest.raises(ValueError, match="'redis', 'toy', install a package"):
        backends.load("nosuch")
    app = Flask(__name__)
    app.config["DURABLE_STREAM_BACKEND"] = "toy"
    DurableStream(app, flows={"story": story})
    try:
        manager = state_of(app).manager
        assert type(manager).__module__ == "fds_toy_backend"
        assert app.config["TOY_HEARTBEAT_INTERVAL"] == 0.5  # the backend's own default
        assert manager is not None and manager.heartbeat_interval == 0.5
        client = app.test_client()
        response = client.post(
            "/flows/story", json={"data": "a tale"}, headers={"Accept": "text/event-stream"}
        )
        assert response.status_code == 200
        sid = response.headers["x-genkit-stream-id"]
        assert b'"result":"told a tale"' in response.data
        info = manager.info(sid)
        assert info is not None and info.last_seq == 3  # stored by the toy backend
    finally:
        shut_down(app)


def test_a_backends_config_error_surfaces_at_init_app(toy_installed: Path) -> None:
    app = Flask(__name__)
    app.config.update(DURABLE_STREAM_BACKEND="toy", TOY_BROKEN=True)
    with pytest.raises(ValueError, match="TOY_BROKEN"):
        DurableStream(app, flows={"story": story})


def test_a_bundled_name_cannot_be_taken_over(toy_installed: Path) -> None:
    assert backends.load("memory").__module__ == "flask_durable_stream.managers.memory"
    assert backends.load("TOY").__name__ == "ToyStreamManager"  # names are case-insensitive


@pytest.mark.usefixtures("toy_installed")
class TestToyBackendContract(StreamManagerContract):
    """The toy backend, selected by name through the extension, against every contract case."""

    shares_storage = False  # it keeps streams in each manager's memory

    @pytest.fixture
    def make_manager(self, toy_installed: Path) -> Iterator[MakeManager]:
        apps: list[Flask] = []
        settings = {
            "ttl_seconds": "DURABLE_STREAM_TTL",
            "timeout": "DURABLE_STREAM_TIMEOUT",
            "lease_seconds": "DURABLE_STREAM_LEASE",
            "heartbeat_interval": "TOY_HEARTBEAT_INTERVAL",
        }

        def make(**options: Any) -> StreamManager:
            app = Flask(__name__)
            app.config["DURABLE_STREAM_BACKEND"] = "toy"
            app.config.update({settings[key]: value for key, value in options.items()})
            DurableStream(app)
            apps.append(app)
            manager = state_of(app).manager
            assert manager is not None and type(manager).__name__ == "ToyStreamManager"
            return manager

        yield make
        for app in apps:
            shut_down(app)


def test_the_kit_without_pytest_names_the_test_extra() -> None:
    blocker = textwrap.dedent(
        """
        import sys

        class NoPytest:
            def find_spec(self, name, path=None, target=None):
                if name == "pytest" or name.startswith(("pytest.", "_pytest")):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoPytest())
        import flask_durable_stream  # the package itself needs no pytest
        try:
            import flask_durable_stream.testing
        except ImportError as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60, check=True
    )
    assert "install the 'test' extra" in done.stdout
    assert "flask_durable_stream[test]" in done.stdout


def test_a_bundled_backend_sets_only_its_own_settings(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config["DURABLE_STREAM_BACKEND"] = "SQLite"
    DurableStream(app, flows={"story": story})
    try:
        manager = state_of(app).manager
        assert type(manager).__name__ == "SQLiteStreamManager"
        assert app.config["DURABLE_STREAM_SQLITE_PATH"] is None  # its default: the instance folder
        assert (tmp_path / "instance").is_dir()
        assert "DURABLE_STREAM_REDIS_URL" not in app.config
        assert app.config["DURABLE_STREAM_TTL"] == 300.0
    finally:
        shut_down(app)


#: Each backend with a store interval: its setting, and the manager's class.
STORE_INTERVALS = {
    "memory": ("DURABLE_STREAM_MEMORY_STORE_INTERVAL", "InMemoryStreamManager"),
    "sqlite": ("DURABLE_STREAM_SQLITE_STORE_INTERVAL", "SQLiteStreamManager"),
}


@pytest.mark.parametrize(
    ("backend", "value", "expected"),
    [
        ("memory", None, 0.1),
        ("memory", 0, 0.0),
        ("memory", "0.5", 0.5),
        ("sqlite", None, 0.0),
        ("sqlite", "0.25", 0.25),
    ],
)
def test_a_backend_reads_its_store_interval(
    tmp_path: Path, backend: str, value: Any, expected: float
) -> None:
    setting, manager_class = STORE_INTERVALS[backend]
    app = Flask(__name__)
    app.config["DURABLE_STREAM_BACKEND"] = backend
    app.config["DURABLE_STREAM_SQLITE_PATH"] = str(tmp_path / "streams.db")
    if value is not None:
        app.config[setting] = value
    DurableStream(app, flows={"story": story})
    try:
        manager = state_of(app).manager
        assert type(manager).__name__ == manager_class
        assert manager.store_interval == expected
    finally:
        shut_down(app)


@pytest.mark.parametrize("backend", sorted(STORE_INTERVALS))
@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_a_store_interval_below_zero_or_nan_is_refused_at_init_app(
    tmp_path: Path, backend: str, value: float
) -> None:
    setting = STORE_INTERVALS[backend][0]
    app = Flask(__name__)
    app.config["DURABLE_STREAM_BACKEND"] = backend
    app.config["DURABLE_STREAM_SQLITE_PATH"] = str(tmp_path / "streams.db")
    app.config[setting] = value
    with pytest.raises(ValueError, match=setting):
        DurableStream(app, flows={"story": story})


def test_a_bundled_backend_names_the_setting_it_misses() -> None:
    app = Flask(__name__)
    app.config["DURABLE_STREAM_BACKEND"] = "rtdb"
    with pytest.raises(ValueError, match="needs DURABLE_STREAM_RTDB_URL"):
        DurableStream(app, flows={"story": story})
