"""``tune_gc``, the production recipe's call of it, and the library's greenlets' footprint.

Each case runs in a fresh patched process: the collector's settings are process-wide.
"""

from __future__ import annotations

from typing import Any

import pytest

from flask_durable_stream import tune_gc
from tests.test_gevent import run_check


def check(step: str) -> Any:
    return run_check("gc_check", step)


def test_tune_gc_freezes_what_is_loaded_and_collects_the_young_generation_less_often() -> None:
    report = check("tune_gc")
    assert report["before"] == [700, 10, 10]  # CPython's defaults: the process was untouched
    # Young collections rarer; middle ones more often (each smaller); full ones as rare.
    assert report["after"] == [10_000, 2, 50]
    assert report["frozen"] > 10_000  # modules, gevent, Flask and the library, never scanned again


def test_tune_gc_without_freeze_only_sets_the_thresholds() -> None:
    report = check("tune_gc_no_freeze")
    assert report["after"] == [5_000, 2, 50]
    assert report["frozen"] == 0


def test_the_example_gunicorn_conf_tunes_the_collector_and_keeps_the_stop_hook() -> None:
    report = check("example_conf")
    assert report["stop_hook"] is True
    assert report["after"] == [10_000, 2, 50]
    assert report["frozen"] > 10_000


def test_a_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        tune_gc(0)


def test_library_greenlets_keep_no_record_of_their_spawner() -> None:
    report = check("tasks")
    assert report["ran"] is True
    assert report["gevent_greenlet"] is True
    assert report["name"] == "flow-x"
    assert report["spawning_stack"] == "None"
    assert (
        report["plain_spawning_stack"] is True
    )  # what gevent keeps by default, in the same process
