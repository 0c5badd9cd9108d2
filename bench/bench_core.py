"""Core benchmark: durable (in-memory) vs plain Flask streaming; 2,000 LLM-paced streams.

    python bench/bench_core.py [--chunks 20000] [--streams 2000] [--repeat 5]

``--streams 0`` runs (a) only.

(a) One stream of 20,000 chunks x 16 bytes: time until the last byte, durable vs a plain
    Flask generator yielding one frame per chunk, same gevent server, same run; then the
    replay of the finished durable stream. Targets: durable <= 0.6 x plain, replay <= 0.2 x plain.
(b) 2,000 concurrent streams of 50 chunks at 20 ms in one gevent server process: all must
    complete; reports server peak RSS per open stream (target <= 30 KiB) and p50/p99 chunk
    delay (flow emit -> client receive). Prints figures; asserts nothing about time.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gevent  # noqa: E402
from bench_flows import read_lags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSE = {"Content-Type": "application/json", "Accept": "text/event-stream"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    port: int, path: str, body: dict, headers: dict | None = None
) -> tuple[float, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={**SSE, **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    hdrs = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    return elapsed, data, hdrs


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def bench_throughput(port: int, chunks: int, repeat: int) -> None:
    body = {"data": {"chunks": chunks}}
    request(port, "/plain", body)  # warm up both paths
    request(port, "/flows/blast", body)
    plain, durable, replay = [], [], []
    for _ in range(repeat):
        t, plain_data, _ = request(port, "/plain", body)
        plain.append(t)
        t, data, hdrs = request(port, "/flows/blast", body)
        durable.append(t)
        assert data == plain_data, "durable and plain streams differ"
        sid = hdrs["x-genkit-stream-id"]
        t, again, _ = request(port, "/flows/blast", {}, {"x-genkit-stream-id": sid})
        assert again == data, "replay differs from the live stream"
        replay.append(t)
    p, d, r = (statistics.median(x) for x in (plain, durable, replay))
    print(f"(a) {chunks} chunks x 16 B, median of {repeat}, {len(plain_data)} bytes per stream")
    print(f"    plain Flask streaming : {p * 1000:8.1f} ms")
    print(f"    durable (in-memory)   : {d * 1000:8.1f} ms   ratio {d / p:.3f}  (target <= 0.6)")
    print(f"    replay of finished    : {r * 1000:8.1f} ms   ratio {r / p:.3f}  (target <= 0.2)")


def bench_concurrency(
    port: int, streams: int, chunks: int, delay: float, path: str, server: str = "WSGIServer"
) -> None:
    before = get_json(port, "/rss")
    base = before["VmRSS"]
    client_cpu = resource.getrusage(resource.RUSAGE_SELF)
    delays: list[float] = []
    done = [0]
    peak = [base]
    stop = [False]

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request(
            "POST",
            "/flows/llm",
            body=json.dumps({"data": {"chunks": chunks, "delay": delay}}),
            headers=SSE,
        )
        if read_lags(conn.getresponse(), delays):
            done[0] += 1
        conn.close()

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], get_json(port, "/rss")["VmRSS"])
            gevent.sleep(0.1)

    sampler = gevent.spawn(sample)
    started = time.perf_counter()
    gevent.joinall([gevent.spawn(one) for _ in range(streams)])
    elapsed = time.perf_counter() - started
    stop[0] = True
    sampler.join()
    server_cpu = get_json(port, "/rss")["cpu"] - before["cpu"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu_s = (usage.ru_utime + usage.ru_stime) - (client_cpu.ru_utime + client_cpu.ru_stime)
    delays.sort()
    per_stream = (peak[0] - base) / streams
    label = "durable, in-memory" if path.startswith("/flows") else "plain Flask streaming"
    label += f", gevent {server}" if server == "WSGIServer" else f", {server}"
    print(
        f"(b) {streams} concurrent streams x {chunks} chunks at {delay * 1000:.0f} ms,"
        f" one gevent process: {label}"
    )
    print(f"    completed             : {done[0]} / {streams} in {elapsed:.1f} s")
    print(
        f"    CPU seconds           : server {server_cpu:.1f}, client {client_cpu_s:.1f}"
        f" (2 cores shared; the streams themselves last {chunks * delay:.1f} s)"
    )
    print(f"    server RSS            : base {base / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB")
    print(f"    peak RSS per stream   : {per_stream:.1f} KiB  (target <= 30 KiB)")
    print(
        f"    chunk delay           : p50 {delays[len(delays) // 2] * 1000:.1f} ms, "
        f"p99 {delays[int(len(delays) * 0.99)] * 1000:.1f} ms over {len(delays)} chunks"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument(
        "--plain-baseline",
        action="store_true",
        help="also run (b) on a plain Flask generator, for comparison",
    )
    parser.add_argument(
        "--gunicorn", action="store_true", help="also run (b) under one gunicorn gevent worker"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with serve() as port:
        bench_throughput(port, args.chunks, args.repeat)
    if args.streams <= 0:
        return  # (a) only: bench/run.py measures concurrency with raw-socket clients
    # (b) in fresh server processes, so that one measurement's memory is not the next one's base
    with serve() as port:
        bench_concurrency(port, args.streams, 50, 0.02, "/flows/llm")
    if args.plain_baseline:
        with serve() as port:
            bench_concurrency(port, args.streams, 50, 0.02, "/plain_llm")
    if args.gunicorn:
        worker = "gunicorn gevent worker"
        with serve(gunicorn=True) as port:
            bench_concurrency(port, args.streams, 50, 0.02, "/flows/llm", worker)
        if args.plain_baseline:
            with serve(gunicorn=True) as port:
                bench_concurrency(port, args.streams, 50, 0.02, "/plain_llm", worker)


@contextlib.contextmanager
def serve(gunicorn: bool = False) -> Iterator[int]:
    port = free_port()
    if gunicorn:
        # One gunicorn gevent worker: the production recipe, same app.
        args = [
            os.path.join(os.path.dirname(sys.executable), "gunicorn"),
            "-k", "gevent", "-w", "1", "--worker-connections", "10000", "--backlog", "4096",
            "--no-control-socket", "-b", f"127.0.0.1:{port}",
            "--chdir", os.path.join(ROOT, "bench"), "core_server:create_app()",
        ]  # fmt: skip
    else:
        args = [sys.executable, os.path.join(ROOT, "bench", "core_server.py"), "--port", str(port)]
    server = subprocess.Popen(args, cwd=ROOT)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
