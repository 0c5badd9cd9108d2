"""Storage gone (its server killed: connections refused) while readers follow from it.

Readers that follow a stream from storage, in the worker that does not run its flow,
end when storage goes away. What they leave behind in that worker must cost nothing:
a client library that keeps re-opening a closed listener (the Firestore client does,
a new thread, under gevent a greenlet, per attempt) would spin the worker's CPU for
as long as storage stays away, and every worker with readers would do the same.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.conftest import App, app_on_own_storage
from tests.support.chaos import (
    Exchange,
    post,
    reattach_elsewhere,
    worker_pids,
)

GONE = ["redis", "firestore", "rtdb"]
NA = {
    "memory": "the memory backend has no storage outside the worker to take away",
    "sqlite": "a file cannot refuse connections (its outage is tests/chaos/test_outage.py)",
}
FOLLOWERS = 3
#: CPU seconds the readers' worker may use in WATCH seconds once its readers have ended
#: (an idle gevent worker uses almost none; a re-open loop uses a whole core).
WATCH = 4.0
CPU_BOUND = 1.0


@pytest.fixture(scope="module", params=GONE)
def chaos(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[App]:
    yield from app_on_own_storage(request.param, tmp_path_factory, "gone")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.chaos_case("storage gone while readers follow: their worker goes idle", na=NA)
def test_readers_of_gone_storage_leave_their_worker_idle(chaos: App) -> None:
    live = post(chaos.url, "paced", {"count": 400, "delay_ms": 50})  # 20 s: outlives the test
    assert live.reply.status == 200 and live.reply.stream_id
    assert live.read_chunks(3) >= 3
    followers = [
        reattach_elsewhere(chaos.url, "paced", live.reply.stream_id, live.reply.pid)
        for _ in range(FOLLOWERS)
    ]
    for follower in followers:  # each follows from storage, past the stored start
        assert follower.read_chunks(5) >= 5
    readers_pid = followers[0].reply.pid
    assert {f.reply.pid for f in followers} == {readers_pid}, "two workers, one runs the flow"
    assert readers_pid in worker_pids(chaos.server)
    chaos.storage.stop()  # killed: every new connection is refused

    ends: list[BaseException | None] = []

    def read_to_end(follower: Exchange) -> None:
        try:
            follower.read()
            ends.append(None)
        except BaseException as exc:  # a cut connection is an end too
            ends.append(exc)

    readers = [threading.Thread(target=read_to_end, args=(f,)) for f in followers]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    assert len(ends) == FOLLOWERS, "a reader of gone storage never ended"
    live.close()
    # Every reader of that worker has ended: from now on it has nothing to do.
    time.sleep(1.0)  # the readers' own last steps (closing listeners, logging)
    before = cpu_seconds(readers_pid)
    time.sleep(WATCH)
    used = cpu_seconds(readers_pid) - before
    assert used <= CPU_BOUND, (
        f"the readers' worker used {used:.1f} s of CPU in {WATCH:.0f} s after its readers"
        f" ended (storage gone); the server logged: {chaos.server.troubles()}"
    )
