"""Durable Streams: this package's server beside the Node reference server, in one run.

    .venv/bin/python bench/bench_durable_streams.py [--appends 2000] [--writers 4]
                                                     [--polls 200] [--catch-up-mib 10]
                                                     [--rounds 3] [--workers gevent,pywsgi]

Servers, each on 127.0.0.1 and a free port, started and stopped here:

* ``reference``: ``@durable-streams/server`` (tests/ds, pinned) in its in-memory mode;
* ``sqlite``: gunicorn with one worker serving ``tests.support.ds_app`` on SQLite
  (durable: every append committed to a file); ``sqlite x2``: the same with two workers
  (requests land on either; the reference server's in-memory mode cannot have two);
* ``memory``: the same on the in-memory store, for scale.

Each of ours once per gunicorn worker class named by ``--workers``, the label saying which:
``[gevent]`` is ``-k gevent`` (the default recipe), ``[pywsgi]`` is
``-k flask_durable_stream.gunicorn_worker.PyWSGIWorker`` (gevent's own WSGI server with a
cheaper header parser; an option, see docs/durable-streams.md).

All run at once; ``--rounds`` rounds measure each in turn (so a change in the load of
the machine falls on every server alike), with the same Python client (keep-alive
``http.client`` connections) for each:

(a) small-message append throughput: ``--writers`` threads, each POSTing 32-byte
    messages to one stream, ``--appends`` in all; appends per second (median of rounds),
    and the server's CPU time per append (user + system of its processes over the phase:
    steadier than rates on a machine whose load changes).
(b) long-poll round trip: a reader long-polls the tail; the writer POSTs a message and
    times until the reader has it; p50 / p99 of ``--polls`` round trips per round.
(c) catch-up: a stream of ``--catch-up-mib`` MiB (64 KiB appends) read from ``-1`` to
    up-to-date following ``Stream-Next-Offset``; best and median of 5 reads per round.

Prints figures only; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import servers  # noqa: E402

DS = ROOT / "tests" / "ds"


class Conn:
    """One keep-alive connection to a server; ``base`` is the stream URL prefix path."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.base = parts.path.rstrip("/")
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)

    def call(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, self.base + path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


def create(url: str, name: str) -> None:
    conn = Conn(url)
    status, _, _ = conn.call("PUT", f"/{name}", headers={"Content-Type": "text/plain"})
    assert status == 201, status
    conn.close()


def appends(url: str, total: int, writers: int) -> float:
    name = f"append-{time.monotonic_ns()}"
    create(url, name)
    body = b"x" * 32
    per = total // writers

    def write() -> None:
        conn = Conn(url)
        for _ in range(per):
            status, _, _ = conn.call("POST", f"/{name}", body, {"Content-Type": "text/plain"})
            assert status == 204, status
        conn.close()

    threads = [threading.Thread(target=write) for _ in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return per * writers / (time.perf_counter() - start)


def long_poll(url: str, rounds: int) -> list[float]:
    name = f"poll-{time.monotonic_ns()}"
    create(url, name)
    writer, reader = Conn(url), Conn(url)
    _, headers, _ = writer.call("HEAD", f"/{name}")
    offset = headers["stream-next-offset"]
    samples: list[float] = []
    got = threading.Event()
    sent_at = [0.0]
    done = threading.Event()

    def read() -> None:
        nonlocal offset
        while not done.is_set():
            status, h, _ = reader.call("GET", f"/{name}?offset={offset}&live=long-poll")
            if status == 200:
                samples.append(time.perf_counter() - sent_at[0])
                offset = h["stream-next-offset"]
                got.set()

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.2)  # let the first long-poll reach the server
    for _ in range(rounds):
        got.clear()
        sent_at[0] = time.perf_counter()
        writer.call("POST", f"/{name}", b"ping", {"Content-Type": "text/plain"})
        got.wait(30)
        time.sleep(0.005)  # the reader is back in its long-poll
    done.set()
    writer.call("POST", f"/{name}", b"bye", {"Content-Type": "text/plain"})
    thread.join()
    writer.close()
    reader.close()
    return samples[:rounds]


def catch_up(url: str, mib: int) -> list[float]:
    name = f"catchup-{time.monotonic_ns()}"
    create(url, name)
    conn = Conn(url)
    block = os.urandom(64 * 1024)
    for _ in range(mib * 16):
        conn.call("POST", f"/{name}", block, {"Content-Type": "text/plain"})
    times = []
    for _ in range(5):
        offset, size = "-1", 0
        start = time.perf_counter()
        while True:
            _, headers, data = conn.call("GET", f"/{name}?offset={offset}")
            size += len(data)
            offset = headers["stream-next-offset"]
            if headers.get("stream-up-to-date") == "true":
                break
        times.append(time.perf_counter() - start)
        assert size == mib * 1024 * 1024, size
    conn.close()
    return times


def reference_server() -> tuple[subprocess.Popen[str], str]:
    port = servers.free_port()
    proc = subprocess.Popen(
        ["node", "reference_server.mjs", str(port)],
        cwd=DS,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    servers.wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}/v1/stream"


#: The ``--workers`` names: gunicorn worker classes.
WORKER_CLASSES = {
    "gevent": "gevent",
    "pywsgi": "flask_durable_stream.gunicorn_worker.PyWSGIWorker",
}


def ours(backend: str, tmp: Path, workers: int = 1, worker: str = "gevent") -> servers.Server:
    db = tmp / f"{backend}{workers}-{worker}.sqlite3"
    env = {"DS_BACKEND": backend, "DS_SQLITE_PATH": str(db)}
    port = servers.free_port()
    args = servers.gunicorn_args(
        "tests.support.ds_app:app", port, workers=workers, extra=["--keep-alive", "30"]
    )
    args[args.index("-k") + 1] = WORKER_CLASSES[worker]
    return servers.Server(args, port, env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children alive now (Linux ``/proc``)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    pids += [int(c) for c in children]
    tick = os.sysconf("SC_CLK_TCK")
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Figures:
    """One server's samples over every round."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu: list[float] = []  # server CPU seconds per append, per round
        self.rates: list[float] = []
        self.lags: list[float] = []
        self.reads: list[float] = []

    def p50(self) -> float:
        return statistics.median(self.lags)

    def line(self, label: str, mib: int, ref: Figures | None = None) -> str:
        lags = sorted(self.lags)
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        vs = ""
        if ref is not None and ref is not self:  # >1 is ahead of the reference, on both
            rate = statistics.median(self.rates) / statistics.median(ref.rates)
            lag = ref.p50() / self.p50()
            vs = f" | vs reference: appends {rate:4.2f}x, long-poll p50 {lag:4.2f}x"
        return (
            f"{label:<20} appends {statistics.median(self.rates):8.0f}/s"
            f" ({statistics.median(self.cpu) * 1e6:4.0f} us server CPU each)"
            f" | long-poll p50 {statistics.median(lags) * 1e3:6.2f} ms p99 {p99 * 1e3:6.2f} ms"
            f" | catch-up {mib} MiB best {min(self.reads) * 1e3:7.1f} ms"
            f" median {statistics.median(self.reads) * 1e3:7.1f} ms{vs}"
        )


def measure(url: str, args: argparse.Namespace, figures: Figures) -> None:
    before = cpu_seconds(figures.pid)
    figures.rates.append(appends(url, args.appends, args.writers))
    figures.cpu.append((cpu_seconds(figures.pid) - before) / args.appends)
    figures.lags.extend(long_poll(url, args.polls))
    figures.reads.extend(catch_up(url, args.catch_up_mib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--catch-up-mib", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", default="gevent,pywsgi", help="gunicorn worker classes: gevent, pywsgi"
    )
    args = parser.parse_args()
    kinds = [k.strip() for k in args.workers.split(",") if k.strip()]
    unknown = set(kinds) - set(WORKER_CLASSES)
    if unknown:
        parser.error(f"unknown worker classes: {', '.join(sorted(unknown))}")
    if not (DS / "node_modules" / "@durable-streams" / "server").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=DS, check=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        proc, url = reference_server()
        stack.callback(proc.wait, 30)
        stack.callback(os.killpg, proc.pid, signal.SIGTERM)  # callbacks run last first
        urls = {"reference": url}
        pids = {"reference": proc.pid}
        for kind in kinds:
            for name, backend, workers in (
                ("sqlite", "sqlite", 1),
                ("sqlite x2", "sqlite", 2),
                ("memory", "memory", 1),
            ):
                label = f"{name} [{kind}]"
                server = ours(backend, Path(tmp), workers, kind)
                stack.callback(server.stop)
                urls[label] = f"{server.url}/ds/bench"
                pids[label] = server.proc.pid  # gunicorn's master; its workers are its children
        figures = {label: Figures(pids[label]) for label in urls}
        # Rounds interleave the servers, so a change in the machine's load falls on all of them.
        for _ in range(args.rounds):
            for label, server_url in urls.items():
                measure(server_url, args, figures[label])
        for label, figs in figures.items():
            print(figs.line(label, args.catch_up_mib, figures["reference"]), flush=True)


if __name__ == "__main__":
    main()
