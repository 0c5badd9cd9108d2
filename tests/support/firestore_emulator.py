"""Google's Firestore emulator, started as a plain JVM process on a free port.

Used by the test fixtures and by ``bench/bench_firestore.py``. The JAR ships
with the ``google-cloud-cli-firestore-emulator`` package; ``FIRESTORE_EMULATOR_JAR``
overrides where it is looked for. Nothing here talks to Google: the emulator
listens on 127.0.0.1 only and keeps its data in memory.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

JAR_ENV = "FIRESTORE_EMULATOR_JAR"
SKIP_ENV = "DURABLE_STREAM_SKIP_FIRESTORE"
MAIN_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
_JAR_GLOBS = (
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/*.jar",
    "/usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/*.jar",
    "/opt/google-cloud-sdk/platform/cloud-firestore-emulator/*.jar",
    str(Path.home() / "google-cloud-sdk/platform/cloud-firestore-emulator/*.jar"),
)


class EmulatorUnavailable(RuntimeError):
    """java or the emulator JAR is missing, or the emulator did not start."""


def find_jar() -> str:
    override = os.environ.get(JAR_ENV)
    if override:
        if not os.path.isfile(override):
            raise EmulatorUnavailable(f"{JAR_ENV}={override} does not exist")
        return override
    for pattern in _JAR_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if path.endswith("cloud-firestore-emulator.jar"):
                return path
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "google-cloud-cli-firestore-emulator"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    jars = [line for line in listing.splitlines() if line.endswith(".jar")]
    if jars:
        return jars[0]
    raise EmulatorUnavailable(
        "Firestore emulator JAR not found: install google-cloud-cli-firestore-emulator "
        f"(apt) or set {JAR_ENV}"
    )


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise EmulatorUnavailable("java not found on PATH (the Firestore emulator needs a JRE 11+)")
    return java


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FirestoreEmulator:
    """One emulator process. ``start()`` returns once it answers HTTP."""

    def __init__(self, project: str | None = None, port: int | None = None) -> None:
        self.project = project or f"demo-durable-{uuid.uuid4().hex[:8]}"
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> FirestoreEmulator:
        jar, java = find_jar(), find_java()
        self.process = subprocess.Popen(
            [java, "-cp", jar, MAIN_CLASS, "--host=127.0.0.1", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorUnavailable(f"emulator exited with {self.process.returncode}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise EmulatorUnavailable(f"emulator did not answer on {self.host} in {timeout} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def reset(self) -> None:
        """Delete every document of the project."""
        request = urllib.request.Request(
            f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents",
            method="DELETE",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def client(self):  # type: ignore[no-untyped-def]
        """A Firestore client bound to this emulator (whatever FIRESTORE_EMULATOR_HOST says)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import firestore

        previous = os.environ.get("FIRESTORE_EMULATOR_HOST")
        os.environ["FIRESTORE_EMULATOR_HOST"] = self.host
        try:
            return firestore.Client(project=self.project, credentials=AnonymousCredentials())
        finally:
            if previous is None:
                del os.environ["FIRESTORE_EMULATOR_HOST"]
            else:
                os.environ["FIRESTORE_EMULATOR_HOST"] = previous

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the JVM's own session only
        except ProcessLookupError:
            return
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def __enter__(self) -> FirestoreEmulator:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
