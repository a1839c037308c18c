"""``RelayMiddleware`` for Flask and any WSGI application.

A threaded WSGI server (waitress, gunicorn's gthread, ``wsgiref`` with a
``ThreadingMixIn``) serves request after request on the same worker thread.
The binding is reset by token when the request ends, so a worker never
carries one request's context into the next.

The response body of a WSGI app is iterated by the *server*, after the app
returned (a streamed Flask response, a generator).  The middleware therefore
binds the request's context around each step of that iteration and around
``close()`` as well, resetting it in between.

Usage::

    from flask import Flask
    from ctxrelay.integrations.wsgi import RelayMiddleware

    app = Flask(__name__)
    app.wsgi_app = RelayMiddleware(app.wsgi_app)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any

from .._context import REQUEST_ID, Context, begin, enter, finish, leave
from .._deadline import check_timeout, deadline_of, for_request, log_if_late
from .._inbound import (
    Door,
    RequestIdGenerator,
    RequestIdTransformer,
    RequestIdValidator,
    admit_wsgi,
    log_request,
    open_wsgi,
    valid_request_id,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RelayMiddleware", "valid_request_id"]

_errors = logging.getLogger("ctxrelay.wsgi")


class RelayMiddleware:
    """Bind a request's ``Context`` (fields, request id, snapshot) while the
    WSGI app runs and while the server iterates and closes its body; reset by
    token after each.

    ``header_name``, ``validator``, ``echo``, ``log_errors`` and the door's
    options -- ``generator``, ``transformer``, ``response_header``,
    ``update_request_header`` (into the environ), ``expose_header``,
    ``exclude_paths`` (matched against ``PATH_INFO``), ``reject_invalid``
    and ``log_requests`` (on ``ctxrelay.wsgi``) -- mean what they mean for
    :class:`ctxrelay.integrations.asgi.RelayMiddleware`.  A streamed body's
    request line is written when the server closes the body.

    ``timeout``
        A default deadline per request, in seconds.  WSGI cannot interrupt
        the app: the deadline is bound (``ctxrelay.remaining()``,
        ``checkpoint()``), pool tasks not started by then fail with
        ``DeadlineExceeded``, and downstream calls get the time left.
    """

    __slots__ = ("_door", "app", "echo", "log_errors", "timeout")

    def __init__(
        self,
        app: WSGIApplication,
        *,
        header_name: str | Sequence[str] | None = None,
        validator: RequestIdValidator | None = None,
        echo: bool = True,
        log_errors: bool = True,
        timeout: float | None = None,
        generator: RequestIdGenerator | None = None,
        transformer: RequestIdTransformer | None = None,
        response_header: str | None = None,
        update_request_header: bool = True,
        expose_header: bool = False,
        exclude_paths: Iterable[str | re.Pattern[str]] = (),
        reject_invalid: bool = False,
        log_requests: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"RelayMiddleware wraps a WSGI app (a callable taking environ, start_response), "
                f"not {type(app).__name__}"
            )
        self.app: WSGIApplication = app
        self._door = Door(
            header_name,
            validator,
            generator=generator,
            transformer=transformer,
            response_header=response_header,
            update_request_header=update_request_header,
            expose_header=expose_header,
            exclude_paths=exclude_paths,
            reject_invalid=reject_invalid,
            log_requests=log_requests,
        )
        self.echo: bool = echo
        self.log_errors: bool = log_errors
        self.timeout: float | None = check_timeout(timeout)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        door = self._door
        if door.options is not None:
            return self._with_options(environ, start_response)
        ctx = open_wsgi(door, environ, door.update_request_header)
        timed = self.timeout is not None or deadline_of(ctx) is not None
        if timed:
            ctx = for_request(ctx, self.timeout)[0]
        if self.echo:
            start_response = _echoing(start_response, door.header_name, ctx[REQUEST_ID])
        token = begin(ctx)
        try:
            body = self.app(environ, start_response)
        except Exception:
            if self.log_errors:
                _log_error(environ)
            raise
        finally:
            if timed and self.log_errors:
                # Still bound: the line carries the request id.
                log_if_late(_errors, ctx, environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            finish(token, ctx)
        if isinstance(body, (list, tuple)):
            return body  # nothing left to run: no user code in a list
        return BoundBody(body, ctx)

    def _with_options(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        # The request when some door option is set (the plain path pays nothing).
        options = self._door.options
        assert options is not None  # checked by the caller
        admitted = admit_wsgi(self._door, environ)
        ctx = admitted.ctx
        if ctx is None:
            if admitted.rejected:
                text = b"invalid request id\n"
                start_response(
                    "400 Bad Request",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(text))),
                    ],
                )
                return [text]
            return self.app(environ, start_response)  # an excluded path: untouched
        timed = self.timeout is not None or deadline_of(ctx) is not None
        if timed:
            ctx = for_request(ctx, self.timeout)[0]
        if self.echo:
            name = self._door.response_header
            start_response = _echoing(start_response, name, ctx[REQUEST_ID])
            if options.expose_header:
                start_response = _exposing(start_response, name)
        status: list[str] = []
        if options.log_requests:
            start_response = _recording(start_response, status)
        started = monotonic()
        token = begin(ctx)
        body: Iterable[bytes] | None = None
        try:
            body = self.app(environ, start_response)
        except Exception:
            if self.log_errors:
                _log_error(environ)
            raise
        finally:
            if timed and self.log_errors:
                log_if_late(_errors, ctx, environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            if options.log_requests and (body is None or isinstance(body, (list, tuple))):
                _log_request(environ, status or ["500"], started)
            finish(token, ctx)
        if isinstance(body, (list, tuple)):
            return body
        if options.log_requests:
            return LoggedBody(body, ctx, environ, status, started)
        return BoundBody(body, ctx)


def _log_request(environ: WSGIEnvironment, status: list[str], started: float) -> None:
    code = status[0].split(" ", 1)[0] if status else "-"
    log_request(
        _errors, environ.get("REQUEST_METHOD", "?"), environ.get("PATH_INFO", "?"), code, started
    )


def _recording(start_response: StartResponse, status: list[str]) -> StartResponse:
    def start_recording(
        line: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        status[:] = [line]  # the last call wins (an error page after exc_info)
        return start_response(line, headers, exc_info)

    return start_recording


def _exposing(start_response: StartResponse, name: str) -> StartResponse:
    def start_exposing(
        line: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        out = list(headers)
        for index, (key, value) in enumerate(out):
            if key.lower() == "access-control-expose-headers":
                listed = [part.strip().lower() for part in value.split(",")]
                if name not in listed and "*" not in listed:
                    out[index] = (key, f"{value}, {name}")
                break
        else:
            out.append(("Access-Control-Expose-Headers", name))
        return start_response(line, out, exc_info)

    return start_exposing


def _echoing(start_response: StartResponse, name: str, request_id: str) -> StartResponse:
    def start_with_id(
        status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        # An id the app set itself wins.
        if not any(key.lower() == name for key, _ in headers):
            headers = [*headers, (name, request_id)]
        return start_response(status, headers, exc_info)

    return start_with_id


class BoundBody:
    """A WSGI body iterated (and closed) with the request's context bound.

    Each ``next()`` and the ``close()`` bind and reset on their own, in the
    thread that calls them, so nothing stays bound between two steps.
    """

    __slots__ = ("_body", "_ctx", "_iter")

    def __init__(self, body: Iterable[bytes], ctx: Context) -> None:
        self._body = body
        self._ctx = ctx
        self._iter: Iterator[bytes] | None = None

    def __iter__(self) -> BoundBody:
        return self

    def __next__(self) -> bytes:
        token = enter(self._ctx)
        try:
            if self._iter is None:
                self._iter = iter(self._body)
            return next(self._iter)
        finally:
            leave(token)

    def close(self) -> None:
        """Close the wrapped body (PEP 3333) with the context bound."""
        close = getattr(self._body, "close", None)
        if close is None:
            return
        token = enter(self._ctx)
        try:
            close()
        finally:
            leave(token)


class LoggedBody(BoundBody):
    """A :class:`BoundBody` that writes the ``log_requests`` line when the
    server closes it (the response is complete then), with the context bound."""

    __slots__ = ("_environ", "_logged", "_started", "_status")

    def __init__(
        self,
        body: Iterable[bytes],
        ctx: Context,
        environ: WSGIEnvironment,
        status: list[str],
        started: float,
    ) -> None:
        super().__init__(body, ctx)
        self._environ = environ
        self._status = status
        self._started = started
        self._logged = False

    def close(self) -> None:
        """Close the wrapped body, then write the request's line."""
        try:
            super().close()
        finally:
            if not self._logged:
                self._logged = True
                token = enter(self._ctx)
                try:
                    _log_request(self._environ, self._status, self._started)
                finally:
                    leave(token)


def _log_error(environ: WSGIEnvironment) -> None:
    """The door's own line for an exception that escapes the app, written
    while the request is still bound (so it carries the request id)."""
    from .._escape import log_text  # the error path only

    # Escaped: the server percent-decoded PATH_INFO, and a raw "%0a" in it
    # would forge a log line (log injection).
    _errors.error(
        "unhandled exception in %s %s",
        log_text(environ.get("REQUEST_METHOD", "?")),
        log_text(environ.get("PATH_INFO", "?")),
        exc_info=True,
    )
