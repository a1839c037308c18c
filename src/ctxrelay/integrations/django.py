"""``RelayMiddleware`` for Django, under WSGI and ASGI, sync and async views.

Put it first in ``MIDDLEWARE`` so everything after it -- other middleware,
the view, Django's own "Internal Server Error" log line -- runs with the
request's context bound::

    MIDDLEWARE = [
        "ctxrelay.integrations.django.RelayMiddleware",
        ...
    ]
    CTXRELAY = {                              # optional
        "header_name": "x-correlation-id",    # default: the policy's, x-request-id
        "validator": "myproject.ids.accept",  # a callable or its dotted path
        "echo": True,                         # send the id back on the response
        "timeout": 4.0,                       # a default deadline per request, seconds
        "generator": "myproject.ids.new_id",  # and the other door options: docs/web.md
        "log_requests": True,
    }

The middleware is both sync and async capable, so Django never adapts it
(an adaptation would run it in another thread or task).  A streamed body is
iterated by the handler after the middleware returned, so its iterator is
wrapped to bind the context around each chunk, and ``response.close()`` (where
Django closes the view's generator, also after a client dropped the stream)
runs with the context bound too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from time import monotonic
from typing import Any

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.conf import settings  # type: ignore[import-untyped]
    from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
    from django.http import FileResponse, HttpResponseBadRequest  # type: ignore[import-untyped]
    from django.utils.module_loading import import_string  # type: ignore[import-untyped]
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.django needs Django: pip install 'ctxrelay[django]'"
    ) from _exc

from .._context import REQUEST_ID, Context, begin, enter, finish, leave
from .._deadline import check_timeout, deadline_of, for_request, log_if_late
from .._inbound import Door, admit_asgi, admit_wsgi, log_request, open_asgi, open_wsgi

__all__ = ["RelayMiddleware", "door_from_settings", "timeout_from_settings"]

#: Where a request that ended after its deadline is logged.
_late = logging.getLogger("ctxrelay.django")

_KEYS = frozenset(
    {
        "header_name",
        "validator",
        "echo",
        "timeout",
        "generator",
        "transformer",
        "response_header",
        "update_request_header",
        "expose_header",
        "exclude_paths",
        "reject_invalid",
        "log_requests",
    }
)
#: Keys whose value may be a callable's dotted path.
_CALLABLES = ("validator", "generator", "transformer")
#: The door's keyword options, passed to ``Door`` as they are.
_OPTIONS = (
    "response_header",
    "update_request_header",
    "expose_header",
    "exclude_paths",
    "reject_invalid",
    "log_requests",
)


def door_from_settings() -> tuple[Door, bool]:
    """The door and the echo flag configured by ``settings.CTXRELAY``
    (its ``timeout`` is read by :func:`timeout_from_settings`).

    A misconfiguration raises ``ImproperlyConfigured`` at start-up, where it
    belongs, never on a request.
    """
    config: Any = getattr(settings, "CTXRELAY", None) or {}
    if not isinstance(config, dict):
        raise ImproperlyConfigured("settings.CTXRELAY must be a dict")
    unknown = set(config) - _KEYS
    if unknown:
        raise ImproperlyConfigured(
            f"settings.CTXRELAY: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}"
        )
    found: dict[str, Any] = {}
    for key in _CALLABLES:
        value = config.get(key)
        if isinstance(value, str):
            try:
                value = import_string(value)
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"settings.CTXRELAY[{key!r}]: cannot import {value!r}: {exc}"
                ) from exc
        found[key] = value
    echo = config.get("echo", True)
    if not isinstance(echo, bool):
        raise ImproperlyConfigured("settings.CTXRELAY['echo'] must be True or False")
    try:
        door = Door(
            config.get("header_name"),
            found["validator"],
            generator=found["generator"],
            transformer=found["transformer"],
            **{key: config[key] for key in _OPTIONS if key in config},
        )
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(f"settings.CTXRELAY: {exc}") from exc
    return door, echo


def timeout_from_settings() -> float | None:
    """``settings.CTXRELAY['timeout']``: a default deadline per request, seconds."""
    config: Any = getattr(settings, "CTXRELAY", None) or {}
    try:
        return check_timeout(config.get("timeout"), "settings.CTXRELAY['timeout']")
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(str(exc)) from exc


class RelayMiddleware:
    """Bind the request's ``Context`` (fields, request id, snapshot) for the
    rest of the middleware chain and the view; reset by token afterwards.

    Under ASGI the snapshot is taken from the ASGI scope, under WSGI from the
    environ, so both servers give the same values.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._door, self._echo = door_from_settings()
        self._timeout = timeout_from_settings()
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._async:
            return self._acall(request)
        if self._door.options is not None:
            return self._with_options(request)
        ctx = self._open(request)
        token = begin(ctx)
        try:
            response = self.get_response(request)
        finally:
            self._log_if_late(request, ctx)
            finish(token, ctx)
        return self._finish(response, ctx)

    async def _acall(self, request: Any) -> Any:
        if self._door.options is not None:
            return await self._awith_options(request)
        ctx = self._open(request)
        token = begin(ctx)
        try:
            response = await self.get_response(request)
        finally:
            self._log_if_late(request, ctx)
            finish(token, ctx)
        return self._finish(response, ctx)

    # -- the door's options (the plain paths above pay nothing for them) -----
    def _admit(self, request: Any) -> Context | Any | None:
        """The context, ``None`` for an excluded path, or a 400 response."""
        scope = getattr(request, "scope", None)
        if isinstance(scope, dict):
            admitted = admit_asgi(self._door, scope)
        else:
            admitted = admit_wsgi(self._door, request.META)
        if admitted.rejected:
            return HttpResponseBadRequest(b"invalid request id\n", content_type="text/plain")
        ctx = admitted.ctx
        if ctx is None:
            return None
        if isinstance(scope, dict) and self._door.update_request_header:
            # An ASGIRequest built META before the door ran: write it there too.
            key = "HTTP_" + self._door.header_names[0].upper().replace("-", "_")
            if request.META.get(key) != ctx[REQUEST_ID]:
                request.META[key] = ctx[REQUEST_ID]
        if self._timeout is not None or deadline_of(ctx) is not None:
            ctx = for_request(ctx, self._timeout)[0]
        return ctx

    def _with_options(self, request: Any) -> Any:
        ctx = self._admit(request)
        if not isinstance(ctx, Context):
            return self.get_response(request) if ctx is None else ctx
        started = monotonic()
        token = begin(ctx)
        response = None
        try:
            response = self.get_response(request)
        finally:
            self._log_if_late(request, ctx)
            self._log_request(request, response, started)
            finish(token, ctx)
        return self._finish(response, ctx)

    async def _awith_options(self, request: Any) -> Any:
        ctx = self._admit(request)
        if not isinstance(ctx, Context):
            return await self.get_response(request) if ctx is None else ctx
        started = monotonic()
        token = begin(ctx)
        response = None
        try:
            response = await self.get_response(request)
        finally:
            self._log_if_late(request, ctx)
            self._log_request(request, response, started)
            finish(token, ctx)
        return self._finish(response, ctx)

    def _log_request(self, request: Any, response: Any, started: float) -> None:
        options = self._door.options
        if options is not None and options.log_requests:
            status = getattr(response, "status_code", 500) if response is not None else 500
            log_request(
                _late,
                getattr(request, "method", "?"),
                getattr(request, "path", "?"),
                status,
                started,
            )

    @staticmethod
    def _log_if_late(request: Any, ctx: Context) -> None:
        # The view ran to its end after the deadline: say so, with the
        # request still bound (its id on the line), as the WSGI door does.
        if deadline_of(ctx) is not None:
            log_if_late(
                _late, ctx, getattr(request, "method", None), getattr(request, "path", None)
            )

    def _open(self, request: Any) -> Context:
        scope = getattr(request, "scope", None)  # ASGIRequest keeps the raw scope
        door = self._door
        if isinstance(scope, dict):
            ctx = open_asgi(door, scope, None, door.update_request_header)
            if door.update_request_header:  # META was built before the door ran
                key = door.current_plan.environ_key
                if request.META.get(key) != ctx[REQUEST_ID]:
                    request.META[key] = ctx[REQUEST_ID]
        else:
            ctx = open_wsgi(door, request.META, door.update_request_header)
        if self._timeout is not None or deadline_of(ctx) is not None:
            # Bound, not enforced: Django runs the view to its end (sync code
            # checks ctxrelay.checkpoint(); pools and calls honour it).
            ctx = for_request(ctx, self._timeout)[0]
        return ctx

    def _finish(self, response: Any, ctx: Context) -> Any:
        door = self._door
        name = door.header_name if door.options is None else door.response_header
        if self._echo and name not in response.headers:  # an id the view set wins
            response.headers[name] = ctx[REQUEST_ID]
        if self._echo and door.options is not None and door.options.expose_header:
            exposed = response.headers.get("Access-Control-Expose-Headers")
            if not exposed:
                response.headers["Access-Control-Expose-Headers"] = name
            else:
                listed = [part.strip().lower() for part in exposed.split(",")]
                if name not in listed and "*" not in listed:
                    response.headers["Access-Control-Expose-Headers"] = f"{exposed}, {name}"
        if getattr(response, "streaming", False) and not isinstance(response, FileResponse):
            # FileResponse runs no user code, and wrapping would cost it sendfile.
            content = response.streaming_content
            if hasattr(content, "__aiter__"):
                response.streaming_content = _bound_aiter(ctx, content)
            else:
                response.streaming_content = _bound_iter(ctx, content)
            # The server calls response.close() after the middleware returned,
            # also when the client dropped the stream: Django then closes the
            # view's generator there.  Run it with the request bound, as the
            # WSGI middleware does, so its cleanup runs as its own request.
            response.close = functools.partial(_bound_close, ctx, response.close)
        return response


def _bound_close(ctx: Context, close: Callable[[], None]) -> None:
    token = enter(ctx)
    try:
        close()
    finally:
        leave(token)


def _bound_iter(ctx: Context, chunks: Iterable[bytes]) -> Iterator[bytes]:
    it = iter(chunks)
    while True:
        token = enter(ctx)  # bound for this step only, reset before yielding
        try:
            chunk = next(it)
        except StopIteration:
            return
        finally:
            leave(token)
        yield chunk


async def _bound_aiter(ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    it = aiter(chunks)
    while True:
        token = enter(ctx)
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            return
        finally:
            leave(token)
        yield chunk
