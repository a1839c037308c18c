"""Stdlib ``logging``: the request's fields on every ``LogRecord`` (the MDC).

Seed 003: the trace id vanished from log lines the moment work changed
thread.  :class:`ContextFilter` reads the one ctxrelay ``ContextVar`` per
record and puts what it holds on the record, so ``%(request_id)s`` works in a
format string and a JSON formatter finds the fields -- in every thread, pool,
process and worker the context was relayed to.  Sensitive fields (``cookie``,
``authorization``, the names of :class:`ctxrelay.Policy`) arrive masked.

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

Stdlib only: this integration needs no extra.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Final, Generic, NoReturn, TypeVar

from .. import _policy
from .._context import REQUEST_ID, Context, read_current, validate_field
from .._escape import escaped_values, log_text
from .._policy import MASK, Policy, active

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
#: The ContextVar's bound ``get``: one attribute lookup less per record.
_current: Final = read_current
_T = TypeVar("_T")

#: What a declared attribute holds on a record logged outside any request (or
#: when the request lacks that field), so a format string never raises.
DEFAULT: Final = "-"

#: The format :func:`setup` gives the handler it creates.
DEFAULT_FORMAT: Final = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"

#: The request-snapshot attributes a filter may copy onto records, as
#: ``request_<attribute>``.  The query string and headers are left out on
#: purpose: they carry tokens and cookies, and logs are widely readable.
REQUEST_ATTRIBUTES: Final = ("method", "scheme", "host", "path", "client")

#: Names a ``LogRecord`` already uses: a field must never overwrite ``msg``,
#: nor shadow a method (a field ``getMessage`` would make the record unformattable).
_RESERVED: Final = (
    frozenset(logging.makeLogRecord({}).__dict__)
    | frozenset(dir(logging.LogRecord))
    | {"message", "asctime"}
)
#: The attributes every ContextFilter sets.
_OURS: Final = frozenset({"request_id", "ctxrelay"})

#: How many contexts each filter remembers its output for (see PerContext).
_CACHE_SIZE: Final = 256


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

    __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __copy__(self) -> FrozenFields:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenFields:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as a plain dict's items: SocketHandler/QueueHandler records travel.
        return (FrozenFields, (dict(self),))


def masked_fields(ctx: Context, policy: Policy) -> FrozenFields:
    """The fields of ``ctx`` as a log line may show them: each sensitive one's
    value replaced by ``***``, every other one escaped (:func:`log_text`).

    Escaped too, though fields are validated: a field may hold a C1 control
    (NEL), U+2028 or an ESC, and come from the request (a captured header,
    a baggage member) -- each could forge a line or rewrite a terminal.
    """
    return FrozenFields(
        escaped_values(
            {name: MASK if policy.is_sensitive(name) else value for name, value in ctx.items()}
        )
    )


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
        if last[0] is not ctx or last[1] is not _policy.STATE.policy:
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


#: What a filter prepares per context: the request id, the dict of fields,
#: and the other attributes its options ask for.
_Prepared = tuple[str, FrozenFields, dict[str, object]]
#: What the filter checks per record: the context and policy it was prepared
#: for, then the prepared values, flat so that one unpacking reads them all.
_Last = tuple[Context | None, Policy | None, str, FrozenFields, dict[str, object]]


class ContextFilter(logging.Filter):
    """Puts the current context's fields on each record; never drops one.

    On every record:

    * ``record.request_id`` -- ``default`` (``"-"``) outside a request, so
      ``%(request_id)s`` never raises ``KeyError``;
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
      uses are skipped) -- for formatters that emit every attribute.

    Sensitive fields (:meth:`ctxrelay.Policy.is_sensitive`) carry ``***``;
    every other value is escaped (``\\n``, ``\\x85``, ``\\u2028``: see
    ``ctxrelay._escape``), so no value from a request can start a log line.
    Attributes the record already has win: an ``extra=`` value is kept, and
    a second filter (on a ``QueueListener``'s handler, on a log server that
    received the record over a socket -- places outside the request) does not
    overwrite what the first one set.
    """

    def __init__(
        self,
        *,
        fields: Mapping[str, str] | Iterable[str] = (),
        request: Iterable[str] = (),
        prefix: str | None = None,
        default: str = DEFAULT,
    ) -> None:
        super().__init__()
        self.fields = _declared(fields)
        self.request = request_attributes(request)
        self.prefix = prefix
        self.default = default
        self._cache: PerContext[_Prepared] = PerContext(self._prepare)
        _, _, (request_id, fields, more) = self._cache.last
        self._last: _Last = (None, None, request_id, fields, more)

    def _prepare(self, ctx: Context, policy: Policy) -> _Prepared:
        fields = masked_fields(ctx, policy)
        snapshot = request_values(ctx, self.request)
        more: dict[str, object] = {}
        if self.prefix is not None:
            for name, value in fields.items():
                attribute = self.prefix + _attribute_name(name)
                if attribute not in _RESERVED and attribute not in _OURS:
                    more[attribute] = value
        for attribute, name in self.fields.items():
            more[attribute] = fields.get(name, self.default)
        for attr in self.request:
            more[f"request_{attr}"] = snapshot.get(f"request_{attr}", self.default)
        request_id = fields.get(REQUEST_ID, self.default)
        return (request_id, FrozenFields({**fields, **snapshot}), more)

    def filter(self, record: logging.LogRecord) -> bool:
        # The per-record path, kept to the fewest bytecodes: every record on
        # every handler runs it.  One flat tuple, read once (other threads may
        # replace it, never change it), so the id and the fields on a record
        # always come from the same context.  ``_current`` is the ContextVar's
        # bound ``get``, and the policy is read as a module attribute, not
        # through ``active()``: each saves a lookup or a call per record.
        ctx, policy, request_id, fields, more = self._last
        if ctx is not _current() or policy is not _policy.STATE.policy:
            ctx, policy, request_id, fields, more = self._last = self._refresh()
        if hasattr(record, "request_id"):
            # Set already: by extra=, or by a filter where the record was made.
            _set_missing(record, {"request_id": request_id, "ctxrelay": fields, **more})
            return True
        # Plain attribute stores, which CPython specialises; going through
        # record.__dict__ would build the instance dict here, and setattr()
        # is not specialised: either doubles this filter's cost.
        record.request_id = request_id
        record.ctxrelay = fields
        if more:
            _set_missing(record, more)
        return True

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
        handler.setFormatter(logging.Formatter(fmt))
        target.addHandler(handler)
    return install(logger=target, context_filter=context_filter)
