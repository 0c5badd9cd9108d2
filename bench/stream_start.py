"""What starting a stream costs the server, apart from its chunks.

    python bench/stream_start.py [--requests 3000] [--rounds 5]

Calls the benchmark app (bench/core_server.py, gevent patched, in this process) as a WSGI
server would: ``POST /flows/llm`` with 0 chunks, streaming (the stream is opened, its flow
runs and ends, the response is read to its result), beside plain Flask's ``POST /plain_llm``
with 0 chunks. CPU time per request (this process's, so the in-memory manager's work counts),
the median of ``--rounds`` rounds, each after a warm-up. No sockets: the server's own parsing
and writing are left out, so the figures are the application's share of a request.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import core_server  # noqa: E402

BODY = json.dumps({"data": {"chunks": 0, "delay": 0}}).encode()


def call(app: Any, path: str) -> bytes:
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_ACCEPT": "text/event-stream",
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
    }
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(line)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    if not status or not status[0].startswith("200") or b'"result"' not in data:
        raise SystemExit(f"{path}: unexpected response {status} {data[:200]!r}")
    return data


def cpu_per_request(app: Any, path: str, requests: int) -> float:
    for _ in range(requests // 10):
        call(app, path)
    start = time.process_time()
    for _ in range(requests):
        call(app, path)
    return (time.process_time() - start) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    app = core_server.create_app()
    rows = {
        "ours, in-memory (POST /flows/llm)": "/flows/llm",
        "plain Flask (POST /plain_llm)": "/plain_llm",
    }
    results = {label: [] for label in rows}
    for _ in range(args.rounds):  # interleaved, so a change of the machine's load falls on both
        for label, path in rows.items():
            results[label].append(cpu_per_request(app, path, args.requests))
    plain = statistics.median(results["plain Flask (POST /plain_llm)"])
    for label, values in results.items():
        median = statistics.median(values)
        print(
            f"{label:36} CPU per started stream: median {median:6.1f} us"
            f" (rounds: {', '.join(f'{v:.0f}' for v in values)}), {median / plain:.2f}x plain"
        )


if __name__ == "__main__":
    main()
