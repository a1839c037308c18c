"""ctxrelay.integrations.httpx, sync and async clients, against a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import ctxrelay
from ctxrelay.integrations.httpx import async_request_hook, install, request_hook, uninstall

from .outgoing import (
    CALLER_SECRET,
    assert_got_everything,
    assert_got_nothing_sensitive,
    context,
    two_servers,
)


def get(flavour: str, url: str, **kwargs: Any) -> httpx.Response:
    """One GET through a relaying client of the given flavour."""
    if flavour == "sync":
        with install(httpx.Client(follow_redirects=True)) as client:
            return client.get(url, **kwargs)

    async def run() -> httpx.Response:
        async with install(httpx.AsyncClient(follow_redirects=True)) as client:
            return await client.get(url, **kwargs)

    return asyncio.run(run())


flavours = pytest.mark.parametrize("flavour", ["sync", "async"])


@flavours
def test_internal_host_receives_cookie_canary_baggage_and_request_id(flavour: str) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        assert get(flavour, internal.url("/a")).status_code == 200
    assert_got_everything(internal.last("/a"))


@flavours
def test_foreign_host_receives_nothing_sensitive(flavour: str) -> None:
    with two_servers() as (_, foreign), ctxrelay.use(context()):
        get(flavour, foreign.url("/a"))
    received = foreign.last("/a")
    assert_got_nothing_sensitive(received)


@flavours
@pytest.mark.parametrize("status", [302, 307])
def test_redirect_from_internal_to_foreign_strips_sensitive_headers(
    flavour: str, status: int
) -> None:
    with two_servers() as (internal, foreign), ctxrelay.use(context()):
        target = internal.redirect_url(foreign.url("/landing"), status)
        response = get(flavour, target, headers=CALLER_SECRET)
    assert (response.status_code, len(response.history)) == (200, 1)
    assert_got_everything(internal.last("/redirect"))
    assert_got_nothing_sensitive(foreign.last("/landing"))


@flavours
def test_redirect_within_the_internal_origin_keeps_them(flavour: str) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        get(flavour, internal.redirect_url(internal.url("/next")))
    assert_got_everything(internal.last("/next"))


@flavours
def test_headers_the_caller_set_win(flavour: str) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        get(flavour, internal.url("/a"), headers={"X-Gray": "stable", "Baggage": "mine=1"})
    received = internal.last("/a").headers
    assert received["x-gray"] == "stable"
    assert received["baggage"] == "mine=1"
    assert received["cookie"] == "session=abc123"


def test_hooks_passed_at_construction_relay_too() -> None:
    async def run(url: str) -> None:
        async with httpx.AsyncClient(event_hooks={"request": [async_request_hook]}) as client:
            await client.get(url)

    with two_servers() as (internal, _), ctxrelay.use(context()):
        with httpx.Client(event_hooks={"request": [request_hook]}) as client:
            client.get(internal.url("/sync"))
        asyncio.run(run(internal.url("/async")))
    assert_got_everything(internal.last("/sync"))
    assert_got_everything(internal.last("/async"))


def test_install_twice_adds_one_hook() -> None:
    client = install(install(httpx.Client()))
    assert client.event_hooks["request"] == [request_hook]
    client.close()


def test_each_sync_pool_task_sends_its_own_context() -> None:
    with two_servers() as (internal, _), install(httpx.Client()) as client:
        with ctxrelay.ThreadPoolExecutor(8) as pool:
            futures = []
            for i in range(40):
                with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
                    futures.append(pool.submit(client.get, internal.url(f"/task/{i}")))
            for future in futures:
                future.result(timeout=30)
        for i in range(40):
            headers = internal.last(f"/task/{i}").headers
            assert (headers["x-request-id"], headers["baggage"]) == (f"req-{i}", f"tenant=t{i}")


def test_each_async_task_sends_its_own_context() -> None:
    async def one(client: httpx.AsyncClient, url: str, i: int) -> None:
        with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
            await asyncio.sleep(0)  # let the other tasks interleave
            await client.get(url)

    async def run(base: str) -> None:
        async with install(httpx.AsyncClient()) as client:
            await asyncio.gather(*(one(client, f"{base}/task/{i}", i) for i in range(40)))

    with two_servers() as (internal, _):
        asyncio.run(run(internal.origin))
        for i in range(40):
            headers = internal.last(f"/task/{i}").headers
            assert (headers["x-request-id"], headers["baggage"]) == (f"req-{i}", f"tenant=t{i}")


@flavours
def test_a_header_value_that_is_not_ascii_costs_only_itself(flavour: str) -> None:
    # httpx refuses a non-ASCII header value: it used to abort the whole
    # injection (an error log, and no cookie, baggage or id sent at all).
    fields = {**context(), "x-gray": "café"}
    with two_servers() as (internal, _), ctxrelay.use(ctxrelay.Context(fields)):
        assert get(flavour, internal.url("/a")).status_code == 200
    received = internal.last("/a").headers
    assert "x-gray" not in received
    assert (received["x-request-id"], received["cookie"]) == ("req-1", "session=abc123")
    assert "tenant=acme" in received["baggage"]


def test_uninstall_removes_only_ctxrelays_hooks() -> None:
    def theirs(request: httpx.Request) -> None:
        pass

    client = install(httpx.Client(event_hooks={"request": [theirs]}))
    uninstall(uninstall(client))  # idempotent
    assert client.event_hooks["request"] == [theirs]
    with two_servers() as (internal, _), ctxrelay.use(context()):
        client.get(internal.url("/a"))
    assert "x-request-id" not in internal.last("/a").headers
    client.close()


@pytest.mark.parametrize("not_a_client", [None, "x", 42])
def test_install_refuses_what_is_not_a_client(not_a_client: object) -> None:
    with pytest.raises(TypeError, match=r"httpx\.Client"):
        install(not_a_client)  # type: ignore[type-var]
