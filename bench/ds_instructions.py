"""Instructions per Durable Streams append, counted by valgrind, per gunicorn worker class.

    .venv/bin/python bench/ds_instructions.py [--servers memory,sqlite,plain]
                                              [--workers gevent,pywsgi] [--appends 200]

``bench/bench_durable_streams.py`` measures appends per second and the server's CPU time
per append; on a shared 2-core machine both move by 20-40 % from one run to the next,
more than most changes are worth. ``valgrind --tool=callgrind`` counts the instructions
the server's worker executes instead, the same count for the same code and requests
whatever else the machine does. Each measurement is one ``gunicorn -w 1`` under
callgrind (it follows the fork into the worker) serving ``tests.support.ds_app`` (or, for
``plain``, a Flask view that answers the same requests with the same status and nothing
stored), driven by one keep-alive client in this process: a ``PUT`` then ``--appends``
``POST``s of 32 bytes one after the other, and the same with three times as many appends;
the difference over the extra appends is the worker's cost per append, its start and
its stop cancelled out. One client at a time means one append per SQLite commit (several
writers share commits): SQLite's figure is the most an append costs it.

Worker classes: ``gevent`` is ``-k gevent`` (the default recipe), ``pywsgi`` is
``-k flask_durable_stream.gunicorn_worker.PyWSGIWorker``. ``plain`` under each says what
the worker class and Flask cost a request by themselves; the difference to it is what
this package adds to an append.

Needs valgrind (Debian's package). Prints figures; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from bench_durable_streams import WORKER_CLASSES  # noqa: E402

from tests.support import servers  # noqa: E402

APPS = {
    "memory": "tests.support.ds_app:app",
    "sqlite": "tests.support.ds_app:app",
    "plain": "ds_plain_app:app",
}
BODY = b"x" * 32


def drive(port: int, appends: int) -> None:
    """One keep-alive connection: create a stream, append to it ``appends`` times."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(method: str, status: int) -> None:
        conn.request(method, "/ds/bench", body=BODY if method == "POST" else b"",
                     headers={"Content-Type": "text/plain"})  # fmt: skip
        response = conn.getresponse()
        response.read()
        if response.status != status:
            raise SystemExit(f"{method} answered {response.status}, not {status}")

    call("PUT", 201)
    for _ in range(appends):
        call("POST", 204)
    conn.close()


def count(server: str, worker: str, appends: int) -> int:
    """Instructions of the gunicorn worker process, as callgrind counts them."""
    tmp = tempfile.mkdtemp(prefix="bench-ds-instructions-")
    port = servers.free_port()
    env = dict(
        os.environ,
        PYTHONHASHSEED="0",
        DS_BACKEND=server if server != "plain" else "memory",
        DS_SQLITE_PATH=os.path.join(tmp, "streams.db"),
        PYTHONPATH=os.pathsep.join([str(BENCH), str(ROOT)]),
    )
    args = servers.gunicorn_args(APPS[server], port, extra=["--keep-alive", "600", "-t", "600"])
    args[args.index("-k") + 1] = WORKER_CLASSES[worker]
    errors = Path(tmp) / "valgrind.txt"
    try:
        with open(errors, "w") as err:
            proc = subprocess.Popen(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--trace-children=yes",
                    "--callgrind-out-file=/dev/null",
                    *args,
                ],  # fmt: skip
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        try:
            servers.wait_for_port(port, timeout=300)
            time.sleep(1)  # the worker is up once it accepts; let its boot's last work end
            drive(port, appends)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=300)
        text = errors.read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = {int(p): int(n) for p, n in re.findall(r"==(\d+)== Collected : (\d+)", text)}
    found.pop(proc.pid, None)  # the master: what it counts depends on how long it ran
    if len(found) != 1:
        raise RuntimeError(f"{server}/{worker}: expected one worker's count:\n{text[-3000:]}")
    return next(iter(found.values()))


def per_append(server: str, worker: str, n: int) -> float:
    """(count with 3n appends - count with n) / 2n; the two runs side by side."""
    figures: dict[int, int] = {}

    def one(appends: int) -> None:
        figures[appends] = count(server, worker, appends)

    threads = [threading.Thread(target=one, args=(k,)) for k in (n, 3 * n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(figures) != 2:
        raise SystemExit(f"{server}/{worker}: a count failed")
    return (figures[3 * n] - figures[n]) / (2 * n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="memory,sqlite,plain")
    parser.add_argument("--workers", default="gevent,pywsgi")
    parser.add_argument("--appends", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (Debian: apt-get install valgrind)")
    n = args.appends
    rows: dict[tuple[str, str], float] = {}
    for worker in [w for w in args.workers.split(",") if w]:
        for server in [s for s in args.servers.split(",") if s]:
            per = per_append(server, worker, n)
            rows[(server, worker)] = per
            print(f"{server:7s} [{worker}] {per / 1e3:8.1f}k instructions per append", flush=True)
    for (server, worker), per in rows.items():
        plain = rows.get(("plain", worker))
        if server != "plain" and plain is not None:
            over = (per - plain) / 1e3
            print(f"{server:7s} [{worker}] over plain Flask: {over:+.1f}k per append")


if __name__ == "__main__":
    main()
