"""Gunicorn server hooks for a graceful stop of running flows.

In your ``gunicorn.conf.py``::

    from flask_durable_stream.gunicorn import post_fork, post_worker_init, worker_exit

A gunicorn worker told to stop (SIGTERM, SIGINT, SIGQUIT) first waits for its
open connections to close, up to ``graceful_timeout``; a client following a long
flow keeps its connection open, so without these hooks the worker is killed
before the library's exit handler runs. ``post_worker_init`` starts the flows'
graceful shutdown (``DURABLE_STREAM_SHUTDOWN_GRACE``) as soon as the worker is
told to stop: flows get the grace, the rest end ``UNAVAILABLE``, their followers
receive the terminal frame and the connections close. ``worker_exit`` lets that
finish before the process ends. ``post_fork`` keeps a stop that arrives while the
worker is still booting: gunicorn installs the worker's own signal handlers only
after importing gevent and before loading the app, and a SIGTERM that comes
earlier is lost, so that worker would serve until the master kills it. Keep
``graceful_timeout`` above the grace + 5 s (storing the last events) + ``keepalive``
(an idle keep-alive connection holds the worker that long) + 2 s.

``post_worker_init`` also makes a gevent worker's new connections take turns
while it is busy (:class:`~flask_durable_stream._admission.Admission`): when
many clients connect at once, the streams already running keep their pace and
the new ones start a little later, instead of every running stream stalling
behind a hundred new requests per turn of the loop.

And it gives the worker its settings as plain attributes (:func:`read_settings_once`):
gunicorn reads about 35 of them for every request, each through ``Config.__getattr__``,
which Python calls only after a failed lookup has built an ``AttributeError``; that
was about 210k instructions a request, a fifth of what a small request costs in a
``-k gevent`` worker.
"""

from __future__ import annotations

import signal
from typing import Any

from ._admission import DEFAULT_TURN, Admission
from .runner import shutdown_all

#: What the master sends its workers to stop them (gracefully or not).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

#: How long worker_exit waits for a started shutdown beyond its grace.
EXIT_MARGIN = 5.0


def post_fork(server: Any, worker: Any) -> None:
    """Remember a stop signal that arrives before the worker handles signals itself.

    Until then the forked worker runs the master's handlers, which only queue the
    signal in the worker's copy of the master's queue, where nothing reads it:
    the queued ones are taken from there, and later ones mark the worker as
    stopping. gunicorn's own handlers replace these once the worker is set up; a
    worker that is no longer alive then goes straight to its graceful stop.
    """

    def stopping(signum: int, frame: Any) -> None:
        worker.alive = False

    for sig in STOP_SIGNALS:
        signal.signal(sig, stopping)
    queued = getattr(server, "SIG_QUEUE", None)
    while queued is not None:
        try:
            sig = queued.get_nowait()
        except Exception:  # queue.Empty
            break
        if sig in STOP_SIGNALS:
            worker.alive = False


def post_worker_init(
    worker: Any, *, admission: float | None = DEFAULT_TURN, settings_once: bool = True
) -> None:
    """Start the flows' graceful shutdown as soon as gunicorn asks this worker to stop,
    and let new connections in by turns (:func:`admit_connections`) while the worker is
    busy: ``admission`` is the length of a turn of the hub's loop in seconds while
    connections wait, ``None`` to let every connection in at once, as gunicorn does.
    With ``settings_once`` (the default) the worker reads its settings as plain
    attributes from now on (:func:`read_settings_once`)."""
    import gevent

    if settings_once:
        read_settings_once(worker)
    if admission is not None:
        admit_connections(worker, Admission(admission))

    def on_stop() -> None:
        while worker.alive:  # gunicorn's own loop checks this flag once a second
            gevent.sleep(0.1)
        shutdown_all()

    worker.durable_stream_shutdown = gevent.spawn(on_stop)


def worker_exit(server: Any, worker: Any) -> None:
    """Let the shutdown started by :func:`post_worker_init` finish before the process ends."""
    task = getattr(worker, "durable_stream_shutdown", None)
    if task is not None:
        worker.alive = False  # also when the worker ends for another reason
        task.join(float(getattr(worker.cfg, "graceful_timeout", 30)) + EXIT_MARGIN)


def admit_connections(worker: Any, admission: Admission) -> bool:
    """Make a gevent ``worker``'s new connections wait for ``admission`` before their
    first request is read; False (and nothing changed) for a worker of another kind.

    gunicorn's ``gevent`` worker handles each connection by its ``handle`` method;
    its ``gevent_pywsgi`` worker and this package's ``PyWSGIWorker`` by their
    handler class's ``handle``. Either is replaced on this worker alone, before it
    starts serving. The instance is kept as ``worker.durable_stream_admission``.
    """
    try:
        from gunicorn.workers.ggevent import GeventPyWSGIWorker, GeventWorker
    except ImportError:  # gunicorn without gevent
        return False
    if isinstance(worker, GeventPyWSGIWorker):
        base = worker.wsgi_handler

        class Handler(base):  # type: ignore[misc, valid-type]
            def handle(self) -> Any:
                admission.admit()
                return super().handle()

        Handler.__name__ = Handler.__qualname__ = base.__name__
        worker.wsgi_handler = Handler
    elif isinstance(worker, GeventWorker):
        handle = worker.handle

        def admitted(listener: Any, client: Any, addr: Any) -> Any:
            admission.admit()
            return handle(listener, client, addr)

        worker.handle = admitted
    else:
        return False
    worker.durable_stream_admission = admission
    return True


#: The class of settings read once, by the class of gunicorn settings it copies.
_SETTLED: dict[type, type] = {}


def read_settings_once(worker: Any) -> bool:
    """Give ``worker`` a copy of its gunicorn settings that keeps every value as a plain
    attribute; False (and nothing changed) when ``worker.cfg`` is not gunicorn's ``Config``.

    gunicorn's ``Config`` answers ``cfg.keepalive`` from ``Config.__getattr__``, which
    Python calls only after the ordinary lookup failed and built an ``AttributeError``;
    a ``-k gevent`` worker reads about 35 settings a request that way. The copy is an
    instance of a subclass of the worker's ``Config`` class with each setting's value in
    its ``__dict__``, so the same reads are plain attribute lookups. Everything else is
    gunicorn's: its properties (``is_ssl``) compute from the same values, a name that is
    no setting raises the same error, and ``cfg.set`` on the copy updates the setting
    and the copy. The worker uses the copy for every request from now on; a setting
    changed afterwards on the original (nothing in gunicorn does that in a running
    worker) is not seen.
    """
    try:
        from gunicorn.config import Config
    except ImportError:  # not under gunicorn
        return False
    cfg = getattr(worker, "cfg", None)
    if not isinstance(cfg, Config) or type(cfg) in _SETTLED.values():
        return False
    worker.cfg = settled(cfg)
    return True


def settled(cfg: Any) -> Any:
    """A copy of gunicorn settings ``cfg`` with every setting's value a plain attribute."""
    base = type(cfg)
    cls = _SETTLED.get(base)
    if cls is None:

        def set(self: Any, name: str, value: Any) -> None:
            base.set(self, name, value)
            self.__dict__[name] = self.settings[name].get()

        cls = type(base.__name__, (base,), {"set": set, "__module__": base.__module__})
        cls.__qualname__ = base.__qualname__
        _SETTLED[base] = cls
    copy: Any = object.__new__(cls)
    copy.__dict__.update(cfg.__dict__)  # the same Setting objects, gunicorn's own caches
    copy.__dict__.update({name: setting.get() for name, setting in cfg.settings.items()})
    return copy
