"""What the Firestore manager's modules share: imports, layout, error mapping, gevent.

Layout of one stream in ``<collection>``::

    <collection>/<stream_id>                       metadata document
        status, last_seq, owner, cancel_requested,
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
import threading
from collections.abc import Iterator
from typing import Any

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
from ..exceptions import StorageUnavailable, StreamClosed, StreamError, StreamExists, StreamNotFound
from .base import Event

__all__ = [
    "BATCHES",
    "COMMIT_BYTES",
    "COMMIT_DOCS",
    "DOC_EVENTS",
    "DOC_LIMIT",
    "MAX_EVENT_BYTES",
    "FieldFilter",
    "at",
    "batch_id",
    "edge",
    "ensure_grpc_gevent",
    "event_bytes",
    "events_of",
    "firestore",
    "gexc",
    "seconds",
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


#: The largest single event a batch document can hold.
MAX_EVENT_BYTES = DOC_LIMIT - _DOC_OVERHEAD
#: One commit stays under Firestore's 10 MiB request and 500 writes limits.
COMMIT_BYTES = 8 * 1024 * 1024
COMMIT_DOCS = 400
#: Events per batch document: keeps index entries far below Firestore's 40,000 per document.
DOC_EVENTS = 1000


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


@contextlib.contextmanager
def edge(what: str, *, conditional: bool = False) -> Iterator[None]:
    """Map Firestore's errors to ours, once, where they leave the client library.

    ``conditional``: the call carries a precondition (``last_update_time``), so
    FAILED_PRECONDITION means "changed meanwhile" (:class:`StreamClosed`) rather
    than a deployment problem such as a missing index.
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
            raise StreamClosed(f"{what}: changed concurrently ({exc.message})") from exc
        raise StreamError(f"{what}: {exc.message}", status="FAILED_PRECONDITION") from exc
    except _UNAVAILABLE as exc:
        raise StorageUnavailable(f"{what}: Firestore unavailable ({exc.message})") from exc
    except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
        raise StreamError(f"{what}: {exc.message}", status="PERMISSION_DENIED") from exc
    except gexc.GoogleAPICallError as exc:
        raise StreamError(f"{what}: {exc.message}", status="INTERNAL") from exc
    except (TimeoutError, ConnectionError) as exc:
        raise StorageUnavailable(f"{what}: Firestore unavailable ({exc})") from exc


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
