"""An AI SDK client that stops reading, under gevent's monkey patching (in a subprocess).

The keep-alive pump reads at most a few chunks ahead of the client, so the client
falls behind and is dropped at the runner's live buffer bound (as a Genkit client
is) instead of the process holding the whole answer for it.
"""

from __future__ import annotations

from tests.test_gevent import run_check


def test_a_client_that_stops_reading_is_not_buffered_for() -> None:
    report = run_check("ai_sdk_slow_reader_check")
    assert report["ended"]  # the flow was not held up by the client for good
    # What the sockets held, not the answer (16 MB): the process kept nothing more for it.
    assert not report["stalled_done"]
    assert report["stalled_bytes"] < 16 * 1024 * 1024
    # Nothing lost: the answer is whole in storage, for the client's resume.
    assert report["resumed_chunks"] == 1000 and report["resumed_done"]
