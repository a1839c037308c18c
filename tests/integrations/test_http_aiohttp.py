"""ctxrelay.integrations.aiohttp (a client TraceConfig) against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

import ctxrelay
from ctxrelay.integrations.aiohttp import trace_config

from .outgoing import (
    CALLER_SECRET,
    assert_got_everything,
    assert_got_nothing_sensitive,
    context,
    two_servers,
)


async def fetch(url: str, **kwargs: Any) -> tuple[int, int]:
    async with (
        aiohttp.ClientSession(trace_configs=[trace_config()]) as http,
        http.get(url, **kwargs) as response,
    ):
        await response.read()
        return response.status, len(response.history)


def get(url: str, **kwargs: Any) -> tuple[int, int]:
    """(status, number of redirects) of one GET through a relaying session."""
    return asyncio.run(fetch(url, **kwargs))


def test_internal_host_receives_cookie_canary_baggage_and_request_id() -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        assert get(internal.url("/a")) == (200, 0)
    assert_got_everything(internal.last("/a"))


def test_foreign_host_receives_nothing_sensitive() -> None:
    with two_servers() as (_, foreign), ctxrelay.use(context()):
        get(foreign.url("/a"))
    assert_got_nothing_sensitive(foreign.last("/a"))


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_from_internal_to_foreign_strips_sensitive_headers(status: int) -> None:
    with two_servers() as (internal, foreign), ctxrelay.use(context()):
        target = internal.redirect_url(foreign.url("/landing"), status)
        assert get(target, headers=CALLER_SECRET) == (200, 1)
    assert_got_everything(internal.last("/redirect"))
    assert_got_nothing_sensitive(foreign.last("/landing"))


def test_redirect_within_the_internal_origin_keeps_them() -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        get(internal.redirect_url(internal.url("/next")))
    assert_got_everything(internal.last("/next"))


def test_headers_the_caller_set_win() -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        get(internal.url("/a"), headers={"X-Gray": "stable", "X-Request-ID": "mine"})
    received = internal.last("/a").headers
    assert (received["x-gray"], received["x-request-id"]) == ("stable", "mine")
    assert received["cookie"] == "session=abc123"


def test_each_task_sends_its_own_context() -> None:
    async def one(http: aiohttp.ClientSession, url: str, i: int) -> None:
        with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
            await asyncio.sleep(0)  # let the other tasks interleave
            async with http.get(url) as response:
                await response.read()

    async def run(base: str) -> None:
        async with aiohttp.ClientSession(trace_configs=[trace_config()]) as http:
            await asyncio.gather(*(one(http, f"{base}/task/{i}", i) for i in range(40)))

    with two_servers() as (internal, _):
        asyncio.run(run(internal.origin))
        for i in range(40):
            headers = internal.last(f"/task/{i}").headers
            assert (headers["x-request-id"], headers["baggage"]) == (f"req-{i}", f"tenant=t{i}")


@pytest.mark.parametrize("location", ["http://[orders.internal]:8000/", "http://[::1/"])
def test_a_malformed_redirect_fails_as_aiohttp_fails_it(location: str) -> None:
    # The hook resolved the Location itself and raised ValueError into the
    # caller, where aiohttp raises its own InvalidUrlRedirectClientError.
    with two_servers() as (internal, _), ctxrelay.use(context()):
        with pytest.raises(aiohttp.InvalidUrlRedirectClientError):
            get(internal.redirect_url(location))
