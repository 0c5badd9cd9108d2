"""The live fast path: a live client's frames written without a task of their own.

Under gevent the usual path costs, per chunk, a wake-up of the response's task
(an Event, a hub callback and two switches), a batch list and a trip through
the WSGI server's write, and every stream holds two greenlets (the flow and
the response). With a server whose socket we can reach (gunicorn's gevent
workers, gevent's WSGIServer), on a connection it does not encrypt itself (no
TLS: the fast path writes to the OS socket), none of that is needed:

* While the client keeps up, the first event of a burst (the first the flow
  emits in a turn of the hub's loop: every chunk of an LLM-paced flow) is framed
  and sent at once, with one non-blocking ``send`` from the emitting task. Its
  second event asks for one hub callback (``Run.defer``, shared with the
  in-process store) that frames every event the burst emitted since, from the
  run at the reader's cursor, and sends them in one ``send``; the other events
  of the burst cost the flow nothing here.
* A send that cannot complete at once (a client that reads slowly) keeps the
  unsent rest and the sink stops taking events: they stay in the run, for the
  live reader, under the usual bound (``live_buffer_bytes``, reader pacing,
  the slow-client disconnect). A write watcher of the hub's loop then sends
  the rest and reads on from the run whenever the socket can take more, and
  hands back to the bursts' sends once it has caught up.
* The response's greenlet only waits for the end: the terminal frame sent, or
  the client gone, when it returns to the server. It starts the flow first: in
  itself with ``DURABLE_STREAM_FLOW_IN_RESPONSE``, else in the flow's task, by
  switching to it at once (a task started by a hub callback would start behind
  every callback queued before it, a storm of new requests' greenlets); it
  then stays switched out until the end.

What keeps it durable and ordered:

* The events stay the run's, exactly as on the usual path: the writer stores
  them from the run whatever happens to the socket, and a burst's deferred send
  runs before (never instead of) its in-process store.
* One writer at a time: a send that comes up short hands over to the watcher
  (a deferred send then sends nothing), and the watcher sends its rest before
  the sink takes bursts again. The live reader's cursor is past exactly the
  events handed to the socket, so each frame goes out once, in order, and
  equals a replay from storage.
* A client that goes away stops nothing: its reader is detached, the response
  ends, and the flow goes on in its own greenlet and is stored.
"""

from __future__ import annotations

import _socket
import contextvars
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _responses, protocol
from .protocol import CHUNK

if TYPE_CHECKING:
    from .managers.base import Event
    from .run import LiveReader, Run

log = logging.getLogger("flask_durable_stream")

#: How many sinks own their connection now (DURABLE_STREAM_DETACH_RESPONSE): at most as
#: many as the server serves connections at once (gunicorn's worker_connections).
_taken = [0]
#: Frames a burst may queue before they are sent without waiting for the burst's end.
FLUSH_BYTES = 64 * 1024
#: The watcher takes at most this many payload bytes from the run per write.
PUMP_BYTES = 256 * 1024


class DirectSink:
    """The socket of one live response, written without blocking from the hub's callbacks.

    ``armed`` while caught up: :meth:`take` sends a burst's first event at once,
    and its second asks for a deferred :meth:`flush` of the rest. Otherwise the
    watcher's :meth:`_pump` sends the rest of the last write, then reads on from
    the run at the reader's cursor.
    """

    __slots__ = (
        "armed", "flush_at", "burst_at", "deferred", "clock", "failed", "done", "reader",
        "in_response", "_run", "_raw", "_chunked", "_rest", "_watcher", "_parked",
        "_owner", "_detached", "_after", "_busy",
    )  # fmt: skip

    def __init__(
        self,
        run: Run,
        reader: LiveReader,
        sock: Any,
        chunked: bool,
        in_response: bool = False,
        owner: Any = None,
    ) -> None:
        import gevent

        self.armed = False
        #: While a send is deferred to the end of the burst: the run's total bytes at which
        #: the burst is sent at once (too long to wait for). 0: no send is deferred.
        self.flush_at = 0
        #: The hub loop's time (``loop.now()``, the same all through one turn of the loop)
        #: at the burst's first event, and that clock: an event emitted at a later turn
        #: starts a new burst, sent at once even if the last one's deferred send has not
        #: run yet.
        self.burst_at = 0.0
        self.deferred = False  # a send of the burst's rest is asked for
        self.clock: Callable[[], float] = gevent.get_hub().loop.now
        self.failed = False  # the client went away (or was dropped)
        self.done = False  # the terminal frame went out, or the client is gone
        self.reader = reader
        self._run = run
        self._raw = sock._sock  # the OS socket under gevent's (non-blocking): sends from anywhere
        self._chunked = chunked
        self._rest = b""  # the unsent end of the last write
        self._watcher: Any = None  # the loop's write watcher, while a send is short
        self._parked: Any = None  # the response's greenlet, while it waits for the end
        #: Whether the flow runs in the response's greenlet (DURABLE_STREAM_FLOW_IN_RESPONSE).
        self.in_response = in_response
        #: The server's response (its WSGI ``write``'s owner), where the sink may take the
        #: connection over and end the request at once (DURABLE_STREAM_DETACH_RESPONSE).
        self._owner = owner
        self._detached = False  # the sink owns the connection (a duplicate of its socket)
        self._after: Any = None  # how the connection is served on after the stream, if it is
        self._busy: object = None  # while the connection is the sink's: a graceful stop waits

    # -- queueing, while caught up ----------------------------------------------
    def emitted(self, event: Event) -> None:
        """From ``Run._emit``, while armed: ``event`` was just emitted.

        The first event of a burst (the first of this turn of the hub's loop), a
        terminal event and a burst too long to wait for are sent at once; a burst's
        second event asks for one send of the rest once the flow yields; the others
        cost nothing here. A chunk at the reader's cursor, the usual case of an
        LLM-paced flow, is framed and sent right here, without :meth:`take`'s steps
        for the other cases (one chunk of a paced stream at a time: a few function
        calls less per chunk, for every chunk of every live stream), through the same
        :meth:`_send` (a short send hands over to the watcher, a failed one lets go of
        the client).
        """
        now = self.clock()
        run = self._run
        if event[1] != CHUNK:
            self.take(event)
            return
        if self.burst_at == now and run.total_bytes < self.flush_at:
            if not self.deferred:  # the burst's second event: the rest go at its end
                self.deferred = True
                run.after_yield(self.flush)
            return
        reader = self.reader
        if reader.cursor != event[0]:  # events before it wait at the cursor
            self.take(event)
            return
        self.deferred = False
        self.flush_at = 0
        run.passed(reader, 1)
        self._send(self._wire(protocol.frame(CHUNK, event[2]).encode()), False)
        if self.armed:  # sent whole: a new burst
            self.flush_at = run.total_bytes + FLUSH_BYTES
            self.burst_at = now

    def take(self, emitted: Event | None) -> None:
        """Send the events at the reader's cursor, framed at once, without waiting; a
        short send hands over to the watcher (then, like once done, this sends nothing).

        From :meth:`emitted` with the event just emitted (``emitted``), for a terminal
        event, and for the first event of a burst or a burst past ``flush_at`` when the
        reader is behind it; the events stay in the run, at the reader's cursor, until a
        send takes them. When the reader's cursor is at ``emitted`` it is framed from
        the event itself rather than read back from the run. A chunk starts a new burst:
        the rest of it waits for one deferred send (:meth:`flush`, asked for by its
        second event, see :meth:`emitted`), up to FLUSH_BYTES. Its first event does not
        wait (see Run.defer): an LLM-paced flow emits one event per burst.
        """
        self.flush_at = 0
        self.deferred = False
        run, reader = self._run, self.reader
        if self.armed and reader.cursor < run.count:
            if emitted is not None and reader.cursor == emitted[0]:
                run.passed(reader, 1)
                body = protocol.frame(emitted[1], emitted[2]).encode()
            else:
                body = protocol.frames(run.read(reader, None))
            last = run.ended and reader.cursor >= run.count
            self._send(self._wire(body, last), last)
        if emitted is not None and emitted[1] == CHUNK and self.armed:  # a new burst
            self.flush_at = run.total_bytes + FLUSH_BYTES
            self.burst_at = self.clock()

    def flush(self) -> None:
        """:meth:`take` of what is at the reader's cursor: the rest of a burst, once the
        flow yields, and what the flow emitted before the sink was set up."""
        self.take(None)

    def _send(self, data: bytes, last: bool) -> None:
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went away: the flow goes on without it
            self._fail()
            return
        if sent < len(data):
            self._rest = data[sent:]
            self.armed = False  # the watcher writes from here on
            self._watch()
        elif last:
            self._finish()

    def _wire(self, body: bytes, last: bool = False) -> bytes:
        """``body`` as the response sends it: one HTTP chunk, when the response is chunked
        (and the chunked body's end after the last, once the sink owns the connection)."""
        if not self._chunked:
            return body
        if last and self._detached:
            return b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        return b"%x\r\n%b\r\n" % (len(body), body)

    # -- the watcher, while the client is behind --------------------------------
    def _watch(self) -> None:
        watcher = self._watcher
        if watcher is None:
            import gevent

            watcher = self._watcher = gevent.get_hub().loop.io(self._raw.fileno(), 2)
        if not watcher.active:
            watcher.start(self._pump)

    def _pump(self) -> None:
        """Send what the socket takes now: the rest of the last write, then the run's events."""
        run, reader = self._run, self.reader
        try:
            while not self.done:
                if reader.dropped:  # too far behind for too long: its connection was closed
                    self._fail()
                    return
                if self._rest:
                    sent = self._raw.send(self._rest)
                    self._rest = self._rest[sent:]
                    if self._rest:
                        self._watch()  # called again once the socket takes more
                        return
                    continue
                if reader.cursor < run.count:
                    body = protocol.frames(run.read(reader, PUMP_BYTES))
                    self._rest = self._wire(body, run.ended and reader.cursor >= run.count)
                    continue
                if run.ended:  # caught up with an ended run: its terminal frame went out
                    self._finish()
                    return
                self._unwatch()
                self.armed = True  # caught up: queue again
                return
        except BlockingIOError:
            self._watch()
        except OSError:
            self._fail()
        except LookupError:  # released meanwhile (only a dropped reader's events are)
            if reader.on_drop is not None and not reader.dropped:
                reader.on_drop()  # the client must see a cut, not an end, and resume
            self._fail()

    def _unwatch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    # -- the end -----------------------------------------------------------------
    def _fail(self) -> None:
        self.failed = True
        self._rest = b""
        self._run.detach(self.reader)  # nothing is kept for a client that is gone
        self._run.reader_moved()  # a flow waiting for this reader goes on
        self._finish()

    def _finish(self) -> None:
        self.armed = False
        self.done = True
        self._unwatch()
        if self._detached:  # the connection is the sink's: it ends with the stream...
            self._run.detach(self.reader)
            busy, self._busy = self._busy, None
            if busy is not None:  # once
                _responses.idle(busy)
                after, self._after = self._after, None
                if after is not None and not self.failed:  # ...or goes on, kept alive
                    from ._handover import continue_after

                    continue_after(after, self._raw, _let_go)  # counted until it closes
                else:
                    _let_go()
                    try:
                        self._raw.close()
                    except OSError:  # pragma: no cover - closing a socket does not fail here
                        pass
        parked, self._parked = self._parked, None
        if parked is not None:
            import gevent

            hub = gevent.get_hub()
            if gevent.getcurrent() is hub:
                _wake(parked)
            else:
                hub.loop.run_callback(_wake, parked)

    def gone(self) -> bool:
        """Whether the client went away (or was dropped)."""
        return self.failed

    @property
    def owns_connection(self) -> bool:
        """Whether the sink took the connection over (the request has nothing more to do)."""
        return self._detached

    def _take_over(self) -> bool:
        """Own the connection: a duplicate of its socket, written from the hub to the
        stream's end, and the server told to end the request without a body end of its
        own and to close its side (the duplicate keeps the connection open)."""
        owner, self._owner = self._owner, None  # the request's objects go with it
        if owner is None:
            return False
        from ._handover import taking

        try:
            server = taking(owner)
        except Exception:  # a server's internals not as expected: the request keeps it
            log.exception("Cannot take this live stream's connection over")
            return False
        if server.limit is not None and _taken[0] >= server.limit:
            # As many connections as the server serves at once are sinks' already: this
            # one stays with its request, among those the server counts.
            return False
        try:
            # The OS socket type (gevent's patched class would wait on the hub), told what
            # it is (else it asks the kernel: three system calls, for every stream).
            old = self._raw
            raw = _socket.socket(old.family, old.type, old.proto, os.dup(old.fileno()))
        except OSError:  # out of descriptors: the response keeps the connection
            return False
        raw.setblocking(False)
        self._after = server.after()  # before the server is told to close its side
        if is_gunicorn_response(owner):
            owner.chunked = False
            owner.force_close()
        else:  # gevent.pywsgi's handler, or a subclass of it
            owner.response_use_chunked = False
            owner.close_connection = True
        watching = self._watcher is not None
        self._unwatch()
        self._raw = raw
        self._detached = True
        self._busy = _responses.busy()
        _taken[0] += 1
        self.reader.on_drop = self._cut
        if watching:
            self._watch()
        return True

    def _cut(self) -> None:
        """A client too far behind is dropped (``Run._drop``): its connection is cut, which
        the watcher (waiting for the socket to take more) then finds."""
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def serve(self) -> bool:
        """In the response's greenlet: wait until the client has every frame; False if it
        went away (or was dropped). Events emitted before the sink existed go out first.
        Once done, it answers the same again at once."""
        if self._detached:
            return False  # the sink writes the rest; the request ends
        try:
            self._pump()  # catch up, then queue
            run = self._run
            body, run_now = run.claim(), run.run_now
            run.run_now = None
            if body is not None and self.in_response:  # the flow runs here
                # A generator flow moves to a task of its own at its first chunk after
                # the client left, so that this response ends then (see FlowMoved).
                run.ctx._move_when = self.gone
                contextvars.Context().run(body)  # as fresh as a greenlet of its own
                body = None
            elif body is not None and (self.done or run_now is None):
                run.pending = body  # the runner's callback (due at the hub's next turn)
                body = None  # starts it as usual
            if not self.done and self._take_over():
                # The request ends now and its greenlet goes back to the server; it
                # starts the flow's task first, and is switched back to once that yields.
                if body is not None and run_now is not None:  # (else it is pending above)
                    import gevent

                    gevent.get_hub().loop.run_callback(_wake, gevent.getcurrent())
                    run_now(body)
                return False
            if not self.done:
                # Switched out until the stream is over for its client (_finish switches
                # back): to the flow's new task, started now rather than by a hub callback
                # behind a storm of new requests' greenlets, or else to the hub.
                import gevent

                self._parked = gevent.getcurrent()
                if body is not None and run_now is not None:
                    run_now(body)
                else:
                    gevent.get_hub().switch()
        finally:
            if not self.done and not self._detached:  # killed meanwhile: nothing more is written
                self._parked = None
                self._fail()
        return not self.failed


def _let_go() -> None:
    """A connection a sink took over is closed, or served on no more."""
    _taken[0] -= 1


def _wake(parked: Any) -> None:
    """From the hub: switch back to a response's greenlet that waits for its stream's end."""
    if not parked.dead:
        parked.switch()


def live_hook(response: Any, run: Run, *, in_response: bool = False, detach: bool = False) -> None:
    """Sets up ``response`` (the live stream of ``run``) for the fast path: once its headers
    are out it calls ``on_headers`` with its server's ``write``, and the live reader gets a
    sink when the server is one we know (under gevent only). ``in_response``: the flow
    runs in the response's greenlet (``DURABLE_STREAM_FLOW_IN_RESPONSE``)."""
    if not run.cooperative or run.live is None:
        return
    reader = run.live

    def use(write: Callable[[bytes], Any]) -> Callable[[], object] | None:
        found = _socket_of(write)
        if found is None:
            return None
        owner = found[2] if detach and not in_response else None
        sink = run.sink = DirectSink(run, reader, found[0], found[1], in_response, owner)
        # The response's greenlet waits in ``serve`` from the body's first step, not
        # under its nested iterators (Werkzeug's, the front's, ``Run.batches``): each
        # is a level of C stack that a switched-out greenlet keeps a copy of. The
        # body then finds the sink served (``serve`` answers again at once).
        return sink.serve

    response.on_headers = use


def _socket_of(write: Callable[[bytes], Any]) -> tuple[Any, bool, Any] | None:
    """The gevent socket under a known server's WSGI ``write``, whether it is chunked,
    and the server's object that ``write`` belongs to."""
    owner: Any = getattr(write, "__self__", None)
    if is_gunicorn_response(owner):
        if not owner.headers_sent or owner.response_length is not None:
            return None
        if getattr(owner, "_omits_body", False):
            return None
        sock, chunked = owner.sock, bool(owner.chunked)
    elif is_pywsgi_handler(owner):
        if not owner.headers_sent:
            return None
        sock, chunked = owner.socket, bool(owner.response_use_chunked)
    else:
        return None
    if getattr(sock, "_sock", None) is None:
        return None
    if hasattr(sock, "_sslobj"):  # TLS (gevent's or the standard SSLSocket): its bytes are
        return None  # encrypted by the socket object; the OS socket under it must not be written
    return sock, chunked, owner


def is_gunicorn_response(owner: Any) -> bool:
    """Whether ``owner`` (a WSGI ``write``'s or ``start_response``'s ``__self__``) is gunicorn's
    ``Response``, whose state (``sock``, ``chunked``, ``headers_sent``...) the fast paths use."""
    return type(owner).__module__ == "gunicorn.http.wsgi"


def is_pywsgi_handler(owner: Any) -> bool:
    """Whether ``owner`` is a handler of gevent's WSGI server: ``gevent.pywsgi.WSGIHandler``
    or a subclass (gunicorn's ``gevent_pywsgi`` worker's, ``PyWSGIWorker``'s)."""
    pywsgi = sys.modules.get("gevent.pywsgi")  # never imported: no handler of it exists
    return pywsgi is not None and isinstance(owner, pywsgi.WSGIHandler)


#: A response body up to this many bytes goes out in one write with its head (gunicorn's
#: fast path, PyWSGIWorker's handler); a longer one keeps two writes: joining it would copy it.
ONE_WRITE_BYTES = 64 * 1024


def send_whole(sock: Any, data: bytes) -> None:
    """``sock.sendall(data)``, one ``send`` first: a short write leaves in one system call
    (gevent's ``sendall`` first asks the socket for its buffer size, a system call of its own)."""
    sent = sock.send(data) if data else 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
