"""Where the door lived before it moved into the core; kept for old imports.

The door (turning an inbound request into its ``Context``) is protocol, not
framework glue: it lives in :mod:`ctxrelay._inbound`, and the web
integrations only adapt their framework to it.
"""

from __future__ import annotations

from .._inbound import (
    PLAIN_NAME_BYTES,
    PLAIN_RETAINED_BYTES,
    Door,
    Plan,
    RequestIdValidator,
    new_request_id,
    open_asgi,
    open_wsgi,
    valid_request_id,
)

__all__ = [
    "PLAIN_NAME_BYTES",
    "PLAIN_RETAINED_BYTES",
    "Door",
    "Plan",
    "RequestIdValidator",
    "new_request_id",
    "open_asgi",
    "open_wsgi",
    "valid_request_id",
]
