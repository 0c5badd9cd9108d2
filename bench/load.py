"""The load side of the concurrency sweep: N raw-socket clients in one gevent process.

    python bench/load.py --port P --path /flows/llm --pid SERVER_PID --streams 500 [--replay]

Each client POSTs ``{"data": {"chunks": C, "delay": D}}`` with ``Accept: text/event-stream``
over its own socket (HTTP/1.1, ``Connection: close``), undoes the chunked transfer
encoding and times every frame. All clients start at once, or one after another evenly
over ``--ramp`` seconds (arrivals spread out, as a server meets them outside a reconnect
storm; a first chunk is then timed from its own client's start). Meanwhile the server's RSS is
sampled from ``/proc/SERVER_PID``; its CPU (user + system of every thread, as the kernel
counts them for the process) is read before the first and after the last stream. With
``--replay`` every stream is then read again by its ``x-genkit-stream-id`` and compared
byte for byte with what the live client got (not counted in the CPU figure).
Prints one JSON object.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

CHUNK_PREFIX = b'data: {"message":'
RESULT_PREFIX = b'data: {"result":'
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(stat: str) -> tuple[float, float]:
    """User and system seconds from a /proc ``stat`` file (a process's: all its threads,
    those that ended too; or one thread's, under ``task/``)."""
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def server_times(pid: int) -> tuple[float, float, float]:
    """The process's user and system seconds, and its main thread's user + system
    (the thread that runs gevent's hub; the others are native threads such as the
    SQLite manager's writer)."""
    user, system = cpu_times(f"/proc/{pid}/stat")
    return user, system, sum(cpu_times(f"/proc/{pid}/task/{pid}/stat"))


def run_times(pid: int) -> dict[int, float]:
    """Seconds on a CPU of each of the process's threads now, by thread id, to the
    nanosecond (``/proc/PID/task/TID/schedstat``), or {} where the kernel does not say.

    ``/proc/PID/stat`` counts in clock ticks (10 ms): over a run of about a second,
    2 % of the figure for each reading. A thread that ends between two readings takes
    its time with it, so a difference is taken only over the same threads."""
    times: dict[int, float] = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                times[int(tid)] = int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return {}
    return times


def precise_cpu(
    pid: int, before: dict[int, float], after: dict[int, float]
) -> tuple[float, float] | None:
    """The process's and its main thread's CPU seconds between two :func:`run_times`, or
    None unless every thread of the first reading is still there."""
    if not before or not after or not set(before) <= set(after):
        return None
    total = sum(after.values()) - sum(before.values())
    return total, after[pid] - before[pid]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Dechunker:
    """Undoes HTTP/1.1 chunked transfer encoding, incrementally."""

    def __init__(self) -> None:
        self.raw = b""
        self.body = bytearray()
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.raw += data
        out = bytearray()
        while not self.done:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self.raw[:line_end].split(b";")[0], 16)
            if size == 0:
                self.done = True
                break
            end = line_end + 2 + size
            if len(self.raw) < end + 2:
                break
            out += self.raw[line_end + 2 : end]
            self.raw = self.raw[end + 2 :]
        self.body += out
        return bytes(out)


def request_bytes(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += ["Content-Type: application/json", "Accept: text/event-stream"]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


def stream(port: int, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """One request read to its end: the body, the stream id, the receive times of chunks."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    try:
        sock.sendall(request_bytes(port, path, body, headers))
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the headers")
            head += data
        head, rest = head.split(b"\r\n\r\n", 1)
        fields = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        chunked = fields.get(b"transfer-encoding", b"").lower() == b"chunked"
        decoder = Dechunker()
        body_out = bytearray()
        pending = b""
        times: list[float] = []
        lags: list[float] = []  # receive time - the emit time the chunk carries
        finished = False
        data = rest
        while True:
            now = time.time()
            piece = decoder.feed(data) if chunked else data
            if not chunked:
                decoder.body += piece
            pending += piece
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                if frame.startswith(CHUNK_PREFIX):
                    times.append(now)
                    lags.append(now - float(frame[len(CHUNK_PREFIX) : -1]))
                elif frame.startswith(RESULT_PREFIX):
                    finished = True
            if decoder.done:
                break
            data = sock.recv(65536)
            if not data:
                break
        body_out = decoder.body
        return {
            "body": bytes(body_out),
            "id": fields.get(b"x-genkit-stream-id", b"").decode(),
            "times": times,
            "lags": lags,
            "finished": finished,
        }
    finally:
        sock.close()


def difference(stream_id: str, live: bytes, replay: bytes) -> dict[str, Any]:
    """Where a replay's body first departs from the live one, and how each ends."""
    live_frames, replay_frames = live.split(b"\n\n"), replay.split(b"\n\n")
    at = next(
        (i for i, (a, b) in enumerate(zip(live_frames, replay_frames, strict=False)) if a != b),
        min(len(live_frames), len(replay_frames)),
    )

    def frame(frames: list[bytes]) -> str:
        return frames[at][:200].decode(errors="replace") if at < len(frames) else "(ended)"

    return {
        "id": stream_id,
        "frames": [len(live_frames), len(replay_frames)],
        "first_difference": at,
        "live": frame(live_frames),
        "replay": frame(replay_frames),
        "replay_end": replay[-200:].decode(errors="replace"),
    }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server process to measure")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--replay", action="store_true", help="compare every stored stream")
    parser.add_argument(
        "--ramp", type=float, default=0.0, help="start the clients evenly over this many seconds"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    body = json.dumps({"data": {"chunks": args.chunks, "delay": args.delay}}).encode()
    warm = {"data": {"chunks": 3, "delay": 0.001}}
    gevent.joinall(
        [
            gevent.spawn(stream, args.port, args.path, json.dumps(warm).encode(), {})
            for _ in range(20)
        ],
        raise_error=True,
    )
    gevent.sleep(0.5)  # let the warm-up streams be stored and forgotten
    base = rss_kib(args.pid)
    peak = [base]
    stop = [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], rss_kib(args.pid))
            gevent.sleep(0.05)

    sampler = gevent.spawn(sample)
    user_before, sys_before, main_before = server_times(args.pid)
    threads_before = run_times(args.pid)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    started_wall = time.time()

    def client() -> dict[str, Any]:
        begun = time.time()
        return {**stream(args.port, args.path, body, {}), "begun": begun}

    jobs = [gevent.spawn_later(i * args.ramp / args.streams, client) for i in range(args.streams)]
    gevent.joinall(jobs)
    elapsed = time.perf_counter() - started
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    # This process's own CPU over the run: near the elapsed time, the clients were busy
    # themselves and read late, which shows as gaps the server did not make.
    client_cpu = (own_after.ru_utime - own_before.ru_utime) + (
        own_after.ru_stime - own_before.ru_stime
    )
    user_after, sys_after, main_after = server_times(args.pid)
    precise = precise_cpu(args.pid, threads_before, run_times(args.pid))
    if precise is not None:  # to the nanosecond
        server_cpu, main_cpu = precise
    else:  # in clock ticks
        server_cpu = (user_after - user_before) + (sys_after - sys_before)
        main_cpu = main_after - main_before
    # What the process's other threads spent: for the SQLite manager, its writer thread.
    off_hub = server_cpu - main_cpu
    stop[0] = True
    sampler.join()
    results = [job.value for job in jobs if job.successful()]
    complete = [r for r in results if r["finished"] and len(r["times"]) == args.chunks]
    gaps = []
    for r in results:
        times = r["times"]
        gaps += [max(0.0, b - a - args.delay) for a, b in zip(times, times[1:], strict=False)]
    # How late each chunk reached its client: the flows of all servers put their emit time
    # (the wall clock, shared by the processes of one machine) in each chunk.
    lags = [lag for r in results for lag in r["lags"]]
    # When each stream's first chunk arrived, from the moment all clients were started
    # (with a ramp: from its own client's start).
    firsts = [
        r["times"][0] - (r["begun"] if args.ramp else started_wall) for r in results if r["times"]
    ]
    chunks_sent = sum(len(r["times"]) for r in results)
    # The most streams open at once (from a stream's first chunk to its last): what the
    # server held at its peak, which is fewer than N when it takes streams in by turns.
    edges = sorted(
        [(r["times"][0], 1) for r in results if r["times"]]
        + [(r["times"][-1], -1) for r in results if r["times"]]
    )
    open_now = open_peak = 0
    for _, step in edges:
        open_now += step
        open_peak = max(open_peak, open_now)
    out: dict[str, Any] = {
        "streams": args.streams,
        "complete": len(complete),
        "errors": args.streams - len(results),
        "elapsed_s": elapsed,
        "server_cpu_s": server_cpu,
        "chunks": chunks_sent,
        "cpu_per_chunk_us": server_cpu / max(1, chunks_sent) * 1e6,
        "server_cpu_precise": precise is not None,
        "server_sys_s": sys_after - sys_before,
        "off_hub_cpu_s": off_hub,
        "off_hub_per_chunk_us": off_hub / max(1, chunks_sent) * 1e6,
        "gap_p50_ms": percentile(gaps, 50) * 1000,
        "gap_p99_ms": percentile(gaps, 99) * 1000,
        "lag_p50_ms": percentile(lags, 50) * 1000,
        "lag_p99_ms": percentile(lags, 99) * 1000,
        "client_cpu_share": client_cpu / elapsed,
        "first_chunk_p50_ms": percentile(firsts, 50) * 1000,
        "first_chunk_p99_ms": percentile(firsts, 99) * 1000,
        "rss_base_kib": base,
        "rss_peak_kib": peak[0],
        "rss_per_stream_kib": (peak[0] - base) / args.streams,
        "open_peak": open_peak,
    }
    if args.replay:
        same = [0]
        differ: list[dict[str, Any]] = []

        def check(r: dict[str, Any]) -> None:
            if not r["id"]:
                body = r["body"][-200:].decode(errors="replace")
                differ.append({"live": "no x-genkit-stream-id", "body": body})
                return
            again = stream(args.port, args.path, b"", {"x-genkit-stream-id": r["id"]})
            if again["body"] == r["body"]:
                same[0] += 1
            else:
                differ.append(difference(r["id"], r["body"], again["body"]))

        pool = gevent.pool.Pool(200)
        pool.map(check, results)
        out["stored_equal_live"] = same[0]
        if differ:  # what a replay that differs looks like, to trace it (a few are enough)
            out["replays_differing"] = len(differ)
            out["replay_differences"] = differ[:3]
    print(json.dumps(out))


if __name__ == "__main__":
    import gevent.pool

    main()
