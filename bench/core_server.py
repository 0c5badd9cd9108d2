"""The server side of bench_core.py: gevent WSGIServer with a durable and a plain endpoint."""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench_flows import CHUNK, blast, llm  # noqa: E402
from flask import Flask, Response, request  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from flask_durable_stream import DurableStream, SQLiteStreamManager, protocol, tune_gc  # noqa: E402


def create_app() -> Flask:
    """The benchmark app; ``BENCH_SQLITE=<file>`` stores streams in SQLite, not in memory
    (``BENCH_SQLITE_STORE_INTERVAL``: its ``store_interval``, seconds);
    ``BENCH_FLOW_IN_RESPONSE`` sets ``DURABLE_STREAM_FLOW_IN_RESPONSE`` and
    ``BENCH_DETACH_RESPONSE`` ``DURABLE_STREAM_DETACH_RESPONSE`` (``1`` or ``0``; unset,
    the library's default); ``BENCH_METRICS=1`` turns the Prometheus metrics on
    (``DURABLE_STREAM_METRICS``). ``GET /storage``: the SQLite manager's writes and commits.

    Unless ``BENCH_GC=default``, the process's garbage collector is set up as the
    production recipe does (:func:`flask_durable_stream.tune_gc`, which the example's
    gunicorn.conf.py calls), for the plain endpoints as for the durable ones.
    """
    app = Flask(__name__)
    app.config["DURABLE_STREAM_TTL"] = 600.0
    for setting in ("FLOW_IN_RESPONSE", "DETACH_RESPONSE"):  # else the library's default
        value = os.environ.get("BENCH_" + setting)
        if value is not None:
            app.config["DURABLE_STREAM_" + setting] = value
    if os.environ.get("BENCH_METRICS"):
        app.config["DURABLE_STREAM_METRICS"] = True
    interval = os.environ.get("BENCH_STORE_INTERVAL")  # else the library's default
    if interval is not None:
        app.config["DURABLE_STREAM_MEMORY_STORE_INTERVAL"] = float(interval)
    sqlite = os.environ.get("BENCH_SQLITE")
    held = float(os.environ.get("BENCH_SQLITE_STORE_INTERVAL", "0"))
    manager = SQLiteStreamManager(sqlite, store_interval=held) if sqlite else None
    DurableStream(app, flows={"blast": blast, "llm": llm}, stream_manager=manager)

    @app.post("/plain")
    def plain() -> Response:
        n = int(request.get_json()["data"]["chunks"])
        frame = protocol.frame(protocol.CHUNK, protocol.encode(CHUNK)).encode()

        def generate():  # type: ignore[no-untyped-def]
            for _ in range(n):
                yield frame
            yield protocol.frame(protocol.DONE, '"end"').encode()

        return Response(generate(), mimetype="text/event-stream")

    @app.post("/plain_llm")
    def plain_llm() -> Response:
        data = request.get_json()["data"]

        def generate():  # type: ignore[no-untyped-def]
            for _ in range(int(data["chunks"])):
                time.sleep(float(data["delay"]))
                yield protocol.frame(protocol.CHUNK, protocol.encode(time.time())).encode()
            yield protocol.frame(protocol.DONE, '"end"').encode()

        return Response(generate(), mimetype="text/event-stream")

    if os.environ.get("BENCH_TRACEMALLOC"):
        memory_routes(app)

    @app.get("/rss")
    def rss() -> dict[str, int]:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            **{k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")},
            "cpu": usage.ru_utime + usage.ru_stime,  # type: ignore[dict-item]
        }

    @app.get("/storage")
    def storage() -> dict[str, int]:
        """The SQLite manager's writes so far (opens and appends) and the commits that
        carried them; empty on the in-memory manager."""
        if manager is None:
            return {}
        return {"writes": manager.operations, "commits": manager.transactions}

    if os.environ.get("BENCH_GC", "tuned") != "default":
        tune_gc()  # last: what the app holds is frozen
    return app


def memory_routes(app: Flask) -> None:
    """``GET /memory/baseline`` then ``GET /memory?n=N``: what N open streams hold, per stream
    (tracemalloc by line, greenlets, RSS); for bench/stream_memory.py only."""
    import collections
    import gc
    import tracemalloc

    import greenlet

    tracemalloc.start(1)
    state: dict[str, Any] = {}

    def counts() -> tuple[int, int]:
        gc.collect()
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects()), rss

    def tracked() -> collections.Counter[str]:
        """Objects the cyclic collector tracks (not frozen ones), by type."""
        return collections.Counter(type(o).__qualname__ for o in gc.get_objects())

    @app.get("/memory/baseline")
    def baseline() -> dict[str, int]:
        gc.collect()
        state["tracked"] = tracked()
        state["greenlets"], state["rss"] = counts()
        state["snapshot"] = tracemalloc.take_snapshot()
        return {"greenlets": state["greenlets"]}

    @app.get("/memory")
    def memory() -> dict[str, Any]:
        n = int(request.args["n"])
        gc.collect()
        objects = tracked()  # first: before the snapshot's own objects exist
        objects.subtract(state["tracked"])
        greenlets, rss = counts()
        snapshot = tracemalloc.take_snapshot()
        names = collections.Counter(
            str(getattr(o, "name", None) or type(o).__name__)
            for o in gc.get_objects()
            if isinstance(o, greenlet.greenlet) and not o.dead
        )
        diff = snapshot.compare_to(state["snapshot"], "lineno")
        traced = sum(d.size_diff for d in diff)
        return {
            "tracked_per_stream": objects.total() / n,
            "tracked_types": [[t, c / n] for t, c in objects.most_common(12)],
            "greenlets_per_stream": (greenlets - state["greenlets"]) / n,
            "rss_per_stream_kib": (rss - state["rss"]) / n,
            "traced_per_stream_bytes": traced / n,
            "greenlets": dict(names.most_common(8)),
            "top": [[str(d.traceback[0]), d.size_diff / n, d.count_diff / n] for d in diff[:120]],
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = WSGIServer(
        ("127.0.0.1", args.port), create_app(), log=None, spawn=Pool(10_000), backlog=4096
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
