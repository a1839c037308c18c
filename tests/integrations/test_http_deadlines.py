"""Deadlines on outgoing HTTP: requests, httpx (sync and async), aiohttp.

Real servers on 127.0.0.1, no mocks.  Each client is made the way its
integration documents (a relaying ``requests`` session, or one installed;
``install()`` on an httpx client; ``install()`` plus ``trace_config()`` on an
aiohttp session).  What the tests assert is what a caller and a server see:
the exception type, the header the server got, whether anything reached the
server at all, and -- from the server's side -- that the client went away
before the server's own slow answer.  Never elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import httpx
import pytest
import requests

import ctxrelay
from ctxrelay import DeadlineExceeded, Policy, RequestCancelled
from ctxrelay.integrations import aiohttp as relay_aiohttp
from ctxrelay.integrations import httpx as relay_httpx
from ctxrelay.integrations import requests as relay_requests

from ..httpserver import recording_server
from ..servers import Mailbox, new_id, serve_asgi

HEADER = "x-request-timeout-ms"
#: The slow server's own delay, and every client's own timeout: far longer
#: than any deadline here, and than the bounded waits (tests.servers.WAIT).
SLOW = 30.0

SEEN = Mailbox()


async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Records the request's headers, then answers only after SLOW seconds,
    or notes that the client went away first (what the server can tell)."""
    if scope["type"] != "http":
        return
    key = parse_qs(scope["query_string"].decode())["key"][0]
    SEEN.post(key, {k.decode().lower(): v.decode() for k, v in scope["headers"]})
    await receive()  # the (empty) request body
    try:
        message = await asyncio.wait_for(receive(), SLOW)
    except asyncio.TimeoutError:
        SEEN.post(key + "-end", "waited the full delay")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})
        return
    SEEN.post(key + "-end", message["type"])  # http.disconnect: the client gave up


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    with serve_asgi(slow_app) as base:
        yield base


@pytest.fixture(autouse=True)
def _internal_routes() -> Iterator[None]:
    before = ctxrelay.active_policy()
    # 127.0.0.1 is in house: it gets the time left (a foreign host would not).
    ctxrelay.configure(Policy(routes=(Policy.Route(hosts=("127.0.0.1",)),)))
    try:
        yield
    finally:
        ctxrelay.configure(before)


# -- one GET per client, each made as its integration documents ---------------------------
Get = Callable[[str, float], int]


def _requests_session(url: str, timeout: float) -> int:
    with relay_requests.Session() as session:
        return session.get(url, timeout=timeout).status_code


def _requests_installed(url: str, timeout: float) -> int:
    with relay_requests.install(requests.Session()) as session:
        return session.get(url, timeout=timeout).status_code


def _httpx_sync(url: str, timeout: float) -> int:
    with relay_httpx.install(httpx.Client(timeout=timeout, follow_redirects=True)) as client:
        return client.get(url).status_code


def _httpx_async(url: str, timeout: float) -> int:
    async def main() -> int:
        async with relay_httpx.install(
            httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        ) as client:
            return (await client.get(url)).status_code

    return asyncio.run(main())  # asyncio.run copies the caller's context


def _aiohttp(url: str, timeout: float) -> int:
    async def main() -> int:
        session = aiohttp.ClientSession(trace_configs=[relay_aiohttp.trace_config()])
        async with relay_aiohttp.install(session) as http:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as got:
                await got.read()
                return got.status

    return asyncio.run(main())


CLIENTS: dict[str, Get] = {
    "requests-session": _requests_session,
    "requests-install": _requests_installed,
    "httpx-sync": _httpx_sync,
    "httpx-async": _httpx_async,
    "aiohttp": _aiohttp,
}

#: Each library's own timeout error: a caller's handler for it still catches
#: the deadline's.
OWN_TIMEOUT: dict[str, tuple[type[BaseException], ...]] = {
    "requests-session": (requests.Timeout,),
    "requests-install": (requests.Timeout,),
    "httpx-sync": (httpx.TimeoutException,),
    "httpx-async": (httpx.TimeoutException,),
    "aiohttp": (asyncio.TimeoutError,),
}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the tests --------------------------------------------------------------------------------


def test_a_slow_server_is_cut_at_the_deadline_not_at_the_clients_own_timeout(
    client: str, slow_server: str
) -> None:
    key = new_id(client)
    with ctxrelay.bind(request_id=key), ctxrelay.deadline(0.3):
        with pytest.raises(DeadlineExceeded) as caught:
            CLIENTS[client](f"{slow_server}/slow?key={key}", SLOW)
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, OWN_TIMEOUT[client])  # the library's own kind too
    got = SEEN.wait([key, key + "-end"])
    assert 0 < int(got[key][HEADER]) <= 300  # the time left went with the call
    assert got[key]["x-request-id"] == key
    # The server saw the client go away, not its own 30 s pass (bounded wait).
    assert got[key + "-end"] == "http.disconnect"


def test_a_call_after_the_deadline_fails_at_once_and_touches_no_network(client: str) -> None:
    with recording_server() as server:
        with ctxrelay.bind(request_id="r-late"), ctxrelay.deadline(0):
            with pytest.raises(DeadlineExceeded):
                CLIENTS[client](server.url("/late"), SLOW)
        assert server.received == []


def test_a_call_for_a_cancelled_request_fails_at_once_and_touches_no_network(
    client: str,
) -> None:
    from ctxrelay._deadline import for_request

    ctx, cancel = for_request(ctxrelay.Context(request_id="r-gone"), 30)
    cancel.cancel("the client disconnected")
    with recording_server() as server:
        with ctxrelay.use(ctx), pytest.raises(RequestCancelled, match="disconnected"):
            CLIENTS[client](server.url("/gone"), SLOW)
        assert server.received == []


def test_the_clients_own_shorter_timeout_is_never_lengthened(client: str, slow_server: str) -> None:
    key = new_id(client)
    with ctxrelay.bind(request_id=key), ctxrelay.deadline(SLOW):
        with pytest.raises(OWN_TIMEOUT[client]) as caught:
            CLIENTS[client](f"{slow_server}/slow?key={key}", 0.1)
    assert not isinstance(caught.value, DeadlineExceeded)  # the client's own, as before
    got = SEEN.wait([key, key + "-end"])
    assert 0 < int(got[key][HEADER]) <= SLOW * 1000
    assert got[key + "-end"] == "http.disconnect"


def test_without_a_deadline_nothing_changes(client: str) -> None:
    with recording_server() as server:
        with ctxrelay.bind(request_id="r-free"):
            assert CLIENTS[client](server.url("/free"), SLOW) == 200
        headers = server.last("/free").headers
    assert HEADER not in headers
    assert headers["x-request-id"] == "r-free"


def test_the_time_left_is_computed_again_on_every_redirect_hop(client: str) -> None:
    with recording_server() as server:
        with ctxrelay.bind(request_id="r-hops"), ctxrelay.deadline(20):
            assert CLIENTS[client](server.redirect_url(server.url("/landing")), SLOW) == 200
        first = int(server.last("/redirect").headers[HEADER])
        second = int(server.last("/landing").headers[HEADER])
    assert 0 < second <= first <= 20_000  # re-read on the second hop, never grown


def test_a_foreign_destination_gets_no_header_but_the_call_is_still_bounded(
    client: str,
) -> None:
    with recording_server() as internal, recording_server() as foreign:
        ctxrelay.configure(
            Policy(routes=(Policy.Route(hosts=("127.0.0.1",), ports={internal.port}),))
        )
        with ctxrelay.bind(request_id="r-out"), ctxrelay.deadline(20):
            CLIENTS[client](foreign.url("/x"), SLOW)
        with ctxrelay.bind(request_id="r-out"), ctxrelay.deadline(0):
            with pytest.raises(DeadlineExceeded):
                CLIENTS[client](foreign.url("/y"), SLOW)
        received = foreign.received
    assert [r.path for r in received] == ["/x"]
    assert HEADER not in received[0].headers
