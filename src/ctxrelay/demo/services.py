"""The three services of the order-confirmation story, served by uvicorn on 127.0.0.1.

* **member** (``/member/me``, ``/member/addresses``) and **cart**
  (``/cart/items``) stand for other teams' services: they know nothing of
  ctxrelay, read the raw headers, answer 401 without the user's session
  cookie, and report what arrived on the wire: whether the cookie came, the
  canary tag, the ``x-request-id`` and the time left (the deadline header).
  The cart answers with its canary assortment when the request carries
  ``x-gray: canary``.  The cart is deliberately slow: it works ``SLOW_CART``
  seconds on every call, unless the caller hangs up first, and keeps its own
  account of each call (:class:`CartLedger`): what arrived, how long it worked.
* **order** (FastAPI behind ctxrelay's ``RelayMiddleware`` with a default
  timeout, ``BUDGET``): ``GET /order/confirm`` builds the confirmation page.
  On the request thread it asks member who is logged in; then it fans out to
  member (addresses) and cart (items) on a thread pool, under the request's
  deadline less ``RENDER_RESERVE`` (the time it keeps to answer), and waits
  for both; a lookup cut at that deadline shows on the page as such.  It
  starts an audit thread that reads the request after the response is sent,
  and publishes a Celery task that mails the confirmation: both must outlive
  the request, so they start under ``ctxrelay.without_deadline()``.  It logs
  through stdlib ``logging``.

:class:`OrderService` is the same code in both walks.  ``relay`` switches
only what is missing without ctxrelay: the pool and the thread class (plain
``concurrent.futures`` / ``threading``, or ctxrelay's drop-ins); the Celery
switch is ``ctxrelay.integrations.celery.install`` (see the package).  In
both walks the request enters through ``RelayMiddleware`` and outgoing calls
carry the current context's headers (ctxrelay's httpx hook), as Spring's
``RequestContextHolder`` and a Feign interceptor do in Spring: the request
thread has the context either way.  Whether it follows the work is the
difference -- for the deadline too: with the relay, the pool thread's call to
the slow cart carries the deadline and is cut at it; without, the pool thread
has no deadline, and the call waits for the cart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.httpx import install

from .hops import (
    AUDIT,
    AUDIT_HOP,
    CART_HOP,
    HANDLER,
    HANDLER_HOP,
    HTTP,
    MEMBER_HOP,
    Hop,
    left_ms,
    observe,
)
from .shop import (
    BUDGET,
    CANARY,
    DEADLINE_HEADER,
    ORDER_ID,
    RENDER_RESERVE,
    SESSIONS,
    SLOW_CART,
    browser_headers,
)

__all__ = [
    "WAIT",
    "CartCall",
    "CartLedger",
    "OrderService",
    "browse",
    "cart_app",
    "member_app",
    "serve",
]

#: Seconds: the bound on every wait of the demo.
WAIT = 30.0

_log = logging.getLogger("shop.order")


# -- member and cart: other teams' services, reading raw headers ------------


def _arrived(request: Request) -> dict[str, Any]:
    """What reached this service on the wire."""
    timeout = request.headers.get(DEADLINE_HEADER, "")
    return {
        "cookie": request.cookies.get("session") in SESSIONS,
        "canary": request.headers.get("x-gray"),
        "request_id": request.headers.get("x-request-id"),
        "deadline_ms": int(timeout) if timeout.isdigit() else None,
    }


def _logged_in(request: Request) -> str | None:
    return SESSIONS.get(request.cookies.get("session", ""))


def _login_required(request: Request) -> JSONResponse:
    return JSONResponse({"error": "login required", "arrived": _arrived(request)}, 401)


def member_app() -> FastAPI:
    """The member service: who is logged in, and her addresses."""
    api = FastAPI(title="member")

    @api.get("/member/me")
    async def me(request: Request) -> JSONResponse:
        user = _logged_in(request)
        if user is None:
            return _login_required(request)
        return JSONResponse({"user": user, "points": 120, "arrived": _arrived(request)})

    @api.get("/member/addresses")
    async def addresses(request: Request) -> JSONResponse:
        if _logged_in(request) is None:
            return _login_required(request)
        found = ["1 Harbour Road, Leith", "7 Mill Lane, Ely"]
        return JSONResponse({"addresses": found, "arrived": _arrived(request)})

    return api


@dataclasses.dataclass(frozen=True)
class CartCall:
    """One call the slow cart worked on, in its own account."""

    #: ``time.monotonic()`` when it arrived, and when the cart stopped working
    #: on it (``None``: still working).
    started: float
    ended: float | None
    #: What arrived on the wire (see ``_arrived``).
    arrived: dict[str, Any]
    #: It worked its full ``SLOW_CART`` seconds; ``False``: it stopped because
    #: the caller hung up.
    finished: bool = False


class CartLedger:
    """The slow cart's own account of its calls, written as each arrives and
    ends: a caller that gives up never reads the answer, so this is where the
    demo learns what arrived and how long the cart kept working."""

    def __init__(self) -> None:
        self._calls: list[CartCall] = []
        self._changed = threading.Condition()

    def begin(self, arrived: dict[str, Any]) -> int:
        """A call arrived: its number in the ledger."""
        with self._changed:
            self._calls.append(CartCall(time.monotonic(), None, arrived))
            return len(self._calls) - 1

    def end(self, number: int, *, finished: bool) -> None:
        """The cart stopped working on call ``number``."""
        with self._changed:
            call = self._calls[number]
            self._calls[number] = dataclasses.replace(
                call, ended=time.monotonic(), finished=finished
            )
            self._changed.notify_all()

    def since(self, moment: float) -> list[CartCall]:
        """The calls that arrived at or after ``moment`` (``time.monotonic()``)."""
        with self._changed:
            return [call for call in self._calls if call.started >= moment]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the cart works on no call (bounded); ``True`` if it is idle."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all(call.ended is not None for call in self._calls), timeout
            )


def cart_app(ledger: CartLedger) -> FastAPI:
    """The cart service: the checked items; a canary assortment for canary
    traffic.  Slow: it works ``SLOW_CART`` seconds on every call -- less only
    if the caller hangs up -- and writes each call into ``ledger``."""
    api = FastAPI(title="cart")

    @api.get("/cart/items")
    async def items(request: Request) -> JSONResponse:
        number = ledger.begin(_arrived(request))
        finished = False
        try:
            done = time.monotonic() + SLOW_CART
            while not await request.is_disconnected():
                if time.monotonic() >= done:
                    finished = True
                    break
                await asyncio.sleep(0.01)
        finally:
            ledger.end(number, finished=finished)
        if _logged_in(request) is None:
            return _login_required(request)
        canary = request.headers.get("x-gray") == CANARY
        found = ["tea", "kettle", "mugs (canary bundle)"] if canary else ["tea", "kettle"]
        variant = "canary" if canary else "stable"
        return JSONResponse({"variant": variant, "items": found, "arrived": _arrived(request)})

    return api


# -- order: the confirmation page --------------------------------------------


def _summary(status: int, body: dict[str, Any]) -> str:
    if status != 200:
        return f"{status} {body.get('error', 'error')}"
    if "addresses" in body:
        return f"200: {len(body['addresses'])} addresses"
    return f"200: {body.get('variant')} cart, {len(body.get('items', ()))} items"


class OrderService:
    """The order service; ``relay`` chooses plain or ctxrelay pool and threads.

    ``confirmation`` is the Celery task that mails the confirmation.  Each
    piece of work records the :class:`~ctxrelay.demo.hops.Hop` it observed;
    :meth:`hops` returns them once the handler has ended (it can outlive the
    response the door gave) and the audit has run.
    """

    def __init__(self, *, relay: bool, member: str, cart: str, confirmation: Any) -> None:
        self.member = member
        self.cart = cart
        self.confirmation = confirmation
        self.pool: concurrent.futures.Executor
        self.thread_class: type[threading.Thread]
        if relay:
            self.pool = ctxrelay.ThreadPoolExecutor(2, thread_name_prefix="ctxrelay-pool")
            self.thread_class = ctxrelay.Thread
        else:
            self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="plain-pool")
            self.thread_class = threading.Thread
        # The same in both walks: adds the *current* context's headers.
        self.http: httpx.Client = install(httpx.Client(timeout=WAIT))
        #: Set by the demo once the browser has the whole response.
        self.response_sent: threading.Event = threading.Event()
        #: The Celery result of the published confirmation, once published.
        self.published: Any = None
        #: The audit thread, once started.
        self.audit: threading.Thread | None = None
        self._hops: dict[str, Hop] = {}
        self._lock = threading.Lock()
        self._handled = threading.Event()

    def app(self) -> RelayMiddleware:
        """The ASGI app: FastAPI, wrapped (outermost) in ctxrelay's door,
        which gives every request ``BUDGET`` seconds."""
        api = FastAPI(title="order")
        api.add_api_route("/order/confirm", self.endpoint, methods=["GET"])
        return RelayMiddleware(api, timeout=BUDGET)

    def endpoint(self) -> dict[str, Any]:
        """``GET /order/confirm``.  A sync endpoint: FastAPI runs it on a
        worker thread, with the request's context copied in (fastapi #953).
        When the door answers 504, this thread still runs to its end: a
        thread cannot be interrupted."""
        try:
            return self.confirm()
        finally:
            self._handled.set()

    def confirm(self) -> dict[str, Any]:
        """The confirmation page (the Spring original's ``confirmOrder``)."""
        status, me = self._get(f"{self.member}/member/me")
        user = me.get("user")
        # The Spring original's LoginUserInterceptor: the user, for everything below.
        with ctxrelay.bind({"user": user} if isinstance(user, str) else {}):
            self._record_call(
                HANDLER_HOP,
                HANDLER,
                status,
                me,
                message=f"confirming {ORDER_ID} for {user}, {me.get('points')} points",
                result=f"member /me: {status}, user {user}",
            )
            # Both lookups on the pool at once, then wait for both -- within
            # the request's deadline, less the time kept to answer.
            with ctxrelay.deadline(_for_lookups()):
                addresses = self.pool.submit(
                    self._fetch, MEMBER_HOP, f"{self.member}/member/addresses"
                )
                items = self.pool.submit(self._fetch, CART_HOP, f"{self.cart}/cart/items")
                page = {"order": ORDER_ID, "addresses": _part(addresses), "items": _part(items)}
            # Work that must outlive the request: its fields, not its deadline.
            with ctxrelay.without_deadline():
                # An audit nobody waits for; it outlives the response.
                self.audit = self.thread_class(target=self._audit, name="audit")
                self.audit.start()
                # The asynchronous work, through a broker.
                self.published = self.confirmation.delay(ORDER_ID)
        return page

    def _get(self, url: str) -> tuple[int, dict[str, Any]]:
        try:
            response = self.http.get(url)
            body = response.json()
            return response.status_code, body if isinstance(body, dict) else {}
        except ctxrelay.DeadlineExceeded as exc:  # before httpx's own: it is one too
            return 0, {"cut": True, "error": f"DeadlineExceeded: {exc}"}
        except (httpx.HTTPError, ValueError) as exc:
            return 0, {"error": f"{type(exc).__name__}: {exc}"}

    def _fetch(self, hop: str, url: str) -> list[str] | str:
        """A remote call made from a pool thread (a Feign call in the Spring
        original): what it found, or what the page says instead."""
        had = left_ms()
        started = time.monotonic()
        status, body = self._get(url)
        took = time.monotonic() - started
        cut = body.get("cut") is True
        if cut:
            message = f"{hop} cut at the deadline after {took:.2f} s"
            result = f"cut at the deadline after {took:.2f} s: DeadlineExceeded"
        else:
            message = f"{hop} answered {status}"
            result = f"{_summary(status, body)} ({took:.2f} s)"
        self._record_call(
            hop, HTTP, status, body, message=message, result=result, deadline_ms=had, cut=cut
        )
        if cut:
            return "not shown: no answer within the deadline"
        found = body.get("addresses", body.get("items", []))
        return [str(item) for item in found]

    def _audit(self) -> None:
        """Work that reads the request after the response is sent."""
        # By now the server has finished with the request (a servlet
        # container recycles it).  ctxrelay.request() is a snapshot, a value: it stays.
        self.response_sent.wait(WAIT)
        after = self.response_sent.is_set()
        request = ctxrelay.request()
        if request is None:
            message = f"audit of {ORDER_ID}: no request to read"
            result, cookie, canary = "ctxrelay.request() is None", False, None
        else:
            line = f"{request.method} {request.path}"
            message = f"audit of {ORDER_ID}: {line} from {request.client}"
            result = f"read {line}: headers and cookies"
            cookie = request.cookies.get("session") in SESSIONS
            canary = request.headers.get("x-gray")
        self._record(
            observe(
                AUDIT_HOP,
                AUDIT,
                _log,
                message,
                cookie=cookie,
                canary=canary,
                result=result,
                after_response=after,
            )
        )

    def _record_call(
        self,
        hop: str,
        kind: str,
        status: int,
        body: dict[str, Any],
        *,
        message: str,
        result: str,
        deadline_ms: int | None = None,
        cut: bool = False,
    ) -> None:
        """Record a hop that called another service: what arrived there (a
        call cut at the deadline heard nothing back: see ``CartLedger``)."""
        arrived = body.get("arrived", {})
        arrived_id = arrived.get("request_id")
        arrived_ms = arrived.get("deadline_ms")
        self._record(
            observe(
                hop,
                kind,
                _log,
                message,
                cookie=arrived.get("cookie") is True,
                canary=arrived.get("canary"),
                result=result,
                status=None if cut else status,
                arrived_request_id=arrived_id if isinstance(arrived_id, str) else None,
                deadline_ms=deadline_ms,
                arrived_deadline_ms=arrived_ms if isinstance(arrived_ms, int) else None,
                cut=cut,
            )
        )

    def _record(self, hop: Hop) -> None:
        with self._lock:
            self._hops[hop.name] = hop

    def hops(self) -> dict[str, Hop]:
        """The hops recorded, once the handler has ended and the audit thread
        has been joined (each wait bounded): nothing of the walk runs on."""
        self._handled.wait(WAIT)
        if self.audit is not None:
            self.audit.join(WAIT)
        with self._lock:
            return dict(self._hops)

    def close(self) -> None:
        """Stop the pool and the HTTP client."""
        self.pool.shutdown(wait=True)
        self.http.close()


def _for_lookups() -> float | None:
    """The lookups' seconds: what the request has left, less the time the
    handler keeps to answer (``None``: no deadline, none for them either)."""
    left = ctxrelay.remaining()
    return None if left is None else max(0.0, left - RENDER_RESERVE)


def _part(lookup: concurrent.futures.Future[list[str] | str]) -> list[str] | str:
    """A lookup's part of the page; a lookup the pool did not start because
    its deadline had passed says so."""
    try:
        return lookup.result()
    except ctxrelay.DeadlineExceeded:
        return "not shown: not started before the deadline"


# -- serving and browsing ---------------------------------------------------


@contextmanager
def serve(app: Any, name: str) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port>; yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"{name}-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"the {name} service did not start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT)


def browse(order_url: str, request_id: str) -> httpx.Response:
    """The browser: ``GET /order/confirm`` with the session cookie, a request id
    and the canary tag.  A plain client: the browser knows nothing of ctxrelay."""
    with httpx.Client(timeout=WAIT) as browser:
        return browser.get(f"{order_url}/order/confirm", headers=browser_headers(request_id))
