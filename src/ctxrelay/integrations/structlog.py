"""structlog: a processor that adds the request's fields to every event.

structlog's own ``merge_contextvars`` copies the whole ``contextvars`` context
and walks every variable on every log call -- 2-7 us with 50 bound, and more
the more variables other libraries set.  :data:`merge_context` reads the one
ctxrelay ``ContextVar`` and adds fields it prepared once per context, masked:
sensitive fields (``cookie``, ``authorization``, the names of
:class:`ctxrelay.Policy`) carry ``***``, and every value is escaped
(``\\n``, ``\\x85``, ``\\u2028``) so that no request can forge a line: see
``ctxrelay._escape``.  Example::

    import structlog
    import ctxrelay
    from ctxrelay.integrations.structlog import merge_context

    structlog.configure(
        processors=[merge_context, structlog.processors.JSONRenderer()]
    )
    with ctxrelay.bind(request_id="r-1", tenant="acme"):
        structlog.get_logger().info("paid")  # {"request_id": "r-1", "tenant": ...}

While a deadline is bound, ``deadline_ms`` holds the whole milliseconds left
(read per event; 0 once it passed or the request was cancelled).
``MergeContext(id_length=8)`` cuts the request id to 8 characters;
``MergeContext(trace_ids=True)`` adds OpenTelemetry's ``otelTraceID``,
``otelSpanID``, ``otelTraceSampled`` and ``otelServiceName`` to every event.

With ``structlog.stdlib.ProcessorFormatter``, put it in ``foreign_pre_chain``
too, so records from stdlib loggers get the fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    import structlog.typing
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.structlog needs structlog: pip install 'ctxrelay[structlog]'"
    ) from _exc

from .._context import Context
from .._deadline import remaining_ms
from .._logfields import (
    DEADLINE_FIELD,
    NO_TRACE,
    TRACE_FIELDS,
    PerContext,
    TraceIds,
    TraceValues,
    id_length_of,
    masked_fields,
    relayed_trace,
    request_attributes,
    request_values,
    timed,
    trace_ids_of,
)
from .._policy import Policy

__all__ = ["MergeContext", "merge_context"]


class MergeContext:
    """A structlog processor: the current context's fields into the event dict.

    Keys the event already has win (as with ``merge_contextvars``): an
    explicit ``log.info("x", tenant="other")`` is kept.  ``request`` names
    snapshot attributes (``"method"``, ``"path"``, ... see
    :data:`ctxrelay.integrations.logging.REQUEST_ATTRIBUTES`) added as
    ``request_<attr>``.  With ``key`` set, the fields go under that one key
    as a dict instead of at the top level.  Outside a request nothing is
    added.  While a deadline is bound, ``deadline_ms`` (beside the fields)
    holds the whole milliseconds left.

    ``id_length`` cuts the request id to its first characters (no other
    field); a value that is not an ``int`` >= 1 is refused (``TypeError``,
    ``ValueError``).  With ``trace_ids=True`` every event -- in a request or
    not -- also gets OpenTelemetry's log correlation keys, ``otelTraceID``,
    ``otelSpanID``, ``otelTraceSampled`` and ``otelServiceName``: from the
    active span when valid, else from the relayed ``traceparent``, else
    ``"0"``, ``"0"``, ``False``, ``""`` (see
    :class:`ctxrelay.integrations.logging.ContextFilter`).
    """

    def __init__(
        self,
        *,
        request: Iterable[str] = (),
        key: str | None = None,
        id_length: int | None = None,
        trace_ids: bool = False,
    ) -> None:
        self.request: tuple[str, ...] = request_attributes(request)
        self.key = key
        self.id_length: int | None = id_length_of(id_length)
        self.trace_ids: bool = trace_ids_of(trace_ids)
        self._trace = TraceIds()
        self._cache: PerContext[tuple[dict[str, Any], Context | None, TraceValues | None]] = (
            PerContext(self._entries)
        )

    def _entries(
        self, ctx: Context, policy: Policy
    ) -> tuple[dict[str, Any], Context | None, TraceValues | None]:
        entries: dict[str, Any] = {
            **masked_fields(ctx, policy, self.id_length),
            **request_values(ctx, self.request),
        }
        relayed = relayed_trace(ctx) if self.trace_ids else None
        if relayed is not None:
            # A placeholder, in the order the keys will have: filled per event.
            entries.update(zip(TRACE_FIELDS, NO_TRACE, strict=True))
        if self.key is None:
            return entries, timed(ctx), relayed
        return ({self.key: entries} if entries else {}), timed(ctx), relayed

    def __call__(
        self,
        logger: structlog.typing.WrappedLogger,
        method_name: str,
        event_dict: structlog.typing.EventDict,
    ) -> structlog.typing.EventDict:
        # A new dict each time: the prepared one is shared by every event of
        # this context, and later processors change the event dict.  copy()
        # clones the prepared dict's table whole, faster than {**a, **b}.
        prepared, timed_ctx, relayed = self._cache.current()
        merged = prepared.copy()
        if self.key is not None and self.key in merged:
            # The nested dict is shared too: a processor may edit it in place.
            merged[self.key] = merged[self.key].copy()
        if timed_ctx is not None or relayed is not None:
            target = merged if self.key is None else merged.setdefault(self.key, {})
            if timed_ctx is not None:
                # Read per event (it changes), and only with a deadline bound.
                target[DEADLINE_FIELD] = remaining_ms(timed_ctx)
            if relayed is not None:
                target.update(zip(TRACE_FIELDS, self._trace.current(relayed), strict=True))
        merged.update(event_dict)
        return merged


#: The processor with default settings: every field, at the top level.
merge_context: MergeContext = MergeContext()
