"""Storage outages on demand, and a raw client that knows which worker served it.

Every storage of the chaos suite runs as a process of its own, so an outage is a
signal: SIGSTOP freezes ``redis-server``, the emulator JVM or the RTDB protocol
server with every connection still open (requests hang, nothing is refused),
SIGCONT brings it back. SQLite has no server: its directory, database and WAL are
made immutable (``chattr +i``), which stops even root from writing, through file
descriptors already open too (``chmod`` would not: the suite runs as root in CI).
"""

from __future__ import annotations

import codecs
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flask_durable_stream import protocol
from tests.support import servers

PID_HEADER = "x-worker-pid"
BACKENDS = ("memory", "sqlite", "redis", "firestore", "rtdb")
#: The reason a Durable Streams case has no Firestore or RTDB cell (docs/durable-streams.md).
DS_NOT_SERVED = "Durable Streams are served by the memory, SQLite and Redis managers"


class OutageUnavailable(RuntimeError):
    """The outage cannot be injected here (no chattr, or a file system without it)."""


class Storage:
    """Where a backend keeps its streams, and how to take it away for a while."""

    backend = "memory"

    def env(self) -> dict[str, str]:
        """The app's configuration, as FLASK_-prefixed environment variables."""
        return {"FLASK_DURABLE_STREAM_BACKEND": self.backend}

    def pause(self) -> None:
        raise OutageUnavailable(f"the {self.backend} backend has no storage to take away")

    def resume(self) -> None:
        raise OutageUnavailable(f"the {self.backend} backend has no storage to take away")

    def stop(self) -> None:
        pass

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()


class ProcessStorage(Storage):
    """A storage server process: SIGSTOP is the outage."""

    pid: int

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


class SqliteStorage(Storage):
    backend = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "streams.sqlite3"
        self.frozen: list[Path] = []

    def env(self) -> dict[str, str]:
        return {**super().env(), "FLASK_DURABLE_STREAM_SQLITE_PATH": str(self.path)}

    def pause(self) -> None:
        chattr = shutil.which("chattr")
        if chattr is None:
            raise OutageUnavailable("chattr is not installed (apt-get install e2fsprogs)")
        # The directory first, so no new journal file appears, then the database and its
        # write-ahead log: the files that hold the streams. The -shm file is left alone: it
        # is SQLite's shared-memory index, written through mmap, and a write to a mapped page
        # of an immutable file is SIGBUS, which no library can catch (see test_outage.py).
        files = [f for f in sorted(self.directory.iterdir()) if not f.name.endswith("-shm")]
        targets = [self.directory, *files]
        for target in targets:
            done = subprocess.run([chattr, "+i", str(target)], capture_output=True, text=True)
            if done.returncode != 0:
                self.resume()
                raise OutageUnavailable(f"chattr +i {target} failed: {done.stderr.strip()}")
            self.frozen.append(target)

    def resume(self) -> None:
        chattr = shutil.which("chattr") or "chattr"
        for target in reversed(self.frozen):
            subprocess.run([chattr, "-i", str(target)], check=True)
        self.frozen.clear()

    def stop(self) -> None:
        if self.frozen:
            self.resume()


class RedisStorage(ProcessStorage):
    backend = "redis"

    def __init__(self, workdir: Path) -> None:
        from tests.support.redis_server import RedisServer

        self.server = RedisServer(workdir)
        self.pid = self.server.proc.pid

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "FLASK_DURABLE_STREAM_REDIS_URL": self.server.url,
            "FLASK_DURABLE_STREAM_REDIS_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}",
        }

    def stop(self) -> None:
        self.resume()
        self.server.stop()


class FirestoreStorage(ProcessStorage):
    backend = "firestore"

    def __init__(self) -> None:
        from tests.support.firestore_emulator import FirestoreEmulator

        self.emulator = FirestoreEmulator().start()
        assert self.emulator.process is not None
        self.pid = self.emulator.process.pid  # the JVM itself, not a wrapper script

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "FIRESTORE_EMULATOR_HOST": self.emulator.host,
            "FLASK_DURABLE_STREAM_FIRESTORE_PROJECT": self.emulator.project,
            "FLASK_DURABLE_STREAM_FIRESTORE_COLLECTION": f"chaos-{uuid.uuid4().hex[:8]}",
        }

    def stop(self) -> None:
        self.resume()
        self.emulator.stop()


class RtdbStorage(ProcessStorage):
    """The RTDB protocol server, run as ``python -m tests.support.rtdb_server``."""

    backend = "rtdb"
    namespace = "chaos"

    def __init__(self) -> None:
        self.server = servers.Server(
            [
                servers.PYTHON,
                "-m",
                "tests.support.rtdb_server",
                "--port",
                str(port := servers.free_port()),
                "--namespace",
                self.namespace,
            ],
            port,
        )
        self.pid = self.server.proc.pid

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "FIREBASE_DATABASE_EMULATOR_HOST": f"127.0.0.1:{self.server.port}",
            "FLASK_DURABLE_STREAM_RTDB_URL": f"{self.server.url}?ns={self.namespace}",
            "FLASK_DURABLE_STREAM_RTDB_PREFIX": f"chaos-{uuid.uuid4().hex[:8]}",
        }

    def stop(self) -> None:
        self.resume()
        self.server.stop()


def _firestore_storage() -> Storage:
    """The emulator, or the same loud skip (``DURABLE_STREAM_SKIP_FIRESTORE=1``) or failure
    as every other Firestore test when it cannot run (no JAR on this machine, no java)."""
    from tests.support.firestore_emulator import SKIP_ENV, EmulatorUnavailable

    try:
        return FirestoreStorage()
    except EmulatorUnavailable as exc:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{SKIP_ENV}=1 and {exc}")
        pytest.fail(f"Firestore emulator unavailable: {exc} (set {SKIP_ENV}=1 to skip)")


def start_storage(backend: str, workdir: Path) -> Storage:
    if backend == "memory":
        return Storage()
    if backend == "sqlite":
        return SqliteStorage(workdir)
    if backend == "redis":
        return RedisStorage(workdir)
    if backend == "firestore":
        return _firestore_storage()
    if backend == "rtdb":
        return RtdbStorage()
    raise ValueError(backend)


# -- the app under gunicorn ----------------------------------------------------------------------

APP = "tests.chaos.app:create_app()"


def workers_for(backend: str) -> int:
    """Two workers, except for the memory backend, whose streams live in one process."""
    return 1 if backend == "memory" else 2


class LoggedServer(servers.Server):
    """A server whose output goes to a file: a pipe nobody reads would fill up during a
    long outage (every retry logs a line) and block the server on its next log line."""

    def __init__(self, args: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=servers.ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            servers.wait_for_port(port, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.output()[-5000:]}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def troubles(self, last: int = 6) -> str:
        """The last warnings and errors gunicorn logged (crashed workers, failed boots)."""
        marks = ("[WARNING]", "[ERROR]", "[CRITICAL]", "Error:", "failed to boot")
        lines = [ln for ln in self.output().splitlines() if any(m in ln for m in marks)]
        return " / ".join(line.split("] ", 2)[-1] for line in lines[-last:]) or "nothing"


def start_app(storage: Storage, log: Path, env: dict[str, str] | None = None) -> LoggedServer:
    port = servers.free_port()
    args = servers.gunicorn_args(
        APP,
        port,
        workers=workers_for(storage.backend),
        extra=["-c", "python:tests.chaos.gunicorn_conf"],
    )
    return LoggedServer(args, port, {**storage.env(), **(env or {})}, log)


def worker_pids(server: servers.Server) -> list[int]:
    """The gunicorn workers: the master's children."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == server.proc.pid:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- a raw client --------------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP exchange: status, headers, the raw body, and the frames in it."""

    status: int
    headers: dict[str, str]
    raw: bytes = b""
    events: list[tuple[str, Any]] = field(default_factory=list)
    ended_at: float = 0.0  # monotonic time the body ended

    @property
    def pid(self) -> int:
        return int(self.headers[PID_HEADER])

    @property
    def stream_id(self) -> str | None:
        return self.headers.get(protocol.STREAM_ID_HEADER)

    @property
    def terminal(self) -> tuple[str, Any] | None:
        last = self.events[-1] if self.events else None
        return last if last is not None and last[0] != protocol.CHUNK else None

    def json(self) -> Any:
        return json.loads(self.raw)


class Exchange:
    """An open request whose headers are in and whose body is read on demand."""

    def __init__(
        self,
        base_url: str,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120,
        *,
        chunked: bool = False,
    ) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.method = method
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        self.response = self.conn.getresponse()
        self.reply = Reply(
            self.response.status, {k.lower(): v for k, v in self.response.getheaders()}
        )
        content_type = self.reply.headers.get("content-type", "")
        self._streaming = content_type.startswith("text/event-stream")
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._raw = bytearray()

    def _feed(self, data: bytes) -> list[Any]:
        """Take in bytes as they come (a read may end mid-character); return new events."""
        self._raw += data
        if not self._streaming:
            return []
        self._buffer += self._utf8.decode(data)
        if "\n\n" not in self._buffer[-(len(data) + 2) :]:
            return []
        parse = parse_sse if self.method == "GET" else protocol.parse_frames
        events, self._buffer = parse(self._buffer)
        self.reply.events.extend(events)
        return events

    def read(self) -> Reply:
        """Read to the end. Genkit frames for a POST, SSE messages ``(id, event, data)`` for
        a GET."""
        try:
            while data := self.response.read1(1 << 20):
                self._feed(data)
        except (http.client.HTTPException, ConnectionError) as exc:
            raise AssertionError(
                f"the server closed the connection mid-stream ({type(exc).__name__}) after"
                f" {summary(bytes(self._raw))}"
            ) from None
        finally:
            self.reply.ended_at = time.monotonic()
            self.reply.raw = bytes(self._raw)
            self.close()
        return self.reply

    def read_chunks(self, count: int) -> int:
        """Read until ``count`` chunks (Genkit) or messages (SSE) are in; return how many."""
        seen = 0
        while seen < count and (data := self.response.read1(65536)):
            events = self._feed(data)
            seen += sum(1 for e in events if e[0] == protocol.CHUNK or self.method == "GET")
        self.reply.raw = bytes(self._raw)
        return seen

    def close(self) -> None:
        if self.conn.sock is not None:
            self.conn.sock.close()
        self.conn.close()


def post(
    base_url: str,
    flow: str,
    data: Any = None,
    *,
    stream_id: str | None = None,
    timeout: float = 120,
) -> Exchange:
    """Genkit's streaming POST: a new run, or with ``stream_id`` a replay and follow."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if stream_id is not None:
        headers[protocol.STREAM_ID_HEADER] = stream_id
    body = json.dumps({"data": data} if stream_id is None else {}).encode()
    return Exchange(base_url, "POST", f"/flows/{flow}", body, headers, timeout)


def reattach_elsewhere(
    base_url: str, flow: str, stream_id: str, not_pid: int | None, tries: int = 200
) -> Exchange:
    """A replay served by another worker than ``not_pid`` (any worker when it is None)."""
    for _ in range(tries):
        exchange = post(base_url, flow, stream_id=stream_id)
        if not_pid is None or exchange.reply.pid != not_pid:
            return exchange
        exchange.close()
    raise AssertionError(f"every one of {tries} replays was served by worker {not_pid}")


def parse_sse(buffer: str) -> tuple[list[tuple[int, str, Any]], str]:
    """SSE messages as ``(seq, event, data)``; comments are skipped. The seq of the
    stream's end is its id without ``-end``."""
    messages: list[tuple[int, str, Any]] = []
    while (end := buffer.find("\n\n")) >= 0:
        block, buffer = buffer[:end], buffer[end + 2 :]
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name and not name.startswith(":"):
                fields[name] = value
        if "data" in fields:
            messages.append(
                (
                    int(fields["id"].removesuffix(protocol.SSE_END_ID)),
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            )
    return messages, buffer


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def summary(raw: bytes) -> str:
    """A stream's bytes in a few words: how many chunks, and how it ended."""
    events, rest = protocol.parse_frames(raw.decode(errors="replace"))
    chunks = sum(1 for kind, _ in events if kind == protocol.CHUNK)
    last = events[-1] if events else None
    if last is None or last[0] == protocol.CHUNK:
        end = "no terminal frame"
    elif last[0] == protocol.ERROR:
        end = f"error {protocol.encode(last[1])}"
    else:
        end = f"done ({len(protocol.encode(last[1]))} bytes of output)"
    tail = f", {len(rest)} bytes of an unfinished frame" if rest else ""
    return f"{len(raw)} bytes: {chunks} chunks, {end}{tail}"


def assert_bytes(name: str, got: bytes, expected: bytes) -> None:
    """Exact bytes, with a failure message a person can read (not a 10 MB diff)."""
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        at = min(len(got), len(expected)) if at is None else at
        raise AssertionError(
            f"{name} got {summary(got)}; expected {summary(expected)} (first difference at"
            f" byte {at})"
        )
