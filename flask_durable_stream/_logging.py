"""``stream_id`` and ``flow`` as fields on every log record about a stream.

A log pipeline follows one stream by these two record attributes (JSON
formatters emit them as fields). They come from, in order: ``extra=`` given
at the call; a stream id of a run of this process among the record's
arguments (every line the runner and the writer log about a stream names it);
the stream the current request or flow task is bound to. Records about no
stream carry ``None`` for both, so a formatter may always name them.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

_CURRENT: ContextVar[tuple[str | None, str | None] | None] = ContextVar(
    "durable_stream_log_fields", default=None
)
#: Stream id -> flow name, for the runs of this process.
_FLOWS: dict[str, str] = {}


def register(stream_id: str, flow: str) -> None:
    _FLOWS[stream_id] = flow


def forget(stream_id: str) -> None:
    _FLOWS.pop(stream_id, None)


def bind(stream_id: str | None, flow: str | None) -> None:
    """The stream the current greenlet or thread works for, until bound again.

    Each request and each flow task binds at its start, so a binding never
    outlives the work it names by more than that.
    """
    _CURRENT.set((stream_id, flow))


class StreamFields(logging.Filter):
    """Fills ``record.stream_id`` and ``record.flow`` (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        stream_id = getattr(record, "stream_id", None)
        flow = getattr(record, "flow", None)
        if stream_id is None:
            stream_id, flow = _from_args(record.args) or _CURRENT.get() or (None, flow)
        elif flow is None:
            flow = _FLOWS.get(stream_id)
        record.stream_id = stream_id
        record.flow = flow
        return True


def _from_args(args: object) -> tuple[str, str] | None:
    if not isinstance(args, tuple):
        return None
    for arg in args:
        if isinstance(arg, str):
            flow = _FLOWS.get(arg)
            if flow is not None:
                return arg, flow
    return None


def install(*names: str) -> None:
    """Add the filter to the package's loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, StreamFields) for f in logger.filters):
            logger.addFilter(StreamFields())


install("flask_durable_stream", "flask_durable_stream.managers.sqlite")
