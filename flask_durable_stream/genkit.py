"""Genkit Python flows (``@ai.flow()``), served unchanged as durable streams.

A Genkit flow is an ``Action`` whose ``run(input, on_chunk=, context=,
abort_signal=)`` is a coroutine. :func:`genkit_flow` wraps it as one of our
async flows, so it runs where every async flow runs: on the process's one
asyncio loop thread under gevent (chunks handed back to the hub thread-safely),
or in ``asyncio.run`` in its own thread otherwise. Genkit's chunks become our
chunks, its output our result, and the context a context provider returned
becomes the action's context (``ctx.context``, ``ai.current_context()``).

Errors follow Genkit's own rule: a ``GenkitError`` (``PublicError`` included)
raised deliberately keeps its status and message; anything else, which Genkit
wraps in a ``GenkitError("Error while running action ...")``, is redacted.

Nothing here imports ``genkit`` at import time: :mod:`.flows` imports this
module only once it has seen a Genkit object, and the package is an optional
extra (``pip install flask_durable_stream[genkit]``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .exceptions import HTTP_STATUS, DurableStreamError, FlowError
from .flows import FlowContext

#: How often a running Genkit flow looks for a cancel request, to set its abort signal.
CANCEL_POLL_SECONDS = 0.25

#: The message Genkit's action runtime gives the GenkitError it wraps a flow's own failure in.
_WRAPPER_PREFIX = "Error while running action "

#: Keys Genkit adds to every error's details by itself: never the flow author's data.
_RUNTIME_DETAILS = ("stack", "trace_id", "traceId")


def is_genkit_action(obj: object) -> bool:
    """A Genkit object that runs like an action (a flow); :mod:`.flows` checked its origin."""
    return callable(getattr(obj, "run", None)) and isinstance(getattr(obj, "name", None), str)


def genkit_flow(action: Any) -> Callable[[Any, FlowContext], Awaitable[Any]]:
    """An async flow of ours that runs the Genkit ``action``.

    The returned function keeps the action's name (``flow_view`` names its
    endpoint after it) and the action itself as ``genkit_action``.
    """

    async def run_genkit_flow(data: Any, ctx: FlowContext) -> Any:
        abort = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_cancel(ctx, abort))
        try:
            response = await action.run(
                data, on_chunk=ctx.send_chunk, context=dict(ctx.context), abort_signal=abort
            )
        except Exception as exc:
            public = flow_error(exc)
            if public is not None and public is not exc:
                raise public from None
            raise  # not deliberate: the runner logs it and sends INTERNAL
        finally:
            watcher.cancel()
        return response.response

    run_genkit_flow.__name__ = run_genkit_flow.__qualname__ = str(action.name)
    run_genkit_flow.__doc__ = getattr(action, "description", None)
    run_genkit_flow.genkit_action = action  # type: ignore[attr-defined]
    return run_genkit_flow


async def _watch_cancel(ctx: FlowContext, abort: asyncio.Event) -> None:
    """Genkit's cooperative cancellation: set the action's abort signal on a cancel request.

    A flow that neither sends chunks nor looks at its abort signal is still
    stopped: the loop thread cancels its task (see :mod:`.flows`).
    """
    while not ctx.cancelled:
        await asyncio.sleep(CANCEL_POLL_SECONDS)
    abort.set()


def flow_error(exc: BaseException) -> DurableStreamError | None:
    """The public error ``exc`` stands for, or None when it must be redacted.

    Genkit wraps whatever a flow raises in a ``GenkitError`` whose ``cause`` is
    the original; that wrapper is peeled off, so an error of ours (a
    ``FlowError``, or ``CANCELLED`` from ``send_chunk``) passes through and any
    other exception stays redacted.
    """
    from genkit import GenkitError

    while isinstance(exc, GenkitError):
        cause = exc.cause
        if cause is not None and _is_runtime_wrapper(exc):
            exc = cause
            continue
        status = exc.status if exc.status in HTTP_STATUS else "INTERNAL"
        return FlowError(status, str(exc.original_message), details=_public_details(exc.details))
    if isinstance(exc, DurableStreamError):
        return exc
    return None


def _is_runtime_wrapper(exc: Any) -> bool:
    return bool(
        str(exc.original_message).startswith(_WRAPPER_PREFIX) and exc.__cause__ is exc.cause
    )


def _public_details(details: Any) -> Any:
    """The details a flow author gave, without the ones Genkit adds to every error."""
    if not isinstance(details, dict):
        return details
    kept = {k: v for k, v in details.items() if k not in _RUNTIME_DETAILS}
    return kept or None
