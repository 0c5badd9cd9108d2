"""What one open stream holds in the server: tracemalloc by line, greenlets and RSS, per stream.

    python bench/stream_memory.py [--streams 300] [--server memory|sqlite|plain]

Starts the benchmark server (bench/core_server.py; ours under ``gunicorn -k gevent -w 1``,
plain Flask on gevent's WSGIServer) with tracemalloc on, opens N LLM-paced streams that
stay open for several seconds, and while they are all open asks the server what it holds
beyond a baseline taken before. tracemalloc sees Python allocations only: greenlet stacks
and the interpreter's per-greenlet frame stacks show in RSS, not in the traced total.
Also the objects the cyclic garbage collector tracks, per stream, by type.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import PATHS, server  # noqa: E402


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as response:
        return json.loads(response.read())


def open_stream(port: int, path: str, chunks: int, delay: float) -> socket.socket:
    body = json.dumps({"data": {"chunks": chunks, "delay": delay}}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + body)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument(
        "--server",
        default="memory",
        choices=[
            "memory",
            "memory-1g",
            "memory-dr",
            "memory-kr",
            "sqlite",
            "sqlite-1g",
            "sqlite-dr",
            "sqlite-kr",
            "plain",
        ],  # fmt: skip
    )
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    os.environ["BENCH_TRACEMALLOC"] = "1"
    chunks, delay = 40, 0.25  # open for 10 s
    with server(args.server) as (port, _pid):
        for _ in range(3):  # warm up: imports, first-use caches
            open_stream(port, PATHS[args.server], 2, 0.01).recv(65536)
        time.sleep(1.0)
        get(port, "/memory/baseline")
        socks = [open_stream(port, PATHS[args.server], chunks, delay) for _ in range(args.streams)]
        stop = threading.Event()

        def drain() -> None:  # read every stream, so none is a slow reader
            while not stop.is_set():
                for sock in socks:
                    sock.setblocking(False)
                    try:
                        while sock.recv(65536):
                            pass
                    except OSError:
                        pass
                time.sleep(0.05)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        time.sleep(4.0)
        figures = get(port, f"/memory?n={args.streams}")
        stop.set()
        for sock in socks:
            sock.close()
    print(f"{args.server}, {args.streams} open streams:")
    print(f"  greenlets per stream: {figures['greenlets_per_stream']:.2f}")
    print(f"  live greenlets by name: {figures['greenlets']}")
    print(f"  RSS per stream: {figures['rss_per_stream_kib']:.1f} KiB")
    print(f"  objects the collector tracks, per stream: {figures['tracked_per_stream']:.0f}")
    print("    " + ", ".join(f"{t} {c:.1f}" for t, c in figures["tracked_types"]))
    print(f"  traced (Python allocations) per stream: {figures['traced_per_stream_bytes']:.0f} B")
    for where, size, count in figures["top"][: args.top]:
        print(f"  {size:8.0f} B {count:6.1f} blocks  {where}")


if __name__ == "__main__":
    main()
