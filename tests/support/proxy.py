"""A TCP proxy that cuts connections, like a network switch or a flaky mobile link."""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; connection ``i`` is cut after ``cuts[i]`` bytes.

    Only server-to-client bytes count. Connections beyond ``cuts`` (or with ``None``)
    are never cut. Connection ``i`` in ``answers`` never reaches upstream: the proxy reads
    the request and answers ``answers[i]`` itself (a restarting server behind a load
    balancer). ``connections`` counts accepted connections.
    """

    def __init__(
        self,
        upstream_port: int,
        cuts: Sequence[int | None] = (),
        *,
        answers: Mapping[int, bytes] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.answers = dict(answers or {})
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            index, self.connections = self.connections, self.connections + 1
            if index in self.answers:
                threading.Thread(
                    target=self._answer, args=(client, self.answers[index]), daemon=True
                ).start()
                continue
            cut = self.cuts[index] if index < len(self.cuts) else None
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, cut), daemon=True).start()

    @staticmethod
    def _answer(client: socket.socket, answer: bytes) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:  # the GETs this answers have no body
                data = client.recv(65536)
                if not data:
                    break
                request += data
            client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if cut is not None and sent + len(data) >= cut:
                    sink.sendall(data[: cut - sent])
                    break  # the link goes down mid-response
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
