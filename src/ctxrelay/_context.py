"""The immutable ``Context`` value and the one ``ContextVar`` that holds it.

Everything ctxrelay relays for a request lives in a single immutable value, so
reading it is one ``ContextVar.get()`` and handing it to other work is passing
a reference: nobody can mutate what another task sees (the hole in
starlette-context, whose per-request dict is shared by reference).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar, Token
from time import monotonic as _monotonic
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from . import _strict
from ._otel import end_use, note_use
from ._policy import MASK, active
from ._request import RequestSnapshot

__all__ = [
    "EMPTY",
    "MAX_NAME_LENGTH",
    "MAX_VALUE_BYTES",
    "DETACHED",
    "Cancellation",
    "FIELD_NAME",
    "REQUEST_ID",
    "Scope",
    "Context",
    "FROZEN",
    "bind",
    "bind_request",
    "capture",
    "current",
    "detached",
    "begin",
    "enter",
    "finish",
    "leave",
    "root_of",
    "make_context",
    "narrowed",
    "make_request_context",
    "raw_current",
    "read_current",
    "get",
    "request",
    "request_id",
    "sanitize",
    "use",
    "validate_field",
    "with_scope",
]

_log = logging.getLogger("ctxrelay")

#: The field under which the request id is kept.
REQUEST_ID = "request_id"

#: Field names: 1-64 characters of ``A-Z a-z 0-9 _ . -``, starting with a
#: letter or digit.  The alphabet is a subset of the HTTP token and W3C baggage
#: key alphabets, so every name can travel as a header or baggage key as is.
MAX_NAME_LENGTH = 64
FIELD_NAME = _NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")

#: Field values: at most 4096 bytes of UTF-8 (the W3C baggage per-member
#: figure OpenTelemetry enforces), and no control character but horizontal
#: tab.  CR, LF and NUL in particular would let a value split a header.
MAX_VALUE_BYTES = 4096
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A lone surrogate has no UTF-8 encoding: such a value could not be written
# to a UTF-8 log file or sent (a JSON message header may decode "\ud800").
_SURROGATE = re.compile(r"[\ud800-\udfff]")

_T = TypeVar("_T")
_P = ParamSpec("_P")
_R = TypeVar("_R")

# What a scope's _ctx holds until it is entered (or used as a decorator).
_UNUSED: Any = object()


def validate_field(name: object, value: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming the field if it is not valid."""
    if not isinstance(name, str):
        raise TypeError(f"context field names are str, got {type(name).__name__}: {name!r}")
    if name not in _known_names:
        if not _NAME.match(name):
            raise ValueError(
                f"invalid context field name {name!r}: use 1-{MAX_NAME_LENGTH} characters "
                "of A-Z a-z 0-9 _ . - starting with a letter or digit"
            )
        if len(_known_names) < _KNOWN_NAMES_MAX:
            _known_names.add(name)
    if not isinstance(value, str):
        raise TypeError(f"context field {name!r} must be a str, got {type(value).__name__}")
    # Fast path: a printable str has no control character, and len() bounds
    # the UTF-8 size; only long or unusual values pay for the full checks.
    if len(value) <= MAX_VALUE_BYTES // 4 and value.isprintable():
        return
    if len(value) * 4 > MAX_VALUE_BYTES and len(value.encode("utf-8", "surrogatepass")) > (
        MAX_VALUE_BYTES
    ):
        raise ValueError(f"context field {name!r} is longer than {MAX_VALUE_BYTES} bytes")
    if _BAD_VALUE_CHAR.search(value):
        raise ValueError(
            f"context field {name!r} contains a control character (CR, LF, NUL, ...), "
            "which could split a header"
        )
    if _SURROGATE.search(value):
        raise ValueError(f"context field {name!r} is not UTF-8 text: it holds a lone surrogate")


# Names already checked against _NAME: binding the same few names on every
# request then costs a set lookup, not a regex.  Bounded, so hostile input
# cannot grow it without limit.
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 4096


def _validated(fields: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, str]:
    # type() first: isinstance() against the Mapping ABC is slow on a hot path.
    items = fields.items() if type(fields) is dict or isinstance(fields, Mapping) else fields
    result: dict[str, str] = {}
    for name, value in items:
        validate_field(name, value)
        result[name] = value
    return result


def sanitize(fields: Iterable[tuple[object, object]], *, source: str) -> dict[str, str]:
    """Keep the valid fields of untrusted input, dropping the rest with a warning.

    Used wherever fields arrive from outside this process (a pickled context
    in a worker process, a message header): bad input never raises there.
    """
    result: dict[str, str] = {}
    try:
        entries = iter(fields)
    except TypeError:
        _log.warning("ctxrelay: dropped context fields from %s: not iterable", source)
        return result
    for entry in entries:
        # A JSON message header decodes pairs as lists, and hostile input may
        # hold anything: only a two-item tuple or list is a field.
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            _log.warning("ctxrelay: dropped a context entry from %s: not a pair", source)
            continue
        name, value = entry
        try:
            validate_field(name, value)
        except (TypeError, ValueError) as exc:
            _log.warning("ctxrelay: dropped a context field from %s: %s", source, exc)
            continue
        result[name] = value  # type: ignore[index,assignment]  # validated above
    return result


class Context(Mapping[str, str]):
    """An immutable mapping of relayed fields, plus the request snapshot.

    ``Context`` is a value: :meth:`set` and :meth:`remove` return a new one.
    Two contexts are equal when their fields and request snapshots are; a
    context compares equal to a plain mapping with the same fields.  Its
    ``repr`` masks sensitive fields (``cookie``, ``authorization``, ...,
    see :class:`ctxrelay.Policy`).  It pickles, and unpickling validates
    every field again, dropping bad ones with a warning.
    """

    # __weakref__: strict mode remembers contexts without keeping them alive.
    __slots__ = (
        "__weakref__",
        "_base",
        "_cancel",
        "_deadline",
        "_fields",
        "_hash",
        "_request",
        "_scope",
        "_stamp",
    )

    _fields: dict[str, str]
    _request: RequestSnapshot | None
    _hash: int | None
    # The context a bind() scope replaced when it made this one (None for
    # every other context): how a late or foreign scope exit tells whether
    # the state it would restore has already been unwound (see Scope).
    _base: Context | None
    # When the work must be done by: a time.monotonic() instant, or None.
    # Not a field: it never travels as a value, only as the time remaining
    # (see _deadline), and it does not take part in equality.
    _deadline: float | None
    # The request's cancellation, shared by everything working for it.
    _cancel: Cancellation | None
    # The request's scope, shared by everything working for it: the fields
    # any of its work added with bind_request() (or a bind() held across a
    # yield), and _stamp, the scope version these fields already include
    # (FROZEN: a hand-off's capture, which never sees later changes).
    _scope: RequestScope | None
    _stamp: int

    def __init__(
        self, fields: Mapping[str, str] | Iterable[tuple[str, str]] = (), /, **more: str
    ) -> None:
        validated = _validated(fields)
        if more:
            validated.update(_validated(more))
        self._fields = validated
        self._request = None
        self._hash = None
        self._base = None
        self._deadline = None
        self._cancel = None
        self._scope = None
        self._stamp = 0

    @classmethod
    def _make(cls, fields: dict[str, str], request: RequestSnapshot | None) -> Context:
        # Trusted, already-validated construction: no copy, no checks.
        ctx = object.__new__(cls)
        ctx._fields = fields
        ctx._request = request
        ctx._hash = None
        ctx._base = None
        ctx._deadline = None
        ctx._cancel = None
        ctx._scope = None
        ctx._stamp = 0
        return ctx

    def _same_work(self, new: Context) -> Context:
        # A changed value of the same unit of work keeps its deadline, its
        # cancellation and its request scope.
        new._deadline = self._deadline
        new._cancel = self._cancel
        new._scope = self._scope
        new._stamp = self._stamp
        return new

    # -- Mapping -------------------------------------------------------------
    def __getitem__(self, name: str) -> str:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...
    def get(self, name: str, /, default: object = None) -> object:
        return self._fields.get(name, default)

    # -- value semantics -----------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Context):
            return self._fields == other._fields and self._request == other._request
        if isinstance(other, Mapping):
            return self._fields == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((frozenset(self._fields.items()), self._request))
        return self._hash

    def __repr__(self) -> str:
        policy = active()
        shown = {
            name: MASK if policy.is_sensitive(name) else value
            for name, value in self._fields.items()
        }
        if self._request is None:
            return f"Context({shown!r})"
        return f"Context({shown!r}, request={self._request!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Across processes the deadline travels as the time remaining (a
        # monotonic instant means nothing in another process), and a
        # cancelled request as none left.
        remaining = None
        if self._deadline is not None:
            remaining = max(0.0, self._deadline - _monotonic())
        if self._cancel is not None and self._cancel.cancelled:
            remaining = 0.0
        return (_unpickle, (dict(self._fields), self._request, remaining))

    def __copy__(self) -> Context:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Context:
        return self

    # -- changes -------------------------------------------------------------
    @property
    def request(self) -> RequestSnapshot | None:
        """The inbound request's snapshot, set by the web middleware."""
        return self._request

    def set(self, fields: Mapping[str, str] | None = None, /, **more: str) -> Context:
        """A new context with ``fields`` (and keyword fields) added or replaced.

        Names that are not valid Python identifiers (``x-gray``) go in the
        positional mapping.  Raises ``TypeError``/``ValueError`` naming the
        bad field.
        """
        new = dict(self._fields)
        if fields:
            new.update(_validated(fields))
        if more:
            new.update(_validated(more))
        return self._same_work(Context._make(new, self._request))

    def remove(self, *names: str) -> Context:
        """A new context without ``names``; names not present are ignored."""
        new = {name: value for name, value in self._fields.items() if name not in names}
        return self._same_work(Context._make(new, self._request))

    def with_request(self, request: RequestSnapshot | None) -> Context:
        """A new context carrying ``request`` as its snapshot (or none)."""
        if request is not None and not isinstance(request, RequestSnapshot):
            raise TypeError(f"expected a RequestSnapshot, got {type(request).__name__}")
        return self._same_work(Context._make(self._fields, request))


def _unpickle(fields: dict[object, object], request: object, remaining: object = None) -> Context:
    # Validated on arrival: a pickle from another process is input, too.
    clean = sanitize(fields.items(), source="a pickled Context")
    if request is not None and not isinstance(request, RequestSnapshot):
        _log.warning("ctxrelay: dropped a request snapshot of type %s", type(request).__name__)
        request = None
    ctx = Context._make(clean, request)
    if remaining is not None:
        if type(remaining) in (int, float) and 0.0 <= remaining <= 86400.0:  # type: ignore[operator]
            ctx._deadline = _monotonic() + float(remaining)  # type: ignore[arg-type]
        else:
            _log.warning("ctxrelay: dropped a pickled deadline that is not a time remaining")
    return ctx


class Cancellation:
    """The cancellation of one request, shared by all the work done for it.

    The web door makes one per request (with ``timeout=``) and cancels it
    when the client disconnects; :func:`ctxrelay.checkpoint` and
    :func:`ctxrelay.cancelled` read it from any thread the context reached.
    """

    __slots__ = ("cancelled", "reason")

    def __init__(self) -> None:
        self.cancelled = False
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        """Mark the request cancelled (idempotent; the first reason stays)."""
        if not self.cancelled:
            self.reason = reason
            self.cancelled = True

    def __repr__(self) -> str:
        return f"<Cancellation {'cancelled: ' + self.reason if self.cancelled else 'active'}>"


#: The stamp of a hand-off's capture: it never sees later changes to its
#: request's scope (work already handed off keeps what it captured).
FROZEN = sys.maxsize


class RequestScope:
    """The fields a request's own work added for the rest of the request.

    One per request, made by the web door and shared by every context of
    that request, the way its :class:`Cancellation` is.  A write
    (:func:`bind_request`, or a ``bind()`` held open across a ``yield`` in
    sync code) adds a layer and bumps ``version``; a context whose stamp is
    older sees the newer layers on top of its own fields when it is read
    (:func:`current`), in every copy of the request's ``contextvars``
    context.  Contexts themselves never change: a read makes a new value.

    Written under one lock (writes are rare: a dependency, a
    ``before_request``); read without one.  ``overlay`` is replaced whole,
    before ``version``, so a reader that sees a version sees at least that
    overlay.
    """

    # No __slots__ and no __init__: a request pays for one bare object, and
    # these class attributes are the defaults until the first write.
    version: int = 0
    #: name -> (value, version it was written at, owner); the latest wins.
    overlay: Mapping[str, tuple[str, int, object]] = {}
    #: The open promoted scopes' fields, by owner: what a withdrawal falls
    #: back to.  Request-level writes (owner None) need no layer: they stay.
    layers: Mapping[object, tuple[int, dict[str, str]]] = {}
    #: name -> (value, version) of the request-level writes.
    lasting: Mapping[str, tuple[str, int]] = {}
    #: id(context) -> (context, its view at ``version``): reads between writes.
    views: dict[int, tuple[Context, Context]] | None = None

    def write(self, fields: dict[str, str], owner: object = None) -> int:
        """Add ``fields`` (for the request, or until ``owner`` withdraws);
        the new version."""
        with _SCOPE_LOCK:
            version = self.version + 1
            overlay = dict(self.overlay)
            for name, value in fields.items():
                overlay[name] = (value, version, owner)
            if owner is None:
                lasting = dict(self.lasting)
                for name, value in fields.items():
                    lasting[name] = (value, version)
                self.lasting = lasting
            else:
                self.layers = {**self.layers, owner: (version, fields)}
            self.views = None
            self.overlay = overlay
            self.version = version
            return version

    def withdraw(self, owner: object) -> None:
        """End ``owner``'s fields: each name it still sets goes back to the
        latest other write of it, if any (as a new write)."""
        with _SCOPE_LOCK:
            layers = dict(self.layers)
            if layers.pop(owner, None) is None:
                return
            version = self.version + 1
            overlay = dict(self.overlay)
            for name, entry in self.overlay.items():
                if entry[2] is not owner:
                    continue  # written again since, by someone else
                del overlay[name]
                best: tuple[int, str, object] | None = None
                if name in self.lasting:
                    value, at = self.lasting[name]
                    best = (at, value, None)
                for who, (at, fields) in layers.items():
                    if name in fields and (best is None or at > best[0]):
                        best = (at, fields[name], who)
                if best is not None:
                    overlay[name] = (best[1], version, best[2])
            self.layers = layers
            self.views = None
            self.overlay = overlay
            self.version = version

    def view(self, ctx: Context) -> Context:
        """``ctx`` with the layers written after its stamp on top."""
        version = self.version  # before overlay: see the class docstring
        views = self.views
        if views is not None:
            hit = views.get(id(ctx))
            if hit is not None and hit[0] is ctx and hit[1]._stamp >= version:
                return hit[1]
        stamp = ctx._stamp
        newer = {name: entry[0] for name, entry in self.overlay.items() if entry[1] > stamp}
        fields = {**ctx._fields, **newer} if newer else ctx._fields
        new = ctx._same_work(Context._make(fields, ctx._request))
        new._base = ctx._base
        new._stamp = version
        if views is None or len(views) >= _MAX_VIEWS:
            views = self.views = {}
        views[id(ctx)] = (ctx, new)
        return new

    def frozen(self, ctx: Context) -> Context:
        """``ctx`` as it reads now, never to see a later write: a capture."""
        now = self.view(ctx) if self.version > ctx._stamp else ctx
        new = now._same_work(Context._make(now._fields, now._request))
        # On top of what it froze: root_of() still finds the request's own
        # context (strict mode's thread watch), and keeps it alive.
        new._base = ctx
        new._stamp = FROZEN
        return new


_SCOPE_LOCK = threading.Lock()
# Views cached per scope between two writes (a request reads a handful of
# contexts; the bound keeps a hostile loop of binds from growing it).
_MAX_VIEWS = 64


class _Amended(Context):
    """What :func:`bind_request` binds in a captured flow (a pool task):
    the context it replaced plus the fields.  Transparent to the scope
    exits: a ``with`` block it was written in ends as if it were not there."""

    __slots__ = ()


EMPTY = Context()

#: What ``detached()`` binds: empty, and a distinct object, so that a thread
#: or process started while it is current starts from an empty
#: ``contextvars.Context`` (no other library's variables either).
DETACHED = Context._make({}, None)

_CURRENT: ContextVar[Context] = ContextVar("ctxrelay.context", default=EMPTY)


def current() -> Context:
    """The context bound here; an empty ``Context`` when none is.

    In a request, it includes what the request's work added to its scope
    (:func:`bind_request`) since the context was bound, whichever thread
    or copy of the context added it.
    """
    ctx = _CURRENT.get()
    scope = ctx._scope
    if scope is None or scope.version <= ctx._stamp:
        return ctx
    return scope.view(ctx)


@overload
def get(name: str) -> str | None: ...
@overload
def get(name: str, default: str) -> str: ...
@overload
def get(name: str, default: _T) -> str | _T: ...
def get(name: str, default: object = None) -> object:
    """One field of :func:`current`, or ``default``."""
    # current()'s read, inlined here and in request_id(): no frame per read.
    ctx = _CURRENT.get()
    scope = ctx._scope
    if scope is not None and scope.version > ctx._stamp:
        ctx = scope.view(ctx)
    return ctx._fields.get(name, default)


def request_id() -> str | None:
    """The current request id, or ``None`` outside a request."""
    ctx = _CURRENT.get()
    scope = ctx._scope
    if scope is not None and scope.version > ctx._stamp:
        ctx = scope.view(ctx)
    return ctx._fields.get(REQUEST_ID)


def request() -> RequestSnapshot | None:
    """The current request's snapshot, or ``None`` outside a request."""
    return _CURRENT.get()._request


class Scope:
    """What :func:`bind`, :func:`use` and :func:`detached` return: a context
    manager that binds a context for a ``with`` block and resets it by token
    on exit -- and a decorator (``@ctxrelay.bind(job="nightly")``) that binds
    afresh around each call of a function or coroutine function.

    The reset is by token, never by setting an "empty" value, so nested and
    interleaved scopes restore exactly what was there (asgi-correlation-id
    #100 broke Celery autoretry logging by doing ``set(None)``).

    A scope only ever restores what it replaced, in the context it was
    entered in.  Exited anywhere else -- a generator holding ``with bind()``
    closed by another request or finalized by the garbage collector in
    whatever context happens to be current -- it leaves the current context
    exactly as it is: writing its saved value there would hand one
    request's whole context to another request's code.  See :func:`_exit`.
    """

    __slots__ = ("_ctx", "_token")

    _ctx: Context | None
    _token: Token[Context] | None

    def __enter__(self) -> Context:
        raise NotImplementedError

    def _fresh(self) -> Scope:
        raise NotImplementedError

    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate ``fn``: each call runs inside a fresh copy of this scope
        (structlog's ``bound_contextvars``), sync or ``async def``."""
        if not callable(fn):
            raise TypeError(f"a ctxrelay scope decorates a callable, not {type(fn).__name__}")
        self._mark_used()  # as a decorator: never entered itself
        fresh = self._fresh
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def bound_async(*args: Any, **kwargs: Any) -> Any:
                with fresh():
                    return await fn(*args, **kwargs)

            return bound_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def bound(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with fresh():
                return fn(*args, **kwargs)

        return bound

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is None:
            return
        self._token = None
        if _CURRENT.get() is self._ctx:
            try:
                _CURRENT.reset(token)  # the common case: last in, first out
                return
            except ValueError:
                pass  # a copy of the context it was entered in: foreign
        _exit(token, self)

    def _mark_used(self) -> None:
        self._ctx = None

    def __del__(self) -> None:
        # A bare ``ctxrelay.bind(user=...)`` statement (structlog's
        # bind_contextvars habit) binds nothing: say so at once, as CPython
        # does for a coroutine that was never awaited.  _ctx is set on
        # enter (and by the decorator); only a never-used scope lacks it.
        if self._ctx is _UNUSED:
            _never_entered("bind")


class _Bind(Scope):
    """``bind()``: the current context plus some fields."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields
        self._token = None
        self._ctx = _UNUSED

    def _fresh(self) -> Scope:
        return _BIND(self._fields)

    def __enter__(self) -> Context:
        if self._token is not None:
            raise RuntimeError("this ctxrelay scope is already entered; call bind()/use() again")
        base = _CURRENT.get()
        if base._scope is not None:
            return _enter_scoped(self, base, base._scope)
        fields = self._fields
        if base._fields:
            fields = {**base._fields, **fields}
        # Context values never mutate their dict, so an unchanged one is
        # shared.  Context._make inlined: a frame less on every bind.
        ctx = _new(Context)
        ctx._fields = fields
        ctx._request = base._request
        ctx._hash = None
        ctx._base = base
        ctx._deadline = base._deadline
        ctx._cancel = base._cancel
        ctx._scope = None
        ctx._stamp = 0
        self._ctx = ctx
        self._token = _CURRENT.set(ctx)
        return ctx


_new = object.__new__


class _Use(Scope):
    """``use()``: another owner's context (a message's, a job's), as it is."""

    __slots__ = ("_otel",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._token = None
        self._otel: Token[object] | object | None = _UNUSED

    def _mark_used(self) -> None:
        self._otel = None

    def __del__(self) -> None:
        if self._otel is _UNUSED:
            _never_entered("detached" if self._ctx is DETACHED else "use")

    def _fresh(self) -> Scope:
        return _USE(self._ctx)  # type: ignore[arg-type]  # set in __init__

    def __enter__(self) -> Context:
        if self._token is not None:
            raise RuntimeError("this ctxrelay scope is already entered; call bind()/use() again")
        self._otel = None
        if _modules.get("opentelemetry.trace") is not None:
            # Note OpenTelemetry's span as it is now: a stale one (a thread
            # started during another request) must not speak for this context.
            self._otel = note_use()
        ctx: Context = self._ctx  # type: ignore[assignment]  # set in __init__
        scope = ctx._scope
        if scope is not None and ctx._stamp != FROZEN:
            # A context of a request, handed over by hand: it is bound as
            # it reads now, and keeps that (as every capture does).
            self._ctx = ctx = scope.frozen(ctx)
        self._token = _CURRENT.set(ctx)
        return ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel = self._otel
        if otel is not None and otel is not _UNUSED and self._token is not None:
            end_use(otel)  # type: ignore[arg-type]  # a Token from note_use()
            self._otel = None
        Scope.__exit__(self, exc_type, exc, tb)


_modules = sys.modules


def enter(ctx: Context) -> Token[Context]:
    """Make ``ctx`` current; undo with :func:`leave` and the token.

    The package's one way to bind a context outside a ``bind()``/``use()``
    scope: the web doors, the queue workers, a step of a streamed body.
    """
    return _CURRENT.set(ctx)


def leave(token: Token[Context]) -> None:
    """Undo :func:`enter`: restore what was current before, by token.

    In another ``contextvars.Context`` than the one :func:`enter` ran in (a
    coroutine finalized by the GC elsewhere), the token cannot reset: the
    current context is left exactly as it is, the place is reported once, and
    nothing is raised into the host (the "No leak, ever" rule).
    """
    try:
        _CURRENT.reset(token)
    except ValueError:
        _report_exit("foreign-exit", "in another context than it was entered in")


#: :func:`current` for the package's hot paths (a log filter per record).
read_current = current

#: The bound context as it is on the stack, without the request scope's
#: later writes: for the scope machinery and the hand-off captures only.
raw_current = _CURRENT.get


def narrowed(
    ctx: Context,
    deadline: float | None,
    cancel: Cancellation | None = None,
    *,
    keep_deadline: bool = True,
) -> Context:
    """``ctx`` as a new context of the same unit of work whose deadline is
    the earlier of its own and ``deadline`` (a monotonic instant; ``None``:
    unchanged), and whose cancellation is ``cancel`` when given.
    ``keep_deadline=False`` drops the deadline and the cancellation (work
    that must outlive its request).  The new context is bound on top of
    ``ctx`` (``_base``), as a ``bind()`` would be."""
    new = Context._make(ctx._fields, ctx._request)
    new._base = ctx._base if ctx._base is not None else ctx
    new._scope = ctx._scope
    new._stamp = ctx._stamp
    if keep_deadline:
        own = ctx._deadline
        earlier = own is None or (deadline is not None and deadline < own)
        new._deadline = deadline if earlier else own
        new._cancel = cancel if cancel is not None else ctx._cancel
    return new


def make_context(fields: dict[str, str], request: RequestSnapshot | None) -> Context:
    """A ``Context`` of already-validated ``fields`` (no copy, no checks).

    For the package's trusted producers only (the door, ``extract``): the
    dict becomes the context's own and must never be changed afterwards.
    """
    return Context._make(fields, request)


def begin(ctx: Context) -> Token[Context]:
    """:func:`enter` for the start of a unit of work: a request at a door, a
    task or job in a worker.  In strict mode it reports a unit that starts
    with a context already bound (something leaked from earlier work)."""
    if _STRICT.on:
        _check_start(ctx)
    return _CURRENT.set(ctx)


def finish(token: Token[Context], ctx: Context) -> None:
    """:func:`leave` at the end of a unit of work begun with :func:`begin`."""
    try:
        _CURRENT.reset(token)  # leave(), inlined: a frame less per request
    except ValueError:
        _report_exit("foreign-exit", "in another context than it was entered in")
    if _STRICT.on:
        _strict.note_ended(ctx)


def _check_start(ctx: Context) -> None:
    leaked = _CURRENT.get()
    if not (leaked._fields or leaked._request is not None):
        if _strict.sample():
            _strict.note_bound(ctx, _strict.site(2))  # the door or worker
        return
    here = _strict.site(2)
    if here is not None:
        _strict.report(
            "dirty-start",
            "a request, task or job started with a context already bound on its thread or "
            "task: it leaked from earlier work (a scope that was never exited, a service "
            "thread started inside a request)",
            started=here,
            bound=_strict.bound_at(leaked) or _strict.bound_at(root_of(leaked)),
        )


def root_of(ctx: Context) -> Context:
    """The outermost context ``ctx`` was bound on top of (its request's, usually)."""
    for _ in range(_MAX_UNWIND):
        base = ctx._base
        if base is None or not (base._fields or base._request is not None):
            return ctx
        ctx = base
    return ctx


class _StrictBind(_Bind):
    """``bind()`` in strict mode: remembers where it was entered (sampled),
    and notes when an outermost one ends (its unit of work ended).

    ``_site`` is set only when sampled; an unset slot reads as None through
    ``getattr``.  The bodies of ``_Bind.__enter__`` and ``Scope.__exit__``
    are repeated here on purpose: a call to them would cost every entry
    while strict mode is on (the staging rate's budget is 10%).
    """

    __slots__ = ("_site",)

    def __enter__(self) -> Context:
        if self._token is not None:
            raise RuntimeError("this ctxrelay scope is already entered; call bind()/use() again")
        base = _CURRENT.get()
        if base._scope is not None:
            ctx = _enter_scoped(self, base, base._scope)
        else:
            fields = self._fields
            if base._fields:
                fields = {**base._fields, **fields}
            ctx = Context._make(fields, base._request)
            ctx._base = base
            ctx._deadline = base._deadline
            ctx._cancel = base._cancel
            self._ctx = ctx
            self._token = _CURRENT.set(ctx)
        if _STRICT.tick() == 0:  # sampled: every Nth entry, N = 1 / rate
            self._site = site = _strict.site(1)
            _strict.note_bound(ctx, site)
        return ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is None:
            return
        self._token = None
        ctx = self._ctx
        if _CURRENT.get() is ctx:
            try:
                _CURRENT.reset(token)
            except ValueError:
                _exit(token, self)
        else:
            _exit(token, self)
        if _WATCHED and id(ctx) in _WATCHED:
            _strict.note_ended(ctx)  # a thread was seen starting with it: it ended


class _StrictUse(_Use):
    """``use()`` in strict mode: remembers where it was entered (sampled)."""

    __slots__ = ("_site",)

    def __enter__(self) -> Context:
        ctx = _Use.__enter__(self)
        if _STRICT.tick() == 0:
            self._site = site = _strict.site(1)
            _strict.note_bound(ctx, site)
        return ctx


def _enter_scoped(
    scope: _Bind, base: Context, shared: RequestScope, promote: bool = False
) -> Context:
    """``bind()`` entered in a request: on top of what the request's scope
    reads now; ``promote``: also written to the scope, for the rest of the
    request's work to see until the block exits (see :class:`_PromotedBind`)."""
    now = shared.view(base) if shared.version > base._stamp else base
    fields = scope._fields
    if now._fields:
        fields = {**now._fields, **fields}
    ctx = Context._make(fields, now._request)
    ctx._base = base  # the stack, for the exits: what was bound, not a view
    ctx._deadline = now._deadline
    ctx._cancel = now._cancel
    ctx._scope = shared
    ctx._stamp = now._stamp
    if promote and now._stamp != FROZEN:  # a hand-off's capture stays to itself
        ctx._stamp = shared.write(scope._fields, scope)
    scope._ctx = ctx
    scope._token = _CURRENT.set(ctx)
    return ctx


class _PromotedBind(_Bind):
    """``bind()`` held by a sync generator inside a request.

    fastapi #953, starlette-context #146: a sync dependency's generator is
    entered in one worker thread's copy of the request's context and exited
    in another's, so what it bound never reached the endpoint.  This scope
    also writes its fields to the request's scope until it exits: every
    later step of the request sees them, in whatever copy it runs.  Its
    exit withdraws them and, where it runs in another copy than it was
    entered in (the expected case), leaves that copy as it is, unreported.
    A hand-off's frozen capture keeps the plain ``bind()`` behaviour.
    """

    __slots__ = ()

    def _fresh(self) -> Scope:
        return _PromotedBind(self._fields)

    def __enter__(self) -> Context:
        if self._token is not None:
            raise RuntimeError("this ctxrelay scope is already entered; call bind()/use() again")
        base = _CURRENT.get()
        shared = base._scope
        if shared is None:  # created in a request, entered outside one
            return _Bind.__enter__(self)
        return _enter_scoped(self, base, shared, promote=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._token
        if token is None:
            return
        self._token = None
        ctx = self._ctx
        shared = ctx._scope if ctx is not None else None
        if shared is not None:
            shared.withdraw(self)
        _exit(token, self, quiet=True)


_GENERATOR = inspect.CO_GENERATOR
_getframe = sys._getframe

_STRICT = _strict.STATE
_WATCHED = _strict.WATCHED


# The scope classes bind()/use() make: swapped for the strict ones while
# strict mode is on, so that off it costs nothing at all.
_BIND: type[_Bind] = _Bind
_USE: type[_Use] = _Use


def _switch_strict(on: bool) -> None:
    global _BIND, _USE
    _BIND, _USE = (_StrictBind, _StrictUse) if on else (_Bind, _Use)


def _exit(token: Token[Context], scope: Scope, quiet: bool = False) -> None:
    """The rare exits: out of order, or where the scope's context is not bound.

    A scope may restore only while its own context ``ctx`` is still on the
    stack of what is bound here: ``ctx`` itself, or below the current
    context (scopes entered inside it link to what they replaced, through
    ``Context._base``).

    * ``ctx`` is below the current context, in the context it was entered
      in: scopes entered after it are still open (two generators closed in
      the order they were opened).  Restore by token: ending a scope ends
      what was bound inside it.  The inner scopes' exits then find their
      contexts gone and leave.
    * Otherwise -- in another ``contextvars.Context`` (``reset`` refuses the
      token), or after the state was unwound and something else bound (a
      generator finalized by the GC while a later request runs on the same
      WSGI thread) -- leave the current context exactly as it is.  The old
      rule set the saved value there, and a generator closed during request
      B installed request A's context, cookie included, into B's code.

    What :func:`bind_request` bound on top of ``ctx`` in a captured flow
    (an ``_Amended`` context) is not a scope of its own: the exit sees
    through it.  ``quiet``: a scope written to its request's scope, whose
    exit in another copy of the request's context is the expected case.

    Reported once per place, never raised into the host.
    """
    ctx = scope._ctx
    top = _CURRENT.get()
    for _ in range(_MAX_UNWIND):
        if type(top) is not _Amended:
            break
        top = top._base  # type: ignore[assignment]  # an _Amended always has one
    if top is ctx:
        try:
            _CURRENT.reset(token)
            return
        except ValueError:
            pass  # a copy of the context it was entered in: foreign
    else:
        below = top._base
        for _ in range(_MAX_UNWIND):
            if below is None:
                break
            if below is ctx:
                try:
                    _CURRENT.reset(token)
                except ValueError:
                    break
                if not quiet:
                    _report_exit(
                        "out-of-order", "while a scope entered inside it was still open", scope
                    )
                return
            below = below._base
    if quiet:
        return
    _report_exit(
        "foreign-exit",
        "in another context than it was entered in, or after its context was unbound",
        scope,
    )


# How far _exit follows the chain of enclosing contexts (nesting depth).
_MAX_UNWIND = 64
_reported: set[tuple[str, int]] = set()
_REPORTED_MAX = 1024


_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _exited_at(frame: FrameType) -> _strict.Site | None:
    # A generator's scope is exited by whoever closed (or resumed) it: the
    # frame above; a function's, on its own with statement.
    if frame.f_code.co_flags & _SUSPENDABLE:
        return _strict.site_of(frame.f_back)
    return _strict.site_of(frame)


def _report_exit(kind: str, how: str, scope: Scope | None = None) -> None:
    try:
        # Up past ctxrelay's own exit frames to the frame of the with
        # statement (where the scope was entered: its exit runs on that line),
        # or to the caller of leave().
        frame = sys._getframe(1)
        while frame.f_code in _EXIT_CODES and frame.f_back is not None:
            frame = frame.f_back
        where = (frame.f_code.co_filename, frame.f_lineno)
        if _strict.STATE.on:
            entered = getattr(scope, "_site", None) or _strict.site_of(frame)
            _strict.report(
                kind,
                f"a bind()/use() scope was exited {how}; the current context was left as it "
                "is.  Close the generator that holds it where it runs, or hand the work off "
                "with ctxrelay.wrap(); sync code that sets a field for the rest of a request "
                "calls ctxrelay.bind_request(...)",
                entered=entered,
                exited=_exited_at(frame) if scope is not None else None,
            )
            return
        if where in _reported:
            return
        if len(_reported) < _REPORTED_MAX:
            _reported.add(where)
        _log.warning(
            "ctxrelay: a bind()/use() scope entered at %s:%d (in %s) was exited %s; "
            "the current context was left as it is.  Typical cause: a generator "
            "holding the scope was closed by other code or by the garbage collector; "
            "close it where it runs, or hand the work off with ctxrelay.wrap().  Sync "
            "code that sets a field for the rest of a request (a dependency, a hook) "
            "calls ctxrelay.bind_request(...) instead",
            where[0],
            where[1],
            frame.f_code.co_name,
            how,
            extra={"ctxrelay_report": {"kind": kind, "file": where[0], "line": where[1]}},
        )
    except Exception:  # reporting must never raise into the host (GC, __exit__)
        pass


def bind(fields: Mapping[str, str] | None = None, /, **more: str) -> Scope:
    """Context manager: ``fields`` are bound inside the block.

    The fields are validated here, so a bad one raises at the call site.  On
    exit the previous context is restored, whatever happened in the block.
    """
    for name, value in more.items():  # ``more`` is our own fresh dict: no copy
        # validate_field's fast path, inlined: a name seen before and a short
        # printable str need no call.
        if (
            type(value) is not str
            or name not in _known_names
            or len(value) > _SHORT
            or not value.isprintable()
        ):
            validate_field(name, value)
    if fields:
        more = {**_validated(fields), **more}
    if _CURRENT.get()._scope is not None and _getframe(1).f_code.co_flags & _GENERATOR:
        # In a request, held by a sync generator: a FastAPI sync dependency
        # that yields, a contextmanager (see _PromotedBind).  ``with``
        # binds __exit__ before __enter__ runs: the class is chosen here.
        return _PromotedBind(more)
    # _BIND(more) without its __init__ frame.
    scope = _new(_BIND)
    scope._fields = more
    scope._token = None
    scope._ctx = _UNUSED
    return scope


# validate_field's fast-path length bound for a value (UTF-8 is at most 4
# bytes a character).
_SHORT = MAX_VALUE_BYTES // 4


def detached() -> Scope:
    """Context manager: no fields inside the block, and nothing of the
    request reaches what the block starts.

    For long-lived work that must not belong to the request that happens to
    start it: a library's service thread started lazily (a pub/sub listener,
    a scheduler, a metrics server), a process pool created on first use.
    Inside the block ``current()`` is empty; a thread or process started
    there (``instrument()``'d or a ctxrelay drop-in) starts from an empty
    ``contextvars.Context``, with no other library's variables either.
    ``bind()`` inside the block binds afresh on top of nothing.
    """
    return _USE(DETACHED)


def use(ctx: Context) -> Scope:
    """Context manager: make ``ctx`` (from :func:`extract`, a message, ...) current."""
    if not isinstance(ctx, Context):
        raise TypeError(f"use() takes a ctxrelay.Context, not {type(ctx).__name__}")
    return _USE(ctx)


def bind_request(fields: Mapping[str, str] | None = None, /, **more: str) -> None:
    """Add ``fields`` to the current request for the rest of its work.

    Not a ``with`` block: for code that cannot wrap what comes after it, such
    as a sync FastAPI dependency without ``yield``, a Flask
    ``before_request`` hook, a Django middleware's ``process_view``, or an
    endpoint that sets something for a background task or for the door's
    request log line.  Later steps of the same request see the fields,
    from any thread and in any copy of its context: the endpoint, later
    dependencies, background tasks, pool tasks and threads handed off
    after the call, outgoing calls, queue messages, log lines.  Work handed
    off before the call keeps what it captured; other requests never see
    them.  A field a later ``bind()`` sets wins inside that block, as
    usual; the fields end with the request.

    Validated as :func:`bind` validates (``TypeError``/``ValueError``
    naming the field).  Outside a request (no web door bound one) it raises
    ``RuntimeError``: use ``with ctxrelay.bind(...)`` there.
    """
    for name, value in more.items():
        validate_field(name, value)
    if fields:
        more = {**_validated(fields), **more}
    raw = _CURRENT.get()
    shared = raw._scope
    if shared is None:
        raise RuntimeError(
            "ctxrelay.bind_request() works inside a request that a ctxrelay door opened "
            "(RelayMiddleware, the aiohttp and gRPC servers) and inside a job a ctxrelay "
            "queue worker runs; elsewhere bind fields for a block with "
            "`with ctxrelay.bind(...)`"
        )
    if not more:
        return
    now = shared.view(raw) if shared.version > raw._stamp else raw
    version = shared.write(more)
    # Where it runs, the write is bound at once: reads here then need no
    # view, and a captured flow (a pool task: FROZEN, which never sees the
    # scope's later writes) sees its own.  A bare set, reset by whatever
    # token bound the request here (the door's, a worker thread's copy
    # dropped); scopes exiting see through it (_Amended).
    ctx = now._same_work(_Amended._make({**now._fields, **more}, now._request))
    ctx._base = raw
    # Up to date when no other write came between (else a read catches up).
    ctx._stamp = version if now._stamp == version - 1 else now._stamp
    _CURRENT.set(ctx)


def capture() -> contextvars.Context:
    """``contextvars.copy_context()`` for a hand-off: in a request, the
    ctxrelay context in the copy is frozen as it reads now, so the work
    keeps what it captured when the request's scope changes later."""
    ctx = _CURRENT.get()
    shared = ctx._scope
    copy = _copy_context()
    if shared is not None and ctx._stamp != FROZEN:
        copy.run(_CURRENT.set, shared.frozen(ctx))
    return copy


def make_request_context(fields: dict[str, str], request: RequestSnapshot | None) -> Context:
    """:func:`make_context` for a request at a web door: with a fresh
    request scope, which :func:`bind_request` writes to."""
    ctx = _new(Context)  # Context._make inlined: a frame less per request
    ctx._fields = fields
    ctx._request = request
    ctx._hash = None
    ctx._base = None
    ctx._deadline = None
    ctx._cancel = None
    ctx._scope = RequestScope()
    ctx._stamp = 0
    return ctx


def with_scope(ctx: Context) -> Context:
    """``ctx`` as the context of a unit of work of its own (a queue job):
    with a fresh request scope, which :func:`bind_request` writes to, unless
    it already has one (an eager task run inside a request)."""
    if ctx._scope is not None:
        return ctx
    new = ctx._same_work(Context._make(ctx._fields, ctx._request))
    new._base = ctx._base
    new._scope = RequestScope()
    return new


def _never_entered(what: str) -> None:
    # Not contextlib.suppress: at interpreter shutdown, a module global may
    # already be gone when __del__ runs.
    try:  # noqa: SIM105
        warnings.warn(
            f"ctxrelay.{what}() was called but never entered, so it bound nothing.  Use it "
            f"as `with ctxrelay.{what}(...):` or as a decorator; to add fields for the "
            "rest of a request without a block, call ctxrelay.bind_request(...)",
            RuntimeWarning,
            stacklevel=3,
        )
    except Exception:  # __del__: never raise into the host
        pass


_copy_context = contextvars.copy_context


# Frames of ctxrelay's own scope exits, skipped to find the with statement.
_EXIT_CODES = frozenset(
    {
        Scope.__exit__.__code__,
        _Use.__exit__.__code__,
        _StrictBind.__exit__.__code__,
        _PromotedBind.__exit__.__code__,
        _exit.__code__,
        _report_exit.__code__,
        leave.__code__,
        finish.__code__,
    }
)

_strict.set_context_probe(lambda: bool(_CURRENT.get()._fields))
_strict.on_switch(_switch_strict)
