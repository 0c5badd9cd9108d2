"""SQLite storage of running flows under gevent: without a flush task per batch, and whole.

Used by tests/test_gevent.py. Runs concurrent flows on a SQLiteStreamManager in a
patched process, first with working storage, then with storage failing for the
first appends of each stream, then both again with the Prometheus metrics on, and
prints a JSON report: per phase, whether every stored stream equals what its flow
emitted, how many flush tasks the runner started (the task that retries with backoff
and owns the fault model), and with metrics, how many appends and retries they counted.
Last, streams that append in one turn of the hub's loop: how many requests and
transactions of the writer thread that took.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from flask_durable_stream import FlowContext, SQLiteStreamManager, protocol  # noqa: E402
from flask_durable_stream.exceptions import StorageUnavailable  # noqa: E402
from flask_durable_stream.managers.base import Event  # noqa: E402
from flask_durable_stream.runner import Runner  # noqa: E402
from tests.support.waiting import PATIENCE  # noqa: E402

STREAMS = 20
CHUNKS = 30


def flow(data: Any, ctx: FlowContext) -> int:
    for n in range(CHUNKS):
        ctx.send_chunk({"stream": data, "n": n})
        gevent.sleep(0.002)  # LLM-paced: each chunk stored on its own
    return int(data)


def sample(name: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"backend": "SQLite"}) or 0.0


def phase(manager: SQLiteStreamManager, fail_first: int, metrics: bool = False) -> dict[str, Any]:
    """Run the flows; the first ``fail_first`` appends of each stream fail (transiently)."""
    runner = Runner(manager, write_retry_timeout=30)
    if metrics:
        from flask_durable_stream.metrics import PrometheusMetrics

        runner.metrics = PrometheusMetrics()
    counted = {
        name: sample(name)
        for name in (
            "durable_stream_storage_write_seconds_count",
            "durable_stream_storage_lag_seconds_count",
            "durable_stream_storage_retries_total",
        )
    }
    appends = [0]
    failed = [0]  # appends that failed: the injected faults, and their requests' others
    spawned = [0]
    spawn = runner._spawn_flush

    def counting(fn: Any) -> Any:
        spawned[0] += 1
        return spawn(fn)

    runner._spawn_flush = counting  # type: ignore[method-assign]
    append = manager._op_append
    failing: dict[str, int] = {}

    def flaky(conn: Any, stream_id: str, *args: Any) -> Any:
        if nested[0]:
            return append(conn, stream_id, *args)
        left = failing.setdefault(stream_id, fail_first)
        if left > 0:
            failing[stream_id] = left - 1
            failed[0] += 1
            raise StorageUnavailable("injected: storage is down")
        appends[0] += 1
        return append(conn, stream_id, *args)

    append_many = manager._op_append_many
    nested = [False]

    def flaky_many(conn: Any, entries: Any) -> Any:
        # The appends of several streams, in one request: it fails (each stream in it
        # retries) if any of them is due a fault, as a commit fails for all of its parts.
        due = [
            stream_id for stream_id, _, _ in entries if failing.setdefault(stream_id, fail_first)
        ]
        for stream_id in due:
            failing[stream_id] -= 1
        if due:
            failed[0] += len(entries)
            raise StorageUnavailable("injected: storage is down")
        nested[0] = True  # the ones it stores one by one are counted here, once
        try:
            results = append_many(conn, entries)
        finally:
            nested[0] = False
        appends[0] += sum(not isinstance(result, BaseException) for result in results)
        return results

    manager._op_append = flaky  # type: ignore[method-assign]
    manager._op_append_many = flaky_many  # type: ignore[method-assign]
    runs = [runner.start("count", flow, n) for n in range(STREAMS)]
    for run in runs:
        assert run.wait(PATIENCE) is not None
    assert runner.tasks.join(PATIENCE)
    expected = [[{"stream": n, "n": i} for i in range(CHUNKS)] + [n] for n in range(STREAMS)]
    stored = [[e.value for e in manager.subscribe(run.stream_id)] for run in runs]
    runner.shutdown(PATIENCE)
    manager._op_append = append  # type: ignore[method-assign]
    manager._op_append_many = append_many  # type: ignore[method-assign]
    return {
        "equal": stored == expected,
        "flush_tasks": spawned[0],
        "faults_injected": fail_first * len(failing) - sum(failing.values()),
        "appends": appends[0],  # stored ones (the stream's end included)
        "failed": failed[0],
        # What the metrics counted meanwhile (0 without them).
        "counted": {name.split("_", 3)[-1]: sample(name) - n for name, n in counted.items()},
    }


def together(manager: SQLiteStreamManager, streams: int = 10) -> dict[str, Any]:
    """``streams`` writers each append in the same turn of the hub's loop, twice (a chunk,
    then their ends): what the writer thread got for it."""
    writers = [manager.open(f"together-{n}") for n in range(streams)]
    before = manager.transactions, manager.operations
    submit, requests = manager._writer.submit_nowait, [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        requests[0] += 1
        return submit(*args, **kwargs)

    manager._writer.submit_nowait = counting  # type: ignore[method-assign]
    answers: list[BaseException | None] = []
    for kind, payload in ((protocol.CHUNK, '"a chunk"'), (protocol.DONE, '"the end"')):
        for writer in writers:  # no yield in between
            assert writer.append_nowait([Event(writer.next_seq, kind, payload)], answers.append)
        while len(answers) < streams * (1 + (kind == protocol.DONE)):
            gevent.sleep(0.001)
    manager._writer.submit_nowait = submit  # type: ignore[method-assign]
    return {
        "answers": [repr(answer) for answer in answers],
        "requests": requests[0],
        "transactions": manager.transactions - before[0],
        "operations": manager.operations - before[1],
        "stored": [
            [(e.kind, e.value) for e in manager.subscribe(writer.stream_id)] for writer in writers
        ],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # No heartbeat falls due during the check (they go through the flush task, by
        # design): what is counted is the storing alone, however slow the machine.
        manager = SQLiteStreamManager(
            str(Path(tmp) / "streams.db"), lease_seconds=7200, heartbeat_interval=3600
        )
        try:
            report = {
                "working": phase(manager, 0),
                "failing": phase(manager, 3),
                "measured": phase(manager, 0, metrics=True),
                "measured_failing": phase(manager, 3, metrics=True),
                "together": together(manager),
            }
        finally:
            manager.close()
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
