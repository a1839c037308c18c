"""The door for ``aiohttp.web`` servers: a middleware, as aiohttp users expect.

:func:`setup` puts :class:`RelayMiddleware` first in the application's
middlewares and connects its echo to ``on_response_prepare``::

    from aiohttp import web
    from ctxrelay.integrations.aiohttp_server import setup

    app = web.Application()
    setup(app)                        # before the app starts
    # or: web.Application(middlewares=[RelayMiddleware()]) -- see below

It applies the ASGI door's rule (``ctxrelay._inbound``: one plan, one
snapshot, one request-id rule): the request is read as the ASGI scope a
server would send for it, so the snapshot, the extracted fields, the trust
check on the peer and the request id (kept when valid, else generated) are
exactly what ``ctxrelay.integrations.asgi`` gives for the same request.

Decisions, and the holes they close:

* The context is bound in the handler's own task around the whole handler
  call -- the other middlewares, the handler, the body it streams, the
  websocket loop -- and reset *by token* in a ``finally``: after a return,
  an exception, an ``HTTPException`` and a cancellation (client disconnect
  with ``handler_cancellation=True``, server shutdown) alike.
* The echo is set in ``on_response_prepare``, which aiohttp sends for every
  response just before its headers go out: a returned response, a
  ``StreamResponse`` or ``WebSocketResponse`` the handler prepared itself
  (its headers are gone by the time the middleware sees it), the 500 aiohttp
  builds for an unhandled exception, an ``HTTPException``.  The middleware
  alone (without :func:`setup`) echoes the responses it sees unprepared.
* An unhandled exception is logged on logger ``ctxrelay.aiohttp`` while the
  context is still bound, so that line carries the request id (aiohttp's own
  "Error handling request" line runs after the reset).  ``HTTPException``\\ s
  are answers, not errors: never logged.
* Nested applications: ``setup`` the root one; its middlewares and signals
  cover the sub-applications' requests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

try:
    from aiohttp import web
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.aiohttp_server needs aiohttp: pip install 'ctxrelay[aiohttp]'"
    ) from _exc

from .. import _policy
from .._context import REQUEST_ID, enter, leave
from .._inbound import Door, RequestIdValidator, open_asgi

__all__ = ["RelayMiddleware", "setup"]

_errors = logging.getLogger("ctxrelay.aiohttp")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Where the middleware leaves the id to echo for on_response_prepare: the
# request's own storage (a RequestKey where aiohttp has them, 3.13 on: a str
# key warns there).
_ECHO: Any = (
    web.RequestKey("ctxrelay.echo", tuple)  # type: ignore[attr-defined,unused-ignore]
    if hasattr(web, "RequestKey")
    else "ctxrelay.echo"
)


def _peer(transport: Any, name: str) -> tuple[Any, ...]:
    # (host, port) of a TCP socket, as an ASGI server puts it in the scope;
    # () for a unix socket or a closed transport (the door reads "unknown").
    if transport is None:
        return ()
    address = transport.get_extra_info(name)
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return (address[0], address[1])  # IPv6 gives 4: host, port, flow, scope
    return ()


def _scope_of(request: web.BaseRequest) -> dict[str, Any]:
    """The ASGI scope an ASGI server would send for ``request``."""
    # ASGI names are lowercase (the door's fast path reads them as they are);
    # raw_headers keeps the client's spelling.
    headers = [(name.lower(), value) for name, value in request.raw_headers]
    upgrade = request.headers.get("Upgrade", "")
    websocket = upgrade.lower() == "websocket"
    scheme = request.scheme
    if websocket:
        scheme = "wss" if scheme == "https" else "ws"
    query = request.rel_url.raw_query_string
    transport = request.transport
    return {
        "type": "websocket" if websocket else "http",
        "method": request.method,
        "scheme": scheme,
        "path": request.path,
        "query_string": query.encode("utf-8", "surrogateescape"),
        "headers": headers,
        "client": _peer(transport, "peername"),
        "server": _peer(transport, "sockname"),
    }


class RelayMiddleware:
    """An ``aiohttp.web`` middleware: bind a request's ``Context`` (fields,
    request id, snapshot) for its whole handler call, reset it by token after.

    ``header_name``
        The request-id header (default: the policy's, ``x-request-id``).
    ``validator``
        ``callable(str) -> bool``: keep an inbound id?  The default accepts
        1-128 characters of ``A-Z a-z 0-9 . _ : -``; anything else is
        replaced by a new random id, 32 hex digits.
    ``echo``
        Send the request id back on the response (and on a websocket's 101).
    ``log_errors``
        Log an exception that escapes the handler on logger
        ``ctxrelay.aiohttp`` while the context is still bound.
    """

    __middleware_version__ = 1  # aiohttp's mark of a new-style middleware

    __slots__ = ("_door", "echo", "log_errors")

    def __init__(
        self,
        *,
        header_name: str | None = None,
        validator: RequestIdValidator | None = None,
        echo: bool = True,
        log_errors: bool = True,
    ) -> None:
        self._door = Door(header_name, validator)
        self.echo: bool = echo
        self.log_errors: bool = log_errors

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        door = self._door
        plan = door.current_plan
        if plan.policy is not _policy.STATE.policy:  # Door.plan(), inlined: runs per request
            plan = door.plan()
        try:
            scope = _scope_of(request)
        except Exception:  # a request aiohttp accepted must not fail here
            _errors.warning("ctxrelay: could not read an aiohttp request", exc_info=True)
            scope = {"type": "http", "headers": []}
        ctx = open_asgi(door, scope, plan)  # never raises
        echoed: tuple[str, str] | None = None
        if self.echo:
            echoed = (plan.name, ctx[REQUEST_ID])
            request[_ECHO] = echoed
        token = enter(ctx)
        try:
            response = await handler(request)
        except web.HTTPException as answer:
            if echoed is not None:
                _echo(answer.headers, echoed)  # aiohttp builds its response from these
            raise
        except Exception:
            if self.log_errors:
                _log_error(request)
            raise
        finally:
            leave(token)
        if echoed is not None and not response.prepared:
            _echo(response.headers, echoed)
        return response

    async def on_response_prepare(
        self, request: web.BaseRequest, response: web.StreamResponse
    ) -> None:
        """``on_response_prepare`` handler: echo the request id on every
        response, including those prepared inside the handler and aiohttp's 500s."""
        echoed = request.get(_ECHO)
        if echoed is not None:
            _echo(response.headers, echoed)


def _echo(headers: Any, echoed: tuple[str, str]) -> None:
    # An id the app set itself wins (CIMultiDict: any spelling).
    name, value = echoed
    if name not in headers:
        headers[name] = value


def _log_error(request: web.Request) -> None:
    # Escaped: aiohttp percent-decodes the path, and "/x%0aINFO [req-admin]"
    # written raw would forge a log line.  The error path only: imported here.
    from .._escape import log_text

    _errors.error(
        "unhandled exception in %s %s",
        log_text(request.method),
        log_text(request.path),
        exc_info=True,
    )


def setup(
    app: web.Application,
    *,
    header_name: str | None = None,
    validator: RequestIdValidator | None = None,
    echo: bool = True,
    log_errors: bool = True,
) -> RelayMiddleware:
    """Put a :class:`RelayMiddleware` first in ``app``'s middlewares (outermost:
    every other middleware runs inside the context) and connect its echo to
    ``app.on_response_prepare``.  Call it before the app starts (aiohttp
    freezes both lists then).  Idempotent: an installed one is returned."""
    for existing in app.middlewares:
        if isinstance(existing, RelayMiddleware):
            return existing
    middleware = RelayMiddleware(
        header_name=header_name, validator=validator, echo=echo, log_errors=log_errors
    )
    app.middlewares.insert(0, middleware)
    if echo:
        app.on_response_prepare.append(middleware.on_response_prepare)
    return middleware
