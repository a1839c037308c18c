"""Log fields: what a context looks like on a log record, for every log library.

One home for the rules the stdlib filter, the structlog processor and the
loguru patcher share: which fields a line may show (sensitive ones masked,
every value escaped so none can forge a line), which request-snapshot
attributes may be copied, and the per-context memo that makes a record cost
one ``ContextVar`` read whatever the number of fields; the request id cut
to a length (``id_length``); and the trace and span ids under
OpenTelemetry's names (``trace_ids``).  The integrations adapt each library
to it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, NoReturn, TypeVar

from ._codec import TRACEPARENT, valid_traceparent
from ._context import REQUEST_ID, Context, read_current
from ._deadline import deadline_of
from ._escape import escaped_values, log_text
from ._otel import span_at_use
from ._policy import MASK, STATE, Policy, active

__all__ = [
    "DEADLINE_FIELD",
    "DEFAULT",
    "NO_TRACE",
    "REQUEST_ATTRIBUTES",
    "TRACE_FIELDS",
    "FrozenFields",
    "PerContext",
    "TraceIds",
    "TraceValues",
    "id_length_of",
    "masked_fields",
    "relayed_trace",
    "trace_ids_of",
    "request_attributes",
    "request_values",
    "timed",
]

_log = logging.getLogger("ctxrelay")
_current: Final = read_current
_T = TypeVar("_T")

#: What a declared attribute holds on a record logged outside any request (or
#: when the request lacks that field), so a format string never raises.
DEFAULT: Final = "-"

#: The request-snapshot attributes a filter may copy onto records, as
#: ``request_<attribute>``.  The query string and headers are left out on
#: purpose: they carry tokens and cookies, and logs are widely readable.
REQUEST_ATTRIBUTES: Final = ("method", "scheme", "host", "path", "client")

#: The name under which a log line shows the whole milliseconds left before
#: the deadline (``record.deadline_ms``, structlog's ``event["deadline_ms"]``,
#: loguru's ``extra["deadline_ms"]``), present only while a deadline is bound.
DEADLINE_FIELD: Final = "deadline_ms"

#: How many contexts each filter remembers its output for (see PerContext).
_CACHE_SIZE: Final = 256

#: The names under which ``trace_ids=True`` shows the trace: OpenTelemetry's
#: logging instrumentation's (``LoggingInstrumentor``) own record attributes,
#: so that a format written for it (``%(otelTraceID)s``) works with either.
TRACE_FIELDS: Final = ("otelTraceID", "otelSpanID", "otelTraceSampled", "otelServiceName")

#: Trace id, span id, sampled, service name.
TraceValues = tuple[str, str, bool, str]

#: What OpenTelemetry's instrumentation writes without a span: ``"0"``, not
#: 32 zeros, and an empty service name when the provider names none.
NO_TRACE: Final[TraceValues] = ("0", "0", False, "")


class FrozenFields(dict[str, str]):
    """A read-only ``dict`` of fields, shared by every record of one context.

    A ``dict`` (not a ``MappingProxyType``) so that ``json.dumps`` and JSON
    formatters write it as an object; read-only because one instance serves
    many records, and a formatter that changed it would change them all.
    Copy it (``dict(record.ctxrelay)``) to change it.
    """

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("ctxrelay record fields are read-only: copy them with dict(...)")

    __setitem__: Callable[..., NoReturn] = _read_only
    __delitem__: Callable[..., NoReturn] = _read_only
    clear: Callable[..., NoReturn] = _read_only
    pop: Callable[..., NoReturn] = _read_only
    popitem: Callable[..., NoReturn] = _read_only
    setdefault: Callable[..., NoReturn] = _read_only
    update: Callable[..., NoReturn] = _read_only
    __ior__: Callable[..., NoReturn] = _read_only

    def __copy__(self) -> FrozenFields:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenFields:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as a plain dict's items: SocketHandler/QueueHandler records travel.
        return (FrozenFields, (dict(self),))


def masked_fields(ctx: Context, policy: Policy, id_length: int | None = None) -> FrozenFields:
    """The fields of ``ctx`` as a log line may show them: each sensitive one's
    value replaced by ``***``, every other one escaped (:func:`log_text`);
    the request id cut to its first ``id_length`` characters when given.

    Escaped too, though fields are validated: a field may hold a C1 control
    (NEL), U+2028 or an ESC, and come from the request (a captured header,
    a baggage member) -- each could forge a line or rewrite a terminal.  The
    id is cut before it is escaped, so that a cut never splits an escape
    (``\\x85`` cut to ``\\x8`` would read as another character).
    """
    fields = {name: MASK if policy.is_sensitive(name) else value for name, value in ctx.items()}
    if id_length is not None and REQUEST_ID in fields and fields[REQUEST_ID] != MASK:
        fields[REQUEST_ID] = fields[REQUEST_ID][:id_length]
    return FrozenFields(escaped_values(fields))


def id_length_of(value: object) -> int | None:
    """``value`` checked as an ``id_length`` option: None, or an int >= 1."""
    if value is None:
        return None
    if type(value) is not int:  # bool is an int subclass: refused too
        raise TypeError(f"id_length must be an int >= 1 or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"id_length must be >= 1, not {value}")
    return value


def trace_ids_of(value: object) -> bool:
    """``value`` checked as a ``trace_ids`` option: a ``bool``.  A string
    such as ``"false"`` from a configuration file is refused, not read as
    true."""
    if type(value) is not bool:
        raise TypeError(f"trace_ids must be True or False, not {type(value).__name__}")
    return value


def relayed_trace(ctx: Context) -> TraceValues:
    """The trace and span ids of the ``traceparent`` that ``ctx`` relays, as
    log lines show them (:data:`TRACE_FIELDS`), or :data:`NO_TRACE`.

    Checked strictly (lower-case hex of the right lengths, neither id all
    zeros, not version ``ff``, nothing after the flags in version ``00``):
    a field may have been bound by any code or read from a task message,
    and only a valid W3C ``traceparent`` speaks for a trace.  Only the fixed
    positions are copied, so nothing else of the value reaches a line.
    """
    value = ctx.get(TRACEPARENT)
    if type(value) is not str or not valid_traceparent(value):
        return NO_TRACE
    return (value[3:35], value[36:52], bool(int(value[53:55], 16) & 1), "")


class TraceIds:
    """Per record: the active OpenTelemetry span's ids, else the relayed ones.

    Reads OpenTelemetry only when the program imported it (a look in
    ``sys.modules``, never an import): without it a record costs one dict
    lookup here.  A span counts when its context is valid, and -- as for the
    outgoing ``traceparent`` (``ctxrelay._outbound``) -- when it was not
    already current when the ``use()`` that bound the context was entered,
    unless it is in the relayed trace: a thread that served request A still
    holds A's span when it takes up message B, and B's lines must not carry
    A's trace.  The service name is the tracer provider's ``service.name``,
    as OpenTelemetry's instrumentation reads it.  Never raises: if
    OpenTelemetry (or an application's span class) fails, the relayed ids
    are used and the failure is logged once.
    """

    __slots__ = ("_failed", "_service", "_span")

    def __init__(self) -> None:
        self._failed = False
        # The last span context seen, with what it gave, in one tuple read
        # once (other threads may replace it): a request's records share it,
        # and formatting two ints as hex per record costs more than an
        # identity check.
        self._span: tuple[object, str, str, bool] = (None, "0", "0", False)
        # The service name, once a tracer provider with a resource is set:
        # OpenTelemetry sets the global provider once and never replaces
        # it.  Until then it is asked again when a new span is seen, not
        # per record: asking while none is set reads os.environ (1.2 us).
        self._service: str | None = None

    def current(self, relayed: TraceValues) -> TraceValues:
        """The values for a record made now, under a context relaying ``relayed``."""
        trace: Any = sys.modules.get("opentelemetry.trace")
        if trace is None:
            return relayed
        try:
            return self._read(trace, relayed)
        except Exception:
            if not self._failed:
                self._failed = True
                _log.warning(
                    "ctxrelay: could not read the trace ids for a log record", exc_info=True
                )
            return relayed

    def _read(self, trace: Any, relayed: TraceValues) -> TraceValues:
        span = trace.get_current_span()
        context = span.get_span_context()
        memo = self._span
        if memo[0] is not context:
            if context.is_valid:
                memo = (
                    context,
                    f"{context.trace_id:032x}",
                    f"{context.span_id:016x}",
                    bool(context.trace_flags.sampled),
                )
            else:
                memo = (context, "0", "0", False)
            self._span = memo
            if self._service is None:
                self._service = self._service_name(trace)
        _, trace_id, span_id, sampled = memo
        service = self._service or ""
        _, trace_id, span_id, sampled = memo
        if span_id == "0" or (trace_id != relayed[0] and span is span_at_use()):
            # No valid span, or a stale one from before use(): the relayed ids.
            return (relayed[0], relayed[1], relayed[2], service)
        return (trace_id, span_id, sampled, service)

    @staticmethod
    def _service_name(trace: Any) -> str | None:
        """The global tracer provider's ``service.name``; None while no
        provider with a resource is set (then asked again later)."""
        resource = getattr(trace.get_tracer_provider(), "resource", None)
        if resource is None:
            return None
        name = resource.attributes.get("service.name")
        return log_text(name) if name else ""


def timed(ctx: Context) -> Context | None:
    """``ctx`` if it has a deadline, else None: what an integration keeps per
    context so that a record computes the time left (it changes with every
    record, so it cannot be memoised) only when there is a deadline."""
    return ctx if deadline_of(ctx) is not None else None


def request_attributes(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each checked against :data:`REQUEST_ATTRIBUTES`."""
    chosen = tuple(names)
    unknown = set(chosen) - set(REQUEST_ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown request attributes {sorted(unknown)}: {REQUEST_ATTRIBUTES}")
    return chosen


def request_values(ctx: Context, attributes: Iterable[str]) -> dict[str, str]:
    """``{"request_<attribute>": value}`` for the snapshot attributes present,
    escaped (:func:`log_text`): servers percent-decode the path, so
    ``/orders/1%0aINFO [req-admin] ...`` would otherwise write a second,
    forged line."""
    snapshot = ctx.request
    if snapshot is None:
        return {}
    values = ((f"request_{attr}", getattr(snapshot, attr)) for attr in attributes)
    return {name: log_text(value) for name, value in values if value}


class PerContext(Generic[_T]):
    """What a log integration derived from one context, remembered by identity.

    A ``Context`` is immutable and every record of a request shares it, so the
    masking and renaming are done once per context, not once per record: a
    record then costs one ``ContextVar`` read and one lookup here, whatever
    the number of fields (structlog's ``merge_contextvars`` walks every
    variable on every call -- 2-7 us with 50 bound).  Entries are keyed by
    ``id()`` but hold the context itself, so a recycled ``id`` never matches;
    the policy is part of the key, so :func:`ctxrelay.configure` takes effect
    at once.  At most ``_CACHE_SIZE`` contexts are kept; then it starts over.
    """

    __slots__ = ("_build", "_entries", "_failed", "_fallback", "last")

    def __init__(self, build: Callable[[Context, Policy], _T]) -> None:
        self._build = build
        self._entries: dict[int, tuple[Context | None, Policy | None, _T]] = {}
        self._failed = False
        # Used if build() fails: what it makes of an empty context.
        self._fallback = build(Context(), active())
        # The entry last used, checked first: a burst of records from one
        # request skips even the id() lookup.
        self.last: tuple[Context | None, Policy | None, _T] = (None, None, self._fallback)

    def current(self) -> _T:
        """What ``build`` makes of the current context."""
        ctx = _current()
        last = self.last  # one tuple, read once: other threads may replace it
        if last[0] is not ctx or last[1] is not STATE.policy:
            last = self.lookup(ctx)
        return last[2]

    def lookup(self, ctx: Context) -> tuple[Context | None, Policy | None, _T]:
        """The entry for ``ctx`` under the active policy, built if missing."""
        policy = active()
        entry = self._entries.get(id(ctx))
        if entry is None or entry[0] is not ctx or entry[1] is not policy:
            entry = self._remember(ctx, policy)
        self.last = entry
        return entry

    def _remember(self, ctx: Context, policy: Policy) -> tuple[Context | None, Policy | None, _T]:
        try:
            value = self._build(ctx, policy)
        except Exception:
            # Never raised into the host's logging call.  Reported once: the
            # report is a record, too, and would come back through here.
            if not self._failed:
                self._failed = True
                _log.warning("ctxrelay: could not put the context on a log record", exc_info=True)
            return (None, None, self._fallback)
        if len(self._entries) >= _CACHE_SIZE:
            self._entries.clear()
        entry = self._entries[id(ctx)] = (ctx, policy, value)
        return entry
