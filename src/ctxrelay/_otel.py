"""What ctxrelay reads of OpenTelemetry, only when the host program imported it.

Three things, each read from ``sys.modules`` at call time, never imported
by ctxrelay on its own (one exception below):

* **Which span speaks for the context.**  ``use(ctx)`` makes another owner's
  context current (a message's, a job's).  OpenTelemetry's span lives in its
  own ``ContextVar`` and is not replaced by that: a thread started during an
  earlier request may still hold that request's span.  So ``use()`` notes
  the span current when it was entered; a span that is still that one was
  not started under the bound context, and must not speak for it on the
  wire (:func:`speaking_span`).
* **Which trace formats go out.**  OpenTelemetry's global propagator
  (``opentelemetry.propagate.set_global_textmap``, or the
  ``OTEL_PROPAGATORS`` environment variable) says which formats a mesh
  speaks: B3, X-Ray, Jaeger, W3C trace context.  :func:`trace_headers`
  writes the trace in those formats -- the speaking span's, else the relayed
  ``traceparent`` converted -- and W3C ``traceparent``/``tracestate`` alone,
  exactly as before, when the propagator writes nothing else (the default).
  The one import ctxrelay makes itself: ``opentelemetry.propagate``, when
  OpenTelemetry's tracing is imported, ``OTEL_PROPAGATORS`` names a format
  other than W3C's, and nothing imported it yet (OpenTelemetry reads the
  variable when that module is imported).
* **OpenTelemetry's baggage** (:func:`baggage_entries`), which rides in
  ctxrelay's own W3C ``baggage`` header.  Propagators never write baggage
  for ctxrelay: they are handed the trace and nothing else, and a baggage
  header one writes anyway is dropped (:data:`BAGGAGE_LISTS`,
  :data:`BAGGAGE_PREFIXES`), so baggage leaves only through ctxrelay's
  policy and its untrusted-peer filter.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any

__all__ = [
    "BAGGAGE_LISTS",
    "BAGGAGE_PREFIXES",
    "baggage_entries",
    "end_use",
    "note_use",
    "span_at_use",
    "speaking_span",
    "trace_headers",
]

_log = logging.getLogger("ctxrelay")

# The W3C header names, as in ``_codec``: spelled out here, because this
# module is a leaf (``_context`` imports it, and ``_codec`` imports that).
TRACEPARENT, TRACESTATE, BAGGAGE = "traceparent", "tracestate", "baggage"

#: Headers that carry a list of baggage members (``k=v,k2=v2``): W3C's and
#: the Jaeger client's.
BAGGAGE_LISTS = frozenset({BAGGAGE, "jaeger-baggage"})
#: Prefixes of headers that carry one baggage entry each (``uberctx-k: v``,
#: ``ot-baggage-k: v``): the Jaeger and OpenTracing propagators'.
BAGGAGE_PREFIXES = ("uberctx-", "ot-baggage-")

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


def speaking_span(relayed: str | None) -> Any:
    """OpenTelemetry's current span when it speaks for the context, else None.

    ``relayed`` is the context's own ``traceparent``.  A valid span speaks
    for the context when it is in the context's trace, or it was not already
    current when the ``use()`` that bound the context was entered (it was
    started under it, or no ``use()`` is in force, as at the door).  A span
    that was current already when ``use(ctx)`` was entered, in another trace
    or when the context has none, is stale: a thread started during request
    A still holds A's span when it takes up message B, and B's request id
    must not go out with A's trace (while B's own is dropped).
    """
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    span = trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return None
    if span is span_at_use() and (relayed is None or f"{context.trace_id:032x}" != relayed[3:35]):
        return None  # a stale span from before use(): the relayed trace (if any) wins
    return span


def baggage_entries() -> Mapping[str, object]:
    """OpenTelemetry's current baggage; empty when it is not imported."""
    baggage: Any = sys.modules.get("opentelemetry.baggage")
    if baggage is None:
        return {}
    entries: Mapping[str, object] = baggage.get_all()
    return entries


# -- trace formats ---------------------------------------------------------------
# The header names ctxrelay writes itself, as it always has: a propagator
# that writes nothing else (tracecontext, baggage, none) changes nothing.
_W3C_FIELDS = frozenset({TRACEPARENT, TRACESTATE, BAGGAGE})
# OTEL_PROPAGATORS names that write only those.
_W3C_NAMES = frozenset({"tracecontext", "baggage", "none"})

# version-traceid-parentid-flags; a later version may append "-...".
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-|\Z)")
# RFC 9110 token, lowercase (gRPC metadata wants it so).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,256}\Z")
# The core's field limit.
_MAX_VALUE = 4096
_MAX_NAMES = 256


class _Seen:
    """What was learnt once: each slot is replaced whole (one atomic store)."""

    __slots__ = ("broken", "empty", "environment", "names", "relayed", "textmap", "w3c")

    def __init__(self) -> None:
        # (global propagator, its formats other than W3C's, or None if none)
        self.textmap: tuple[object, object] = (None, None)
        # (traceparent, the non-recording span made of it, or None)
        self.relayed: tuple[str | None, object] = (None, None)
        self.environment = False  # OTEL_PROPAGATORS was looked at
        self.broken: object = None  # the last propagator whose failure was logged
        self.w3c: Any = None  # TraceContextTextMapPropagator, made once
        self.empty: Any = None  # an empty OpenTelemetry Context (immutable)
        # a propagator's carrier key -> the header it goes out as, "" if none
        self.names: dict[object, str] = {}


_SEEN = _Seen()


def _global_textmap() -> Any:
    """OpenTelemetry's global propagator when it writes any format besides
    W3C's trace context and baggage (judged by its ``fields``), else None."""
    propagate: Any = sys.modules.get("opentelemetry.propagate")
    if propagate is None:
        propagate = _propagate_from_environment()
        if propagate is None:
            return None
    textmap = propagate.get_global_textmap()
    seen, foreign = _SEEN.textmap
    if seen is not textmap:
        foreign = textmap if _other_formats(textmap) else None
        _SEEN.textmap = (textmap, foreign)
    return foreign


def _other_formats(textmap: Any) -> bool:
    try:
        names = {str(name).lower() for name in textmap.fields}
    except Exception:
        _log.exception("ctxrelay: OpenTelemetry's propagator has no readable fields; W3C only")
        return False
    return not names <= _W3C_FIELDS


def _propagate_from_environment() -> Any:
    """``opentelemetry.propagate``, imported, when ``OTEL_PROPAGATORS`` names a
    format other than W3C's (looked at once: OpenTelemetry reads it once)."""
    if _SEEN.environment:
        return None
    _SEEN.environment = True
    configured = os.environ.get("OTEL_PROPAGATORS", "")
    if {name.strip().lower() for name in configured.split(",")} <= _W3C_NAMES | {""}:
        return None
    try:
        return importlib.import_module("opentelemetry.propagate")
    except Exception:
        _log.exception(
            "ctxrelay: OTEL_PROPAGATORS=%r could not be loaded; trace headers go out as W3C",
            configured,
        )
        return None


def _relayed_span(trace: Any, traceparent: str) -> Any:
    """A non-recording span for the relayed W3C ``traceparent``; None if it
    is not one.  ``tracestate`` is W3C's alone: it is not converted."""
    seen, span = _SEEN.relayed
    if seen == traceparent:
        return span
    span = None
    match = _TRACEPARENT.match(traceparent)
    if match is not None:
        version, trace_id, span_id, flags = match.groups()
        if version != "ff" and int(trace_id, 16) and int(span_id, 16):
            context = trace.SpanContext(
                int(trace_id, 16),
                int(span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(flags, 16)),
            )
            span = trace.NonRecordingSpan(context)
    _SEEN.relayed = (traceparent, span)
    return span


def _w3c(trace: Any) -> dict[str, str]:
    """``traceparent``/``tracestate`` of the current span, by OpenTelemetry's
    own W3C propagator: what ctxrelay has always written for a span."""
    if _SEEN.w3c is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _SEEN.w3c = TraceContextTextMapPropagator()
    carrier: dict[str, str] = {}
    _SEEN.w3c.inject(carrier)
    return carrier


def _propagated(textmap: Any, trace: Any, span: Any) -> dict[str, str] | None:
    """What ``textmap`` writes for ``span`` alone, cleaned; None if it raised."""
    carrier: dict[object, object] = {}
    try:
        if _SEEN.empty is None:
            _SEEN.empty = sys.modules["opentelemetry.context"].Context()
        textmap.inject(carrier, context=trace.set_span_in_context(span, _SEEN.empty))
    except Exception:
        if _SEEN.broken is not textmap:  # once per propagator, not once per call
            _SEEN.broken = textmap
            _log.exception("ctxrelay: OpenTelemetry's propagator failed; trace goes out as W3C")
        else:
            _log.debug("ctxrelay: OpenTelemetry's propagator failed again", exc_info=True)
        return None
    out: dict[str, str] = {}
    names = _SEEN.names
    for key, value in carrier.items():
        name = names.get(key)
        if name is None:
            name = _header_name(key)
        # Visible ASCII and inner spaces, as a header (and gRPC metadata)
        # carries unaltered: no line break, no split header.
        if (
            name
            and isinstance(value, str)
            and 0 < len(value) <= _MAX_VALUE
            and value.isascii()
            and value.isprintable()
            and value[0] != " " != value[-1]
        ):
            out[name] = value
        else:
            _log.debug("ctxrelay: propagator header %r not sent", key)
    return out


def _header_name(key: object) -> str:
    """The header a propagator's carrier key goes out as; "" for none (not
    a header name, or one that carries baggage).  Remembered: a propagator
    writes a few names, always the same."""
    name = key.lower() if isinstance(key, str) else ""
    if not _HEADER_NAME.match(name) or name in BAGGAGE_LISTS or name.startswith(BAGGAGE_PREFIXES):
        name = ""
    if len(_SEEN.names) < _MAX_NAMES:
        _SEEN.names[key] = name
    return name


def trace_headers(
    traceparent: str | None, tracestate: str | None, *, formats: bool = True
) -> dict[str, str] | None:
    """The trace headers for the current context, when OpenTelemetry has a
    say in them; None means "relay ``traceparent``/``tracestate`` verbatim".

    * A span that speaks for the context (:func:`speaking_span`) gives the
      trace; otherwise the relayed ``traceparent`` does, converted to a
      non-recording span context (trace id, parent id, flags).
    * With ``formats`` and a global propagator that writes other formats
      (B3, X-Ray, Jaeger, ...), they are what that propagator writes for
      that trace and nothing else: no baggage, and W3C headers only if it
      writes them -- then, for a relayed trace, the relayed ones verbatim.
    * Otherwise (the default propagator, or ``formats=False`` for an
      in-house carrier read back by ctxrelay), the speaking span's W3C
      headers, or None.

    A propagator that raises is logged (once) and W3C goes out instead.
    OpenTelemetry's own failures (``get_current_span``) propagate: the
    caller logs them, as before.
    """
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    span = speaking_span(traceparent)
    if span is None and traceparent is None:
        return None  # no trace to write, in any format
    textmap = _global_textmap() if formats else None
    if textmap is None:
        return None if span is None else _w3c(trace)
    if span is not None:
        out = _propagated(textmap, trace, span)
        return _w3c(trace) if out is None else out
    if traceparent is None:
        return None
    relayed = _relayed_span(trace, traceparent)
    if relayed is None:
        return None
    out = _propagated(textmap, trace, relayed)
    if out is None:
        return None
    if TRACEPARENT in out:  # the propagator writes W3C too: the relayed headers, verbatim
        out.pop(TRACESTATE, None)
        out[TRACEPARENT] = traceparent
        if tracestate is not None:
            out[TRACESTATE] = tracestate
    return out
