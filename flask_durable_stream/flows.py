"""Flows: plain Python callables, adapted to one calling convention.

Supported shapes (``data`` is the request's input, ``ctx`` a :class:`FlowContext`)::

    def flow(data): return output                 # plain call, no chunks
    def flow(data, ctx): ctx.send_chunk(c); return output
    def flow(data[, ctx]): yield chunk; return output   # generator: return value is the output
    async def flow(data[, ctx]): ...               # coroutine
    async def flow(data[, ctx]): yield chunk       # async generator: output is ctx.output (None)

Coroutines never run on the gevent hub: under gevent they run on one shared
asyncio event loop in a real OS thread, and their chunks are handed back to the
flow's greenlet through an :class:`~._concurrency.Inbox`, so an ``await`` never
blocks other greenlets.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
import types
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from ._concurrency import AsyncioThread, Inbox, gevent_patched
from .exceptions import DurableStreamError, FlowError
from .managers.common import event_size_error

log = logging.getLogger("flask_durable_stream")

Flow = Callable[..., Any]

#: A CPU-bound flow yields the hub this often, so other streams keep flowing.
COOPERATIVE_EVERY = 256


@dataclass
class RequestData:
    """What a context provider sees: plain data, never the request object itself."""

    method: str
    path: str
    headers: Mapping[str, str]
    input: Any
    flow: str
    stream_id: str | None = None


@dataclass
class FlowContext:
    """The second argument of a flow that takes one."""

    stream_id: str | None
    context: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    _emit: Callable[[str], None] | None = field(default=None, repr=False)
    _cancel: threading.Event | None = field(default=None, repr=False)  # made by the first wait
    _cancelled: bool = field(default=False, repr=False)  # to test: read once per chunk
    _sent: int = field(default=0, repr=False)
    _cooperative: bool = field(default=True, repr=False)
    _max_event_bytes: int | None = field(default=None, repr=False)
    _backend: str = field(default="storage", repr=False)
    #: Asked after each chunk of a generator or async flow: True hands the rest to another
    #: greenlet (see FlowMoved).
    _move_when: Callable[[], bool] | None = field(default=None, repr=False)

    def send_chunk(self, chunk: Any) -> None:
        """Stream one chunk to every subscriber (and to storage). Must be JSON-serializable.

        Once the stream was cancelled this raises ``FlowError("CANCELLED")`` instead,
        so a flow that never looks at :attr:`cancelled` still stops at its next chunk
        (and stops paying for the tokens nobody will read).

        A chunk larger than the stream manager can store raises
        :class:`~.EventTooLarge` here, at the line that emitted it, rather than
        failing later in storage where the flow could no longer react.
        """
        if self._cancelled:
            raise FlowError("CANCELLED", "Cancelled by client.")
        payload = protocol.encode(chunk)
        limit = self._max_event_bytes
        if limit is not None and len(payload) * 4 > limit:  # else it fits whatever its text
            too_large = event_size_error(f"Chunk {self._sent}", payload, limit, self._backend)
            if too_large is not None:
                raise too_large
        if self._emit is not None:
            self._emit(payload)
        self._sent += 1
        if self._cooperative and self._sent % COOPERATIVE_EVERY == 0:
            _yield_cpu()

    @property
    def cancelled(self) -> bool:
        """True once a client asked to cancel this stream. Check it in long loops."""
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self._cancelled:
            raise FlowError("CANCELLED", "Cancelled by client.")

    def _request_cancel(self) -> None:
        """Ask the flow to stop: the flag its chunks test, and the event its waits wake on."""
        self._cancelled = True  # before looking for the event: a wait that makes it sees this
        if self._cancel is not None:
            self._cancel.set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on cancel. Returns ``cancelled``."""
        if self._cancel is None:
            with _CANCEL_EVENT_LOCK:  # two waiters share one event
                if self._cancel is None:
                    self._cancel = threading.Event()
        if self._cancelled:
            return True
        return self._cancel.wait(timeout)


#: Most flows never wait for a cancel: their event is made by the first wait only.
_CANCEL_EVENT_LOCK = threading.Lock()


def fit_error(body: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """``body``, made small enough to store: without ``details``, then with a shorter message."""
    if limit is None or len(protocol.encode(body).encode()) <= limit:
        return body
    body = {k: v for k, v in body.items() if k != "details"}
    message = str(body.get("message", ""))
    while len(protocol.encode(body).encode()) > limit and message:
        excess = len(protocol.encode(body).encode()) - limit
        message = message[: max(0, len(message) - max(excess, 16) - 1)]
        body["message"] = message + "…" if message else ""
    return body


def _yield_cpu() -> None:
    import time

    time.sleep(0)  # gevent.sleep(0) once patched; releases the GIL otherwise


def adapt(flow: Flow) -> Flow:
    """The flow as :func:`call_flow` runs it: a Genkit flow (``@ai.flow()``) gets wrapped.

    Detected by duck typing, so ``genkit`` is imported only once one is registered.
    """
    if _from_genkit(flow):
        from .genkit import genkit_flow, is_genkit_action

        if is_genkit_action(flow):
            return genkit_flow(flow)
    return flow


def foreign_error(exc: BaseException) -> DurableStreamError | None:
    """A deliberate error from another framework (Genkit's ``GenkitError``) as ours, if any."""
    if _from_genkit(exc):
        from .genkit import flow_error

        return flow_error(exc)
    return None


def _from_genkit(obj: object) -> bool:
    """An instance of a class from ``genkit`` or a ``genkit_*`` plugin (or a subclass)."""
    for cls in type(obj).__mro__[:-1]:
        root = (cls.__module__ or "").partition(".")[0]
        if root == "genkit" or root.startswith("genkit_"):
            return True
    return False


def resolve(value: Any) -> Any:
    """``value``, or what it resolves to when awaitable (an async context provider's result).

    Awaited where async flows run, so the hub never blocks on it.
    """
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    return _run_async(wait, (), FlowContext(None))


def takes_context(flow: Flow) -> bool:
    try:
        params = inspect.signature(flow).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _shape(flow: Flow) -> tuple[bool, bool]:
    """(takes a context, is an ``async def``): how ``flow`` is called."""
    return takes_context(flow), inspect.iscoroutinefunction(flow) or inspect.isasyncgenfunction(
        flow
    )


#: What :func:`_shape` found, per flow function: ``inspect.signature`` is most of the
#: cost of starting a small flow. Plain functions only (a callable object could change).
_SHAPES: weakref.WeakKeyDictionary[Any, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def call_flow(flow: Flow, data: Any, ctx: FlowContext) -> Any:
    """Run ``flow`` to completion in the current greenlet/thread; return its output."""
    if isinstance(flow, types.FunctionType):
        shape = _SHAPES.get(flow)
        if shape is None:
            shape = _SHAPES[flow] = _shape(flow)
    else:
        shape = _shape(flow)
    with_context, is_async = shape
    args = (data, ctx) if with_context else (data,)
    if is_async:
        return _run_async(flow, args, ctx)
    result = flow(*args)
    # inspect.isgenerator and friends, without a call each: this runs for every stream.
    if isinstance(result, types.GeneratorType):
        return _drain(result, ctx)
    if isinstance(result, (types.CoroutineType, types.AsyncGeneratorType)):
        return _run_async(lambda *_: result, args, ctx)
    return result


class FlowMoved(BaseException):
    """A generator flow leaves the greenlet that ran it: ``rest()`` runs it on, elsewhere.

    Raised between two chunks of a generator or ``async`` flow when
    ``FlowContext._move_when`` says so (a live response whose client left, see the
    runner); a ``BaseException``, so that no handler of flow errors takes it for one.
    """

    def __init__(self, rest: Callable[[], Any]) -> None:
        super().__init__()
        self.rest = rest


def _moves(ctx: FlowContext) -> bool:
    """Whether the flow should leave its greenlet now (asked once, between two chunks)."""
    move = ctx._move_when
    if move is None or not move():
        return False
    ctx._move_when = None
    return True


def _drain(gen: Any, ctx: FlowContext) -> Any:
    moving = False
    try:
        while True:
            try:
                chunk = next(gen)
            except StopIteration as stop:
                return stop.value
            ctx.send_chunk(chunk)  # raises CANCELLED once cancelled
            if ctx._cancelled:  # do not ask the generator for more work
                raise FlowError("CANCELLED", "Cancelled by client.")
            if _moves(ctx):
                moving = True
                raise FlowMoved(lambda: _drain(gen, ctx))
    finally:
        if not moving:
            gen.close()  # runs the generator's cleanup now; a no-op once it returned or raised


async def _consume(flow: Flow, args: tuple[Any, ...], ctx: FlowContext) -> Any:
    ctx._cooperative = False  # the event loop schedules; never sleep the thread
    result = flow(*args)
    if inspect.isasyncgen(result):
        try:
            async for chunk in result:
                ctx.send_chunk(chunk)  # raises CANCELLED once cancelled
                if ctx.cancelled:
                    raise FlowError("CANCELLED", "Cancelled by client.")
        finally:
            await result.aclose()
        return ctx.output
    return await result


def _run_async(flow: Flow, args: tuple[Any, ...], ctx: FlowContext) -> Any:
    if not gevent_patched():
        return asyncio.run(_consume(flow, args, ctx))
    return _loop_thread().run(flow, args, ctx)


class _LoopThread:
    """The process's asyncio loop thread, shared by every async flow of the process."""

    def __init__(self) -> None:
        self.native = AsyncioThread()
        self.loop = self.native.loop
        self.pid = os.getpid()  # a forked child (gunicorn --preload) needs a thread of its own

    def run(self, flow: Flow, args: tuple[Any, ...], ctx: FlowContext) -> Any:
        # Chunks are produced on the loop thread; this greenlet emits them, in order,
        # then takes the result, which the loop thread queues after the last chunk.
        inbox = Inbox()
        emit = ctx._emit
        if emit is not None:
            ctx._emit = inbox.put
        future: Future[Any] = self.native.submit(_consume(flow, args, ctx))
        future.add_done_callback(inbox.put)
        return _relay(inbox, future, emit, ctx)


def _relay(
    inbox: Inbox, future: Future[Any], emit: Callable[[str], None] | None, ctx: FlowContext
) -> Any:
    """Emit the async flow's chunks from ``inbox`` until its ``future`` is done; its result.

    Like a generator flow, it may move to another greenlet between two chunks
    (:class:`FlowMoved`): the flow itself runs on in the loop thread meanwhile.
    """
    try:
        while True:
            item = inbox.get(0.5)
            if item is None:
                if ctx.cancelled and not future.done():
                    future.cancel()
            elif item is future:
                break
            elif emit is not None:
                emit(item)
                if _moves(ctx):
                    raise FlowMoved(lambda: _relay(inbox, future, emit, ctx))
    except FlowMoved:
        raise
    except BaseException:
        future.cancel()
        raise
    if future.cancelled():
        raise FlowError("CANCELLED", "Cancelled by client.")
    return future.result()


_LOOP: _LoopThread | None = None
_LOOP_LOCK = threading.Lock()


def _loop_thread() -> _LoopThread:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.pid != os.getpid():
            _LOOP = _LoopThread()
        return _LOOP
