"""Instructions per chunk and per stream, counted by valgrind: figures the load cannot move.

    .venv/bin/python bench/instructions.py [--servers memory,sqlite,plain] [--streams 5]

CPU time on a shared machine moves by 10-20 % from one run to the next, more than most
changes to the hot path are worth. ``valgrind --tool=callgrind`` counts the instructions
a process executes instead: the same count for the same code and inputs whatever else
the machine does (within 0.3 %; SQLite's per-chunk count within about 5 %, its writer
thread's hand-offs differing from run to run). The price is a process about 50 times slower, so this
runs a few slow streams, not a thousand: it measures the work per chunk and per stream,
not how a worker behaves when it is saturated (``bench/run.py`` does that).

Each measurement is one process (``--child``) that serves bench/core_server.py's app on
gevent's WSGIServer and drives it with raw-socket clients of its own (greenlets of the same
process, LLM-paced: 50 ms between chunks), two rounds of ``--streams`` streams (the first
warms up). Its count includes the clients' work and the process's start; differences
cancel both:

* per chunk: (streams of 41 chunks - streams of 1 chunk) / (40 x streams);
* per stream: (streams of 1 chunk, 9 x ``--streams`` of them - ``--streams`` of them)
  / (8 x ``--streams``), so per stream includes its one chunk.

The clients' share (a ``recv`` per chunk, a connection per stream) is in every server's
figure alike, so compare servers by their difference, not by their ratio. The SQLite
server's writer thread counts too; at this pace nearly every chunk is its own commit (a
busy worker shares commits between streams), so its per-chunk figure is an upper bound.

Needs valgrind (Debian's package). Prints figures; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PATHS = {
    "memory": "/flows/llm",
    "memory-dr": "/flows/llm",
    "memory-kr": "/flows/llm",
    "sqlite": "/flows/llm",
    "sqlite-si": "/flows/llm",
    "memory-pm": "/flows/llm",
    "sqlite-pm": "/flows/llm",
    "plain": "/plain_llm",
}
DELAY = 0.05
#: Bytes of BENCH_* variables every child gets (see count); more than any server's own.
ENV_PAD = 512


def child(path: str, streams: int, chunks: int, delay: float = DELAY) -> None:
    """Serve the benchmark app and run ``streams`` streams of ``chunks`` chunks, twice."""
    from gevent import monkey

    monkey.patch_all()
    import socket

    import gevent
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIServer

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    import core_server

    server = WSGIServer(("127.0.0.1", 0), core_server.create_app(), log=None, spawn=Pool(1000))
    server.start()
    body = json.dumps({"data": {"chunks": chunks, "delay": delay}}).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    def one() -> int:
        # Not create_connection: its getaddrinfo would run in gevent's resolver thread,
        # whose work (and waits for the interpreter lock) would be counted too.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.connect(("127.0.0.1", server.server_port))
            sock.sendall(request)
            received = 0
            while data := sock.recv(65536):
                received += len(data)
            return received

    for _ in range(2):
        clients = [gevent.spawn(one) for _ in range(streams)]
        gevent.joinall(clients)
        if not all(c.value and c.value > chunks * 20 for c in clients):
            raise SystemExit("a stream came back incomplete")
    server.stop()


def count(server: str, streams: int, chunks: int, delay: float = DELAY) -> int:
    """Instructions of one child process, as callgrind counts them."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    tmp = tempfile.mkdtemp(prefix="bench-instructions-")
    try:
        if server.startswith("sqlite"):
            env["BENCH_SQLITE"] = os.path.join(tmp, "streams.db")
        if server.endswith("-si"):  # each stream's events held up to 100 ms
            env["BENCH_SQLITE_STORE_INTERVAL"] = "0.1"
        if server.endswith("-dr"):  # the live stream's connection taken over
            env["BENCH_DETACH_RESPONSE"] = "1"
        if server.endswith("-kr"):  # kept by its response to the stream's end
            env["BENCH_DETACH_RESPONSE"] = "0"
        if server.endswith("-pm"):  # the Prometheus metrics on
            env["BENCH_METRICS"] = "1"
        # The same environment size for every server: the process's memory layout moves
        # with it, and so does the count (an unset variable of 23 bytes moved the in-memory
        # server's figure per chunk by 4.5k instructions, 4 %).
        size = sum(len(k) + len(v) + 2 for k, v in env.items() if k.startswith("BENCH_"))
        env["BENCH_PAD"] = "x" * (ENV_PAD - size)
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--child",
                PATHS[server],
                str(streams),
                str(chunks),
                "--delay",
                str(delay),
            ],  # fmt: skip
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{server}: callgrind run failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", default="memory,sqlite,plain")
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "STREAMS", "CHUNKS"))
    parser.add_argument(
        "--delay", type=float, default=DELAY, help="seconds between two chunks of a stream"
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.delay)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (Debian: apt-get install valgrind)")
    n = args.streams
    rows = []
    for server in [s for s in args.servers.split(",") if s]:
        one = count(server, n, 1, args.delay)
        per_chunk = (count(server, n, 41, args.delay) - one) / (2 * n * 40)
        per_stream = (count(server, 9 * n, 1, args.delay) - one) / (2 * 8 * n)
        rows.append((server, per_chunk, per_stream))
        print(f"{server:8s} {per_chunk / 1e3:8.1f}k instructions per chunk"
              f"  {per_stream / 1e3:8.0f}k per stream (with its chunk)", flush=True)  # fmt: skip
    plain = next((r for r in rows if r[0] == "plain"), None)
    if plain is not None:
        for server, per_chunk, per_stream in rows:
            if server != "plain":
                chunk, stream = (per_chunk - plain[1]) / 1e3, (per_stream - plain[2]) / 1e3
                print(
                    f"{server:8s} over plain Flask: {chunk:+.1f}k per chunk,"
                    f" {stream:+.0f}k per stream"
                )


if __name__ == "__main__":
    main()
