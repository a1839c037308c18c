"""Log fields: what a context looks like on a log record, for every log library.

One home for the rules the stdlib filter, the structlog processor and the
loguru patcher share: which fields a line may show (sensitive ones masked,
every value escaped so none can forge a line), which request-snapshot
attributes may be copied, and the per-context memo that makes a record cost
one ``ContextVar`` read whatever the number of fields.  The integrations
adapt each library to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, NoReturn, TypeVar

from . import _policy
from ._context import Context, read_current
from ._deadline import deadline_of
from ._escape import escaped_values, log_text
from ._policy import MASK, Policy, active

__all__ = [
    "DEADLINE_FIELD",
    "DEFAULT",
    "REQUEST_ATTRIBUTES",
    "FrozenFields",
    "PerContext",
    "masked_fields",
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
