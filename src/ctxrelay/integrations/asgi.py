"""``RelayMiddleware`` for Starlette, FastAPI and any ASGI application.

Pure ASGI on purpose: Starlette's ``BaseHTTPMiddleware`` runs the app in
another task, so a context set inside it does not flow back out (starlette
#1525).  Here the context is bound in the server's own task around the whole
call, so everything the framework runs for the request inherits it:

* async endpoints run in that task;
* sync endpoints and dependencies run via ``anyio.to_thread``, which copies
  the context into the worker thread (fastapi #953);
* ``BackgroundTasks`` run inside the same call, after the body is sent;
* streaming and SSE bodies are iterated in child tasks, which copy it;
* exception handlers: wrap the *outermost* app (``app = RelayMiddleware(api)``)
  so Starlette's ``ServerErrorMiddleware`` and ``exception_handler(500)`` run
  inside the binding and the 500 carries the id (asgi-correlation-id #55/#104).

Usage::

    from fastapi import FastAPI
    from ctxrelay.integrations.asgi import RelayMiddleware

    api = FastAPI()
    app = RelayMiddleware(api)              # outermost: covers 500 handlers too
    # or: api.add_middleware(RelayMiddleware)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .. import _policy
from .._context import REQUEST_ID, begin, finish
from .._inbound import Door, RequestIdValidator, open_asgi, valid_request_id

__all__ = ["RelayMiddleware", "valid_request_id"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_errors = logging.getLogger("ctxrelay.asgi")


class RelayMiddleware:
    """Bind a request's ``Context`` (fields, request id, snapshot) for its whole
    ASGI call, and reset it by token when the call ends -- on success, on an
    exception and on client disconnect (cancellation) alike.

    ``header_name``
        The request-id header (default: the policy's, ``x-request-id``).
    ``validator``
        ``callable(str) -> bool``: keep an inbound id?  The default accepts
        1-128 characters of ``A-Z a-z 0-9 . _ : -``; anything else is
        replaced by a new random id, 32 hex digits (logged at debug level).
    ``echo``
        Send the request id back as a response header (and on a websocket
        accept).
    ``log_errors``
        Log an exception that escapes the app on logger ``ctxrelay.asgi``
        while the context is still bound, so that line carries the request id
        (the server's own "Exception in ASGI application" line runs after the
        reset and cannot).

    ``lifespan`` and other scope types pass through untouched.
    """

    __slots__ = ("_door", "app", "echo", "log_errors")

    def __init__(
        self,
        app: ASGIApp,
        *,
        header_name: str | None = None,
        validator: RequestIdValidator | None = None,
        echo: bool = True,
        log_errors: bool = True,
    ) -> None:
        self.app = app
        self._door = Door(header_name, validator)
        self.echo = echo
        self.log_errors = log_errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)  # lifespan: untouched
            return
        door = self._door
        plan = door.current_plan
        if plan.policy is not _policy.STATE.policy:  # Door.plan(), inlined: runs per request
            plan = door.plan()
        ctx = open_asgi(door, scope, plan)
        if self.echo and plan.name_bytes is not None:
            send = _echoing(send, (plan.name_bytes, ctx._fields[REQUEST_ID].encode("latin-1")))
        token = begin(ctx)
        try:
            await self.app(scope, receive, send)
        except Exception:
            if self.log_errors:
                _log_error(scope)
            raise
        finally:
            finish(token, ctx)


def _echoing(send: Send, header: tuple[bytes, bytes]) -> Send:
    # A module-level factory: a closure built in __call__ would turn its
    # variables into cells on every call, echo or not.
    def send_with_id(message: Message) -> Awaitable[None]:
        # Not a coroutine function: it hands back the server's own awaitable,
        # which the app awaits -- no extra coroutine per message.
        kind = message.get("type")
        if kind == "http.response.start" or kind == "websocket.accept":
            message = _with_header(message, header)
        return send(message)

    return send_with_id


def _with_header(message: Message, header: tuple[bytes, bytes]) -> Message:
    # A copy: the app may reuse its message dict.  An id the app set itself wins.
    name = header[0]
    size = len(name)
    headers = message.get("headers") or ()
    try:
        if type(headers) is not list:
            headers = list(headers)  # a tuple, or an iterator to read once
            # What the server gets from here on: an iterator is spent now.
            message = {**message, "headers": headers}
        for key, _ in headers:
            if len(key) == size:  # the length first: most names differ in it
                if type(key) is not bytes and not isinstance(key, (bytes, bytearray)):
                    # Never bytes(key): bytes() of an int-like allocates its
                    # value in bytes, of an iterable reads it to its end.
                    # Not the app's id, then; the server judges it.
                    from .._request import refuse_odd_headers  # this rare branch only

                    refuse_odd_headers("response header", headers)
                    continue
                if key.lower() == name:
                    return message
    except (TypeError, ValueError):
        # A name without a length (an int, an iterator), an entry that is no
        # pair: never converted, reported once; the server judges it, not us.
        from .._request import refuse_odd_headers

        refuse_odd_headers("response header", headers)
        return message
    copy = dict(message)
    copy["headers"] = [*headers, header]
    return copy


def _log_error(scope: Scope) -> None:
    # logging reports its own handler failures (Handler.handleError): no guard.
    # log_text() never raises.  Imported here: this is the error path only.
    from .._escape import log_text

    # Escaped: the server percent-decoded the path, and "/x%0aINFO [req-admin]
    # ..." written raw would forge a log line (log injection).
    _errors.error(
        "unhandled exception in %s %s",
        log_text(scope.get("method", "WEBSOCKET")),
        log_text(scope.get("path", "?")),
        exc_info=True,
    )


valid_request_id.__module__ = __name__  # its public path (the WSGI door shares it)
