"""A three-service chain on 127.0.0.1 under one deadline: ASGI -> WSGI -> ASGI.

* the front: uvicorn, ``RelayMiddleware(timeout=...)``, calls the middle
  with an httpx ``AsyncClient`` made with ``install()``;
* the middle: waitress, the WSGI ``RelayMiddleware``, trusts the front's
  peer, calls the back with a relaying ``requests`` session;
* the back: uvicorn, ``RelayMiddleware()``, trusts its caller; its sync
  endpoint (in a thread, as Starlette runs one) calls a slow server (which
  answers after 30 s) with a relaying ``requests`` session and its own 30 s
  timeout.

Every hop does a little work and reports ``ctxrelay.remaining()``.  The
tests assert what a user would check: the budget each hop sees only
shrinks, the last hop's slow call is cut by the deadline (the slow server
sees the client go away, not its own 30 s pass), work queued after the
deadline does not run, the front answers 504 with the request id, and 500
concurrent requests with distinct budgets each see their own.  Never
elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import ctxrelay
from ctxrelay import DeadlineExceeded, Policy
from ctxrelay.integrations import httpx as relay_httpx
from ctxrelay.integrations import requests as relay_requests
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.wsgi import RelayMiddleware as WsgiRelayMiddleware

from .servers import CONNECTIONS, WAIT, Mailbox, new_id, serve_asgi, serve_wsgi

HEADER = "x-request-timeout-ms"
SLOW = 30.0  # the slow server's delay and the last hop's own client timeout
WORK = 0.005  # what each hop does before it calls on

BOX = Mailbox()


def _hop(name: str) -> dict[str, Any]:
    return {"hop": name, "request_id": ctxrelay.request_id(), "left": ctxrelay.remaining()}


# -- the slow server: answers after SLOW seconds, or sees the client go --------------------
async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    key = parse_qs(scope["query_string"].decode())["key"][0]
    BOX.post(key + "-slow-header", dict(scope["headers"]).get(HEADER.encode(), b"").decode())
    await receive()
    try:
        message = await asyncio.wait_for(receive(), SLOW)
    except asyncio.TimeoutError:
        BOX.post(key + "-slow-end", "waited the full delay")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})
        return
    BOX.post(key + "-slow-end", message["type"])


# -- the back (ASGI): a sync endpoint, run in a thread --------------------------------------
class Back:
    def __init__(self) -> None:
        self.slow_url = ""
        self.http = relay_requests.Session()

    def endpoint(self, request: Request) -> Response:
        time.sleep(WORK)
        me = _hop("back")
        if "slow" not in request.query_params:
            return JSONResponse([me])
        rid = me["request_id"]
        try:
            self.http.get(f"{self.slow_url}/slow?key={rid}", timeout=SLOW)
            BOX.post(rid + "-back-call", "answered")
        except Exception as exc:
            BOX.post(rid + "-back-call", type(exc).__name__)
        # Work queued after the deadline passed is not run.
        ran: list[str] = []
        with ctxrelay.ThreadPoolExecutor(1) as pool:
            future = pool.submit(ran.append, "late")
            try:
                future.result(WAIT)
                BOX.post(rid + "-back-queued", "ran")
            except DeadlineExceeded:
                BOX.post(rid + "-back-queued", "not run" if not ran else "ran")
        return PlainTextResponse("out of time", status_code=504)


# -- the middle (WSGI): calls the back with requests ---------------------------------------
class Middle:
    def __init__(self) -> None:
        self.back_url = ""
        self.http = relay_requests.Session()
        # One kept connection per waitress thread: no new one per call.
        self.http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=CONNECTIONS))

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        time.sleep(WORK)
        me = _hop("middle")
        query = environ.get("QUERY_STRING", "")
        try:
            got = self.http.get(f"{self.back_url}/back?{query}", timeout=SLOW)
            status, body = got.status_code, got.content
        except DeadlineExceeded:
            status, body = 504, b"out of time"
        if status == 200:
            body = json.dumps([me, *json.loads(body)]).encode()
        start_response(f"{status} X", [("content-type", "application/json")])
        return [body]


# -- the front (ASGI): calls the middle with httpx --------------------------------------------
class Front:
    def __init__(self) -> None:
        self.middle_url = ""
        self.client: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def endpoint(self, request: Request) -> Response:
        await asyncio.sleep(WORK)
        me = _hop("front")
        if self.client is None:  # one client for the server's loop
            self.loop = asyncio.get_running_loop()
            limits = httpx.Limits(max_connections=CONNECTIONS)
            self.client = relay_httpx.install(httpx.AsyncClient(timeout=SLOW, limits=limits))
        got = await self.client.get(f"{self.middle_url}/middle?{request.url.query}")
        if got.status_code != 200:
            return PlainTextResponse(got.text, status_code=got.status_code)
        return JSONResponse([me, *got.json()])

    def close(self) -> None:
        if self.client is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(WAIT)


@pytest.fixture(autouse=True)
def _policy() -> Iterator[None]:
    before = ctxrelay.active_policy()
    # In house on 127.0.0.1: the time left goes out to it and is honoured
    # from it (each hop trusts its caller's peer).
    ctxrelay.configure(
        Policy(trusted_peers=("127.0.0.1",), routes=(Policy.Route(hosts=("127.0.0.1",)),))
    )
    try:
        yield
    finally:
        ctxrelay.configure(before)


@pytest.fixture
def chain(request: pytest.FixtureRequest) -> Iterator[str]:
    """The front's URL; ``request.param`` is the front's ``timeout=``."""
    timeout = float(getattr(request, "param", 1.0))
    back, middle, front = Back(), Middle(), Front()
    back_app = RelayMiddleware(Starlette(routes=[Route("/back", back.endpoint)]))
    front_app = RelayMiddleware(
        Starlette(routes=[Route("/front", front.endpoint)]), timeout=timeout
    )
    with (
        serve_asgi(slow_app) as slow_url,
        serve_asgi(back_app) as back_url,
        serve_wsgi(WsgiRelayMiddleware(middle), threads=32) as middle_url,
        serve_asgi(front_app) as front_url,
    ):
        back.slow_url, middle.back_url, front.middle_url = slow_url, back_url, middle_url
        try:
            yield front_url
        finally:
            front.close()
            back.http.close()
            middle.http.close()


def test_the_budget_each_hop_sees_only_shrinks(chain: str) -> None:
    rid = new_id("chain")
    got = httpx.get(f"{chain}/front", headers={"x-request-id": rid}, timeout=WAIT)
    assert got.status_code == 200
    hops = got.json()
    assert [h["hop"] for h in hops] == ["front", "middle", "back"]
    assert {h["request_id"] for h in hops} == {rid}
    front, middle, back = (h["left"] for h in hops)
    assert 0 < back < middle < front <= 1.0  # the front's 1 s, only ever shrinking


def test_the_last_hops_slow_call_is_cut_at_the_deadline_and_the_front_answers_504(
    chain: str,
) -> None:
    rid = new_id("slow")
    got = httpx.get(f"{chain}/front?slow=1", headers={"x-request-id": rid}, timeout=WAIT)
    assert got.status_code == 504
    assert got.headers["x-request-id"] == rid
    assert rid in got.text
    seen = BOX.wait(
        [rid + "-slow-header", rid + "-back-call", rid + "-back-queued", rid + "-slow-end"]
    )
    assert 0 < int(seen[rid + "-slow-header"]) < 1000  # what was left of the front's 1 s
    assert seen[rid + "-back-call"] == "_DeadlineTimeout"  # cut by the deadline, not at 30 s
    assert seen[rid + "-back-queued"] == "not run"
    assert seen[rid + "-slow-end"] == "http.disconnect"  # the slow server saw the client go


@pytest.mark.parametrize("chain", [60.0], indirect=True)
def test_500_concurrent_requests_with_distinct_budgets_each_see_their_own(chain: str) -> None:
    # Two far-apart classes of budget, every budget distinct: a request that
    # saw another's would show a budget of the other class.
    def budget(i: int) -> int:
        return 8_000 + i if i % 2 == 0 else 40_000 + i

    async def main() -> list[tuple[int, str, httpx.Response]]:
        slots = asyncio.Semaphore(CONNECTIONS)
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=chain, timeout=WAIT * 3, limits=limits) as client:

            async def one(i: int) -> tuple[int, str, httpx.Response]:
                rid = new_id("many")
                headers = {"x-request-id": rid, HEADER: str(budget(i))}
                async with slots:
                    return i, rid, await client.get("/front", headers=headers)

            return await asyncio.gather(*(one(i) for i in range(500)))

    for i, rid, got in asyncio.run(main()):
        assert got.status_code == 200, got.text
        hops = got.json()
        assert {h["request_id"] for h in hops} == {rid}
        front, middle, back = (h["left"] for h in hops)
        assert 0 < back < middle < front <= budget(i) / 1000
        if budget(i) > 40_000:
            assert back > 9.0  # more than any budget of the other class
