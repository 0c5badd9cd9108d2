"""The SQLite manager behind real servers. Run: ``.venv/bin/python bench/bench_sqlite_server.py``.

    .venv/bin/python bench/bench_sqlite_server.py [--chunks 20000] [--repeat 21]
                                                  [--follow-chunks 500] [--follow-delay 0.01]

(a) One stream of 20,000 chunks x 16 bytes through one gevent WSGIServer process that
    serves the same flow twice: durable on SQLite and on the in-memory manager. Time to
    the last byte of the live stream and of the replay of the finished stream, median and
    best of ``--repeat`` alternating runs (a shared machine is noisy); throughput ratio
    SQLite / in-memory (target >= 0.7 for the live stream). Before each timed run the
    server runs a full garbage collection (untimed), so neither manager pays at random
    for collecting the events of earlier runs.
(b) Follow latency through HTTP with ``gunicorn -k gevent -w 2`` on one SQLite file: a
    flow emits ``time.time()`` every 10 ms; three clients read it at the same time: the
    starting request (live, from the producing process), a reconnect that landed on the
    same worker and one that landed on the other worker (found by the ``X-Worker-Pid``
    header this app adds). p50/p99/max of receive - emit.

Prints figures only; nothing here asserts on time. The same file is the server:
``--serve --port N`` (gevent WSGIServer) or ``bench_sqlite_server:create_app()`` (gunicorn,
run with ``--chdir bench``).
"""

import sys

if __name__ == "__main__" and "--serve" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench_flows import blast, llm, read_lags  # noqa: E402
from flask import Flask, Response  # noqa: E402

from flask_durable_stream import (  # noqa: E402
    InMemoryStreamManager,
    SQLiteStreamManager,
    durable_stream_blueprint,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}
TTL = 600.0


# -- the server ----------------------------------------------------------------------------------
def create_app() -> Flask:
    """``/sqlite/<flow>`` and ``/memory/<flow>``: the same flows on both managers."""
    app = Flask(__name__)
    flows = {"blast": blast, "llm": llm}
    sqlite = SQLiteStreamManager(os.environ["BENCH_SQLITE_PATH"], ttl_seconds=TTL)
    memory = InMemoryStreamManager(TTL)
    for name, manager in (("sqlite", sqlite), ("memory", memory)):
        bp = durable_stream_blueprint(flows, stream_manager=manager, name=name)
        app.register_blueprint(bp, url_prefix=f"/{name}")

    @app.post("/_collect")
    def collect() -> str:
        # Between timed runs, untimed: both managers then start from the same clean heap
        # instead of paying a full collection of earlier runs' events at random.
        gc.collect()
        return ""

    @app.after_request
    def worker_pid(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    return app


def serve(port: int) -> None:
    from gevent.pywsgi import WSGIServer

    server = WSGIServer(("127.0.0.1", port), create_app(), log=None)
    server.serve_forever()


# -- the client ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            time.sleep(0.05)
    raise TimeoutError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post(
    port: int, path: str, body: Any, stream_id: str | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = dict(SSE)
    if stream_id is not None:
        headers["x-genkit-stream-id"] = stream_id
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    return conn, conn.getresponse()


def timed(
    port: int, path: str, body: Any, stream_id: str | None = None
) -> tuple[float, bytes, str]:
    started = time.perf_counter()
    conn, response = post(port, path, body, stream_id)
    data = response.read()
    elapsed = time.perf_counter() - started
    sid = response.getheader("x-genkit-stream-id") or ""
    conn.close()
    return elapsed, data, sid


def collect(port: int) -> None:
    """Run a full garbage collection in the server, between timed runs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/_collect")
    conn.getresponse().read()
    conn.close()


def bench_throughput(chunks: int, repeat: int, tmp: str) -> None:
    port = free_port()
    env = {"BENCH_SQLITE_PATH": os.path.join(tmp, "throughput.sqlite3")}
    proc = start(
        [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port)], port, env
    )
    body = {"data": {"chunks": chunks}}
    times: dict[str, dict[str, list[float]]] = {
        m: {"live": [], "replay": []} for m in ("memory", "sqlite")
    }
    size = 0
    try:
        for manager in ("memory", "sqlite"):  # warm up both paths
            timed(port, f"/{manager}/blast", body)
        reference = None
        for _ in range(repeat):
            for manager in ("memory", "sqlite"):
                collect(port)
                t, live, sid = timed(port, f"/{manager}/blast", body)
                times[manager]["live"].append(t)
                t, again, _ = timed(port, f"/{manager}/blast", {}, sid)
                times[manager]["replay"].append(t)
                assert again == live, f"{manager}: the replay differs from the live stream"
                reference = reference or live
                assert live == reference, "SQLite and in-memory streams differ"
                size = len(live)
    finally:
        stop(proc)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    best = {m: {k: min(v) for k, v in d.items()} for m, d in times.items()}
    print(
        f"(a) one stream of {chunks} chunks x 16 B ({size} bytes), gevent WSGIServer,"
        f" {repeat} runs each, alternating"
    )
    print("                       time to last byte: median (best)     chunks/s at the median")
    for m in ("memory", "sqlite"):
        for k in ("live", "replay"):
            t, b = med[m][k], best[m][k]
            print(
                f"    {m:7} {k:7}      {t * 1000:8.1f} ms ({b * 1000:6.1f} ms)"
                f"   {chunks / t:13,.0f}"
            )
    for k in ("live", "replay"):
        ratio = med["memory"][k] / med["sqlite"][k]
        ratio_best = best["memory"][k] / best["sqlite"][k]
        target = "   (target >= 0.7)" if k == "live" else ""
        print(
            f"    throughput SQLite / in-memory, {k:6}: {ratio:.2f} at the median,"
            f" {ratio_best:.2f} best to best{target}"
        )


def reconnect_on(
    port: int, sid: str, want_other_than: str | None, want_pid: str | None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """Reconnect until the request lands on the wanted worker (gunicorn picks one at random)."""
    for _ in range(200):
        conn, response = post(port, "/sqlite/llm", {}, sid)
        pid = response.getheader("X-Worker-Pid") or ""
        if (want_other_than is not None and pid != want_other_than) or pid == want_pid:
            return conn, response, pid
        conn.close()
    raise RuntimeError("could not land on the wanted worker")


def stats(lags: list[float]) -> str:
    lags = sorted(lags)
    if not lags:
        return "no chunks"
    p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] * 1000  # noqa: E731
    return (
        f"p50 {p(0.5):6.1f} ms   p99 {p(0.99):6.1f} ms   max {lags[-1] * 1000:6.1f} ms"
        f"   ({len(lags)} chunks)"
    )


def bench_follow(chunks: int, delay: float, tmp: str) -> None:
    port = free_port()
    env = {"BENCH_SQLITE_PATH": os.path.join(tmp, "follow.sqlite3")}
    args = [
        os.path.join(BIN, "gunicorn"),
        "-k",
        "gevent",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "--no-control-socket",
        "--chdir",
        os.path.join(ROOT, "bench"),
        "bench_sqlite_server:create_app()",
    ]
    proc = start(args, port, env)
    try:
        for _ in range(4):  # both workers import everything before we measure
            timed(port, "/sqlite/llm", {"data": {"chunks": 1, "delay": 0}})
        body = {"data": {"chunks": chunks, "delay": delay}}
        conn, response = post(port, "/sqlite/llm", body)
        sid = response.getheader("x-genkit-stream-id") or ""
        producer = response.getheader("X-Worker-Pid") or ""
        other = reconnect_on(port, sid, want_other_than=producer, want_pid=None)
        same = reconnect_on(port, sid, want_other_than=None, want_pid=producer)
        lags: dict[str, list[float]] = {"live": [], "same": [], "other": []}
        readers = [
            threading.Thread(target=read_lags, args=(response, lags["live"], time.time())),
            threading.Thread(target=read_lags, args=(same[1], lags["same"], time.time())),
            threading.Thread(target=read_lags, args=(other[1], lags["other"], time.time())),
        ]
        for r in readers:
            r.start()
        for r in readers:
            r.join()
        for c in (conn, same[0], other[0]):
            c.close()
    finally:
        stop(proc)
    print(
        f"(b) follow latency (receive - emit), gunicorn -k gevent -w 2, one SQLite file,"
        f" {chunks} chunks every {delay * 1000:.0f} ms"
    )
    print(f"    starting request, producing worker {producer}:   {stats(lags['live'])}")
    print(f"    reconnect on the same worker {same[2]}:         {stats(lags['same'])}")
    print(f"    reconnect on the other worker {other[2]}:        {stats(lags['other'])}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help="run the gevent server")
    parser.add_argument("--port", type=int)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--follow-chunks", type=int, default=500)
    parser.add_argument("--follow-delay", type=float, default=0.01)
    args = parser.parse_args()
    if args.serve:
        serve(args.port)
        return
    tmp = tempfile.mkdtemp(prefix="bench-sqlite-server-")
    try:
        bench_throughput(args.chunks, args.repeat, tmp)
        bench_follow(args.follow_chunks, args.follow_delay, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
