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
"""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import urljoin

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ctxrelay.integrations.aiohttp needs aiohttp: pip install 'ctxrelay[aiohttp]'"
    ) from exc

from .._outbound import Sent, inject_hop

__all__ = ["trace_config"]


async def _on_request_start(
    session: aiohttp.ClientSession,
    trace: SimpleNamespace,
    params: aiohttp.TraceRequestStartParams,
) -> None:
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
