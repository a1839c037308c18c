"""Deadlines and cancellation that follow the work.

The time a request has left is part of its context, so it crosses every
boundary the context crosses: pools and threads (with the capture), other
processes and queue messages (as the time *remaining*, re-read against the
receiver's own clock: an absolute timestamp would break under clock skew, as
talisker's did), and downstream calls (a header, by policy).  It only ever
shrinks: :func:`deadline` narrows, an inbound header narrows, nothing widens
(gRPC's ``min(own, inherited)`` at every hop).

In process a deadline is a ``time.monotonic()`` instant.  The cancellation
of a request (the client went away) is one shared flag that every piece of
work for that request can check cheaply, from sync code too.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from contextvars import Token
from time import monotonic
from types import TracebackType
from typing import Any

from ._context import Cancellation, Context, enter, leave, narrowed, raw_current, read_current

__all__ = [
    "DeadlineExceeded",
    "RequestCancelled",
    "cancelled",
    "call_deadline",
    "check_timeout",
    "checkpoint",
    "deadline",
    "deadline_of",
    "expired",
    "for_request",
    "log_if_late",
    "new_cancellation",
    "parse_remaining_ms",
    "remaining",
    "remaining_ms",
    "run_unless_expired",
    "without_deadline",
]


class DeadlineExceeded(TimeoutError):
    """The work's deadline passed (``ctxrelay.deadline``, a door's ``timeout=``,
    or a deadline that arrived with the request or message)."""


class RequestCancelled(Exception):
    """The request this work is done for was cancelled (the client went away)."""


def remaining() -> float | None:
    """Seconds left before the current deadline (0.0 once it passed), or
    ``None`` when there is no deadline."""
    at = read_current()._deadline
    return None if at is None else max(0.0, at - monotonic())


def remaining_ms(ctx: Context) -> int | None:
    """Whole milliseconds left before ``ctx``'s deadline (0 once passed, or if
    its request was cancelled); ``None`` without a deadline.  What travels."""
    at = ctx._deadline
    if at is None:
        return None
    if ctx._cancel is not None and ctx._cancel.cancelled:
        return 0
    return max(0, math.floor((at - monotonic()) * 1000))


def expired(ctx: Context) -> BaseException | None:
    """The error work for ``ctx`` must fail with instead of running, or None."""
    at = ctx._deadline
    if at is not None and monotonic() >= at:
        return DeadlineExceeded("the deadline passed")
    cancel = ctx._cancel
    if cancel is not None and cancel.cancelled:
        return RequestCancelled(f"the request was cancelled ({cancel.reason})")
    return None


def cancelled() -> bool:
    """True when the current request was cancelled or its deadline passed.

    Cheap enough to call in a loop from sync code (two attribute reads and a
    clock read)."""
    ctx = read_current()
    cancel = ctx._cancel
    if cancel is not None and cancel.cancelled:
        return True
    at = ctx._deadline
    return at is not None and monotonic() >= at


def checkpoint() -> None:
    """Raise :class:`DeadlineExceeded` or :class:`RequestCancelled` when the
    current work should stop; return otherwise.  For sync code's loops."""
    error = expired(read_current())
    if error is not None:
        raise error


def parse_remaining_ms(value: object, cap_seconds: float) -> float | None:
    """Seconds from a remaining-milliseconds header value, or None when it is
    malformed (not 1-12 ASCII digits).  Capped at ``cap_seconds``."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not (0 < len(text) <= 12 and text.isascii() and text.isdigit()):
        return None
    return min(int(text) / 1000.0, cap_seconds)


class _DeadlineScope:
    """``with ctxrelay.deadline(s):`` narrows; ``async with`` also enforces."""

    __slots__ = ("_cancel_handle", "_fired", "_seconds", "_task", "_token")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._token: Token[Context] | None = None
        self._cancel_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._fired = False

    def __enter__(self) -> float | None:
        if self._token is not None:
            raise RuntimeError("this deadline scope is already entered")
        base = read_current()
        at = None if self._seconds is None else monotonic() + self._seconds
        self._token = enter(narrowed(base, at))
        return remaining()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            leave(token)

    async def __aenter__(self) -> float | None:
        left = self.__enter__()
        task = asyncio.current_task()
        if task is not None and left is not None:
            # Every await inside the block times out at the deadline: the
            # task is cancelled then, and the cancellation becomes
            # DeadlineExceeded on the way out (asyncio.timeout's shape, also
            # on Python 3.10).
            self._task = task
            self._cancel_handle = asyncio.get_running_loop().call_later(left, self._fire)
        return left

    def _fire(self) -> None:
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel("ctxrelay deadline")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle, self._cancel_handle = self._cancel_handle, None
        if handle is not None:
            handle.cancel()
        self.__exit__(exc_type, exc, tb)
        fired, self._fired = self._fired, False
        task, self._task = self._task, None
        if fired and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None and uncancel() > 0:
                return  # cancelled from elsewhere as well: let it through
            raise DeadlineExceeded("the deadline passed") from exc


def deadline(seconds: float | None = None) -> _DeadlineScope:
    """Context manager: the work inside must be done within ``seconds``.

    It only ever narrows: inside, the deadline is the earlier of the one in
    force and ``seconds`` from now.  ``with`` binds it (sync code checks it
    with :func:`checkpoint`; pools, processes, queues and downstream calls
    see it); ``async with`` also cancels the block's awaits at the deadline,
    raising :class:`DeadlineExceeded`.  ``deadline()`` without seconds
    enforces the deadline already in force (``async with``).  The block's
    value is the time remaining.
    """
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"deadline() takes seconds as a number, not {type(seconds).__name__}")
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"deadline() takes seconds >= 0, not {seconds!r}")
    return _DeadlineScope(None if seconds is None else float(seconds))


class _Without:
    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token: Token[Context] | None = None

    def __enter__(self) -> Context:
        ctx = narrowed(read_current(), None, keep_deadline=False)
        self._token = enter(ctx)
        return ctx

    def __exit__(self, *exc: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            leave(token)


def without_deadline() -> _Without:
    """Context manager: keep the request's fields, drop its deadline and its
    cancellation -- for work that must outlive the request on purpose (the
    audit after the response; gRPC's ``Context.fork()``).  Threads and tasks
    started inside carry the fields and no deadline.  ``detached()`` drops
    everything instead."""
    return _Without()


def new_cancellation() -> Cancellation:
    """A fresh cancellation for one request."""
    return Cancellation()


def run_unless_expired(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` unless the current work's deadline passed or its request
    was cancelled before it started: then raise that instead (a pool task's
    future fails with it, and the caller's ``result()`` says so)."""
    # Runs before every pool task with a deadline: the check inlined, on the
    # raw binding (a request scope's view carries the same deadline and
    # cancellation), so the guard costs one Python frame and nothing more.
    ctx = raw_current()
    at = ctx._deadline
    cancel = ctx._cancel
    if (at is not None and monotonic() >= at) or (cancel is not None and cancel.cancelled):
        error = expired(ctx)
        if error is not None:
            raise error
    return fn(*args, **kwargs)


def deadline_of(ctx: Context) -> float | None:
    """``ctx``'s deadline, a ``time.monotonic()`` instant, or None."""
    return ctx._deadline


def for_request(ctx: Context, timeout: float | None) -> tuple[Context, Cancellation]:
    """The context a door binds for a request with a default ``timeout``
    (seconds; None: only what arrived with the request), and the request's
    own cancellation."""
    cancel = Cancellation()
    at = None if timeout is None else monotonic() + timeout
    return narrowed(ctx, at, cancel), cancel


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """``timeout`` validated as a door option: None, or seconds > 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} is seconds (a number) or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout <= 0 or math.isinf(timeout):
        raise ValueError(f"{what} is seconds > 0, not {timeout!r}")
    return float(timeout)


def log_if_late(logger: logging.Logger, ctx: Context, method: object, path: object) -> None:
    """Log ``deadline exceeded in GET /path (finished N ms after it)`` on
    ``logger`` when the request bound in ``ctx`` ends after its deadline.
    For the doors that bind the deadline without interrupting the view (WSGI,
    Django): the line is how a late request shows, as the ASGI door's
    "deadline exceeded in ..." does.  Call it with ``ctx`` still bound, so
    the line carries the request id."""
    at = ctx._deadline
    if at is None:
        return
    late = monotonic() - at
    if late < 0:
        return
    from ._escape import log_text  # the late path only

    # Escaped: servers percent-decode the path, and a raw "%0a" in it would
    # forge a log line (log injection).
    logger.error(
        "deadline exceeded in %s %s (finished %d ms after it)",
        log_text(method or "?"),
        log_text(path or "?"),
        late * 1000,
    )


def call_deadline(
    timed_out: Callable[[str], BaseException],
    cancelled: Callable[[str], BaseException] | None = None,
) -> float | None:
    """For an outgoing call about to start: the deadline it runs under (a
    monotonic instant), or None; raises at once, before any network, when the
    deadline passed (``timed_out(message)``: the client's own timeout error
    that is also a :class:`DeadlineExceeded`) or the request was cancelled
    (``cancelled(message)``, default :class:`RequestCancelled`).  The one
    rule every client integration applies before it clamps its timeouts."""
    ctx = read_current()
    error = expired(ctx)
    if error is not None:
        if isinstance(error, DeadlineExceeded):
            raise timed_out(str(error))
        raise error if cancelled is None else cancelled(str(error))
    return ctx._deadline
