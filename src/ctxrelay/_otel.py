"""What ctxrelay reads of OpenTelemetry, only when the host program imported it.

``use(ctx)`` makes another owner's context current (a message's, a job's).
OpenTelemetry's span lives in its own ``ContextVar`` and is not replaced by
that: a thread started during an earlier request may still hold that
request's span.  So ``use()`` notes the span current when it was entered; a
span that is still that one was not started under the bound context, and
must not speak for it on the wire (see ``_wire.outgoing``).
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar, Token

__all__ = ["end_use", "note_use", "span_at_use"]

# The OpenTelemetry span that was current when the innermost use() was
# entered; None outside use() or when OpenTelemetry is not imported.
_AT_USE: ContextVar[object] = ContextVar("ctxrelay.otel_span_at_use", default=None)


def note_use() -> Token[object] | None:
    """Record the current OpenTelemetry span, on entering ``use()``."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        span: object = trace.get_current_span()
    except Exception:  # OpenTelemetry's bug must not fail use()
        return None
    return _AT_USE.set(span)


def end_use(token: Token[object]) -> None:
    """Undo :func:`note_use` on leaving ``use()``; silent in a foreign context."""
    # Exited in another context: leave that context as it is.
    with contextlib.suppress(ValueError, RuntimeError):
        _AT_USE.reset(token)


def span_at_use() -> object:
    """The span current when the innermost active ``use()`` was entered, or None."""
    return _AT_USE.get()
