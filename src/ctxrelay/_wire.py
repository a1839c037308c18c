"""Where the wire lived before it was split by direction; kept for old imports.

Reading headers is :mod:`ctxrelay._inbound`, writing them
:mod:`ctxrelay._outbound`, and the format both share :mod:`ctxrelay._codec`.
Names that pickles or older code may spell ``ctxrelay._wire.X`` still
resolve here (``Sent`` in particular).
"""

from __future__ import annotations

from ._codec import BAGGAGE, TRACEPARENT, TRACESTATE
from ._inbound import extract, fields_from
from ._outbound import Sent, inject, inject_hop, outgoing

__all__ = [
    "BAGGAGE",
    "TRACEPARENT",
    "TRACESTATE",
    "Sent",
    "extract",
    "fields_from",
    "inject",
    "inject_hop",
    "outgoing",
]
