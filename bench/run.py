"""Every benchmark in one command; writes BENCHMARKS.md. Asserts nothing about time.

    python bench/run.py [--quick] [--only concurrency,single,backends] [--runs 3]
                        [--streams 500,1000,2000]
                        [--servers memory,memory-1g,memory-kr,memory-pw,memory-na,memory-se,
                                   memory-gs,memory-pm,sqlite,sqlite-1g,sqlite-si,sqlite-pm,
                                   plain,genkit]
                        [--gc tuned|default] [--chunks 50] [--ramp 0] [--output BENCHMARKS.md]

1. Concurrency sweep: N concurrent streams of 50 chunks (``--chunks``) 20 ms apart,
   raw-socket clients in one gevent load process (bench/load.py), each server in a fresh
   process: ours with the in-memory and the SQLite manager under ``gunicorn -k gevent
   -w 1``, each also with ``DURABLE_STREAM_FLOW_IN_RESPONSE`` (``-1g``), without
   ``DURABLE_STREAM_DETACH_RESPONSE`` (``-kr``: the response kept to the stream's end; ``-dr``
   sets it explicitly, as the default does), and the in-memory one under
   ``-k flask_durable_stream.gunicorn_worker.PyWSGIWorker`` (``-pw``), all with the
   production recipe's ``post_worker_init`` (bench/gunicorn_conf.py), and the in-memory
   one without its admission of new connections by turns (``-na``) and with each event
   stored as it comes (``-se``: ``DURABLE_STREAM_MEMORY_STORE_INTERVAL = 0``) and with
   gunicorn's own settings object (``-gs``: ``post_worker_init(settings_once=False)``), and the
   SQLite one holding each stream's events up to 100 ms (``-si``:
   ``DURABLE_STREAM_SQLITE_STORE_INTERVAL = 0.1``), and either with the Prometheus metrics
   on (``-pm``: ``DURABLE_STREAM_METRICS``); a plain Flask
   generator on gevent's WSGIServer (not durable); Genkit's Express
   handler with its InMemoryStreamManager when node is available (its npm packages are
   installed into bench/genkit_express from its pinned package.json). Both Python servers
   run with the production recipe's garbage-collector settings (``tune_gc``), or CPython's
   defaults with ``--gc default``. CPU per chunk is the server process's user + system
   time (every thread) over the run / chunks received.
2. Single stream: bench/bench_core.py (a); what starting a stream costs: bench/stream_start.py.
3. Per-backend figures: the other bench/bench_*.py scripts, their output as printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
GENKIT_DIR = BENCH / "genkit_express"
sys.path.insert(0, str(BENCH))

from bench_durable_streams import WORKER_CLASSES  # noqa: E402 - the gunicorn worker classes

SERVERS = {
    "memory": "ours, in-memory",
    "sqlite": "ours, SQLite",
    "memory-1g": "ours, in-memory, flow in response",
    "sqlite-1g": "ours, SQLite, flow in response",
    "sqlite-si": "ours, SQLite, events held up to 100 ms",
    "memory-dr": "ours, in-memory, detached response",
    "sqlite-dr": "ours, SQLite, detached response",
    "memory-kr": "ours, in-memory, response kept (not detached)",
    "sqlite-kr": "ours, SQLite, response kept (not detached)",
    "memory-pw": "ours, in-memory, `PyWSGIWorker`",
    "memory-na": "ours, in-memory, no admission by turns",
    "memory-se": "ours, in-memory, each event stored as it comes",
    "memory-gs": "ours, in-memory, gunicorn's own settings (`settings_once=False`)",
    "memory-pm": "ours, in-memory, Prometheus metrics on",
    "sqlite-pm": "ours, SQLite, Prometheus metrics on",
    "plain": "plain Flask (not durable)",
    "genkit": "Genkit Express durable",
}
PATHS = {
    "memory": "/flows/llm",
    "sqlite": "/flows/llm",
    "memory-1g": "/flows/llm",
    "sqlite-1g": "/flows/llm",
    "sqlite-si": "/flows/llm",
    "memory-dr": "/flows/llm",
    "sqlite-dr": "/flows/llm",
    "memory-kr": "/flows/llm",
    "sqlite-kr": "/flows/llm",
    "memory-pw": "/flows/llm",
    "memory-na": "/flows/llm",
    "memory-se": "/flows/llm",
    "memory-gs": "/flows/llm",
    "memory-pm": "/flows/llm",
    "sqlite-pm": "/flows/llm",
    "plain": "/plain_llm",
    "genkit": "/llm",
}
#: The per-backend scripts: arguments for a full run and for --quick.
BACKENDS = {
    "bench_sqlite.py": ([], ["--quick"]),
    "bench_sqlite_server.py": ([], ["--chunks", "5000", "--repeat", "5"]),
    "bench_redis.py": ([], ["--chunks", "5000", "--replay", "2000", "--follow", "200"]),
    "bench_rtdb.py": ([], ["--seconds", "3", "--replay", "2000"]),
    "bench_firestore.py": ([], ["--seconds", "3"]),
    "bench_genkit.py": ([], ["--streams", "1,10,50"]),
    "bench_durable_streams.py": (
        [],
        ["--rounds", "1", "--appends", "1000", "--polls", "100", "--catch-up-mib", "2"],
    ),
    "bench_ds_flows.py": ([], ["--flows", "2", "--chunks", "20"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port}")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@contextlib.contextmanager
def server(kind: str, gc: str = "tuned") -> Iterator[tuple[int, int]]:
    """A fresh server process of ``kind``: (port, pid of the process that serves)."""
    port = free_port()
    env = dict(os.environ, BENCH_GC=gc)
    tmp = tempfile.mkdtemp(prefix="bench-run-")
    ours = kind.split("-")[0] in ("memory", "sqlite")
    if ours:
        if kind.startswith("sqlite"):
            env["BENCH_SQLITE"] = os.path.join(tmp, "streams.db")
        if kind.endswith("-1g"):
            env["BENCH_FLOW_IN_RESPONSE"] = "1"
        if kind.endswith("-dr"):
            env["BENCH_DETACH_RESPONSE"] = "1"
        if kind.endswith("-kr"):
            env["BENCH_DETACH_RESPONSE"] = "0"
        if kind.endswith("-na"):
            env["BENCH_ADMISSION"] = "off"
        if kind.endswith("-se"):
            env["BENCH_STORE_INTERVAL"] = "0"
        if kind.endswith("-si"):
            env["BENCH_SQLITE_STORE_INTERVAL"] = "0.1"
        if kind.endswith("-gs"):
            env["BENCH_SETTINGS_ONCE"] = "0"
        if kind.endswith("-pm"):
            env["BENCH_METRICS"] = "1"
        # -pw: gunicorn with this package's PyWSGIWorker, not its gevent worker
        worker = WORKER_CLASSES["pywsgi" if kind.endswith("-pw") else "gevent"]
        args = [
            os.path.join(os.path.dirname(sys.executable), "gunicorn"),
            "-k", worker, "-w", "1", "--worker-connections", "10000", "--backlog", "4096",
            "--no-control-socket", "-b", f"127.0.0.1:{port}",
            "-c", str(BENCH / "gunicorn_conf.py"),
            "--chdir", str(BENCH), "core_server:create_app()",
        ]  # fmt: skip
    elif kind == "plain":
        args = [sys.executable, str(BENCH / "core_server.py"), "--port", str(port)]
    else:
        args = ["node", str(GENKIT_DIR / "server.mjs"), str(port)]
    log_path = os.path.join(tmp, "server.log")  # kept for a failure's report
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=log)
    try:
        wait_for_port(port, proc)
        pid = proc.pid
        if ours:  # gunicorn listens before it forks its worker
            deadline = time.monotonic() + 60
            while not children(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = children(proc.pid)[0]
        yield port, pid
    except Exception as exc:
        with open(log_path, "rb") as log:
            output = log.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{exc}\n--- the server's output (its end):\n{output}") from exc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def genkit_ready() -> str | None:
    """Why Genkit Express cannot run here, or None once its packages are installed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found"
    if not (GENKIT_DIR / "node_modules" / "@genkit-ai" / "express").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=GENKIT_DIR,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return "npm install failed: " + done.stderr.strip()[-500:]
    return None


def measure(
    kind: str, streams: int, gc: str, chunks: int = 50, ramp: float = 0.0
) -> dict[str, Any]:
    with server(kind, gc) as (port, pid):
        load = [
            sys.executable, str(BENCH / "load.py"), "--port", str(port),
            "--path", PATHS[kind], "--pid", str(pid), "--streams", str(streams),
            "--chunks", str(chunks), "--ramp", str(ramp),
        ]  # fmt: skip
        if kind != "plain":
            load.append("--replay")
        done = subprocess.run(load, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"load.py failed: {done.stderr.strip()[-2000:]}")
        row = dict(json.loads(done.stdout.strip().splitlines()[-1]))
        if kind.startswith("sqlite"):  # how many commits carried the run's writes
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/storage", timeout=30) as r:
                row.update({"sqlite_" + k: v for k, v in json.load(r).items()})
        return row


def concurrency(args: argparse.Namespace, out: list[str]) -> None:
    kinds = [k for k in args.servers.split(",") if k]
    skipped: dict[str, str] = {}
    if "genkit" in kinds:
        reason = genkit_ready()
        if reason is not None:
            print(f"!!! Genkit Express NOT measured: {reason}", file=sys.stderr)
            skipped["genkit"] = reason
            kinds.remove("genkit")
    counts = [int(n) for n in args.streams.split(",")]
    rows: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        # Each run starts with another server: a machine's load drifts within a run, and the
        # server measured first (or right after node's) would always meet the same part of it.
        shift = (run - 1) % len(kinds) if kinds else 0
        order = kinds[shift:] + kinds[:shift]
        for n in counts:
            for kind in order:
                print(f"[concurrency] run {run}: {kind}, {n} streams", file=sys.stderr, flush=True)
                try:
                    figures = measure(kind, n, args.gc, args.chunks, args.ramp)
                except Exception as exc:  # noqa: BLE001 - reported in the file, loudly
                    print(f"!!! {kind} at {n} failed: {exc}", file=sys.stderr)
                    figures = {"failed": str(exc)[-300:]}
                rows.append({"run": run, "streams": n, "server": kind, **figures})
    rows.sort(key=lambda row: (row["run"], row["streams"], kinds.index(row["server"])))
    out.append("## 1. Concurrency sweep\n")
    out.append(
        f"N concurrent streams of {args.chunks} chunks 20 ms apart; one raw-socket client per"
        " stream in one gevent load process (`bench/load.py`), "
        + (
            f"started one after another evenly over {args.ramp:g} s"
            if args.ramp
            else "all started at once"
        )
        + "; each server in a fresh process. CPU per chunk: the server process's user + system "
        "time (all threads, so SQLite's writer thread counts) over the run / chunks received;"
        " the ratio is to plain Flask in the same run and N. Of which: the part spent by "
        "threads other than the main one (the one that runs gevent's hub or node's event "
        "loop: for ours on SQLite, the writer thread; for node, its own helper threads), and "
        "the part that was system time (the kernel's work: sockets, and SQLite's file "
        "writes). Gap: time between two chunks at the client minus the 20 ms pacing (0 when "
        "they arrive together). Lag: a chunk's arrival at its client minus the time its flow "
        "emitted it (carried in the chunk): the server's delay in sending what the flow "
        "emitted, and the client's in reading it. First chunk: when a stream's first chunk "
        "reached its client, from the moment every client was started, or with a ramp from "
        "its own client's start (a server that takes streams in one after another shows short"
        " gaps and late first chunks). Load CPU: the load process's own CPU time over the "
        "run's wall time; near 100 % the clients themselves read late, and part of the gaps "
        "is theirs, not the server's. RSS per stream: (peak - base RSS) / N; open at the "
        "peak: the most streams open at once (from a stream's first chunk to its last), N "
        "unless the server takes streams in"
        f" by turns. Complete: streams that got all {args.chunks} chunks and their result; stored"
        " = live: streams whose replay by"
        " `x-genkit-stream-id` is byte-identical to the live body. The SQLite servers' raw"
        " figures also say how many writes (opens and appends, the warm-up's included) their"
        " manager made and in how many commits (`sqlite_writes`, `sqlite_commits`).\n"
    )
    out.append(
        "Garbage collector of both Python servers: "
        + (
            "CPython's defaults (`--gc default`).\n"
            if args.gc == "default"
            else "`flask_durable_stream.tune_gc()`, as in the production recipe"
            " (example_app/gunicorn.conf.py).\n"
        )
    )
    for kind, reason in skipped.items():
        out.append(f"**{SERVERS[kind]} not measured: {reason}**\n")
    out.append(
        "| run | N | server | CPU/chunk µs | vs plain | of which: other threads µs, system %"
        " | gap p50 ms | gap p99 ms"
        " | lag p50 / p99 ms | first chunk p50 / p99 ms | RSS/stream KiB (open at the peak)"
        " | complete"
        " | stored = live | wall s | load CPU |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plains = {
        (r["run"], r["streams"]): r for r in rows if r["server"] == "plain" and "failed" not in r
    }
    for row in rows:
        if "failed" in row:
            out.append(
                f"| {row['run']} | {row['streams']} | {SERVERS[row['server']]} |"
                f" FAILED: {row['failed']} | | | | | | | | | | | |"
            )
            continue
        plain = plains.get((row["run"], row["streams"]))
        ratio = f"{row['cpu_per_chunk_us'] / plain['cpu_per_chunk_us']:.2f}x" if plain else "-"
        cpu = row["server_cpu_s"] or 1.0
        stored = row.get("stored_equal_live")
        stored_text = "-" if stored is None else f"{stored} / {row['streams']}"
        if row.get("replays_differing"):  # examples in the raw figures below
            stored_text += " (see replay_differences)"
        out.append(
            f"| {row['run']} | {row['streams']} | {SERVERS[row['server']]}"
            f" | {row['cpu_per_chunk_us']:.1f} | {ratio}"
            f" | {max(0.0, row['off_hub_per_chunk_us']):.1f}, {row['server_sys_s'] / cpu:.0%}"
            f" | {row['gap_p50_ms']:.1f} | {row['gap_p99_ms']:.1f}"
            f" | {row['lag_p50_ms']:.1f} / {row['lag_p99_ms']:.1f}"
            f" | {row['first_chunk_p50_ms']:.0f} / {row['first_chunk_p99_ms']:.0f}"
            f" | {row['rss_per_stream_kib']:.1f} ({row.get('open_peak', '-')})"
            f" | {row['complete']} / {row['streams']}"
            f" | {stored_text}"
            f" | {row['elapsed_s']:.1f} | {row['client_cpu_share']:.0%} |"
        )
    out.append("")
    if args.runs > 1:
        out += medians(rows, plains, kinds, counts)
    out += targets(rows, kinds, counts)
    out.append("<details><summary>raw figures (JSON)</summary>\n")
    out.append("```json")
    out += [json.dumps(row) for row in rows]
    out.append("```\n</details>\n")


def medians(
    rows: list[dict[str, Any]],
    plains: dict[tuple[int, int], dict[str, Any]],
    kinds: list[str],
    counts: list[int],
) -> list[str]:
    """The sweep's runs summed up: per N and server, the median and range of each figure.

    CPU time on a shared machine moves by 20-40 % from one run to the next, the server
    and the load alike (a run's figure tracks its wall time: a saturated server that
    runs slower takes longer). One run's ratio to plain Flask can land far from the
    others, so a target is judged on the median of the runs' ratios, each taken
    within its own run.
    """
    lines = [
        f"**Over the {max(r['run'] for r in rows)} runs:** median (lowest-highest). The ratio"
        " to plain Flask is taken within each run, then its median across runs.\n",
        "| N | server | CPU/chunk µs | vs plain | gap p99 ms | RSS/stream KiB | complete,"
        " stored = live (all runs) |",
        "|---|---|---|---|---|---|---|",
    ]

    for n in counts:
        for kind in kinds:
            done = [
                r for r in rows if r["streams"] == n and r["server"] == kind and "failed" not in r
            ]
            failed = sum(1 for r in rows if r["streams"] == n and r["server"] == kind) - len(done)
            ratios = [
                r["cpu_per_chunk_us"] / plains[r["run"], n]["cpu_per_chunk_us"]
                for r in done
                if (r["run"], n) in plains
            ]
            complete = sum(r["complete"] for r in done)
            stored = [r.get("stored_equal_live") for r in done]
            stored_text = "-" if None in stored or not done else str(sum(stored))
            lines.append(
                f"| {n} | {SERVERS[kind]}"
                f" | {span([r['cpu_per_chunk_us'] for r in done])}"
                f" | {span(ratios, 'x', 2) if kind != 'plain' else '1.00x'}"
                f" | {span([r['gap_p99_ms'] for r in done])}"
                f" | {span([r['rss_per_stream_kib'] for r in done])}"
                f" | {complete} / {n * len(done)}, {stored_text}"
                + (f" ({failed} runs FAILED)" if failed else "")
                + " |"
            )
    lines.append("")
    return lines


#: The sweep's targets: CPU per chunk at 500 and 1,000 streams against plain Flask's, by
#: store (the in-memory manager, SQLite); the gap p99 at 1,000 streams against Genkit's and
#: at 2,000 against plain Flask's, in the same run; RSS per open stream at 500 and 2,000.
CPU_TARGETS = {"memory": 1.1, "sqlite": 1.4}
CPU_AT = (500, 1000)
GAP_AGAINST = ((1000, "genkit", "Genkit's"), (2000, "plain", "plain Flask's"))
RSS_AT = (500, 2000)
RSS_TARGET_KIB = 24.0


def targets(rows: list[dict[str, Any]], kinds: list[str], counts: list[int]) -> list[str]:
    """Each of ours judged against the sweep's targets on this report's own figures.

    A ratio is taken within each run (ours against plain Flask or Genkit at the same N),
    and the target judged on the median of the runs' ratios; RSS on the median of the
    runs. A target whose N or other server this sweep did not run is left out.
    """
    done = [r for r in rows if "failed" not in r]

    def of(kind: str, n: int) -> list[dict[str, Any]]:
        return [r for r in done if r["server"] == kind and r["streams"] == n]

    def within_runs(kind: str, other: str, n: int, key: str) -> list[float]:
        theirs = {r["run"]: r[key] for r in of(other, n)}
        return [r[key] / theirs[r["run"]] for r in of(kind, n) if theirs.get(r["run"], 0) > 0]

    def line(target: str, kind: str, n: object, figure: str, met: bool) -> str:
        return f"| {target} | {SERVERS[kind]} | {n} | {figure} | {'yes' if met else '**no**'} |"

    lines = [
        "**Against the targets**, each judged on the figures above: a ratio is taken within"
        " each run, and the median of the runs judged (lowest-highest).\n",
        "| target | server | N | figure | met |",
        "|---|---|---|---|---|",
    ]
    for kind in [k for k in kinds if k.split("-")[0] in CPU_TARGETS]:
        limit = CPU_TARGETS[kind.split("-")[0]]
        for n in CPU_AT:
            ratios = within_runs(kind, "plain", n, "cpu_per_chunk_us")
            if ratios:
                target = f"CPU per chunk <= {limit}x plain Flask's"
                lines.append(line(target, kind, n, span(ratios, "x", 2), median(ratios) <= limit))
        for n, other, name in GAP_AGAINST:
            ratios = within_runs(kind, other, n, "gap_p99_ms")
            if ratios:
                target = f"gap p99 <= {name} (ours / theirs)"
                lines.append(line(target, kind, n, span(ratios, "x", 2), median(ratios) <= 1.0))
        for n in RSS_AT:
            rss = [r["rss_per_stream_kib"] for r in of(kind, n)]
            if rss:
                target = f"RSS per open stream <= {RSS_TARGET_KIB:.0f} KiB"
                lines.append(
                    line(target, kind, n, span(rss, " KiB", 2), median(rss) <= RSS_TARGET_KIB)
                )
        ran = [r for r in rows if r["server"] == kind and r["streams"] in counts]
        if ran:  # a failed run counts as one that lost streams
            whole = sum(
                1 for r in ran if r.get("complete") == r["streams"] == r.get("stored_equal_live")
            )
            target = "every stream complete, its stored record equal to its live body"
            ns = ", ".join(str(n) for n in counts)
            figure = f"{whole} of {len(ran)} runs"
            lines.append(line(target, kind, ns, figure, whole == len(ran)))
    lines.append("")
    return lines


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def span(values: list[float], unit: str = "", digits: int = 1) -> str:
    """``values``' median and range: ``1.06x (1.01-1.21)``."""
    if not values:
        return "-"
    lo, mid, hi = min(values), median(values), max(values)
    return f"{mid:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def run_script(name: str, script_args: list[str], timeout: float) -> str:
    print(f"[{name}] {' '.join(script_args)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / name), *script_args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        return f"FAILED: timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    if done.returncode != 0:
        print(f"!!! {name} failed", file=sys.stderr)
        return f"{done.stdout}\nFAILED (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}"
    return done.stdout


def single(args: argparse.Namespace, out: list[str]) -> None:
    script_args = ["--streams", "0"] + (["--chunks", "5000", "--repeat", "5"] if args.quick else [])
    text = run_script("bench_core.py", script_args, 1800)
    out.append("## 2. Single stream (bench/bench_core.py)\n")
    out.append(f"`python bench/bench_core.py {' '.join(script_args)}`\n")
    out += ["```", text.rstrip(), "```", ""]
    out += single_targets(text)
    start_args = ["--rounds", "3", "--requests", "1000"] if args.quick else []
    text = run_script("stream_start.py", start_args, 600)
    out.append("### Starting a stream (bench/stream_start.py)\n")
    out.append(f"`{' '.join(['python bench/stream_start.py', *start_args])}`\n")
    out += ["```", text.rstrip(), "```", ""]


#: A line of bench/bench_core.py that states its own target: "<what> : <ms> ms ratio <r>
#: (target <= <t>)".
SINGLE_TARGET = re.compile(r"^\s*(.+?)\s*:.*ratio ([\d.]+)\s+\(target <= ([\d.]+)\)", re.M)


def single_targets(text: str) -> list[str]:
    """bench/bench_core.py's ratios to plain Flask judged against the targets it prints."""
    found = SINGLE_TARGET.findall(text)
    if not found:
        return []
    lines = [
        "**Against the targets** (ratio to plain Flask's time, as printed above):\n",
        "| single stream | ratio | target | met |",
        "|---|---|---|---|",
    ]
    for what, ratio, limit in found:
        met = float(ratio) <= float(limit)
        lines.append(f"| {what} | {ratio} | <= {limit} | {'yes' if met else '**no**'} |")
    lines.append("")
    return lines


def backends(args: argparse.Namespace, out: list[str]) -> None:
    out.append("## 3. Per-backend figures\n")
    for name, (full, quick) in BACKENDS.items():
        script_args = quick if args.quick else full
        text = run_script(name, script_args, 1800)
        out.append(f"### {name}\n")
        out.append(f"`python bench/{name} {' '.join(script_args)}`\n")
        out += ["```", text.rstrip(), "```", ""]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = ["flask-durable-stream", "flask", "werkzeug", "gevent", "greenlet", "gunicorn"]
    lines = [
        f"- CPU: {os.cpu_count()} cores, {model}",
        f"- Load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({sys.executable})",
        "- Packages: " + ", ".join(f"{p} {version(p)}" for p in packages),
    ]
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
        found = []
        for package in ("@genkit-ai/core", "@genkit-ai/express"):
            manifest = GENKIT_DIR / "node_modules" / package / "package.json"
            got = json.loads(manifest.read_text())["version"] if manifest.exists() else None
            found.append(f"{package} {got or 'not installed'}")
        lines.append(f"- Node {node.strip()}, {', '.join(found)} (bench/genkit_express)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 streams, shorter runs")
    parser.add_argument("--only", default="concurrency,single,backends")
    parser.add_argument("--runs", type=int, default=1, help="repeat the sweep to show noise")
    parser.add_argument("--streams", default=None, help="default 500,1000,2000 (--quick: 500)")
    parser.add_argument(
        "--servers",
        default=(
            "memory,memory-1g,memory-kr,memory-pw,memory-na,memory-se,memory-pm,sqlite,sqlite-1g,"
            "sqlite-si,sqlite-pm,plain,genkit"
        ),
    )
    parser.add_argument(
        "--gc",
        choices=["tuned", "default"],
        default="tuned",
        help="the Python servers' garbage collector: tune_gc() (the recipe's) or CPython's",
    )
    parser.add_argument(
        "--chunks", type=int, default=50, help="chunks per stream in the sweep (per-stream costs)"
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="start the sweep's clients evenly over this many seconds (default: all at once)",
    )
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.streams is None:
        args.streams = "500" if args.quick else "500,1000,2000"
    parts = set(args.only.split(","))
    started = datetime.datetime.now(datetime.timezone.utc)
    out = [
        "# Benchmarks\n",
        "Written by `bench/run.py`; nothing here is typed by hand.\n",
        f"- Command: `python bench/run.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        *machine(),
        "",
    ]
    if "concurrency" in parts:
        concurrency(args, out)
    if "single" in parts:
        single(args, out)
    if "backends" in parts:
        backends(args, out)
    elapsed = datetime.datetime.now(datetime.timezone.utc) - started
    out.append(f"Total time: {elapsed.total_seconds():.0f} s.\n")
    Path(args.output).write_text("\n".join(out))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
