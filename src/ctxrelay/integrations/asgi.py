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

import asyncio
import heapq
import logging
import math
import re
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from time import monotonic
from types import MethodType
from typing import Any

from .._context import REQUEST_ID, Cancellation, Context, begin, finish, narrowed
from .._deadline import check_timeout, deadline_of
from .._inbound import (
    Door,
    RequestIdGenerator,
    RequestIdTransformer,
    RequestIdValidator,
    admit_asgi,
    log_request,
    open_asgi_echo,
    valid_request_id,
)

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
    ``timeout``
        A default deadline for every request, in seconds (Spring's
        ``setDefaultTimeout``); a trusted caller's remaining-time header can
        only narrow it.  When it passes, the handler is cancelled: answered
        504 with the request id if the response has not started, closed if
        it has.  With a deadline, a client disconnect cancels the request
        too (``ctxrelay.cancelled()``/``checkpoint()``; pool tasks not yet
        started fail with ``RequestCancelled``).

    The door's options (same names on the WSGI middleware and in Django's
    ``CTXRELAY``; docs/web.md, "Door options"):

    ``header_name``
        Also a sequence of names: the first one present with a valid value
        wins; the echo uses the first name.
    ``generator``
        ``callable() -> str`` making new ids (validated like an inbound id;
        a failing or invalid one falls back to a random id, logged).
    ``transformer``
        ``callable(str) -> str`` applied to the inbound or generated id
        before it is validated, bound and echoed
        (:func:`ctxrelay.integrations.aws_trace_id` reads AWS's header).
    ``response_header``
        Echo under this name instead of the (first) inbound one.
    ``update_request_header``
        Default on: when the id was generated or replaced, the scope's
        headers and the snapshot carry the id in force.
    ``expose_header``
        Add the echoed name to ``Access-Control-Expose-Headers``.
    ``exclude_paths``
        Exact paths (``str``) or compiled regular expressions (matched
        whole): such requests run without an id, an echo or a log line.
    ``reject_invalid``
        Answer an invalid inbound id with 400; the app is not called.
    ``log_requests``
        One INFO line per request on ``ctxrelay.asgi``, written while the
        context is bound: method, escaped path, status, duration in
        milliseconds, and ``user=`` when a ``user_id`` or ``user`` field is
        bound.

    A replaced inbound id is logged at WARNING on ``ctxrelay`` (rate-limited,
    naming the peer).

    ``lifespan`` and other scope types pass through untouched.
    """

    __slots__ = ("_door", "app", "echo", "log_errors", "timeout")

    def __init__(
        self,
        app: ASGIApp,
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
            # Checked here: otherwise the first request fails with Python's own TypeError.
            raise TypeError(
                f"RelayMiddleware wraps an ASGI app (a callable taking scope, receive, send), "
                f"not {type(app).__name__}"
            )
        self.app: ASGIApp = app
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)  # lifespan: untouched
            return
        door = self._door
        if door.options is not None:
            await _with_options(self, scope, receive, send)
            return
        ctx, line = open_asgi_echo(door, scope, True)
        echo = line if self.echo else None
        if self.timeout is not None or (
            door.current_plan.trusting and deadline_of(ctx) is not None
        ):
            # The echo is added by the exchange's own send: one wrapper per message.
            await _bounded(self, scope, receive, send, ctx, echo=echo)
            return
        if echo is not None:
            # A bound method of (send, line): the cheapest callable that
            # carries two values (no cells, no partial's argument dict).
            send = MethodType(_send_with_id, (send, echo))
        token = begin(ctx)
        try:
            await self.app(scope, receive, send)
        except Exception:
            if self.log_errors:
                _log_error(scope)
            raise
        finally:
            finish(token, ctx)


async def _with_options(door: RelayMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """The request when some door option is set (the plain path above pays
    nothing for them)."""
    options = door._door.options
    assert options is not None  # checked by the caller
    admitted = admit_asgi(door._door, scope)
    ctx = admitted.ctx
    if ctx is None:
        if admitted.rejected:
            await _answer_400(send, scope)
        else:
            await door.app(scope, receive, send)  # an excluded path: untouched
        return
    if door.echo:
        name = door._door.response_header.encode("latin-1")
        send = _echoing(send, (name, ctx._fields[REQUEST_ID].encode("latin-1")))
        if options.expose_header:
            send = _exposing(send, name)
    status: list[int] = []
    if options.log_requests:
        send = _recording(send, status)
    started = monotonic()
    if door.timeout is not None or deadline_of(ctx) is not None:
        await _bounded(
            door, scope, receive, send, ctx, status if options.log_requests else None, started
        )
        return
    token = begin(ctx)
    try:
        await door.app(scope, receive, send)
    except Exception:
        if door.log_errors:
            _log_error(scope)
        if not status:
            status.append(500)
        raise
    finally:
        if options.log_requests:
            _log_request(scope, status, started)
        finish(token, ctx)


def _log_request(scope: Scope, status: list[int], started: float) -> None:
    log_request(
        _errors,
        scope.get("method", "WEBSOCKET"),
        scope.get("path", "?"),
        status[0] if status else "-",
        started,
    )


async def _answer_400(send: Send, scope: Scope) -> None:
    if scope.get("type") == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = b"invalid request id\n"
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _recording(send: Send, status: list[int]) -> Send:
    def send_recording(message: Message) -> Awaitable[None]:
        kind = message.get("type")
        if kind == "http.response.start" and not status:
            status.append(message.get("status", 0))
        elif kind == "websocket.accept" and not status:
            status.append(101)
        return send(message)

    return send_recording


def _exposing(send: Send, name: bytes) -> Send:
    def send_exposing(message: Message) -> Awaitable[None]:
        kind = message.get("type")
        if kind == "http.response.start":
            message = _with_exposed(message, name)
        return send(message)

    return send_exposing


_EXPOSE = b"access-control-expose-headers"


def _with_exposed(message: Message, name: bytes) -> Message:
    headers = list(message.get("headers") or ())
    for index, pair in enumerate(headers):
        try:
            key, value = pair
        except (TypeError, ValueError):
            continue
        if isinstance(key, (bytes, bytearray)) and bytes(key).lower() == _EXPOSE:
            if not isinstance(value, (bytes, bytearray)):
                return message
            listed = [part.strip().lower() for part in bytes(value).split(b",")]
            if name in listed or b"*" in listed:
                return message
            headers[index] = (key, bytes(value) + b", " + name)
            return {**message, "headers": headers}
    headers.append((_EXPOSE, name))
    return {**message, "headers": headers}


async def _bounded(
    door: RelayMiddleware,
    scope: Scope,
    receive: Receive,
    send: Send,
    ctx: Context,
    status: list[int] | None = None,
    started: float = 0.0,
    *,
    echo: tuple[bytes, bytes] | None = None,
) -> None:
    """The request under a deadline (``timeout=``, or one a trusted caller
    sent): when it passes, the handler is cancelled -- answered 504 with the
    request id if the response has not started, closed if it has -- and a
    client that disconnects cancels the request (``ctxrelay.cancelled()``,
    ``checkpoint()``, pool tasks not started yet).

    Per request this costs a guard, an exchange and the narrowed context;
    the timers are the event loop's one :class:`_Watcher`, shared by all its
    requests (two timer handles per request, armed and cancelled, were most
    of the door's cost under ``timeout=``)."""
    loop = asyncio.get_running_loop()
    now = monotonic()
    timeout = door.timeout
    guard = _Guard(asyncio.current_task(loop))
    ctx = narrowed(ctx, None if timeout is None else now + timeout, guard)
    guard.at = ctx._deadline
    http = scope.get("type") == "http"
    exchange = _Exchange(receive, send, guard, now + WATCH_AFTER, echo)
    watcher = _last_watcher
    if watcher is None or watcher.loop is not loop:
        watcher = _watcher_of(loop)
    watcher.add(guard, exchange if http else None)
    token = begin(ctx)
    try:
        await door.app(scope, exchange.receive, exchange.send)
    except asyncio.CancelledError:
        if not guard.fired:
            raise
        uncancel = getattr(guard.task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
        _log_deadline(scope)
        if not exchange.started and http:
            await _answer_504(exchange.send, ctx)
    except Exception:
        if door.log_errors:
            _log_error(scope)
        if status is not None and not status:
            status.append(500)
        raise
    finally:
        # Ended: the watcher skips both from now on (exchange.close(),
        # inlined where it has no pump to stop: this runs per request).
        guard.live = False
        guard.task = None
        exchange.closed = True
        if exchange._pump is not None:
            exchange.close()
        if status is not None:  # log_requests
            if guard.fired and not status:
                status.append(504)
            _log_request(scope, status, started)
        finish(token, ctx)


class _Guard(Cancellation):
    """A request's cancellation, and its deadline as the watcher holds it:
    the task to cancel when it passes.  One object, since the request needs
    its :class:`Cancellation` anyway.  When the request ends, ``live`` turns
    false and the task is let go (the watcher may hold a finished guard
    until it next looks)."""

    __slots__ = ("at", "fired", "live", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.cancelled = False
        self.reason = ""
        self.task = task
        self.at: float | None = None
        self.fired = False
        self.live = True

    def __lt__(self, other: _Guard) -> bool:  # heapq, for deadlines out of order
        return (self.at or 0.0) < (other.at or 0.0)

    def fire(self) -> None:
        self.fired = True
        self.cancel("the deadline passed")
        if self.task is not None:
            self.task.cancel("ctxrelay: the request's deadline passed")


class _Watcher:
    """The deadlines and the disconnect watches of one event loop's bounded
    requests, on a single timer.

    With one default ``timeout=``, deadlines arrive in increasing order, and
    so do the watch times (``WATCH_AFTER`` after the start): each is a deque
    appended at the back and read from the front, and the one timer is armed
    at the earliest front.  A request that ends is not removed (lazy
    deletion): its entry is skipped when the timer reaches it, and the
    deque of deadlines is compacted when finished entries pile up behind a
    long request, so it never holds many more than the requests in flight.
    A deadline earlier than the last one queued (a caller's header narrowed
    it) goes to a heap instead.
    """

    __slots__ = ("_deadlines", "_handle", "_late", "_limit", "_watches", "_when", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._deadlines: deque[_Guard] = deque()
        self._late: list[_Guard] = []
        self._watches: deque[_Exchange] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._limit = _COMPACT_AT

    def add(self, guard: _Guard, exchange: _Exchange | None) -> None:
        at = guard.at
        first = math.inf
        if at is not None:
            deadlines = self._deadlines
            if not deadlines or deadlines[-1].at <= at:  # type: ignore[operator]
                deadlines.append(guard)
                if len(deadlines) > self._limit:
                    self._compact()
            else:
                heapq.heappush(self._late, guard)
            first = at
        if exchange is not None:
            self._watches.append(exchange)
            if exchange.watch_at < first:
                first = exchange.watch_at
        if self._handle is None or first < self._when:
            self._arm(first)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if when == math.inf:
            return
        self._when = when
        loop = self.loop
        self._handle = loop.call_at(loop.time() + (when - monotonic()), self._run)

    def _run(self) -> None:
        self._handle = None
        now = monotonic()
        try:
            watches = self._watches
            while watches and (watches[0].closed or watches[0].watch_at <= now):
                exchange = watches.popleft()
                if not exchange.closed:
                    exchange.watch()
            deadlines = self._deadlines
            while deadlines and (not deadlines[0].live or deadlines[0].at <= now):  # type: ignore[operator]
                guard = deadlines.popleft()
                if guard.live:
                    guard.fire()
            late = self._late
            while late and (not late[0].live or late[0].at <= now):  # type: ignore[operator]
                guard = heapq.heappop(late)
                if guard.live:
                    guard.fire()
        finally:
            first = math.inf
            if self._watches:
                first = self._watches[0].watch_at
            if self._deadlines and self._deadlines[0].at < first:  # type: ignore[operator]
                first = self._deadlines[0].at  # type: ignore[assignment]
            if self._late and self._late[0].at < first:  # type: ignore[operator]
                first = self._late[0].at  # type: ignore[assignment]
            self._arm(first)

    def _compact(self) -> None:
        live = [guard for guard in self._deadlines if guard.live]
        self._deadlines = deque(live)
        self._late = [guard for guard in self._late if guard.live]
        heapq.heapify(self._late)
        # Amortized: the next compaction waits for as many new entries.
        self._limit = max(_COMPACT_AT, 2 * len(live))


#: Finished entries the watcher's deque of deadlines may hold before it is
#: compacted (more when many requests are in flight).
_COMPACT_AT = 1024

_last_watcher: _Watcher | None = None
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = (
    weakref.WeakKeyDictionary()
)


def _watcher_of(loop: asyncio.AbstractEventLoop) -> _Watcher:
    """The loop's watcher (made on its first bounded request); remembered
    as the last one used, which is the one the next request wants."""
    global _last_watcher
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = _Watcher(loop)
    _last_watcher = watcher
    return watcher


class _Exchange:
    """The app's side of receive/send under a deadline: whether the response
    started, and a client disconnect seen as soon as it happens.

    A request still running after :data:`WATCH_AFTER` seconds gets a pump,
    which from then on is the only reader of the server's ``receive``, and
    the app reads from it: so a disconnect is seen even while the handler
    does not read at all (a sync endpoint in a thread).  Fast requests never
    pay for it.  The pump stays at most one message ahead of the app (an
    upload is never buffered whole), and once the client is gone every
    further ``receive`` answers ``http.disconnect``, as servers do.
    """

    __slots__ = (
        "_cancel", "_echo", "_gone", "_pump", "_queue", "_reading", "_receive", "_send", "closed",
        "started", "watch_at",
    )  # fmt: skip

    def __init__(
        self,
        receive: Receive,
        send: Send,
        cancel: Cancellation,
        watch_at: float,
        echo: tuple[bytes, bytes] | None,
    ) -> None:
        self._echo = echo
        self._receive = receive
        self._send = send
        self._cancel = cancel
        self._queue: asyncio.Queue[Message] | None = None
        self._gone: Message | None = None
        self._pump: asyncio.Task[None] | None = None
        self._reading = False
        self.started = False
        self.closed = False
        self.watch_at = watch_at

    def watch(self) -> None:
        """Start the pump, unless the app is reading right now (two readers
        of one ``receive`` would split its messages): then the app's own
        read sees the disconnect."""
        if self._pump is None and not self._reading:
            self._queue = asyncio.Queue(maxsize=1)
            self._pump = asyncio.ensure_future(self._read_ahead())

    async def receive(self) -> Message:
        queue = self._queue
        if queue is None:
            self._reading = True
            try:
                message = await self._receive()
            finally:
                self._reading = False
            self._watch(message)
            return message
        if self._gone is not None and queue.empty():
            return self._gone
        return await queue.get()

    def _watch(self, message: Message) -> bool:
        kind = message.get("type")
        if kind == "http.disconnect" or kind == "websocket.disconnect":
            self._cancel.cancel("the client disconnected")
            return True
        return False

    async def _read_ahead(self) -> None:
        queue = self._queue
        assert queue is not None  # set by watch()
        while True:
            message = await self._receive()
            if self._watch(message):
                self._gone = message
                if queue.empty():
                    queue.put_nowait(message)
                return
            await queue.put(message)  # waits for the app: one message ahead

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine function: it hands back the server's own awaitable
        # (no extra coroutine per message, as _echoing).
        kind = message.get("type")
        if kind == "http.response.start" or kind == "websocket.accept":
            self.started = True
            if self._echo is not None:
                message = _with_header(message, self._echo)
        return self._send(message)

    def close(self) -> None:
        self.closed = True
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()


#: Seconds a request under a deadline runs before its client is watched for
#: a disconnect while the handler is not reading (see _Exchange).
WATCH_AFTER = 0.05


async def _answer_504(send: Send, ctx: Context) -> None:
    body = b"deadline exceeded (request id " + ctx[REQUEST_ID].encode("latin-1") + b")\n"
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 504,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
    except Exception:  # the client may be gone already: nothing to answer
        _errors.debug("ctxrelay: could not send the 504", exc_info=True)


def _log_deadline(scope: Scope) -> None:
    from .._escape import log_text

    _errors.error(
        "deadline exceeded in %s %s",
        log_text(scope.get("method", "WEBSOCKET")),
        log_text(scope.get("path", "?")),
    )


def _send_with_id(bound: tuple[Send, tuple[bytes, bytes]], message: Message) -> Awaitable[None]:
    """The plain path's send, bound to ``(send, header)`` (see
    :class:`RelayMiddleware`): the header added to the response start.

    Not a coroutine function: it hands back the server's own awaitable,
    which the app awaits -- no extra coroutine per message.  The common case
    (a list of pairs of ``bytes``) is :func:`_with_header` inlined: this
    runs for every response."""
    send, header = bound
    kind = message.get("type")
    if kind != "http.response.start" and kind != "websocket.accept":
        return send(message)
    headers = message.get("headers")
    if type(headers) is not list or type(message) is not dict:
        return send(_with_header(message, header))
    name = header[0]
    size = len(name)
    try:
        for key, _ in headers:
            # The length first: most names differ in it.  An id the app set
            # itself wins.
            if len(key) == size and (type(key) is not bytes or key.lower() == name):
                return send(_with_header(message, header))  # the app's, or odd: decided there
    except (TypeError, ValueError):  # odd entries: _with_header reports them
        return send(_with_header(message, header))
    # A copy: the app may reuse its message dict.
    copy = message.copy()
    copy["headers"] = [*headers, header]
    return send(copy)


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
