"""Outgoing context headers for ``httpx``, sync and async.

An httpx *request event hook* may change the request's headers, and httpx
runs the hooks again for every redirect hop, so that is the plug::

    import httpx
    from ctxrelay.integrations.httpx import install

    client = install(httpx.Client())          # or install(httpx.AsyncClient())
    # or: httpx.Client(event_hooks={"request": [request_hook]})
    #     httpx.AsyncClient(event_hooks={"request": [async_request_hook]})

Headers are computed when the request is sent, from the context current in
the sending thread or task.  Headers the caller set win.  On every redirect
hop the headers ctxrelay added are taken back and computed again for the new
URL; a hop to another origin (scheme, host or port) loses every sensitive
header, the caller's included -- httpx itself only drops ``Authorization`` --
but ``Proxy-Authorization``, the proxy's.  A header ctxrelay added is taken
back only while it holds what ctxrelay set: httpx rebuilds ``Cookie`` from
the client's jar on every hop, and the cookies ctxrelay sent join the jar's.

Deadlines: under a deadline (``ctxrelay.deadline()``, a door's ``timeout=``,
or one that arrived with the request) the hook checks the time left before
every hop.  None left, or the request was cancelled: the call fails at once
with ``ctxrelay.DeadlineExceeded`` (or ``RequestCancelled``) and nothing
touches the network.  Otherwise each of the hop's timeouts -- connect, read,
write, pool -- becomes ``min(its own, the time remaining)``: never longer
than the caller's.  On a client made with :func:`install`, a timeout that
fires once the deadline has passed is raised as ``DeadlineExceeded``, an
exception that is also an ``httpx.TimeoutException`` (handlers written for
either catch it); with the hooks alone it stays httpx's own.  httpx's
timeouts bound each wait, not the whole call: a server that trickles bytes
can keep one call past the deadline, the next hop fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

try:
    import httpx
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.httpx needs httpx: pip install 'ctxrelay[httpx]'"
    ) from _exc

from .._context import current
from .._deadline import DeadlineExceeded, call_deadline, expired
from .._outbound import Sent, inject_hop

__all__ = ["async_request_hook", "install", "request_hook", "uninstall"]

# httpx copies request.extensions into each redirect request
# (Client._build_redirect_request), so the previous hop's state is found there.
_SENT = "ctxrelay.sent"

_ClientT = TypeVar("_ClientT", httpx.Client, httpx.AsyncClient)


class _DeadlineTimeout(DeadlineExceeded, httpx.TimeoutException):
    """The deadline passed: a ``ctxrelay.DeadlineExceeded`` that is also the
    ``httpx.TimeoutException`` callers already catch."""


def _deadline_error(message: str, request: httpx.Request) -> _DeadlineTimeout:
    error = _DeadlineTimeout(message)
    error._request = request  # what httpx.RequestError.request reads
    return error


def _bound(request: httpx.Request) -> None:
    """Fail at once when the work is out of time, else clamp every timeout."""
    at = call_deadline(lambda message: _deadline_error(message, request))
    if at is None:
        return
    left = max(0.001, at - monotonic())  # never 0: httpcore reads 0 as "do not wait"
    own = request.extensions.get("timeout")
    own = own if isinstance(own, dict) else {}
    clamped: dict[str, float | None] = {}
    for name in ("connect", "read", "write", "pool"):
        value = own.get(name)
        shorter = isinstance(value, (int, float)) and not isinstance(value, bool) and value < left
        clamped[name] = float(value) if shorter else left  # type: ignore[arg-type]
    # A new dict: a redirect hop's request shares this extensions mapping
    # and is clamped again, from the time left then.
    request.extensions["timeout"] = {**own, **clamped}


def request_hook(request: httpx.Request) -> None:
    """Sync request event hook: add the current context's headers to
    ``request``; under a deadline, fail at once when it passed, else clamp
    the request's timeouts to the time remaining."""
    previous = request.extensions.get(_SENT)
    previous = previous if isinstance(previous, Sent) else None
    _bound(request)
    request.extensions[_SENT] = inject_hop(request.headers, str(request.url), previous)


def _past_deadline() -> bool:
    return isinstance(expired(current()), DeadlineExceeded)


def _sync_send(send: Callable[..., httpx.Response]) -> Callable[..., httpx.Response]:
    def relaying_send(request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return send(request, **kwargs)
        except httpx.TimeoutException as exc:
            if isinstance(exc, DeadlineExceeded) or not _past_deadline():
                raise
            raise _deadline_error("the deadline passed during the call", exc.request) from exc

    return relaying_send


def _async_send(send: Callable[..., Any]) -> Callable[..., Any]:
    async def relaying_send(request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return await send(request, **kwargs)  # type: ignore[no-any-return]
        except httpx.TimeoutException as exc:
            if isinstance(exc, DeadlineExceeded) or not _past_deadline():
                raise
            raise _deadline_error("the deadline passed during the call", exc.request) from exc

    return relaying_send


async def async_request_hook(request: httpx.Request) -> None:
    """Async request event hook, for ``httpx.AsyncClient``."""
    request_hook(request)


def install(client: _ClientT) -> _ClientT:
    """Append ctxrelay's request hook to ``client``; returns it.  Idempotent.

    It runs after the hooks already there, so headers they set count as the
    caller's and win.  ``client.send`` is wrapped too, so that a timeout
    that fires once the deadline passed is raised as ``DeadlineExceeded``.
    """
    if not isinstance(client, (httpx.Client, httpx.AsyncClient)):
        raise TypeError(
            f"install() takes an httpx.Client or httpx.AsyncClient, not {type(client).__name__}"
        )
    aio = isinstance(client, httpx.AsyncClient)
    hook = async_request_hook if aio else request_hook
    hooks: dict[str, list[Callable[..., Any]]] = client.event_hooks
    if hook not in hooks["request"]:
        hooks["request"] = [*hooks["request"], hook]
        client.event_hooks = hooks
    if "send" not in vars(client):
        wrap: Callable[[Any], Any] = _async_send if aio else _sync_send
        setattr(client, "send", wrap(client.send))  # noqa: B010 - an instance attribute
    return client


def uninstall(client: _ClientT) -> _ClientT:
    """Remove ctxrelay's request hooks from ``client``; returns it.  Idempotent."""
    hooks: dict[str, list[Callable[..., Any]]] = client.event_hooks
    kept = [h for h in hooks["request"] if h not in (request_hook, async_request_hook)]
    if len(kept) != len(hooks["request"]):
        hooks["request"] = kept
        client.event_hooks = hooks
    send = vars(client).get("send")
    if getattr(send, "__name__", "") == "relaying_send":
        delattr(client, "send")  # the class's own method shows through again
    return client
