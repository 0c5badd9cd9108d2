"""The thread-to-greenlet wake-up (:class:`Signal`, :class:`Inbox`), with and without gevent."""

from __future__ import annotations

from typing import Any

import pytest

from flask_durable_stream._concurrency import gevent_patched
from tests.support import signal_cases
from tests.test_gevent import run_check

EXPECTED = {
    "set_before_wait": [True, False, False],
    "wait_times_out": False,
    "native": {"woken": True, "ticks": 5},
    "many": 300,
    "inbox": True,
}


@pytest.fixture(scope="module")
def patched_report() -> Any:
    return run_check("gevent_signal_check")


def test_cases_run_unpatched_here() -> None:
    assert not gevent_patched()
    assert signal_cases.run_all() == EXPECTED


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_under_gevent(patched_report: Any, case: str) -> None:
    assert patched_report["patched"] is True
    assert patched_report[case] == EXPECTED[case]
