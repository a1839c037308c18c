"""ctxrelay: make a request's context follow the work, wherever it goes.

The core API.  Integrations live in ``ctxrelay.integrations.<name>`` and are
never imported from here.
"""

from __future__ import annotations

import contextlib as _contextlib

from . import _strict
from ._context import (
    Context,
    Scope,
    bind,
    bind_request,
    current,
    detached,
    get,
    request,
    request_id,
    use,
)
from ._deadline import (
    DeadlineExceeded,
    RequestCancelled,
    cancelled,
    checkpoint,
    deadline,
    remaining,
    without_deadline,
)
from ._inbound import extract
from ._instrument import instrument, instrumented, uninstrument
from ._outbound import inject
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
from ._strict import strict, strict_reports

__all__ = [
    "Context",
    "ContextExecutor",
    "DeadlineExceeded",
    "Headers",
    "Policy",
    "ProcessPoolExecutor",
    "RequestCancelled",
    "RequestSnapshot",
    "Scope",
    "Thread",
    "ThreadPoolExecutor",
    "Timer",
    "active_policy",
    "bind",
    "bind_request",
    "cancelled",
    "checkpoint",
    "configure",
    "current",
    "deadline",
    "detached",
    "extract",
    "get",
    "inject",
    "instrument",
    "instrumented",
    "remaining",
    "request",
    "request_id",
    "run_async",
    "strict",
    "strict_reports",
    "uninstrument",
    "use",
    "without_deadline",
    "wrap",
]

__version__ = "0.1.0"

# Public objects show their public path (``ctxrelay.Context``, not
# ``ctxrelay._context.Context``) in reprs, docs and tracebacks, as httpx's do.
# Pickles keep working: every name here resolves from ``ctxrelay``.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "ctxrelay").startswith("ctxrelay._"):
        with _contextlib.suppress(AttributeError, TypeError):  # a builtin keeps its own
            _obj.__module__ = "ctxrelay"
del _name, _obj

_strict.from_environment()  # CTXRELAY_STRICT=1 turns strict mode on at import
