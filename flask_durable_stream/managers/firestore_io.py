"""What the Firestore manager's modules share: imports, layout, error mapping, gevent.

Layout of one stream in ``<collection>``::

    <collection>/<stream_id>                       metadata document
        status, last_seq, owner, flow, cancel_requested,
        createdAt, updatedAt, heartbeatAt, expiresAt
    <collection>/<stream_id>/batches/<first_seq:012d>   one per flush
        first_seq, last_seq, events: [{seq, kind, payload}, ...], expiresAt

Batch documents hold contiguous, non-overlapping seq ranges, so ordering them
by ``last_seq`` orders them by ``first_seq`` too, and a range query on one
field needs only Firestore's automatic single-field indexes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

try:
    from google.api_core import exceptions as gexc
    from google.cloud import firestore
    from google.cloud.firestore_v1.base_query import FieldFilter
except ImportError as exc:  # pragma: no cover - exercised by simulating the missing package
    raise ImportError(
        "The Firestore stream manager needs google-cloud-firestore: "
        "pip install flask_durable_stream[firestore]"
    ) from exc

from .._concurrency import gevent_patched
from ..exceptions import (
    StoragePermanentError,
    StorageUnavailable,
    StreamClosed,
    StreamError,
    StreamExists,
    StreamNotFound,
)
from .base import Event

__all__ = [
    "BATCHES",
    "COMMIT_DOCS",
    "COMMIT_WIRE_BYTES",
    "DOC_EVENTS",
    "DOC_LIMIT",
    "MAX_EVENT_BYTES",
    "FieldFilter",
    "at",
    "batch_id",
    "commit_size",
    "edge",
    "ensure_grpc_gevent",
    "event_bytes",
    "request_bytes",
    "wire_bytes",
    "events_of",
    "firestore",
    "gexc",
    "seconds",
    "sent_once_more_after_fork",
    "split",
]

#: Name of the per-stream subcollection (and of its collection group, for the TTL policy).
BATCHES = "batches"
#: Firestore's hard limit on one document, in bytes.
DOC_LIMIT = 1_048_576
#: Room kept for the document name, field names and the other fields of a batch document.
_DOC_OVERHEAD = 2_048


def batch_id(first_seq: int) -> str:
    """Zero-padded, so document ids sort like sequence numbers."""
    return f"{first_seq:012d}"


def event_bytes(event: Event) -> int:
    """Firestore's size of one ``{seq, kind, payload}`` map (strings count UTF-8 bytes + 1)."""
    return 4 + 8 + 5 + len(event.kind) + 1 + 8 + len(event.payload.encode("utf-8")) + 1


#: The largest event payload (UTF-8 bytes) a batch document can hold: the
#: document limit less 2 KiB for its name, its other fields and the event's map.
MAX_EVENT_BYTES = DOC_LIMIT - _DOC_OVERHEAD
#: One commit's request stays under gRPC's default 4 MiB message limit (which
#: the emulator enforces) and so under Firestore's 10 MiB request limit too.
COMMIT_WIRE_BYTES = 3 * 1024 * 1024
#: Firestore allows 500 writes per commit; one is kept for the metadata update.
COMMIT_DOCS = 400
#: Events per batch document: keeps index entries far below Firestore's 40,000 per document.
DOC_EVENTS = 1000


def wire_bytes(event: Event) -> int:
    """An upper bound of one event's size in a commit request (protobuf map of three fields).

    Larger than :func:`event_bytes` for small events: protobuf spends about 50
    bytes of tags, lengths and field names per event, which is what made a
    commit of 100,000 small events exceed the gRPC limit.
    """
    return 64 + len(event.payload.encode("utf-8"))


def request_bytes(write: Any) -> int:
    """The exact protobuf size of a write batch's writes (0 if the client hides them)."""
    total = 0
    for pb in getattr(write, "_write_pbs", ()):
        raw = type(pb).pb(pb) if hasattr(type(pb), "pb") else pb
        total += raw.ByteSize() + 6  # the repeated field's tag and length
    return total


def split(events: list[Event], batch_bytes: int) -> list[tuple[list[Event], int]]:
    """Events per batch document, with each document's size.

    Greedy, so the split of a prefix is a prefix of the split: a retry with
    more events buffered recreates the same first documents.
    """
    docs: list[tuple[list[Event], int]] = []
    current: list[Event] = []
    size = 0
    for event in events:
        n = event_bytes(event)
        if current and (size + n > batch_bytes or len(current) >= DOC_EVENTS):
            docs.append((current, size))
            current, size = [], 0
        current.append(event)
        size += n
    if current:
        docs.append((current, size))
    return docs


def commit_size(docs: list[tuple[list[Event], int]]) -> int:
    """How many of ``docs`` go in the next commit (at least one)."""
    size = 0
    for count, (part, _) in enumerate(docs):
        size += sum(map(wire_bytes, part)) + 256  # the document's name and other fields
        if count and (size > COMMIT_WIRE_BYTES or count >= COMMIT_DOCS):
            return count
    return len(docs)


def events_of(data: dict[str, Any]) -> list[Event]:
    return [Event(int(e["seq"]), str(e["kind"]), str(e["payload"])) for e in data["events"]]


def at(seconds_since_epoch: float) -> dt.datetime:
    """A timestamp Firestore stores as a Timestamp (the type a TTL policy needs)."""
    return dt.datetime.fromtimestamp(seconds_since_epoch, tz=dt.timezone.utc)


def seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value)


_UNAVAILABLE = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.RetryError,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.Aborted,
    gexc.Cancelled,  # the emulator cancels a call now and then under load; transient
    gexc.Unknown,
    gexc.GatewayTimeout,
)


log = logging.getLogger(__name__)


def _code(exc: Any) -> str:
    """The gRPC status name of a Google API error: what a client may learn about it."""
    code = getattr(exc, "grpc_status_code", None)
    return getattr(code, "name", None) or type(exc).__name__


@contextlib.contextmanager
def edge(what: str, *, conditional: bool = False) -> Iterator[None]:
    """Map Firestore's errors to ours, once, where they leave the client library.

    ``conditional``: the call carries a precondition (``last_update_time``), so
    FAILED_PRECONDITION means "changed meanwhile" (:class:`StreamClosed`) rather
    than a deployment problem such as a missing index.

    Messages that may reach clients carry the status name only: Google's own
    messages can name hosts and addresses, so they go to the log.
    """
    try:
        yield
    except StreamError:
        raise
    except gexc.AlreadyExists as exc:
        raise StreamExists(f"{what}: already exists") from exc
    except gexc.NotFound as exc:
        raise StreamNotFound(f"{what}: not found") from exc
    except gexc.FailedPrecondition as exc:
        if conditional:
            raise StreamClosed(f"{what}: changed concurrently") from exc
        log.error("Firestore %s: %s", what, exc.message)
        raise StoragePermanentError(
            f"{what}: Firestore refused the request (FAILED_PRECONDITION)"
        ) from exc
    except gexc.ResourceExhausted as exc:
        if "exceeds maximum size" in str(exc.message):  # a request over gRPC's limit
            log.error("Firestore %s: %s", what, exc.message)
            raise StoragePermanentError(f"{what}: a request over Firestore's size limit") from exc
        log.warning("Firestore %s: %s", what, exc.message)
        raise StorageUnavailable(f"{what}: Firestore is throttling (RESOURCE_EXHAUSTED)") from exc
    except _UNAVAILABLE as exc:
        log.warning("Firestore %s: %s", what, exc.message)
        raise StorageUnavailable(f"{what}: Firestore unavailable ({_code(exc)})") from exc
    except (gexc.InvalidArgument, gexc.OutOfRange) as exc:
        log.error("Firestore %s: %s", what, exc.message)
        raise StoragePermanentError(f"{what}: Firestore rejected the data ({_code(exc)})") from exc
    except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
        log.error("Firestore %s: %s", what, exc.message)
        raise StoragePermanentError(
            f"{what}: Firestore denied access ({_code(exc)}); check the credentials",
            status="PERMISSION_DENIED",
        ) from exc
    except gexc.GoogleAPICallError as exc:
        log.warning("Firestore %s: %s", what, exc.message)
        raise StorageUnavailable(f"{what}: Firestore error ({_code(exc)})") from exc
    except (TimeoutError, ConnectionError, OSError) as exc:
        log.warning("Firestore %s: %s", what, exc)
        raise StorageUnavailable(f"{what}: Firestore unreachable") from exc


_T = TypeVar("_T")


def inherited_connection(exc: BaseException) -> bool:
    """gRPC refused to send on a connection this process inherited through ``fork()``.

    gRPC's fork support marks the sockets a process had when it forked as of an
    older generation and refuses every system call on them; a channel created
    in the child can still be handed the parent's connection (gRPC shares
    connections between channels to the same target). The call then fails with
    UNAVAILABLE "Wrong file descriptor generation" before anything is sent, and
    gRPC drops that connection.
    """
    return isinstance(exc, gexc.ServiceUnavailable) and "file descriptor generation" in str(
        exc.message
    )


def sent_once_more_after_fork(call: Callable[[], _T]) -> _T:
    """``call()``, and once more when gRPC refused it on a connection from before a fork.

    Nothing was sent the first time (see :func:`inherited_connection`), so this
    holds for conditional writes too; the second call opens a connection of this
    process. Any other failure, and a second refusal, go to :func:`edge` as they are.
    """
    try:
        return call()
    except gexc.ServiceUnavailable as exc:
        if not inherited_connection(exc):
            raise
        log.info("Firestore: a connection opened before this process forked was refused; resent")
    return call()


_gevent_lock = threading.Lock()


def ensure_grpc_gevent() -> None:
    """Make gRPC cooperative once gevent has patched the process.

    Without ``grpc.experimental.gevent.init_gevent()`` every streaming call
    (get, query, commit, listen) of a patched process waits forever on the
    gevent hub. It is idempotent and also takes effect when gRPC was already
    used before patching, so calling it before each use of the client is enough.
    """
    if not gevent_patched():
        return
    from grpc._cython import cygrpc

    if cygrpc.g_gevent_activated:
        return
    with _gevent_lock:
        if not cygrpc.g_gevent_activated:
            from grpc.experimental import gevent as grpc_gevent

            grpc_gevent.init_gevent()
