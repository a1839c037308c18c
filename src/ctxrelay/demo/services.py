"""The three services of the order-confirmation story, served by uvicorn on 127.0.0.1.

* **member** (``/member/me``, ``/member/addresses``) and **cart**
  (``/cart/items``) stand for other teams' services: they know nothing of
  ctxrelay, read the raw headers, answer 401 without the user's session
  cookie, and report what arrived on the wire: whether the cookie came, the
  canary tag and the ``x-request-id``.  The cart answers with its
  canary assortment when the request carries ``x-gray: canary``.
* **order** (FastAPI behind ctxrelay's ``RelayMiddleware``): ``GET
  /order/confirm`` builds the confirmation page.  On the request thread it
  asks member who is logged in; then it fans out to member (addresses) and
  cart (items) on a thread pool and waits for both; it starts an audit thread
  that reads the request after the response is sent; it publishes a Celery
  task that mails the confirmation.  It logs through
  stdlib ``logging``.

:class:`OrderService` is the same code in both walks.  ``relay`` switches
only what is missing without ctxrelay: the pool and the thread class (plain
``concurrent.futures`` / ``threading``, or ctxrelay's drop-ins); the Celery
switch is ``ctxrelay.integrations.celery.install`` (see the package).  In
both walks the request enters through ``RelayMiddleware`` and outgoing calls
carry the current context's headers (ctxrelay's httpx hook), as Spring's
``RequestContextHolder`` and a Feign interceptor do in Spring: the request
thread has the context either way.  Whether it follows the work is the
difference.
"""

from __future__ import annotations

import concurrent.futures
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
    observe,
)
from .shop import CANARY, ORDER_ID, SESSIONS, browser_headers

__all__ = ["WAIT", "OrderService", "browse", "cart_app", "member_app", "serve"]

#: Seconds: the bound on every wait of the demo.
WAIT = 30.0

_log = logging.getLogger("shop.order")


# -- member and cart: other teams' services, reading raw headers ------------


def _arrived(request: Request) -> dict[str, Any]:
    """What reached this service on the wire."""
    return {
        "cookie": request.cookies.get("session") in SESSIONS,
        "canary": request.headers.get("x-gray"),
        "request_id": request.headers.get("x-request-id"),
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


def cart_app() -> FastAPI:
    """The cart service: the checked items; a canary assortment for canary traffic."""
    api = FastAPI(title="cart")

    @api.get("/cart/items")
    async def items(request: Request) -> JSONResponse:
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
    :meth:`hops` returns them once the audit has run.
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
        self.http = install(httpx.Client(timeout=WAIT))
        #: Set by the demo once the browser has the whole response.
        self.response_sent = threading.Event()
        #: The Celery result of the published confirmation, once published.
        self.published: Any = None
        self._hops: dict[str, Hop] = {}
        self._lock = threading.Lock()
        self._audited = threading.Event()

    def app(self) -> RelayMiddleware:
        """The ASGI app: FastAPI, wrapped (outermost) in ctxrelay's door."""
        api = FastAPI(title="order")
        api.add_api_route("/order/confirm", self.confirm, methods=["GET"])
        return RelayMiddleware(api)

    def confirm(self) -> dict[str, Any]:
        """``GET /order/confirm``.  A sync endpoint: FastAPI runs it on a
        worker thread, with the request's context copied in (fastapi #953)."""
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
            # Both lookups on the pool at once, then wait for both.
            addresses = self.pool.submit(self._fetch, MEMBER_HOP, f"{self.member}/member/addresses")
            items = self.pool.submit(self._fetch, CART_HOP, f"{self.cart}/cart/items")
            page = {"order": ORDER_ID, "addresses": addresses.result(), "items": items.result()}
            # An audit nobody waits for; it outlives the response.
            self.thread_class(target=self._audit, name="audit").start()
            # The asynchronous work, through a broker.
            self.published = self.confirmation.delay(ORDER_ID)
        return page

    def _get(self, url: str) -> tuple[int, dict[str, Any]]:
        try:
            response = self.http.get(url)
            body = response.json()
            return response.status_code, body if isinstance(body, dict) else {}
        except (httpx.HTTPError, ValueError) as exc:
            return 0, {"error": f"{type(exc).__name__}: {exc}"}

    def _fetch(self, hop: str, url: str) -> list[str]:
        """A remote call made from a pool thread (a Feign call in the Spring original)."""
        status, body = self._get(url)
        message = f"{hop} answered {status}"
        self._record_call(hop, HTTP, status, body, message=message, result=_summary(status, body))
        found = body.get("addresses", body.get("items", []))
        return [str(item) for item in found]

    def _audit(self) -> None:
        """Work that reads the request after the response is sent."""
        try:
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
        finally:
            self._audited.set()

    def _record_call(
        self, hop: str, kind: str, status: int, body: dict[str, Any], *, message: str, result: str
    ) -> None:
        """Record a hop that called another service: what arrived there."""
        arrived = body.get("arrived", {})
        arrived_id = arrived.get("request_id")
        self._record(
            observe(
                hop,
                kind,
                _log,
                message,
                cookie=arrived.get("cookie") is True,
                canary=arrived.get("canary"),
                result=result,
                status=status,
                arrived_request_id=arrived_id if isinstance(arrived_id, str) else None,
            )
        )

    def _record(self, hop: Hop) -> None:
        with self._lock:
            self._hops[hop.name] = hop

    def hops(self) -> dict[str, Hop]:
        """The hops recorded, after waiting (bounded) for the audit thread."""
        self._audited.wait(WAIT)
        with self._lock:
            return dict(self._hops)

    def close(self) -> None:
        """Stop the pool and the HTTP client."""
        self.pool.shutdown(wait=True)
        self.http.close()


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
