"""Cross-process wake-ups for the live readers of a shared SQLite file.

The worker processes of one host share a SQLite file; a reader waiting in one
of them learns of another's append by polling (:class:`~.store.PolledStore`),
a millisecond or two after the commit. With a doorbell, a process with live
readers listens on a Unix datagram socket named after its pid in a directory
of its own user, derived from the file's path; a process that commits sends
the paths it changed to every socket there, and the listener wakes those
readers of its process (:class:`~.store.Wakeups`) at once.

It only ever adds wake-ups (a spurious one is harmless: readers re-read), and
it never blocks or fails a write: a full socket buffer, a stale socket of a
dead worker or a directory it cannot use leave the readers to their polling.
Listening needs gevent (``gunicorn -k gevent``: the listener is a greenlet);
every process rings, patched or not (a ``stat`` of the directory per commit,
and a datagram per listener), so a listening process's readers hear every
writer and poll only as a safety net (:attr:`listening`).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterable

from .._concurrency import TaskGroup, gevent_patched

_DATAGRAM = 32 * 1024


class Doorbell:
    """``wake(paths)`` is called in the listening process for each ring that names ``paths``."""

    def __init__(self, db_path: str, wake: Callable[[list[str]], None]) -> None:
        digest = hashlib.sha1(os.path.abspath(db_path).encode()).hexdigest()[:16]
        self.directory = os.path.join(tempfile.gettempdir(), f"fds-{os.getuid()}-{digest}")
        self._wake = wake
        self._pid = 0  # the process the socket below belongs to
        self._listener: socket.socket | None = None
        self._name = ""
        self._sender: socket.socket | None = None
        self._sender_pid = 0  # the process the sender belongs to (a fork makes its own)
        self._peers: list[str] = []
        self._listed = -1  # the directory's mtime when it was last listed
        self._tasks = TaskGroup()
        self._checked = 0  # the process that decided ``_enabled`` (a fork decides again)
        self._enabled = False

    @property
    def listening(self) -> bool:
        """Whether this process listens: other processes' rings wake its readers."""
        return self._listener is not None and self._pid == os.getpid()

    @property
    def enabled(self) -> bool:
        if self._checked != os.getpid():  # gunicorn patches in the worker, after a --preload
            self._checked, self._enabled = os.getpid(), gevent_patched()
        return self._enabled

    # -- the listening side -------------------------------------------------------------
    def listen(self) -> None:
        """Start listening in this process (once; before a reader's first look at the file)."""
        if not self.enabled or self._pid == os.getpid():
            return
        self._pid = os.getpid()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if os.stat(self.directory).st_uid != os.getuid():
                raise PermissionError(self.directory)
            name = os.path.join(self.directory, str(self._pid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)  # a dead process's, whose pid this one got
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(name)
        except OSError:
            self._enabled = False  # polling only
            return
        self._listener, self._name = sock, name
        atexit.register(self._remove, name)
        self._tasks.spawn(self._serve, sock, name="durable-streams-doorbell")

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_DATAGRAM + 1024)
            except OSError:
                return  # closed
            if data:
                self._wake(data.decode().split("\n"))

    # -- the writing side ---------------------------------------------------------------
    def ring(self, paths: Iterable[str]) -> None:
        """Tell every other listening process that ``paths`` changed; never blocks."""
        peers = self._list()
        if not peers:
            return
        if self._sender is None or self._sender_pid != os.getpid():
            self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sender.settimeout(0)  # a full buffer drops the ring, never waits
            self._sender_pid = os.getpid()
        for payload in _payloads(paths):
            for peer in peers:
                try:
                    self._sender.sendto(payload, peer)
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):  # its process is gone
                        with contextlib.suppress(OSError):
                            os.unlink(peer)
                        self._listed = -1

    def _list(self) -> list[str]:
        """The other listeners' sockets, listed again whenever the directory changed."""
        try:
            found = os.stat(self.directory)
        except OSError:
            return []
        if found.st_uid != os.getuid():
            return []  # not this user's: the paths are not sent there
        changed = found.st_mtime_ns
        if changed != self._listed:
            self._listed = changed
            try:
                names = os.listdir(self.directory)
            except OSError:
                names = []
            own = str(os.getpid())
            self._peers = [os.path.join(self.directory, n) for n in names if n != own]
        return self._peers

    def _remove(self, name: str) -> None:
        """The socket's name, and the directory once no process listens there."""
        with contextlib.suppress(OSError):
            os.unlink(name)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and self._pid == os.getpid():
            atexit.unregister(self._remove)
            self._remove(self._name)
            listener.close()
            for task in self._tasks.tasks():
                task.kill(timeout=1)
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._pid = 0


def _payloads(paths: Iterable[str]) -> Iterable[bytes]:
    """The paths, newline-separated, in datagrams of at most ~32 KiB."""
    batch: list[bytes] = []
    size = 0
    for path in paths:
        data = path.encode()
        if batch and size + len(data) > _DATAGRAM:
            yield b"\n".join(batch)
            batch, size = [], 0
        batch.append(data)
        size += len(data) + 1
    if batch:
        yield b"\n".join(batch)
