"""The SQLite manager's ``store_interval``: events held back, and no reader misses any.

Used by tests/test_gevent.py. In a patched process, a runner over a
``SQLiteStreamManager`` starts flows that emit one chunk per step of the check.
"In the file" is what another process would read: a connection of the check's own
counts the stream's rows. With a 30 s interval and heartbeats 2 minutes apart,
nothing below can be the timer's or a heartbeat's doing; one case uses 0.5 s to
see the timer store. Prints a JSON report:

* ``held``: after each of two chunks (and a pause in which an append would have
  been committed), the rows in the file and the ``last_seq`` the manager reports:
  the chunks are held;
* ``follower``: a follower of this process that starts then: the events it got
  (the held ones first, then each chunk as it comes, then the end), how many it
  had within ``WAIT`` of starting, and the rows in the file then;
* ``appends``: the operations the writer thread committed for a stream of five
  chunks held and its end (its open and one append);
* ``end``: the rows in the file once the end was emitted after a held chunk, and
  the stream's status;
* ``timer``: rows in the file after one chunk, then after the 0.5 s timer with no
  read at all;
* ``invalid``: the error for a negative interval.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from flask_durable_stream import SQLiteStreamManager  # noqa: E402
from flask_durable_stream.runner import Runner  # noqa: E402
from tests.support.gevent_store_interval_check import Stepped  # noqa: E402

WAIT = 10.0  # for what must happen at once: far less than the 30 s interval


def rows_in_file(path: str, stream_id: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM ds_events WHERE stream_id = ?", (stream_id,)
            ).fetchone()[0]
        )


def until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check() and time.monotonic() < deadline:
        gevent.sleep(0.005)


def main() -> None:
    report: dict[str, Any] = {}
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "streams.db")
    # Heartbeats (an append's work when one is due) far apart too: none stores meanwhile.
    manager = SQLiteStreamManager(
        path, store_interval=30.0, lease_seconds=600.0, heartbeat_interval=120.0
    )
    runner = Runner(manager)

    flow = Stepped(["a", "b", "c", "d"])
    sid = runner.start("stepped", flow, None).stream_id
    held = []
    for _ in range(2):
        flow.step()
        gevent.sleep(0.2)  # an append sent now would be committed by then
        info = manager.info(sid)
        held.append([rows_in_file(path, sid), None if info is None else info.last_seq])
    report["held"] = held

    got: list[list[Any]] = []

    def follow() -> None:
        for event in manager.subscribe(sid, timeout=WAIT):
            got.append([event.seq, event.kind, event.payload])

    follower = gevent.spawn(follow)
    until(lambda: len(got) >= 2)
    had_two = len(got)  # long before the timer: the follower's read had them stored
    in_file = rows_in_file(path, sid)
    for count in (3, 4):
        flow.step()
        until(lambda count=count: len(got) >= count)  # type: ignore[misc]
    flow.go.set()  # the end
    follower.join(WAIT)
    report["follower"] = {"got": got, "had_two": had_two, "in_file_after_two": in_file}

    flow = Stepped(["x"] * 5)
    before = manager.operations
    sid = runner.start("stepped", flow, None).stream_id
    for _ in range(5):
        flow.step()
    flow.go.set()  # the end
    # Answered too (in_flight is counted down after the commit is counted), not only committed.
    until(lambda: rows_in_file(path, sid) >= 6 and manager.in_flight == 0)
    report["appends"] = manager.operations - before

    flow = Stepped(["y"])
    sid = runner.start("stepped", flow, None).stream_id
    flow.step()
    flow.go.set()  # the end, right after a held chunk
    until(lambda: rows_in_file(path, sid) >= 2)
    info = manager.info(sid)
    report["end"] = {
        "in_file": rows_in_file(path, sid),
        "status": None if info is None else info.status.value,
    }

    quick = SQLiteStreamManager(os.path.join(folder, "quick.db"), store_interval=0.5)
    quick_runner = Runner(quick)
    flow = Stepped(["t"])
    sid = quick_runner.start("stepped", flow, None).stream_id
    flow.step()
    first = rows_in_file(quick.path, sid)
    until(lambda: rows_in_file(quick.path, sid) >= 1)
    report["timer"] = [first, rows_in_file(quick.path, sid)]
    flow.go.set()
    gevent.sleep(0.05)  # it ends

    try:
        SQLiteStreamManager(os.path.join(folder, "bad.db"), store_interval=-1)
    except ValueError as exc:
        report["invalid"] = str(exc)
    runner.shutdown(5)
    quick_runner.shutdown(5)
    manager.close()
    quick.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
