"""What idle Durable Streams long-poll readers cost a server: its CPU while nothing is appended.

    .venv/bin/python bench/ds_idle_readers.py [--readers 500] [--seconds 5]
                                              [--servers sqlite,memory] [--workers gevent,pywsgi]

Each server (one gunicorn worker serving ``tests.support.ds_app``, whose long-poll timeout is
2 s) gets ``--readers`` long-poll readers of one stream that nobody appends to, each on its own
keep-alive connection (greenlets of this process), asking again as soon as a long-poll ends
empty. After 3 s of that, the worker's CPU time (user + system) over ``--seconds`` is printed
as a share of one core. A reader of a SQLite stream polls the file for other processes'
appends; how often is what this shows.

Prints figures only; nothing here asserts on time.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_durable_streams as ds  # noqa: E402

from tests.support.chaos import worker_pids  # noqa: E402

REQUEST = b"GET /ds/idle?offset=now&live=long-poll HTTP/1.1\r\nHost: bench\r\n\r\n"


def reader(port: int) -> None:
    """Long-poll the idle stream over and over (each answer is a head without a body)."""
    with socket.socket() as sock:
        sock.connect(("127.0.0.1", port))
        while True:
            sock.sendall(REQUEST)
            data = b""
            while b"\r\n\r\n" not in data:
                got = sock.recv(65536)
                if not got:
                    return
                data += got


def measure(backend: str, worker: str, readers: int, seconds: float) -> float:
    """The worker's CPU share of one core while ``readers`` idle long-polls wait."""
    with tempfile.TemporaryDirectory() as tmp:
        server = ds.ours(backend, Path(tmp), worker=worker)
        try:
            deadline = time.monotonic() + 30
            while not (pids := worker_pids(server)):
                if time.monotonic() > deadline:
                    raise RuntimeError("gunicorn started no worker")
                time.sleep(0.05)
            ds.create(server.url + "/ds", "idle")
            tasks = [gevent.spawn(reader, server.port) for _ in range(readers)]
            gevent.sleep(3)  # every reader is in its long-poll
            before, start = ds.cpu_seconds(pids[0]), time.monotonic()
            gevent.sleep(seconds)
            share = (ds.cpu_seconds(pids[0]) - before) / (time.monotonic() - start)
            gevent.killall(tasks)
        finally:
            server.stop()
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readers", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--servers", default="sqlite,memory")
    parser.add_argument("--workers", default="gevent,pywsgi")
    args = parser.parse_args()
    for worker in [w for w in args.workers.split(",") if w]:
        for backend in [b for b in args.servers.split(",") if b]:
            share = measure(backend, worker, args.readers, args.seconds)
            print(
                f"{backend:7s} [{worker}] {args.readers} idle long-poll readers:"
                f" worker CPU {share * 100:5.1f} % of a core",
                flush=True,
            )


if __name__ == "__main__":
    main()
