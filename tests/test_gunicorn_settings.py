"""``read_settings_once``: a gunicorn worker reads its settings as plain attributes.

gunicorn's ``Config`` answers every setting from ``__getattr__``, which Python calls only
after a failed lookup has built an ``AttributeError``: about 35 such reads a request in a
``-k gevent`` worker. The copy the production recipe's ``post_worker_init`` gives the
worker must answer exactly what gunicorn's own settings answer.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config

from flask_durable_stream import gunicorn as hooks
from flask_durable_stream.client import DurableStreamClient
from tests.support import servers


def _config() -> Config:
    cfg = Config()
    cfg.set("keepalive", 9)
    cfg.set("forwarded_allow_ips", "10.0.0.0/8,127.0.0.1")
    cfg.set("certfile", "/etc/cert.pem")
    cfg.set("limit_request_line", 1234)
    return cfg


def test_the_copy_answers_what_gunicorns_settings_answer() -> None:
    original = _config()
    worker = SimpleNamespace(cfg=original)
    assert hooks.read_settings_once(worker) is True
    copy = worker.cfg
    assert copy is not original
    assert isinstance(copy, Config)
    for name in original.settings:
        assert getattr(copy, name) == getattr(original, name), name
    assert copy.keepalive == 9 and copy.limit_request_line == 1234
    assert copy.is_ssl == original.is_ssl == "/etc/cert.pem"
    assert copy.forwarded_allow_networks() == original.forwarded_allow_networks()
    assert str(copy) == str(original)
    with pytest.raises(AttributeError, match="No configuration setting for: no_such"):
        copy.no_such  # noqa: B018


def test_a_setting_set_on_the_copy_is_read_back_from_it() -> None:
    worker = SimpleNamespace(cfg=_config())
    hooks.read_settings_once(worker)
    worker.cfg.set("keepalive", 3)
    assert worker.cfg.keepalive == 3
    assert worker.cfg.settings["keepalive"].get() == 3
    with pytest.raises(AttributeError):
        worker.cfg.set("no_such", 1)


def test_settings_are_read_by_attribute_not_through_getattr(monkeypatch: Any) -> None:
    worker = SimpleNamespace(cfg=_config())
    hooks.read_settings_once(worker)
    reads: list[str] = []
    lookup = Config.__getattr__

    def counted(self: Any, name: str) -> Any:
        reads.append(name)
        return lookup(self, name)

    monkeypatch.setattr(Config, "__getattr__", counted)
    cfg = worker.cfg
    assert [cfg.keepalive, cfg.is_ssl, cfg.accesslog] == [9, "/etc/cert.pem", None]
    assert reads == []
    assert _config().keepalive == 9
    assert reads == ["keepalive"]  # gunicorn's own settings: through __getattr__


def test_only_a_gunicorn_config_is_copied_and_only_once() -> None:
    assert hooks.read_settings_once(SimpleNamespace(cfg={"keepalive": 2})) is False
    assert hooks.read_settings_once(SimpleNamespace()) is False
    worker = SimpleNamespace(cfg=_config())
    assert hooks.read_settings_once(worker) is True
    copy = worker.cfg
    assert hooks.read_settings_once(worker) is False
    assert worker.cfg is copy


@pytest.mark.parametrize("settings_once", [True, False], ids=["settings-once", "gunicorns-own"])
def test_a_gevent_worker_serves_streams_without_reading_settings_through_getattr(
    settings_once: bool, tmp_path: Path
) -> None:
    """Through ``gunicorn -k gevent``: with the hook's default no request reads a setting
    through ``Config.__getattr__``; without it every request does (so the count counts)."""
    reads = tmp_path / "reads"
    env = {"SETTINGS_ONCE": "1" if settings_once else "0", "SETTINGS_READS": str(reads)}
    extra = ["-c", "tests/support/settings_conf.py"]
    server = servers.gunicorn("tests.support.admission_app:app", env=env, extra=extra)
    try:
        client = DurableStreamClient(f"{server.url}/flows")
        for _ in range(3):
            stream = client.stream("count", {"chunks": 4})
            assert list(stream) == [f"chunk {i}" for i in range(4)]
            assert stream.result == "done"
            replay = client.resume("count", stream.stream_id)
            assert list(replay) == [f"chunk {i}" for i in range(4)]
        with urllib.request.urlopen(server.url + "/admission", timeout=30) as response:
            assert json.load(response)["pid"] > 0  # a plain request too
    finally:
        server.stop()
    counts = [line.split() for line in reads.read_text().splitlines()]
    assert len(counts) == 7
    per_request = [int(n) for _, n in counts[1:]]  # the first also counts the worker's start
    if settings_once:
        assert per_request == [0] * 6
    else:
        assert min(per_request) > 10
