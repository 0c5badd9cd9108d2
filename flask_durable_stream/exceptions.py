"""The exception tree. Everything else in the package imports from here.

Two families:

* :class:`FlowError` is the *public* error: a flow raises it to send a deliberate
  status and message to clients. Any other exception raised by a flow is
  redacted to ``INTERNAL: Internal Error`` before it reaches a client or a
  stream manager.
* :class:`StreamError` and its subclasses are raised by the library itself
  (stream managers, the runner, the HTTP layer). Backends map their native
  errors to these at their edge (``raise StorageUnavailable(...) from exc``).

Every error carries a Genkit/gRPC canonical status name so that the HTTP layer
can turn it into the right status code and wire frame without guessing.
"""

from __future__ import annotations

from typing import Any

#: Canonical status name -> HTTP status code, as Genkit's callable protocol maps them.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


class DurableStreamError(Exception):
    """Base class of every error this package raises or understands."""

    status: str = "INTERNAL"

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            if status not in HTTP_STATUS:
                raise ValueError(f"unknown status {status!r}; use one of {sorted(HTTP_STATUS)}")
            self.status = status

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.status]

    def to_dict(self) -> dict[str, Any]:
        """The ``{"status": ..., "message": ...}`` body that clients see."""
        return {"status": self.status, "message": self.message}


class FlowError(DurableStreamError):
    """A deliberate, public error: its status and message reach the client as-is.

    ``raise FlowError("INVALID_ARGUMENT", "name is required")`` inside a flow ends
    the stream with that error frame (and a 400 for plain calls). ``details``, if
    given, must be JSON-serializable and is sent along.
    """

    def __init__(self, status: str, message: str, *, details: Any = None) -> None:
        super().__init__(message, status=status)
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        if self.details is not None:
            body["details"] = self.details
        return body

    def __repr__(self) -> str:
        return f"FlowError({self.status!r}, {self.message!r})"


class StreamError(DurableStreamError):
    """An error raised by the library while storing or reading a stream."""


class StreamNotFound(StreamError):
    status = "NOT_FOUND"


class StreamExists(StreamError):
    status = "ALREADY_EXISTS"


class StreamClosed(StreamError):
    """A write after the terminal event (``done`` or ``error``)."""

    status = "FAILED_PRECONDITION"


class StreamTimeout(StreamError):
    """A subscriber saw neither an event nor a producer heartbeat for too long."""

    status = "DEADLINE_EXCEEDED"


class StorageError(StreamError):
    """A storage operation failed. Backends raise one of the two subclasses below.

    The split is the storage fault model: the runner retries a
    :class:`StorageUnavailable` (transient) with backoff and keeps the producer
    alive meanwhile; a :class:`StoragePermanentError` is never retried: the
    stream ends at once with that error, stored for every reader.
    """

    status = "UNAVAILABLE"


class StorageUnavailable(StorageError):
    """Transient: unreachable, timed out, locked, throttled, pool exhausted.

    The same call may succeed later, so the runner retries it with backoff.
    """

    status = "UNAVAILABLE"


class StoragePermanentError(StorageError):
    """Permanent: this write can never succeed (invalid data, over a backend limit).

    Its message reaches clients, so it names the limit, never a file path or host.
    """

    status = "FAILED_PRECONDITION"


class EventTooLarge(StoragePermanentError):
    """One event (a chunk, the output or an error) is larger than the backend can store."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class InvalidRequest(StreamError):
    """Bad input from an HTTP client."""

    status = "INVALID_ARGUMENT"

    def __init__(
        self, message: str, *, status: str | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(message, status=status)
        self._http_status = http_status

    @property
    def http_status(self) -> int:
        return self._http_status or HTTP_STATUS[self.status]
