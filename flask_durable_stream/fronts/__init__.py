"""One module per wire protocol over one shared core.

:mod:`.core` parses and checks requests (ids, offsets, bodies, context provider,
owner, flow), shapes errors and streaming responses and holds the one keep-alive
pump; :mod:`.genkit_http` (``POST <flow>``, ``POST <flow>/cancel``) and :mod:`.sse`
(``GET <flow>/events``) only map requests to runner and manager calls and events
to bytes. The AI SDK front (:mod:`flask_durable_stream.ai_sdk`) stands on the same core.
"""

from .core import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_CONTENT_LENGTH,
    ContextProvider,
    Front,
    FrontOptions,
    keepalive_pump,
    request_context,
)
from .genkit_http import GenkitFront
from .sse import SseFront

__all__ = [
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_CONTENT_LENGTH",
    "ContextProvider",
    "Front",
    "FrontOptions",
    "GenkitFront",
    "SseFront",
    "keepalive_pump",
    "request_context",
]
