"""ctxrelay: make a request's context follow the work, wherever it goes.

The core API.  Integrations live in ``ctxrelay.integrations.<name>`` and are
never imported from here.
"""

from __future__ import annotations

from ._context import Context, bind, current, detached, get, request, request_id, use
from ._instrument import instrument, instrumented, uninstrument
from ._policy import Policy, configure
from ._policy import active as active_policy
from ._relay import (
    ContextExecutor,
    ProcessPoolExecutor,
    Thread,
    ThreadPoolExecutor,
    Timer,
    run_async,
    wrap,
)
from ._request import Headers, RequestSnapshot
from ._wire import extract, inject

__all__ = [
    "Context",
    "ContextExecutor",
    "Headers",
    "Policy",
    "ProcessPoolExecutor",
    "RequestSnapshot",
    "Thread",
    "ThreadPoolExecutor",
    "Timer",
    "active_policy",
    "bind",
    "configure",
    "current",
    "detached",
    "extract",
    "get",
    "inject",
    "instrument",
    "instrumented",
    "request",
    "request_id",
    "run_async",
    "uninstrument",
    "use",
    "wrap",
]

__version__ = "0.1.0"
