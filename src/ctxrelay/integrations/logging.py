"""Stdlib ``logging``: the request's fields on every ``LogRecord`` (the MDC).

In the order-confirmation story, the trace id vanished from log lines the
moment work changed thread.  :class:`ContextFilter` reads the one ctxrelay
``ContextVar`` per record and puts what it holds on the record, so
``%(request_id)s`` works in a format string and a JSON formatter finds the
fields -- in every thread, pool, process and worker the context was relayed
to.  Sensitive fields (``cookie``, ``authorization``, the names of
:class:`ctxrelay.Policy`) arrive masked.

Put the filter on *handlers*, not loggers: a logger's filters only see records
logged through that very logger, not those propagating up from its children
(``logging.getLogger("app.db")`` would slip past a filter on ``"app"``).
:func:`setup` and :func:`install` do that.  Example::

    import logging
    import ctxrelay
    from ctxrelay.integrations.logging import setup

    setup("%(levelname)s [%(request_id)s] %(name)s: %(message)s", level=logging.INFO)
    with ctxrelay.bind(request_id="r-1"):
        logging.getLogger("app.db").info("query")  # INFO [r-1] app.db: query

``ContextFilter(id_length=8)`` cuts the request id to 8 characters (as
asgi-correlation-id's ``uuid_length``); ``ContextFilter(trace_ids=True)``
adds the trace and span ids under OpenTelemetry's own attribute names
(``%(otelTraceID)s``, ``%(otelSpanID)s``), from the active span or from the
relayed ``traceparent``.

Stdlib only: this integration needs no extra.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Final

from .._context import REQUEST_ID, Context, read_current, validate_field
from .._deadline import remaining_ms
from .._logfields import (
    DEADLINE_FIELD,
    DEFAULT,
    REQUEST_ATTRIBUTES,
    TRACE_FIELDS,
    FrozenFields,
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
from .._policy import STATE, Policy

__all__ = [
    "DEFAULT",
    "DEFAULT_FORMAT",
    "REQUEST_ATTRIBUTES",
    "ContextFilter",
    "FrozenFields",
    "install",
    "setup",
    "uninstall",
]

_log = logging.getLogger("ctxrelay")
#: Bound to a module global: one attribute lookup less per record.
_current: Final = read_current
_modules: Final = sys.modules
#: Whether the program imported OpenTelemetry's trace API (we never import it).
_OTEL: Final = "opentelemetry.trace"
#: LogRecord's own attributes (a live view): where OpenTelemetry declares its names.
_RECORD_CLASS: Final = logging.LogRecord.__dict__

#: The format :func:`setup` gives the handler it creates.
DEFAULT_FORMAT: Final = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"

#: Names a ``LogRecord`` already uses: a field must never overwrite ``msg``,
#: nor shadow a method (a field ``getMessage`` would make the record unformattable).
_RESERVED: Final = (
    frozenset(logging.makeLogRecord({}).__dict__)
    | frozenset(dir(logging.LogRecord))
    | {"message", "asctime"}
)
#: The attributes a ContextFilter may set besides the declared ones.
_OURS: Final = frozenset({"request_id", "ctxrelay", DEADLINE_FIELD, *TRACE_FIELDS})


def _attribute_name(field: str) -> str:
    # "x-gray" -> "x_gray", "trace.id" -> "trace_id": {}- and $-style formats
    # accept identifiers only.
    return field.replace("-", "_").replace(".", "_")


def _declared(fields: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    pairs = (
        fields.items()
        if isinstance(fields, Mapping)
        else ((_attribute_name(name), name) for name in fields)
    )
    declared: dict[str, str] = {}
    for attribute, field in pairs:
        validate_field(field, "")
        if attribute == REQUEST_ID and field == REQUEST_ID:
            continue  # always there
        if not attribute.isidentifier() or attribute in _RESERVED or attribute in _OURS:
            raise ValueError(
                f"cannot use {attribute!r} as a LogRecord attribute for field {field!r}: "
                "pass fields={'some_name': field} with an identifier that LogRecord "
                "does not already use"
            )
        declared[attribute] = field
    return declared


#: What a record needs beyond the id and the fields, prepared per context;
#: None (most contexts: no declared fields, no deadline, no trace ids) lets
#: a record skip it with one check.  The other attributes the filter's
#: options ask for, the context again if it has a deadline, and the relayed
#: trace ids when ``trace_ids`` is on.
_More = tuple[dict[str, object], Context | None, TraceValues | None]
#: What a filter prepares per context: the request id, the fields, the rest.
_Prepared = tuple[str, FrozenFields, _More | None]
#: What the filter checks per record: the context and policy it was prepared
#: for, then the prepared values, flat, so that a record reads them by index.
_Last = tuple[Context | None, Policy | None, str, FrozenFields, _More | None]


class ContextFilter(logging.Filter):
    """Puts the current context's fields on each record; never drops one.

    On every record:

    * ``record.request_id`` -- ``default`` (``"-"``) outside a request, so
      ``%(request_id)s`` never raises ``KeyError``; with ``id_length`` set,
      its first ``id_length`` characters (as asgi-correlation-id's
      ``uuid_length``), here and wherever the request id appears on the
      record -- no other field is cut;
    * ``record.deadline_ms`` -- only while a deadline is bound: the whole
      milliseconds left (an ``int``; 0 once it passed or the request was
      cancelled).  Not in ``record.ctxrelay``, which one context's records
      share: the time left is read per record.  A format string that shows
      it needs a default for records without one:
      ``logging.Formatter(fmt, defaults={"deadline_ms": "-"})`` (what
      :func:`setup` does);
    * ``record.ctxrelay`` -- a read-only dict of every field under its own
      name (plus the ``request_<attr>`` values below): what a JSON formatter
      should emit.  Only what the context holds; empty outside a request;
    * each attribute declared in ``fields`` -- always there, ``default`` when
      the context lacks it.  ``fields`` is a list of field names (``"x-gray"``
      becomes ``record.x_gray``) or a mapping of attribute name to field name
      (``{"gray": "x-gray"}``), for names a format string cannot spell;
    * ``record.request_<attr>`` for each snapshot attribute named in
      ``request`` (from :data:`REQUEST_ATTRIBUTES`), ``default`` when absent;
    * with ``prefix`` set (say ``"ctx_"``), every field also as an attribute
      ``ctx_<name>`` (``-`` and ``.`` become ``_``; names a ``LogRecord``
      uses are skipped) -- for formatters that emit every attribute;
    * with ``trace_ids=True``, OpenTelemetry's logging attributes:
      ``otelTraceID``, ``otelSpanID``, ``otelTraceSampled`` and
      ``otelServiceName`` -- from the active OpenTelemetry span when there is
      a valid one, else from the ``traceparent`` the context relays, else
      OpenTelemetry's own values without a span (``"0"``, ``"0"``, ``False``,
      ``""``).  Values OpenTelemetry's ``LoggingInstrumentor`` already set
      are kept.

    Sensitive fields (:meth:`ctxrelay.Policy.is_sensitive`) carry ``***``;
    every other value is escaped (``\\n``, ``\\x85``, ``\\u2028``: see
    ``ctxrelay._escape``), so no value from a request can start a log line.
    Attributes the record already has win: an ``extra=`` value is kept, and
    a second filter (on a ``QueueListener``'s handler, on a log server that
    received the record over a socket -- places outside the request) does not
    overwrite what the first one set.

    Raises ``TypeError`` for an ``id_length`` that is not an ``int`` (or is a
    ``bool``), ``ValueError`` for one below 1, and ``TypeError`` for a
    ``trace_ids`` that is not a ``bool`` (a ``"false"`` from a configuration
    file would otherwise read as true).
    """

    def __init__(
        self,
        *,
        fields: Mapping[str, str] | Iterable[str] = (),
        request: Iterable[str] = (),
        prefix: str | None = None,
        default: str = DEFAULT,
        id_length: int | None = None,
        trace_ids: bool = False,
    ) -> None:
        super().__init__()
        self.fields: dict[str, str] = _declared(fields)
        self.request: tuple[str, ...] = request_attributes(request)
        self.prefix = prefix
        self.default = default
        self.id_length: int | None = id_length_of(id_length)
        self.trace_ids: bool = trace_ids_of(trace_ids)
        self._trace = TraceIds()
        self._cache: PerContext[_Prepared] = PerContext(self._prepare)
        _, _, (request_id, fields, more) = self._cache.last
        self._last: _Last = (None, None, request_id, fields, more)

    def _prepare(self, ctx: Context, policy: Policy) -> _Prepared:
        fields = masked_fields(ctx, policy, self.id_length)
        snapshot = request_values(ctx, self.request)
        attributes: dict[str, object] = {}
        if self.prefix is not None:
            for name, value in fields.items():
                attribute = self.prefix + _attribute_name(name)
                if attribute not in _RESERVED and attribute not in _OURS:
                    attributes[attribute] = value
        for attribute, name in self.fields.items():
            attributes[attribute] = fields.get(name, self.default)
        for attr in self.request:
            attributes[f"request_{attr}"] = snapshot.get(f"request_{attr}", self.default)
        request_id = fields.get(REQUEST_ID, self.default)
        timed_ctx = timed(ctx)
        relayed = relayed_trace(ctx) if self.trace_ids else None
        more = (
            (attributes, timed_ctx, relayed)
            if attributes or timed_ctx is not None or relayed is not None
            else None
        )
        return (request_id, FrozenFields({**fields, **snapshot}), more)

    def filter(self, record: logging.LogRecord) -> bool:
        # The per-record path, kept to the fewest bytecodes: every record on
        # every handler runs it.  One flat tuple, read once (other threads may
        # replace it, never change it), so the id and the fields on a record
        # always come from the same context.  The policy is read from the
        # one STATE object, not through ``active()``: a call less per record.
        last = self._last
        if last[0] is not _current() or last[1] is not STATE.policy:
            last = self._last = self._refresh()
        if hasattr(record, "request_id"):
            # Set already: by extra=, or by a filter where the record was made.
            self._keep(record, last)
            return True
        # Plain attribute stores, which CPython specialises; going through
        # record.__dict__ would build the instance dict here, and setattr()
        # is not specialised: either doubles this filter's cost.
        record.request_id = last[2]
        record.ctxrelay = last[3]
        if last[4] is not None:
            self._more(record, last[4])
        return True

    def _more(self, record: logging.LogRecord, more: _More) -> None:
        """What a record gets beyond the id and the fields (see ``_More``)."""
        attributes, timed_ctx, relayed = more
        if timed_ctx is not None:
            # The time left changes with every record, so it is never
            # memoised, and it is set only under a deadline: a store on every
            # record cost ~310 instructions (it grows the record's dict).
            record.deadline_ms = remaining_ms(timed_ctx)
        if attributes:
            _set_missing(record, attributes)
        # OpenTelemetry's LoggingInstrumentor (its record factory) may have
        # set the trace attributes already: its values are kept.  Its later
        # releases declare the old names on the LogRecord class (forwarding
        # to new ones, with a DeprecationWarning): then they are its, and
        # left alone too -- the class is asked first, so that the instance's
        # lookup never runs that forwarding.  Asked through the class's
        # __dict__: hasattr() on a class raises (and discards) an
        # AttributeError when the name is missing, ~250 ns per record.
        if (
            relayed is not None
            and "otelTraceID" not in _RECORD_CLASS
            and not hasattr(record, "otelTraceID")
        ):
            # Without OpenTelemetry imported, the relayed ids as prepared.
            ids = relayed if _OTEL not in _modules else self._trace.current(relayed)
            record.otelTraceID = ids[0]
            record.otelSpanID = ids[1]
            record.otelTraceSampled = ids[2]
            record.otelServiceName = ids[3]

    def _keep(self, record: logging.LogRecord, last: _Last) -> None:
        """The attributes for a record that has some already: keep those."""
        more = last[4]
        attributes = more[0] if more is not None else {}
        _set_missing(record, {"request_id": last[2], "ctxrelay": last[3], **attributes})
        if more is not None:
            if more[1] is not None:
                _set_missing(record, {DEADLINE_FIELD: remaining_ms(more[1])})
            if more[2] is not None:
                self._more(record, ({}, None, more[2]))

    def _refresh(self) -> _Last:
        """The flat entry for the current context (prepared once per context)."""
        ctx, policy, (request_id, fields, more) = self._cache.lookup(_current())
        return (ctx, policy, request_id, fields, more)


def _set_missing(record: logging.LogRecord, attributes: Mapping[str, object]) -> None:
    """Set ``attributes`` on ``record``, keeping the values it already has."""
    present = record.__dict__
    kept = {name: present[name] for name in attributes.keys() & present.keys()}
    present.update(attributes)
    present.update(kept)


def _handlers_of(
    handlers: tuple[logging.Handler, ...], logger: logging.Logger | str | None
) -> tuple[logging.Handler, ...]:
    if handlers:
        return handlers
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
    return tuple(target.handlers)


def install(
    *handlers: logging.Handler,
    logger: logging.Logger | str | None = None,
    context_filter: ContextFilter | None = None,
) -> ContextFilter:
    """Add one :class:`ContextFilter` to ``handlers``, or to every handler of
    ``logger`` (default: the root logger, which every propagating record
    reaches).  A ``ContextFilter`` already on a handler is replaced, so calling
    this twice is harmless.  Returns the filter.

    With a ``QueueHandler``, install on the ``QueueHandler``: it runs in the
    thread that logs, where the context is; the ``QueueListener``'s thread
    has none.
    """
    targets = _handlers_of(handlers, logger)
    if not targets:
        raise ValueError(
            f"logger {logger!r} has no handlers to install ctxrelay's filter on: "
            "add one first, pass handlers, or use setup()"
        )
    chosen = context_filter if context_filter is not None else ContextFilter()
    uninstall(*targets)
    for handler in targets:
        handler.addFilter(chosen)
    return chosen


def uninstall(*handlers: logging.Handler, logger: logging.Logger | str | None = None) -> None:
    """Remove every :class:`ContextFilter` from ``handlers`` (or ``logger``'s)."""
    for handler in _handlers_of(handlers, logger):
        for existing in [f for f in handler.filters if isinstance(f, ContextFilter)]:
            handler.removeFilter(existing)


def setup(
    fmt: str = DEFAULT_FORMAT,
    *,
    logger: logging.Logger | str | None = None,
    level: int | str | None = None,
    stream: IO[str] | None = None,
    context_filter: ContextFilter | None = None,
) -> ContextFilter:
    """One call for logs that carry the request: like ``logging.basicConfig``.

    If ``logger`` (default: root) has no handler yet, adds a ``StreamHandler``
    on ``stream`` (default ``sys.stderr``) formatting with ``fmt``; then
    installs the filter on every handler of ``logger`` (see :func:`install`).
    """
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
    if level is not None:
        target.setLevel(level)
    if not target.handlers:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        # Records get deadline_ms only under a deadline: "-" otherwise.
        handler.setFormatter(logging.Formatter(fmt, defaults={DEADLINE_FIELD: DEFAULT}))
        target.addHandler(handler)
    return install(logger=target, context_filter=context_filter)


# Shown (and pickled) under its public path; SocketHandler/QueueHandler
# records carry FrozenFields to other processes.
FrozenFields.__module__ = __name__
