"""Real servers for tests: subprocesses on free ports on 127.0.0.1, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 60,
    output: Any = None,
) -> None:
    """``output``: a callable returning what ``proc`` printed (when something else reads it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            if output is not None:
                out = output()
            else:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Server:
    """A server process; ``url`` is its base URL.

    What it prints is read all along by a thread of its own: a pipe that nobody
    drains fills up (64 KiB) and then blocks every process of the server that
    logs, which would stall flows and heartbeats and make tests fail for a
    reason that is not the library's.
    """

    def __init__(self, args: Sequence[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(env or {})  # what the test set, e.g. the path of the server's storage
        # PYTHONFAULTHANDLER: a Python server that does not stop in time prints every
        # thread's stack on SIGABRT (see stop).
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **self.env}
        self.proc = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._printed = bytearray()
        self._drain = threading.Thread(target=self._read_output, name="server-output", daemon=True)
        self._drain.start()
        wait_for_port(port, self.proc, output=self.output)

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._printed += chunk

    def output(self) -> str:
        """What the server printed so far (all of it once it has exited)."""
        if self.proc.poll() is not None:
            self._drain.join(10)  # EOF comes once every process of the group has exited
        return bytes(self._printed).decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> str:
        """Stop the whole process group; return what it printed."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stuck = self._stuck()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the rest of its group
            except ProcessLookupError:
                pass
            self.proc.wait()
            return self.output() + stuck
        return self.output()

    def _stuck(self) -> str:
        """Why the server did not stop: its signal state, then every thread's stack."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                state = [line for line in f if line.startswith(("Sig", "Shd", "State"))]
        except OSError:
            state = []
        try:
            os.kill(self.proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: stacks to the output
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        return f"\n--- did not stop within its timeout; its state then:\n{''.join(state)}"


def sqlite_env(tmp_path_factory: Any, name: str = "streams") -> dict[str, str]:
    """Environment that points the example app's SQLite default at a fresh file."""
    path = tmp_path_factory.mktemp(name) / "durable-streams.sqlite3"
    return {"FLASK_DURABLE_STREAM_SQLITE_PATH": str(path)}


def example_app(env: dict[str, str] | None = None) -> Server:
    port = free_port()
    return Server([PYTHON, "-m", "example_app", "--port", str(port)], port, env)


def gunicorn(
    app: str, *, workers: int = 1, env: dict[str, str] | None = None, extra: Sequence[str] = ()
) -> Server:
    port = free_port()
    return Server(gunicorn_args(app, port, workers=workers, extra=extra), port, env)


def gunicorn_args(app: str, port: int, *, workers: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """The command line of a gevent gunicorn on 127.0.0.1:``port``."""
    return [
        str(BIN / "gunicorn"),
        "-k",
        "gevent",
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "10",
        "--no-control-socket",  # gunicorn 27's default socket path is shared by every instance
        *extra,
        app,
    ]


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory`` (for a
    server under TLS, ``--certfile`` and ``--keyfile``)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)
