"""Outgoing context headers for the ``aiohttp`` client.

A ``TraceConfig`` is aiohttp's plug for per-request hooks::

    import aiohttp
    from ctxrelay.integrations.aiohttp import trace_config

    async with aiohttp.ClientSession(trace_configs=[trace_config()]) as http:
        await http.get("http://orders.internal.example/api")

Headers are computed when the request starts, from the context current in
the calling task.  Headers the caller (or the session's defaults) set win.
aiohttp sends one headers object through every redirect hop; on each hop the
headers ctxrelay added are taken back and computed again for the new URL,
and a hop to another origin (scheme, host or port) loses every sensitive
header but ``Proxy-Authorization`` -- aiohttp itself drops only
``Authorization``, ``Cookie`` and ``Proxy-Authorization`` there (its own
proxy credentials, from the proxy URL, never pass through these hooks).

Deadlines: a ``TraceConfig`` cannot change a request's timeout, so
:func:`install` does that part::

    http = install(aiohttp.ClientSession(trace_configs=[trace_config()]))

Under a deadline (``ctxrelay.deadline()``, a door's ``timeout=``, or one that
arrived with the request) a call on an installed session fails at once with
``ctxrelay.DeadlineExceeded`` (or ``RequestCancelled``) when no time is left,
without touching the network; otherwise its ``ClientTimeout.total`` -- which
covers the whole call, redirects and the body included -- becomes
``min(its own, the time remaining)``, never longer than the caller's.  A
timeout that fires once the deadline has passed is raised as
``DeadlineExceeded``, an exception that is also aiohttp's
``ServerTimeoutError`` and ``asyncio.TimeoutError``.  The trace config alone
still refuses to start a request once the deadline passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from time import monotonic
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin

try:
    import aiohttp
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.aiohttp needs aiohttp: pip install 'ctxrelay[aiohttp]'"
    ) from _exc

import attr
from aiohttp.helpers import sentinel

from .._deadline import DeadlineExceeded, call_deadline
from .._outbound import Sent, inject_hop

__all__ = ["install", "trace_config", "uninstall"]


class _DeadlineTimeout(DeadlineExceeded, aiohttp.ServerTimeoutError):
    """The deadline passed: a ``ctxrelay.DeadlineExceeded`` that is also the
    ``aiohttp.ServerTimeoutError`` (an ``asyncio.TimeoutError``) callers
    already catch."""


def _check() -> float | None:
    """The current deadline (a monotonic instant) or None; raises at once
    when it passed or the request was cancelled."""
    return call_deadline(_DeadlineTimeout)


async def _on_request_start(
    session: aiohttp.ClientSession,
    trace: SimpleNamespace,
    params: aiohttp.TraceRequestStartParams,
) -> None:
    _check()  # out of time: fail before any network
    # One trace context per request, kept across its redirect hops.
    trace.ctxrelay_sent = inject_hop(params.headers, str(params.url), None)


async def _on_request_redirect(
    session: aiohttp.ClientSession,
    trace: SimpleNamespace,
    params: aiohttp.TraceRequestRedirectParams,
) -> None:
    # Sent before aiohttp follows the Location: compute the next URL as it will.
    location = params.response.headers.get("Location") or params.response.headers.get("URI")
    if not location:
        return
    previous = getattr(trace, "ctxrelay_sent", None)
    previous = previous if isinstance(previous, Sent) else None
    try:
        target = urljoin(str(params.url), location)
    except ValueError:  # aiohttp refuses it too, with its own error: not ours to raise
        target = ""  # no origin: strip as for a foreign host
    trace.ctxrelay_sent = inject_hop(params.headers, target, previous)


def trace_config() -> aiohttp.TraceConfig:
    """A ``TraceConfig`` that relays the current context on every request.

    Pass it in ``ClientSession(trace_configs=[...])``; one may be shared by
    many sessions.
    """
    config = aiohttp.TraceConfig()
    config.on_request_start.append(_on_request_start)
    config.on_request_redirect.append(_on_request_redirect)
    return config


_Request = Callable[..., Awaitable[aiohttp.ClientResponse]]


def _clamped(own: aiohttp.ClientTimeout, at: float) -> aiohttp.ClientTimeout:
    left = max(0.001, at - monotonic())
    if own.total is not None and own.total <= left:
        return own  # the caller's own is shorter: never lengthened
    # aiohttp rounds a timeout of ceil_threshold (5 s) or more up to the next
    # whole second: that would lengthen it past the deadline.
    threshold = max(own.ceil_threshold, left + 1.0)
    return attr.evolve(own, total=left, ceil_threshold=threshold)


def install(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """Bound every call of ``session`` by the current deadline; returns it.

    Idempotent.  Headers come from :func:`trace_config`, given when the
    session is made; this adds the deadline: fail at once when it passed,
    clamp ``ClientTimeout.total`` to the time remaining, and report a
    timeout the deadline caused as ``DeadlineExceeded``.
    """
    if not isinstance(session, aiohttp.ClientSession):
        raise TypeError(f"install() takes an aiohttp.ClientSession, not {type(session).__name__}")
    request: _Request = session._request
    if getattr(request, "__name__", "") == "relaying_request":
        return session

    async def relaying_request(method: str, str_or_url: Any, **kwargs: Any) -> Any:
        at = _check()
        if at is None:
            return await request(method, str_or_url, **kwargs)
        own = kwargs.get("timeout", sentinel)
        if own is sentinel:
            own = session.timeout  # aiohttp's rule: the session's default
        elif not isinstance(own, aiohttp.ClientTimeout):
            own = aiohttp.ClientTimeout(total=own)  # aiohttp's rule: a number is the total
        kwargs["timeout"] = _clamped(own, at)
        try:
            return await request(method, str_or_url, **kwargs)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, DeadlineExceeded) or monotonic() < at:
                raise
            raise _DeadlineTimeout("the deadline passed during the call") from exc

    # An instance attribute, set as aiohttp's debug mode allows: every verb
    # (get, post, request, ws_connect) goes through session._request.
    object.__setattr__(session, "_request", relaying_request)
    return session


def uninstall(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """Undo :func:`install`; returns ``session``.  Idempotent."""
    if getattr(vars(session).get("_request"), "__name__", "") == "relaying_request":
        object.__delattr__(session, "_request")
    return session
