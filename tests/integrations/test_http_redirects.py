"""Redirects: ctxrelay takes back only what it added, and leaves proxy credentials.

Real servers on 127.0.0.1 (``tests/httpserver.py``), a real authenticating
forward proxy (``tests/httpproxy.py``), real requests, httpx and aiohttp
clients.

* A redirect that sets a cookie (``Set-Cookie`` on the 302, as a login
  redirect does): requests and httpx rebuild ``Cookie`` from their jar on
  every hop.  ctxrelay used to take back ``Cookie`` by name, so the cookie
  the server had just set never reached the next hop.
* Behind a proxy that requires ``Proxy-Authorization``: a redirect to another
  origin stripped every sensitive header, the proxy's credentials included,
  so the next hop got a 407 from the proxy.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import aiohttp
import httpx
import pytest
import requests

import ctxrelay
from ctxrelay._policy import Origin
from ctxrelay._wire import Sent, inject_hop
from ctxrelay.integrations.aiohttp import trace_config
from ctxrelay.integrations.httpx import install as install_httpx
from ctxrelay.integrations.requests import Session, install

from ..httpproxy import AuthProxy, ProxyHop, auth_proxy
from ..httpserver import RecordingServer
from .outgoing import (
    CALLER_SECRET,
    assert_got_everything,
    assert_got_nothing_sensitive,
    context,
    two_servers,
)

clients = pytest.mark.parametrize(
    "client", ["requests", "requests-install", "httpx-sync", "httpx-async", "aiohttp"]
)


def get(client: str, url: str, proxy: str | None = None, **kwargs: Any) -> tuple[int, int]:
    """(status, number of redirects) of one GET through a relaying ``client``
    with a fresh cookie jar, through ``proxy`` when given."""
    if client.startswith("requests"):
        session = Session() if client == "requests" else install(requests.Session())
        session.trust_env = False  # no proxy or .netrc from the environment
        with session:
            proxies = {"http": proxy} if proxy else None
            response = session.get(url, proxies=proxies, timeout=30, **kwargs)
            return response.status_code, len(response.history)
    if client == "httpx-sync":
        with install_httpx(
            httpx.Client(follow_redirects=True, proxy=proxy, trust_env=False)
        ) as http:
            answer = http.get(url, **kwargs)
            return answer.status_code, len(answer.history)
    if client == "httpx-async":

        async def run_httpx() -> tuple[int, int]:
            async with install_httpx(
                httpx.AsyncClient(follow_redirects=True, proxy=proxy, trust_env=False)
            ) as http:
                response = await http.get(url, **kwargs)
                return response.status_code, len(response.history)

        return asyncio.run(run_httpx())

    async def run_aiohttp() -> tuple[int, int]:
        jar = aiohttp.CookieJar(unsafe=True)  # keep cookies from an IP address host
        async with (
            aiohttp.ClientSession(trace_configs=[trace_config()], cookie_jar=jar) as http,
            http.get(url, proxy=proxy, **kwargs) as response,
        ):
            await response.read()
            return response.status, len(response.history)

    return asyncio.run(run_aiohttp())


def cookies(server: RecordingServer, path: str) -> dict[str, str]:
    """The cookies the last request on ``path`` carried, by name."""
    header = server.last(path).headers.get("cookie", "")
    pairs = [pair.strip().partition("=") for pair in header.split(";") if pair.strip()]
    return {name: value for name, _, value in pairs}


# -- a redirect that sets a cookie ----------------------------------------------
@clients
@pytest.mark.parametrize("status", [302, 307])
def test_a_cookie_set_by_a_same_origin_redirect_reaches_the_next_hop(
    client: str, status: int
) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        target = internal.redirect_url(internal.url("/next"), status, cookie="step=1")
        assert get(client, target) == (200, 1)
    # The cookie the redirect set, and the user's session ctxrelay relays.
    assert cookies(internal, "/next") == {"step": "1", "session": "abc123"}
    received = internal.last("/next").headers
    assert (received["x-request-id"], received["x-gray"]) == ("req-1", "canary")


@clients
def test_a_cookie_set_on_the_way_to_a_foreign_host_does_not_carry_the_users(
    client: str,
) -> None:
    # Leaving the first hop's origin still strips the user's credentials.
    # (The jar's own cookie is valid for the other port too -- cookies ignore
    # ports -- and aiohttp adds it after ctxrelay's hook: the library's call.)
    with two_servers() as (internal, foreign), ctxrelay.use(context()):
        target = internal.redirect_url(foreign.url("/landing"), cookie="step=1")
        assert get(client, target, headers=CALLER_SECRET) == (200, 1)
    assert_got_everything(internal.last("/redirect"))
    landing = foreign.last("/landing").headers
    assert "session" not in cookies(foreign, "/landing")
    assert not {"x-api-key", "x-gray", "baggage"} & landing.keys()
    assert landing["x-request-id"] == "req-1"


@clients
def test_two_redirects_that_set_cookies_keep_them_all(client: str) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        second = internal.redirect_url(internal.url("/next"), cookie="b=2")
        assert get(client, internal.redirect_url(second, cookie="a=1")) == (200, 2)
    assert cookies(internal, "/next") == {"a": "1", "b": "2", "session": "abc123"}


@clients
def test_without_set_cookie_the_relayed_cookie_is_not_doubled(client: str) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        get(client, internal.redirect_url(internal.redirect_url(internal.url("/next"))))
    assert internal.last("/next").headers["cookie"] == "session=abc123"


# -- Sent: what a hop added, name and value ----------------------------------------
def test_a_redirect_takes_back_only_headers_still_holding_what_ctxrelay_set() -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        headers: dict[str, str] = {}
        first = inject_hop(headers, internal.url("/a"), None)
        headers["x-gray"] = "changed-by-the-app"  # no longer ctxrelay's
        del headers["cookie"]
        headers["Cookie"] = "jar=1"  # rebuilt by the library
        inject_hop(headers, internal.url("/b"), first)
    assert headers["x-gray"] == "changed-by-the-app"
    assert headers["cookie"] == "jar=1; session=abc123"
    assert "Cookie" not in headers  # one cookie header, not two


def test_sent_pickles_and_an_older_sent_still_takes_back_by_name() -> None:
    origin = Origin("http", "127.0.0.1", 80)
    sent = Sent(origin, ("x-gray",), (("x-gray", "canary"),))
    assert pickle.loads(pickle.dumps(sent)) == sent
    # A Sent pickled before values were kept: only origin and added.
    older = Sent.__new__(Sent)
    older.__dict__.update({"origin": origin, "added": ("x-gray",)})
    older = pickle.loads(pickle.dumps(older))
    assert (older.values, older.merged) == ((), ())
    headers = {"x-gray": "set-by-someone-else"}
    inject_hop(headers, "http://127.0.0.1/next", older)
    assert headers == {}  # as before: taken back by name


# -- behind an authenticating forward proxy ----------------------------------------
def assert_every_hop_authorized(proxy: AuthProxy, internal: RecordingServer) -> None:
    hops = proxy.hops
    assert [hop.authorized for hop in hops] == [True, True], hops
    assert hops[0] == ProxyHop("GET", hops[0].target, True)
    assert hops[0].target.startswith(internal.origin)


@clients
@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_to_another_origin_through_a_proxy_with_credentials_in_its_url(
    client: str, status: int
) -> None:
    # Each library adds these itself (requests also writes them into the
    # redirect's headers, where ctxrelay's hook sees them): they must stay.
    with (
        auth_proxy() as proxy,
        two_servers() as (internal, foreign),
        ctxrelay.use(context()),
    ):
        target = internal.redirect_url(foreign.url("/landing"), status)
        assert get(client, target, proxy=proxy.url(), headers=CALLER_SECRET) == (200, 1)
    assert_every_hop_authorized(proxy, internal)
    assert_got_everything(internal.last("/redirect"))
    landing = foreign.last("/landing")
    assert_got_nothing_sensitive(landing)  # the destination's credentials: stripped
    assert "proxy-authorization" not in landing.headers  # the proxy's: used up there


@pytest.mark.parametrize("client", ["httpx-sync", "httpx-async"])
@pytest.mark.parametrize("status", [302, 307])
def test_a_proxy_authorization_header_survives_a_redirect_to_another_origin(
    client: str, status: int
) -> None:
    # httpx sends a Proxy-Authorization header the caller set to the proxy on
    # every hop; ctxrelay stripped it with the destination's credentials on
    # the redirect, and the proxy answered the next hop 407.
    with (
        auth_proxy() as proxy,
        two_servers() as (internal, foreign),
        ctxrelay.use(context()),
    ):
        headers = {"Proxy-Authorization": proxy.expected, **CALLER_SECRET}
        target = internal.redirect_url(foreign.url("/landing"), status)
        assert get(client, target, proxy=proxy.url(credentials=False), headers=headers) == (
            200,
            1,
        )
    assert_every_hop_authorized(proxy, internal)
    landing = foreign.last("/landing")
    assert_got_nothing_sensitive(landing)
    assert "proxy-authorization" not in landing.headers
