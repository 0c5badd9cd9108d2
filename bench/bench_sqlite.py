"""Figures for the SQLite manager. Run: ``.venv/bin/python bench/bench_sqlite.py [--quick]``.

1. Append throughput of a 20,000-chunk stream of 16-byte chunks, SQLite vs in-memory:
   one event per append, fixed batches, and runner-style batches (a persister
   thread appends whatever the flow emitted since its last append).
2. Cross-process follow latency: another process writes 500 chunks every 10 ms
   carrying ``time.time()``; this process follows and records receive - write.
3. ``synchronous=NORMAL`` vs ``FULL``: cost per commit.
4. Under gevent: writes through the writer thread vs inline SQLite commits on the
   hub, with the longest hub stall seen by a 1 ms ticker.
5. Idle followers: one gevent process follows N open streams that another process
   produces and heartbeats (every 2 s, as the runner does) without new events;
   CPU of the following process over 5 s.
Prints figures only; nothing here asserts on timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flask_durable_stream import InMemoryStreamManager, SQLiteStreamManager, StreamManager, protocol
from flask_durable_stream.managers.base import Event, StreamWriter

QUICK = "--quick" in sys.argv
COUNTS = (100, 1000)
CHUNKS = 2_000 if QUICK else 20_000
CHUNK = "0123456789abcd"  # 16 bytes once JSON-encoded


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- 1. throughput -------------------------------------------------------------------
def fixed_batches(manager: StreamManager, sid: str, size: int) -> float:
    started = time.perf_counter()
    writer = manager.open(sid)
    events: list[Event] = []
    for seq in range(CHUNKS):
        events.append(Event(seq, protocol.CHUNK, protocol.encode(CHUNK)))
        if len(events) == size:
            writer.append(events)
            events = []
    writer.append(events + [Event(CHUNKS, protocol.DONE, "null")])
    return time.perf_counter() - started


def runner_style(manager: StreamManager, sid: str) -> tuple[float, int]:
    """A flow thread emits events; a persister thread appends what accumulated, like the runner."""
    events: list[Event] = []
    cond = threading.Condition()
    appends = [0]

    def flow() -> None:
        for seq in range(CHUNKS + 1):
            kind = protocol.CHUNK if seq < CHUNKS else protocol.DONE
            event = Event(seq, kind, protocol.encode(CHUNK if seq < CHUNKS else None))
            with cond:
                events.append(event)
                cond.notify()

    def persist() -> None:
        while True:
            with cond:
                while len(events) <= writer.next_seq:
                    cond.wait()
                batch = events[writer.next_seq :]
            writer.append(batch)
            appends[0] += 1
            if batch[-1].terminal:
                return

    started = time.perf_counter()
    writer = manager.open(sid)
    threads = [threading.Thread(target=flow), threading.Thread(target=persist)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, appends[0]


def bench_throughput(tmp: Path) -> None:
    print(f"1. append throughput, {CHUNKS:,} chunks x 16 B (chunks/s; ratio = SQLite / in-memory)")
    memory = InMemoryStreamManager()
    sqlite = SQLiteStreamManager(tmp / "throughput.db")
    try:
        for label, size in (
            ("one event per append", 1),
            ("batches of 64", 64),
            ("batches of 512", 512),
        ):
            m = min(fixed_batches(memory, f"m{size}-{i}", size) for i in range(3))
            s = min(fixed_batches(sqlite, f"s{size}-{i}", size) for i in range(3))
            print(
                f"   {label:<24} memory {CHUNKS / m:>10,.0f}   sqlite {CHUNKS / s:>10,.0f}"
                f"   ratio {m / s:.2f}"
            )
        m_runs = [runner_style(memory, f"mr{i}") for i in range(3)]
        s_runs = [runner_style(sqlite, f"sr{i}") for i in range(3)]
        m, m_appends = min(m_runs)
        s, s_appends = min(s_runs)
        print(
            f"   {'runner-style batches':<24} memory {CHUNKS / m:>10,.0f}"
            f"   sqlite {CHUNKS / s:>10,.0f}"
            f"   ratio {m / s:.2f}   (appends: memory {m_appends}, sqlite {s_appends})"
        )
    finally:
        sqlite.close()
        memory.close()


# -- 2. cross-process follow latency -------------------------------------------------------
PRODUCER = """
import sys, time
from flask_durable_stream import SQLiteStreamManager
manager = SQLiteStreamManager(sys.argv[1])
writer = manager.open("latency")
print("open", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    writer.write({"t": time.time(), "i": i})
    time.sleep(0.01)
writer.done(None)
manager.close()
"""


def bench_latency(tmp: Path) -> None:
    count = 100 if QUICK else 500
    print(f"2. follow latency, {count} chunks written every 10 ms (write -> receive, ms)")
    path = tmp / "latency.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(path), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdout.readline()
    with SQLiteStreamManager(path) as manager:
        sub = manager.subscribe("latency")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        delays = [(time.time() - e.value["t"]) * 1000 for e in sub if not e.terminal]
    proc.wait()
    print(
        f"   other process: p50 {percentile(delays, 50):.2f}  p99 {percentile(delays, 99):.2f}"
        f"  max {max(delays):.2f}"
    )

    with SQLiteStreamManager(tmp / "latency-local.db") as manager:
        writer = manager.open("local")

        def produce() -> None:
            for i in range(count):
                writer.write({"t": time.time(), "i": i})
                time.sleep(0.01)
            writer.done(None)

        thread = threading.Thread(target=produce)
        sub = manager.subscribe("local")
        thread.start()
        delays = [(time.time() - e.value["t"]) * 1000 for e in sub if not e.terminal]
        thread.join()
    print(
        f"   same process:  p50 {percentile(delays, 50):.2f}  p99 {percentile(delays, 99):.2f}"
        f"  max {max(delays):.2f}"
    )


# -- 3. synchronous NORMAL vs FULL -------------------------------------------------------------
def bench_synchronous(tmp: Path) -> None:
    appends = 500 if QUICK else 2_000
    print(f"3. synchronous setting, {appends:,} single-event appends, then runner-style batches")
    for mode in ("NORMAL", "FULL"):
        with SQLiteStreamManager(tmp / f"sync-{mode}.db", synchronous=mode) as manager:
            writer = manager.open("s")
            latencies = []
            for _ in range(appends):
                started = time.perf_counter()
                writer.write(CHUNK)
                latencies.append((time.perf_counter() - started) * 1000)
            elapsed, batches = runner_style(manager, "r")
        print(
            f"   {mode:<6} per append p50 {statistics.median(latencies):.3f} ms"
            f"  p99 {percentile(latencies, 99):.3f} ms"
            f"  ({1000 / statistics.mean(latencies):,.0f}/s);"
            f"  runner-style {CHUNKS / elapsed:,.0f} chunks/s in {batches} appends"
        )


# -- 4. writer thread vs inline commits under gevent ----------------------------------------------
GEVENT = """
from gevent import monkey
monkey.patch_all()
import json, sqlite3, sys, time
import gevent
from flask_durable_stream import SQLiteStreamManager
from flask_durable_stream.managers.base import Event, StreamWriter

path, mode, sync, streams, per_stream = sys.argv[1], sys.argv[2], sys.argv[3], 16, int(sys.argv[4])
stall = [0.0]

def ticker():
    last = time.perf_counter()
    while True:
        gevent.sleep(0.001)
        now = time.perf_counter()
        stall[0] = max(stall[0], now - last - 0.001)
        last = now

manager = SQLiteStreamManager(path, synchronous=sync)
writers = [manager.open(f"s{n}") for n in range(streams)]
if mode == "inline":  # the same transaction, run on the hub by the calling greenlet
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute(f"PRAGMA synchronous={sync}")

    def append(n, seq):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT status, last_seq FROM ds_streams WHERE stream_id = ?", (f"s{n}",))
        conn.execute("INSERT OR IGNORE INTO ds_events VALUES (?, ?, 'chunk', ?)",
                     (f"s{n}", seq, '"x"'))
        conn.execute("UPDATE ds_streams SET last_seq = ?, updated_at = ? WHERE stream_id = ?",
                     (seq, time.time(), f"s{n}"))
        conn.execute("COMMIT")
else:
    def append(n, seq):
        writers[n].append([Event(seq, "chunk", '"x"')])

def produce(n):
    for seq in range(per_stream):
        append(n, seq)
        gevent.sleep(0)

tick = gevent.spawn(ticker)
gevent.sleep(0.01)
stall[0] = 0.0
started = time.perf_counter()
gevent.joinall([gevent.spawn(produce, n) for n in range(streams)], raise_error=True)
elapsed = time.perf_counter() - started
tick.kill()
manager.close()
print(json.dumps({"rate": streams * per_stream / elapsed, "stall_ms": stall[0] * 1000,
                  "transactions": manager.transactions}))
"""


def bench_gevent(tmp: Path) -> None:
    per_stream = 50 if QUICK else 250
    print(
        f"4. under gevent: 16 greenlets x {per_stream} single-event appends"
        " (appends/s, longest hub stall)"
    )
    for sync in ("NORMAL", "FULL"):
        for mode in ("thread", "inline"):
            path = tmp / f"gevent-{mode}-{sync}.db"
            out = subprocess.run(
                [sys.executable, "-c", GEVENT, str(path), mode, sync, str(per_stream)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out)
            extra = f"  in {r['transactions']} transactions" if mode == "thread" else ""
            print(
                f"   {sync:<6} {mode + ' writes':<14} {r['rate']:>9,.0f}/s"
                f"   stall {r['stall_ms']:.2f} ms{extra}"
            )


# -- 5. idle followers -------------------------------------------------------------------------
IDLE = """
from gevent import monkey
monkey.patch_all()
import json, os, sys, time
import gevent
from flask_durable_stream import SQLiteStreamManager

path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
manager = SQLiteStreamManager(path, timeout=600)
followers = [gevent.spawn(lambda i=i: list(manager.subscribe(f"idle{i}"))) for i in range(count)]
gevent.sleep(1.0)  # every follower has read the stream and is waiting
cpu, wall = time.process_time(), time.monotonic()
gevent.sleep(seconds)
cpu, wall = time.process_time() - cpu, time.monotonic() - wall
print(json.dumps({"cpu": cpu / wall, "waiting": sum(not g.dead for g in followers)}), flush=True)
os._exit(0)
"""


def heartbeat_every(writers: list[StreamWriter], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        for writer in writers:
            writer.heartbeat()


def bench_idle(tmp: Path) -> None:
    seconds = 2.0 if QUICK else 5.0
    print(f"5. idle followers in another process, CPU of the following process over {seconds:.0f}s")
    for count in COUNTS:
        path = tmp / f"idle-{count}.db"
        with SQLiteStreamManager(path) as manager:
            writers = [manager.open(f"idle{i}") for i in range(count)]
            stop = threading.Event()
            thread = threading.Thread(target=heartbeat_every, args=(writers, 2.0, stop))
            thread.start()
            try:
                out = subprocess.run(
                    [sys.executable, "-c", IDLE, str(path), str(count), str(seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            finally:
                stop.set()
                thread.join()
            r = json.loads(out)
            cpu = r["cpu"] * 100
            print(f"   {count:>5} followers ({r['waiting']} waiting): {cpu:5.1f} % of a core")


def main() -> None:
    print(
        f"python {sys.version.split()[0]}, SQLite {__import__('sqlite3').sqlite_version},"
        f" {os.cpu_count()} cores{', quick run' if QUICK else ''}"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        bench_throughput(Path(tmp))
        bench_latency(Path(tmp))
        bench_synchronous(Path(tmp))
        bench_gevent(Path(tmp))
        bench_idle(Path(tmp))


if __name__ == "__main__":
    main()
