"""The thread-to-greenlet wake-ups (:class:`Signal`, :class:`Inbox`), with and without gevent,
and :class:`HubCallbacks` under gevent."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from flask_durable_stream._concurrency import gevent_patched
from tests.support import signal_cases
from tests.support.waiting import PATIENCE
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
    results: list[Any] = []
    # In a thread with a deadline: a lost wake-up hangs its case, and must fail, not hang the suite.
    thread = threading.Thread(target=lambda: results.append(signal_cases.run_all()), daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), f"a wake-up was lost: the cases still wait after {PATIENCE} s"
    assert results == [EXPECTED]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_under_gevent(patched_report: Any, case: str) -> None:
    assert patched_report["patched"] is True
    assert patched_report[case] == EXPECTED[case]


def test_hub_callbacks_from_a_native_thread() -> None:
    report = run_check("gevent_hub_callbacks_check")
    assert report["same"] is True  # one per hub
    assert report["order"] is True  # every post run, in order, in the hub's thread
    assert report["kept_alive"] is True  # an expected post keeps the loop running
    assert report["idle_returns"] is True  # and nothing expected keeps it running
    # 200,000 posts from another thread, libev's active count unchanged
    assert report["count"] == [200_000, 0]
    # A child forked while a post was due: its loop ends, the stale post never runs there
    # (exit 0; a loop kept alive would be killed by its alarm); the parent runs both.
    assert report["forked_child"] == 0
    assert report["parent_after_fork"] is True
