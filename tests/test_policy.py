"""ctxrelay.Policy: what is sensitive, captured, trusted, and forwarded where."""

from __future__ import annotations

import dataclasses

import pytest

import ctxrelay
from ctxrelay import Context, Policy
from ctxrelay._policy import MASK, Origin, host_matches


def test_default_policy_sends_nothing_sensitive_anywhere() -> None:
    policy = Policy(capture={"cookie", "authorization", "x-gray"})
    for destination in ("http://127.0.0.1/", "https://internal.example/", None):
        route, _ = policy.route(destination)
        assert not route.sensitive
        assert not any(policy.is_sensitive(name) for name in route.headers if name != "*")


def test_default_policy_sends_no_fields_to_unnamed_destinations() -> None:
    route, _ = Policy().route("https://api.partner.example/")
    assert (route.baggage, route.headers, route.request_id, route.trace) == (
        False,
        frozenset(),
        True,
        True,
    )


def test_default_policy_trusts_no_peer() -> None:
    policy = Policy()
    assert not any(policy.trusts(peer) for peer in ("127.0.0.1", "10.0.0.1:80", "", None))


def test_sensitive_names_include_defaults_configured_and_fragments() -> None:
    policy = Policy(sensitive=frozenset({"X-Tenant-Secret-Id", "x-sig"}))
    for name in ("Cookie", "authorization", "PROXY-AUTHORIZATION", "x-sig", "db_password"):
        assert policy.is_sensitive(name), name
    assert not policy.is_sensitive("tenant")


def test_sensitive_fields_are_masked_in_repr() -> None:
    assert repr(Context({"cookie": "s=1", "tenant": "a"})) == (
        f"Context({{'cookie': {MASK!r}, 'tenant': 'a'}})"
    )


def test_names_are_normalised_and_a_bare_string_is_one_name() -> None:
    route = Policy.Route(hosts="API.Example.", sensitive="Cookie", schemes={"HTTPS"})  # type: ignore[arg-type]
    assert route.hosts == ("api.example",)
    assert route.sensitive == {"cookie"}
    assert route.schemes == {"https"}
    policy = Policy(capture="X-Gray", request_id_header="X-Correlation-ID", routes=route)  # type: ignore[arg-type]
    assert policy.capture == {"x-gray"}
    assert policy.request_id_header == "x-correlation-id"
    assert policy.routes == (route,)


@pytest.mark.parametrize("name", ["x gray", "x:gray", "", "-lead", "ü"])
def test_capturing_a_header_that_cannot_be_a_field_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot capture"):
        Policy(capture={name})


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("*", "anything.example", True),
        ("api.example", "API.example.", True),
        ("api.example", "api.example.evil", False),
        ("*.internal.example", "a.internal.example", True),
        ("*.internal.example", "a.b.internal.example", True),
        ("*.internal.example", "internal.example", False),
        ("*.internal.example", "evilinternal.example", False),
        ("10.0.0.0/8", "10.9.8.7", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.0.0.0/8", "ten.example", False),
        ("::1/128", "[::1]", True),
        ("::1", "[::1]", True),
    ],
)
def test_host_patterns(pattern: str, host: str, matches: bool) -> None:
    assert host_matches(pattern, host) is matches


def test_origins_default_their_port_by_scheme() -> None:
    assert Origin.parse("http://A.example/x") == Origin("http", "a.example", 80)
    assert Origin.parse("https://a.example:443/") == Origin("https", "a.example", 443)
    assert Origin.parse("https://a.example:8443/") != Origin.parse("https://a.example/")
    assert Origin.parse("http://a.example/") != Origin.parse("https://a.example/")
    assert Origin.parse("/relative") is None
    assert Origin.parse("http://a.example:notaport/") is None


def test_the_first_matching_route_wins() -> None:
    first = Policy.Route(hosts=("*.internal.example",), sensitive={"cookie"})
    second = Policy.Route(hosts=("*",), baggage=False)
    policy = Policy(routes=(first, second))
    assert policy.route("https://a.internal.example/")[0] is first
    assert policy.route("https://elsewhere.example/")[0] is second
    assert policy.route(None)[0] is policy.in_house


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("10.1.2.3:5000", True),
        ("192.168.1.1", False),
        ("mesh.internal:15001", True),
        ("mesh.internal:80", False),
        ("mesh.internal", False),
        ("[::1]:8000", True),
        ("::1", True),
        ("", False),
        (None, False),
    ],
)
def test_trusted_peers(peer: str | None, trusted: bool) -> None:
    policy = Policy(trusted_peers=("10.0.0.0/8", "mesh.internal:15001", "::1/128"))
    assert policy.trusts(peer) is trusted


def test_configure_swaps_the_policy_and_returns_the_previous_one() -> None:
    new = dataclasses.replace(ctxrelay.Policy(), capture=frozenset({"x-gray"}))
    previous = ctxrelay.configure(new)
    assert ctxrelay.configure(previous) is new


def test_configure_refuses_anything_but_a_policy() -> None:
    with pytest.raises(TypeError, match=r"ctxrelay\.Policy"):
        ctxrelay.configure({"capture": ["cookie"]})  # type: ignore[arg-type]


def test_a_single_name_given_as_a_str_is_one_name_not_its_letters() -> None:
    policy = ctxrelay.Policy(sensitive="x-key", local="tenant", capture="x-gray")  # type: ignore[arg-type]
    assert policy.is_sensitive("x-key")
    assert not policy.is_sensitive("x")
    assert policy.local == frozenset({"tenant"})
    assert policy.capture == frozenset({"x-gray"})


@pytest.mark.parametrize(
    "pattern",
    ["https://api.example.com", "api.example.com:443", "*.*.example.com", "10.0.0.0/33", "", "a b"],
)
def test_a_host_pattern_that_could_never_match_is_refused_when_the_policy_is_built(
    pattern: str,
) -> None:
    with pytest.raises(ValueError, match="accepted"):
        Policy.Route(hosts=(pattern,))


@pytest.mark.parametrize("peer", ["10.0.0.0/8:99999", "10.0.0.1:0", "bad host", "10.0.0.0/40"])
def test_a_trusted_peer_that_could_never_match_is_refused(peer: str) -> None:
    with pytest.raises(ValueError, match="trusted_peers"):
        Policy(trusted_peers=(peer,))


def test_every_accepted_form_still_builds_and_matches() -> None:
    route = Policy.Route(hosts=("*.internal.example", "10.0.0.0/8", "::1", "API.example.com."))
    assert route.hosts == ("*.internal.example", "10.0.0.0/8", "::1", "api.example.com")
    policy = Policy(trusted_peers=("10.0.0.1:5000", "[::1]:8000", "fd00::/8"))
    assert policy.trusts("10.0.0.1:5000")
    assert policy.trusts("[::1]:8000")
    assert policy.trusts("[fd00::5]:1")
    with pytest.raises(ValueError, match="port"):
        Policy.Route(ports=frozenset({70000}))
