"""What SQLite itself costs per append, as the writer thread appends for paced streams.

    .venv/bin/python bench/sqlite_append_cost.py [--streams 1000] [--per-commit 66]
                                                 [--appends 50000] [--rounds 3]

One process, no server, no other thread: the floor under the SQLite manager's writer
thread. ``--streams`` open streams with the manager's own 32-hex ids, appended to in a
random order (as paced streams' appends arrive), ``--per-commit`` appends a transaction
(66 is what the joint appends of a 1,000-stream sweep averaged); each append is the
manager's usual case: the ``UPDATE`` of the stream's row with its checks, then the
``INSERT`` of its events. The file is made with the manager's schema and connection
settings (WAL, ``synchronous=NORMAL``); the variants change one thing each:

* the events table as a rowid table with a ``UNIQUE (stream_id, seq)`` index, or with an
  integer per stream instead of its id (a layout the manager does not use);
* ``page_size`` 2,048 or 1,024 bytes; a 64 MiB page cache;
* 5 events an append instead of 1 (one ``INSERT`` of 5 rows).

Prints the process's CPU time (user + system) per append, the median of ``--rounds``
fresh files, and the range. Asserts nothing about time.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask_durable_stream.managers.sqlite_io import INSERT_EVENT, SCHEMA, connect  # noqa: E402
from flask_durable_stream.managers.sqlite_ops import _GUARD  # noqa: E402
from flask_durable_stream.runner import new_stream_id  # noqa: E402

UPDATE = "UPDATE ds_streams SET last_seq = ?, updated_at = ?, heartbeat_at = ? WHERE stream_id = ?"
PAYLOAD = '{"message":{"content":[{"text":"a token or two"}]}}'
EVENTS_BY_ID = (
    "DROP TABLE ds_events;"
    "CREATE TABLE ds_events (stream_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " kind TEXT NOT NULL, payload TEXT NOT NULL);"
    "CREATE UNIQUE INDEX ds_events_key ON ds_events (stream_id, seq)"
)
EVENTS_BY_NUMBER = (
    "DROP TABLE ds_events;"
    "CREATE TABLE ds_events (stream_id INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " kind TEXT NOT NULL, payload TEXT NOT NULL);"
    "CREATE UNIQUE INDEX ds_events_key ON ds_events (stream_id, seq)"
)
VARIANTS: dict[str, dict[str, object]] = {
    "as stored (WITHOUT ROWID, key (stream_id, seq))": {},
    "rowid table, UNIQUE (stream_id, seq)": {"layout": EVENTS_BY_ID},
    "rowid table, UNIQUE (number, seq), a number per stream": {
        "layout": EVENTS_BY_NUMBER,
        "numbers": True,
    },
    "as stored, page_size 2048": {"page_size": 2048},
    "as stored, page_size 1024": {"page_size": 1024},
    "as stored, 64 MiB page cache": {"cache_kib": 65536},
    "as stored, 5 events an append": {"events": 5},
}


def cpu_per_append(
    directory: str, streams: int, per_commit: int, appends: int, **variant: object
) -> float:
    path = os.path.join(directory, f"{random.getrandbits(64):x}.db")
    if "page_size" in variant:  # before the file has a page: the WAL switch writes one
        with sqlite3.connect(path) as fresh:
            fresh.execute(f"PRAGMA page_size={variant['page_size']}")
            fresh.execute("VACUUM")
    conn = connect(path, busy_timeout=5.0, synchronous="NORMAL")
    if "cache_kib" in variant:
        conn.execute(f"PRAGMA cache_size=-{variant['cache_kib']}")
    if "layout" in variant:
        conn.executescript(str(variant["layout"]))
    ids = [new_stream_id() for _ in range(streams)]
    conn.execute("BEGIN")
    for stream_id in ids:
        conn.execute(
            "INSERT INTO ds_streams (stream_id, token, status, created_at, updated_at,"
            " heartbeat_at) VALUES (?, 1, 'open', 0, 0, 0)",
            (stream_id,),
        )
    conn.execute("COMMIT")
    keys: list[object] = list(range(1, streams + 1)) if variant.get("numbers") else list(ids)
    per_append = int(variant.get("events", 1))  # type: ignore[call-overload]
    insert = INSERT_EVENT.replace("(?, ?, ?, ?)", ", ".join(["(?, ?, ?, ?)"] * per_append))
    tail = [-1] * streams
    order = list(range(streams))
    random.shuffle(order)
    started = time.process_time()
    done = 0
    while done < appends:
        conn.execute("BEGIN IMMEDIATE")
        for _ in range(per_commit):
            n = order[done % streams]
            first, last = tail[n] + 1, tail[n] + per_append
            moved = conn.execute(UPDATE + _GUARD, (last, 1.0, 1.0, ids[n], 1, first - 1))
            if moved.rowcount != 1:
                raise SystemExit(f"the usual case's checks failed for stream {ids[n]}")
            rows = [(keys[n], seq, "chunk", PAYLOAD) for seq in range(first, last + 1)]
            conn.execute(insert, [value for row in rows for value in row])
            tail[n] = last
            done += 1
        conn.execute("COMMIT")
    spent = time.process_time() - started
    conn.close()
    return spent / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--per-commit", type=int, default=66)
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    assert "WITHOUT ROWID" in SCHEMA  # "as stored" is the manager's own layout
    print(
        f"{args.streams} streams, {args.per_commit} appends a commit, {args.appends} appends,"
        f" SQLite {sqlite3.sqlite_version}; CPU per append, median of {args.rounds} (range)"
    )
    for name, variant in VARIANTS.items():
        with tempfile.TemporaryDirectory() as directory:
            figures = [
                cpu_per_append(directory, args.streams, args.per_commit, args.appends, **variant)
                for _ in range(args.rounds)
            ]
        print(
            f"  {name:58s} {statistics.median(figures):6.1f} us"
            f" ({min(figures):.1f}-{max(figures):.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
