"""Credentials never show in a ``repr``: not a context's, not a request's.

A ``repr`` ends up in logs, tracebacks and error reports, so the masking is
checked on the real output: the secret value must not appear anywhere in it,
and names added through a configured :class:`ctxrelay.Policy` count too.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxrelay
from ctxrelay import Context, Headers, Policy, RequestSnapshot
from ctxrelay._policy import MASK, active, configure
from tests.strategies import NAME_CHARS, field_names, field_values

SECRET = "s3cr3t-VALUE-do-not-log"

#: Field names the default policy treats as sensitive, in assorted cases.
sensitive_names = st.one_of(
    st.sampled_from(
        [
            "cookie",
            "Cookie",
            "authorization",
            "AUTHORIZATION",
            "proxy-authorization",
            "set-cookie",
            "x-api-key",
            "x-auth-token",
            "x-csrf-token",
        ]
    ),
    st.builds(
        lambda head, fragment, tail: (head + fragment + tail)[:64],
        field_names.map(lambda n: n[:20]),
        st.sampled_from(
            ["token", "TOKEN", "password", "Password", "passwd", "secret", "credential"]
        ),
        st.text(alphabet=NAME_CHARS, max_size=10),
    ),
)


@pytest.fixture
def tenant_key_policy() -> Iterator[Policy]:
    """A policy that also treats ``x-tenant-key`` as sensitive; restored after."""
    previous = configure(Policy(sensitive=frozenset({"X-Tenant-Key"})))
    try:
        yield active()
    finally:
        configure(previous)


def shown_fields(ctx: Context) -> dict[str, str]:
    """The fields as a context's ``repr`` shows them."""
    text = repr(ctx)
    assert text.startswith("Context(")
    assert text.endswith(")")
    shown = ast.literal_eval(text[len("Context(") : -1])
    assert isinstance(shown, dict)
    return shown


# -- Context --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "cookie",
        "authorization",
        "Authorization",
        "x-api-key",
        "session_token",
        "X-Auth-Token",
        "db_password",
        "DB_PASSWD",
        "client_secret",
        "aws.credentials",
    ],
)
def test_context_repr_masks_sensitive_names(name: str) -> None:
    ctx = Context({name: SECRET, "user": "ada"})
    text = repr(ctx)
    assert SECRET not in text
    assert shown_fields(ctx) == {name: MASK, "user": "ada"}
    assert ctx[name] == SECRET  # masked in the repr only, not in the value


@settings(max_examples=80, deadline=None)
@given(
    st.dictionaries(field_names, field_values, max_size=6),
    st.dictionaries(sensitive_names, field_values, min_size=1, max_size=3),
)
def test_context_repr_masks_exactly_the_sensitive_fields(
    plain: dict[str, str], sensitive: dict[str, str]
) -> None:
    fields = {**plain, **sensitive}
    policy = active()
    expected = {
        name: MASK if policy.is_sensitive(name) else value for name, value in fields.items()
    }
    assert shown_fields(Context(fields)) == expected
    assert all(expected[name] == MASK for name in sensitive)


def test_context_repr_masks_names_added_by_the_configured_policy(
    tenant_key_policy: Policy,
) -> None:
    ctx = Context({"x-tenant-key": SECRET, "X-Tenant-Key": SECRET, "tenant": "t1"})
    assert SECRET not in repr(ctx)
    assert shown_fields(ctx) == {"x-tenant-key": MASK, "X-Tenant-Key": MASK, "tenant": "t1"}


def test_restoring_the_policy_stops_masking_the_names_it_added() -> None:
    ctx = Context({"x-tenant-key": "visible"})
    previous = configure(Policy(sensitive=frozenset({"x-tenant-key"})))
    try:
        assert "visible" not in repr(ctx)
    finally:
        assert configure(previous).is_sensitive("x-tenant-key")
    assert shown_fields(ctx) == {"x-tenant-key": "visible"}


def test_context_repr_masks_its_request_too() -> None:
    snapshot = RequestSnapshot(
        headers=[("authorization", f"Bearer {SECRET}"), ("cookie", f"sid={SECRET}")]
    )
    ctx = Context(user="ada").with_request(snapshot)
    text = repr(ctx)
    assert SECRET not in text
    assert "'user': 'ada'" in text
    assert "request=" in text


# -- Policy ------------------------------------------------------------------------------


def test_extra_sensitive_names_add_to_the_defaults_case_insensitively() -> None:
    policy = Policy(sensitive=frozenset({"X-Tenant-Key"}))
    for name in ("x-tenant-key", "X-TENANT-KEY", "cookie", "Authorization", "my_token"):
        assert policy.is_sensitive(name), name
    for name in ("user", "tenant", "request_id", "x-tenant"):
        assert not policy.is_sensitive(name), name


def test_policy_is_a_frozen_value() -> None:
    policy = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.sensitive = frozenset()  # type: ignore[misc]
    assert dataclasses.replace(policy) == policy


def test_configure_returns_the_previous_policy_and_rejects_non_policies() -> None:
    first = active()
    replacement = Policy(sensitive=frozenset({"x-one"}))
    assert configure(replacement) is first
    try:
        assert active() is replacement
        assert ctxrelay.configure is configure
        with pytest.raises(TypeError, match="Policy"):
            configure({"sensitive": ["x"]})  # type: ignore[arg-type]
        assert active() is replacement
    finally:
        configure(first)


# -- Headers and RequestSnapshot ---------------------------------------------------------


def test_headers_repr_masks_credentials_and_shows_the_rest() -> None:
    headers = Headers(
        [
            ("Authorization", f"Bearer {SECRET}"),
            ("Cookie", f"sid={SECRET}"),
            ("X-Api-Key", SECRET),
            ("Accept", "text/html"),
        ]
    )
    text = repr(headers)
    assert SECRET not in text
    assert "('authorization', '***')" in text
    assert "('cookie', '***')" in text
    assert "('accept', 'text/html')" in text


def test_snapshot_repr_masks_cookie_and_authorization_and_every_cookie_value() -> None:
    snap = RequestSnapshot.from_asgi(
        {
            "type": "http",
            "method": "GET",
            "path": "/account",
            "query_string": b"tab=1",
            "headers": [
                (b"host", b"shop.example"),
                (b"authorization", f"Basic {SECRET}".encode()),
                (b"cookie", f"sid={SECRET}; theme=dark-{SECRET}".encode()),
                (b"x-request-id", b"req-1"),
            ],
        }
    )
    text = repr(snap)
    assert SECRET not in text
    assert "dark" not in text  # every cookie value, not only the obvious ones
    assert "'sid': '***'" in text
    assert "'theme': '***'" in text
    assert "req-1" in text
    assert "shop.example/account?tab=1" in text
    assert snap.cookies["sid"] == SECRET  # masked in the repr only


def test_snapshot_repr_masks_headers_named_by_the_configured_policy(
    tenant_key_policy: Policy,
) -> None:
    snap = RequestSnapshot(headers=[("X-Tenant-Key", SECRET), ("x-tenant", "t1")])
    text = repr(snap)
    assert SECRET not in text
    assert "t1" in text


@pytest.mark.parametrize("path", ["/a\r\nInjected: 1", "/a\nfake log line", "/\x1b[2J"])
def test_snapshot_repr_escapes_control_characters_from_the_request_line(path: str) -> None:
    # A path is percent-decoded by the server, so "%0d%0a" arrives as CR LF;
    # a repr that lands in a log must not let it forge a line.
    snap = RequestSnapshot.from_asgi({"type": "http", "path": path, "headers": []})
    assert snap.path == path  # kept as the server gave it
    for text in (repr(snap), repr(Context().with_request(snap))):
        assert "\r" not in text
        assert "\n" not in text
        assert "\x1b" not in text
