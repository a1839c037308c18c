"""loguru: a patcher that puts the request's fields in ``record["extra"]``.

Use it for the whole process with ``logger.configure(patcher=patcher)``, or
for one logger with ``logger.patch(patcher)``.  It reads the one ctxrelay
``ContextVar`` per message; sensitive fields (``cookie``, ``authorization``,
the names of :class:`ctxrelay.Policy`) carry ``***``; every value is
escaped (``\\n``, ``\\x85``, ``\\u2028``: see ``ctxrelay._escape``) so that no
request can forge a line.  ``request_id`` (and any
field declared with ``fields=``) is always in ``extra`` -- ``"-"`` outside a
request -- so a format such as ``"{extra[request_id]} {message}"`` never
fails.  Example::

    from loguru import logger
    import ctxrelay
    from ctxrelay.integrations.loguru import patcher

    logger.configure(patcher=patcher)
    logger.add(sys.stderr, format="{level} [{extra[request_id]}] {message}")
    with ctxrelay.bind(request_id="r-1"):
        logger.info("paid")  # INFO [r-1] paid

While a deadline is bound, ``extra["deadline_ms"]`` holds the whole
milliseconds left (read per message; 0 once it passed or the request was
cancelled); declare ``fields=["deadline_ms"]`` for ``"-"`` without one.
``ContextPatcher(id_length=8)`` cuts the request id to 8 characters;
``ContextPatcher(trace_ids=True)`` adds OpenTelemetry's ``otelTraceID``,
``otelSpanID``, ``otelTraceSampled`` and ``otelServiceName`` to ``extra``.

With ``serialize=True`` the fields appear in the JSON under ``extra``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

try:
    import loguru  # noqa: F401  # only the record is needed, but say which extra is missing
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.loguru needs loguru: pip install 'ctxrelay[loguru]'"
    ) from _exc

from .._context import REQUEST_ID, Context, validate_field
from .._deadline import remaining_ms
from .._logfields import (
    DEADLINE_FIELD,
    DEFAULT,
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

if TYPE_CHECKING:
    from loguru import Record

__all__ = ["ContextPatcher", "patcher"]


class ContextPatcher:
    """A loguru patcher: the current context's fields into ``record["extra"]``.

    Values already in ``extra`` win (``logger.bind(...)``,
    ``logger.contextualize(...)``).  ``fields`` are names always present,
    ``default`` when the context lacks them (``request_id`` always is);
    ``request`` names snapshot attributes (``"method"``, ``"path"``, ...)
    added as ``request_<attr>``.  ``id_length`` cuts the request id to its
    first characters (no other field); a value that is not an ``int`` >= 1
    is refused (``TypeError``, ``ValueError``).  With ``trace_ids=True``,
    ``extra`` also holds OpenTelemetry's log correlation keys on every
    message, ``otelTraceID``, ``otelSpanID``, ``otelTraceSampled`` and
    ``otelServiceName`` (see
    :class:`ctxrelay.integrations.logging.ContextFilter`).
    """

    def __init__(
        self,
        *,
        fields: Iterable[str] = (),
        request: Iterable[str] = (),
        default: str = DEFAULT,
        id_length: int | None = None,
        trace_ids: bool = False,
    ) -> None:
        self.fields: tuple[str, ...] = (
            REQUEST_ID,
            *(name for name in fields if name != REQUEST_ID),
        )
        for name in self.fields:
            validate_field(name, "")
        self.request: tuple[str, ...] = request_attributes(request)
        self.default = default
        self.id_length: int | None = id_length_of(id_length)
        self.trace_ids: bool = trace_ids_of(trace_ids)
        self._trace = TraceIds()
        self._cache: PerContext[tuple[dict[str, Any], Context | None, TraceValues | None]] = (
            PerContext(self._extra)
        )

    def _extra(
        self, ctx: Context, policy: Policy
    ) -> tuple[dict[str, Any], Context | None, TraceValues | None]:
        defaults = dict.fromkeys(self.fields, self.default)
        defaults.update((f"request_{attr}", self.default) for attr in self.request)
        extra = {
            **defaults,
            **masked_fields(ctx, policy, self.id_length),
            **request_values(ctx, self.request),
        }
        return extra, timed(ctx), relayed_trace(ctx) if self.trace_ids else None

    def __call__(self, record: Record) -> None:
        # A new dict each message: the prepared one is shared by every
        # message of this context.  copy() clones the prepared dict's table
        # whole, faster than {**a, **b}.
        prepared, timed_ctx, relayed = self._cache.current()
        extra = prepared.copy()
        if timed_ctx is not None:
            # Read per message (it changes), and only with a deadline bound.
            extra[DEADLINE_FIELD] = remaining_ms(timed_ctx)
        if relayed is not None:
            extra.update(zip(TRACE_FIELDS, self._trace.current(relayed), strict=True))
        extra.update(record["extra"])
        record["extra"] = extra


#: The patcher with default settings: every field, ``request_id`` always.
patcher: ContextPatcher = ContextPatcher()
