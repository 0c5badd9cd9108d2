"""What SQLite itself costs per append, as the writer thread appends for paced streams.

    .venv/bin/python bench/sqlite_append_cost.py [--streams 1000] [--per-commit 66]
                                                 [--appends 50000] [--rounds 5]

One process, no server, no other thread: the floor under the SQLite manager's writer
thread. ``--streams`` open streams with the manager's own 32-hex ids, appended to in a
random order (as paced streams' appends arrive), ``--per-commit`` appends a transaction
(66 is what the joint appends of a 1,000-stream sweep once averaged; it moves with how busy
the writer thread is: 197 in a sweep run of 2026-12-05). The file is made with the
manager's schema and connection settings (WAL, ``synchronous=NORMAL``).

The first figure stores each append as the single append does: the ``UPDATE`` of the
stream's row with the usual case's checks, then the ``INSERT`` of its event. Every other
figure stores a transaction's appends as the joint append does under load (the manager's
own texts, up to 64 streams or events a statement: every stream's checks read, then every
stream's ``UPDATE ... FROM``, then the events' ``INSERT``), and changes one thing:

* no checks read first, the ``UPDATE`` (not ``OR IGNORE``) and the ``INSERT`` in a savepoint
  that a failed check rolls back, as the manager did before 2026-12-05: SQLite then keeps a
  statement journal of the pages they change, in a temporary file once it passes 64 KiB;
* no ``UPDATE`` of the streams' rows (what the checks, the tail and the lease cost);
* the events table as a rowid table with a ``UNIQUE (stream_id, seq)`` index, or with an
  integer per stream instead of its id (layouts the manager does not use);
* the events first written to an append-ordered table (a rowid table, no index) and moved
  into the manager's table, sorted, every 50 commits (a layout the manager does not use);
* ``page_size`` 2,048 bytes; a 64 MiB page cache; ``wal_autocheckpoint`` 10,000 pages;
* 5 events an append instead of 1, a row each or all in one row (the JSON array of their
  payloads: a layout the manager does not use).

Prints the process's CPU time (user + system) per append, the median of ``--rounds``
fresh files and the range, and the median of the rounds' ratios to the joint append as
stored: the variants take turns, one file each a round, so a change of the machine's speed
during the run falls on all of them. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask_durable_stream.managers.sqlite_io import INSERT_EVENT, SCHEMA, connect  # noqa: E402
from flask_durable_stream.managers.sqlite_ops import (  # noqa: E402
    _GUARD,
    _check_sql,
    _insert_sql,
    _parts,
    _update_sql,
)
from flask_durable_stream.runner import new_stream_id  # noqa: E402

UPDATE = "UPDATE ds_streams SET last_seq = ?, updated_at = ?, heartbeat_at = ? WHERE stream_id = ?"
PAYLOAD = '{"message":{"content":[{"text":"a token or two"}]}}'
EVENTS_BY_ID = (
    "DROP TABLE ds_events;"
    "CREATE TABLE ds_events (stream_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " kind TEXT NOT NULL, payload TEXT NOT NULL);"
    "CREATE UNIQUE INDEX ds_events_key ON ds_events (stream_id, seq)"
)
EVENTS_BY_NUMBER = EVENTS_BY_ID.replace("(stream_id TEXT", "(stream_id INTEGER")
LOG = (
    "CREATE TABLE ds_log (stream_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " kind TEXT NOT NULL, payload TEXT NOT NULL)"
)
MOVE = ("INSERT INTO ds_events SELECT * FROM ds_log ORDER BY stream_id, seq", "DELETE FROM ds_log")
JOINT = {"joint": True}
BASE = "as stored, joint appends (as under load)"
VARIANTS: dict[str, dict[str, Any]] = {
    "as stored (WITHOUT ROWID, key (stream_id, seq)), single appends": {},
    BASE: JOINT,
    "joint, in a savepoint, no checks read first (before 2026-12-05)": {
        **JOINT,
        "savepoint": True,
    },
    "joint, no UPDATE of the streams' rows": {**JOINT, "update": False},
    "joint, rowid table, UNIQUE (stream_id, seq)": {**JOINT, "layout": EVENTS_BY_ID},
    "joint, rowid table, UNIQUE (number, seq), a number per stream": {
        **JOINT,
        "layout": EVENTS_BY_NUMBER,
        "numbers": True,
    },
    "joint, to an append-ordered table, moved every 50 commits": {**JOINT, "log_every": 50},
    "joint, the same, no UPDATE of the streams' rows": {
        **JOINT,
        "log_every": 50,
        "update": False,
    },
    "joint, page_size 2048": {**JOINT, "page_size": 2048},
    "joint, 64 MiB page cache": {**JOINT, "pragmas": ["cache_size=-65536"]},
    "joint, wal_autocheckpoint 10000": {**JOINT, "pragmas": ["wal_autocheckpoint=10000"]},
    "joint, 5 events an append": {**JOINT, "events": 5},
    "joint, 5 events an append in one row (their JSON array)": {
        **JOINT,
        "events": 5,
        "packed": True,
    },
}


def cpu_per_append(
    directory: str,
    streams: int,
    per_commit: int,
    appends: int,
    *,
    joint: bool = False,
    savepoint: bool = False,
    update: bool = True,
    layout: str | None = None,
    numbers: bool = False,
    log_every: int = 0,
    page_size: int | None = None,
    pragmas: tuple[str, ...] = (),
    events: int = 1,
    packed: bool = False,
) -> float:
    path = os.path.join(directory, f"{random.getrandbits(64):x}.db")
    if page_size is not None:  # before the file has a page: the WAL switch writes one
        with sqlite3.connect(path) as fresh:
            fresh.execute(f"PRAGMA page_size={page_size}")
            fresh.execute("VACUUM")
    conn = connect(path, busy_timeout=5.0, synchronous="NORMAL")
    for pragma in pragmas:
        conn.execute(f"PRAGMA {pragma}")
    if layout is not None:
        conn.executescript(layout)
    if log_every:
        conn.execute(LOG)
    ids = [new_stream_id() for _ in range(streams)]
    conn.execute("BEGIN")
    for stream_id in ids:
        conn.execute(
            "INSERT INTO ds_streams (stream_id, token, status, created_at, updated_at,"
            " heartbeat_at) VALUES (?, 1, 'open', 0, 0, 0)",
            (stream_id,),
        )
    conn.execute("COMMIT")
    keys: list[object] = list(range(1, streams + 1)) if numbers else list(ids)
    insert = INSERT_EVENT.replace("(?, ?, ?, ?)", ", ".join(["(?, ?, ?, ?)"] * events))
    tail = [-1] * streams
    order = list(range(streams))
    random.shuffle(order)
    started = time.process_time()
    done = commits = 0
    while done < appends:
        conn.execute("BEGIN IMMEDIATE")
        batch = [order[(done + i) % streams] for i in range(per_commit)]  # distinct streams
        if joint:  # as _append_together: the checks, every stream's UPDATE, every INSERT
            if savepoint:
                conn.execute("SAVEPOINT append_together")
            if update:
                parts = []
                for part in _parts(batch):
                    args: list[object] = []
                    for n in part:
                        args += (ids[n], tail[n] + events, 1, tail[n])
                    if not savepoint:
                        ready = conn.execute(_check_sql(len(part)), args).fetchone()[0]
                        if ready != len(part):
                            raise SystemExit("the usual case's checks failed")
                    parts.append((len(part), args))
                for size, args in parts:
                    sql = _update_sql(size)
                    sql = sql.replace("UPDATE OR IGNORE", "UPDATE") if savepoint else sql
                    if conn.execute(sql, [1.0, 1.0, *args]).rowcount != size:
                        raise SystemExit("the usual case's checks failed")
            if packed:  # one row an append, keyed by its first seq
                array = "[" + ",".join([PAYLOAD] * events) + "]"
                rows = [(keys[n], tail[n] + 1, "chunk", array) for n in batch]
            else:
                rows = [
                    (keys[n], seq, "chunk", PAYLOAD)
                    for n in batch
                    for seq in range(tail[n] + 1, tail[n] + events + 1)
                ]
            for some in _parts(rows):
                sql = _insert_sql(len(some))
                sql = sql.replace("ds_events", "ds_log") if log_every else sql
                conn.execute(sql, [value for row in some for value in row])
            if savepoint:
                conn.execute("RELEASE append_together")
        else:
            for n in batch:
                first, last = tail[n] + 1, tail[n] + events
                moved = conn.execute(UPDATE + _GUARD, (last, 1.0, 1.0, ids[n], 1, first - 1))
                if moved.rowcount != 1:
                    raise SystemExit(f"the usual case's checks failed for stream {ids[n]}")
                rows = [(keys[n], seq, "chunk", PAYLOAD) for seq in range(first, last + 1)]
                conn.execute(insert, [value for row in rows for value in row])
        for n in batch:
            tail[n] += events
        done += per_commit
        commits += 1
        if log_every and commits % log_every == 0:
            for sql in MOVE:
                conn.execute(sql)
        conn.execute("COMMIT")
    spent = time.process_time() - started
    stored = conn.execute("SELECT count(*) FROM ds_events").fetchone()[0]
    if log_every:
        stored += conn.execute("SELECT count(*) FROM ds_log").fetchone()[0]
    conn.close()
    os.remove(path)  # the variants' files would fill the directory
    expected = done if packed else done * events
    if stored != expected:
        raise SystemExit(f"{stored} rows stored of {expected}")
    return spent / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--per-commit", type=int, default=66)
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.per_commit > args.streams:
        parser.error(
            "--per-commit cannot exceed --streams: a commit's appends are of distinct streams"
        )
    assert "WITHOUT ROWID" in SCHEMA  # "as stored" is the manager's own layout
    print(
        f"{args.streams} streams, {args.per_commit} appends a commit, {args.appends} appends,"
        f" SQLite {sqlite3.sqlite_version}; CPU per append, median of {args.rounds} (range);"
        " against the joint append as stored, the median of the rounds' ratios"
    )
    # Round by round, every variant once: a change of the machine's speed during the run
    # falls on all of them, and each round's ratio to the joint append as stored cancels it.
    figures: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.rounds):
            for name, variant in VARIANTS.items():
                figures[name].append(
                    cpu_per_append(
                        directory, args.streams, args.per_commit, args.appends, **variant
                    )
                )
    base = figures[BASE]
    for name, values in figures.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        print(
            f"  {name:64s} {statistics.median(values):6.1f} us"
            f" ({min(values):.1f}-{max(values):.1f})  {ratio:4.2f}x"
        )


if __name__ == "__main__":
    main()
