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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ctxrelay.integrations.httpx needs httpx: pip install 'ctxrelay[httpx]'"
    ) from exc

from .._outbound import Sent, inject_hop

__all__ = ["async_request_hook", "install", "request_hook", "uninstall"]

# httpx copies request.extensions into each redirect request
# (Client._build_redirect_request), so the previous hop's state is found there.
_SENT = "ctxrelay.sent"

_ClientT = TypeVar("_ClientT", httpx.Client, httpx.AsyncClient)


def request_hook(request: httpx.Request) -> None:
    """Sync request event hook: add the current context's headers to ``request``."""
    previous = request.extensions.get(_SENT)
    previous = previous if isinstance(previous, Sent) else None
    request.extensions[_SENT] = inject_hop(request.headers, str(request.url), previous)


async def async_request_hook(request: httpx.Request) -> None:
    """Async request event hook, for ``httpx.AsyncClient``."""
    request_hook(request)


def install(client: _ClientT) -> _ClientT:
    """Append ctxrelay's request hook to ``client``; returns it.  Idempotent.

    It runs after the hooks already there, so headers they set count as the
    caller's and win.
    """
    hook = async_request_hook if isinstance(client, httpx.AsyncClient) else request_hook
    hooks: dict[str, list[Callable[..., Any]]] = client.event_hooks
    if hook not in hooks["request"]:
        hooks["request"] = [*hooks["request"], hook]
        client.event_hooks = hooks
    return client


def uninstall(client: _ClientT) -> _ClientT:
    """Remove ctxrelay's request hooks from ``client``; returns it.  Idempotent."""
    hooks: dict[str, list[Callable[..., Any]]] = client.event_hooks
    kept = [h for h in hooks["request"] if h not in (request_hook, async_request_hook)]
    if len(kept) != len(hooks["request"]):
        hooks["request"] = kept
        client.event_hooks = hooks
    return client
