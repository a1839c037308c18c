"""The outgoing path's memos: route verdicts per origin, baggage per context."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest

import ctxrelay
from ctxrelay import Context, Policy
from ctxrelay._outbound import outgoing
from ctxrelay._policy import configure

Route = Policy.Route
INTERNAL = Route(hosts=("*.internal.example",), sensitive=frozenset({"session_token"}))


@pytest.fixture(autouse=True)
def _policy() -> object:
    previous = configure(Policy(routes=(INTERNAL,)))
    yield
    configure(previous)


def injected(ctx: Context, url: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    with ctxrelay.use(ctx):
        ctxrelay.inject(headers, destination=url)
    return headers


def test_a_hostile_stream_of_distinct_hosts_does_not_grow_the_route_memo() -> None:
    policy = ctxrelay.active_policy()
    for i in range(5000):
        assert policy.route(f"https://h{i}.evil.example/x")[0] is policy.foreign
    assert len(policy._routes) <= 256
    assert policy.route("https://a.internal.example/x")[0] is INTERNAL


@pytest.mark.parametrize(
    ("url", "internal"),
    [
        ("https://a.internal.example/x", True),
        ("https://a.internal.example?q=1", True),
        ("https://a.internal.example#f", True),
        ("https://a.internal.example", True),
        ("https://a.internal.example.evil.example/x", False),
        ("https://a.internal.example@evil.example/x", False),
        ("https://evil.example/https://a.internal.example/", False),
        ("ftp://a.internal.example/x", False),
        ("https://a.internal.example:99999/x", False),
    ],
)
def test_each_url_gets_the_route_of_its_own_origin_cached_or_not(url: str, internal: bool) -> None:
    policy = ctxrelay.active_policy()
    for _ in range(2):  # the first resolves, the second is remembered
        assert (policy.route(url)[0] is INTERNAL) is internal


def test_a_tab_inside_the_authority_is_never_mistaken_for_a_shorter_host() -> None:
    policy = Policy(routes=(Route(hosts=("host",)),))
    assert policy.route("http://ho\tst/")[0] is policy.routes[0]  # urlsplit drops the tab
    assert policy.route("http://ho/")[0] is policy.foreign
    assert policy.route("http://ho\tst/")[0] is policy.routes[0]


def test_a_reused_context_sends_the_same_baggage_every_time() -> None:
    ctx = Context(request_id="r", tenant="acme", user="u 1")
    first = injected(ctx, "https://a.internal.example/")
    assert first["baggage"] == "tenant=acme,user=u%201"
    for _ in range(3):
        assert injected(ctx, "https://b.internal.example/") == first
    assert "baggage" not in injected(ctx, "https://partner.example/")


def test_a_new_context_at_a_dead_ones_address_gets_its_own_baggage() -> None:
    for i in range(300):
        ctx = Context(tenant=f"t{i}")
        assert injected(ctx, "https://a.internal.example/")["baggage"] == f"tenant=t{i}"
        del ctx
        gc.collect(0)


def test_the_memo_keeps_no_context_alive() -> None:
    ctx = Context(tenant="acme")
    injected(ctx, "https://a.internal.example/")
    ref = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert ref() is None


def test_a_new_policy_decides_again_for_the_same_context() -> None:
    ctx = Context(tenant="acme", user="u")
    assert injected(ctx, "https://a.internal.example/")["baggage"] == "tenant=acme,user=u"
    configure(Policy(routes=(INTERNAL,), local=frozenset({"user"})))
    assert injected(ctx, "https://a.internal.example/")["baggage"] == "tenant=acme"


def test_a_credential_field_goes_only_with_credentials_even_when_remembered() -> None:
    ctx = Context(tenant="acme", session_token="s3")
    policy = ctxrelay.active_policy()
    with_credentials = outgoing(ctx, policy, INTERNAL)
    assert with_credentials["baggage"] == "tenant=acme,session_token=s3"
    assert outgoing(ctx, policy, INTERNAL, credentials=False)["baggage"] == "tenant=acme"
    assert outgoing(ctx, policy, INTERNAL) == with_credentials


def test_baggage_over_its_limits_warns_on_every_call(caplog: pytest.LogCaptureFixture) -> None:
    configure(Policy(routes=(INTERNAL,), max_baggage_fields=1))
    ctx = Context(a="1", b="2")
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        for _ in range(3):
            assert injected(ctx, "https://a.internal.example/")["baggage"] == "a=1"
    assert sum("over its limits" in r.getMessage() for r in caplog.records) == 3


def test_a_non_ascii_header_is_left_out_with_a_warning_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure(
        Policy(
            routes=(Route(hosts=("*.internal.example",), headers={"x-gray"}),), capture={"x-gray"}
        )
    )
    ctx = Context({"x-gray": "grüne", "request_id": "r"})
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        for _ in range(2):
            headers = injected(ctx, "https://a.internal.example/")
            assert "x-gray" not in headers
            assert headers["x-request-id"] == "r"
    assert sum("not ASCII" in r.getMessage() for r in caplog.records) == 2
