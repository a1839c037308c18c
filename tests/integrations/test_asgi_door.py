"""The door's fast path: raw ASGI header pairs read once, names as ``bytes``.

The ASGI and WSGI middleware compare header names against a set built per
policy and learn the names they have seen.  These tests, raw ASGI calls in
process and WSGI calls with a real environ, pin that the shortcut gives what
reading the full snapshot gives: names from servers that do not lowercase
them, repeated headers, names learned before a policy change, the echo.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxrelay
from ctxrelay import RequestSnapshot, _policy
from ctxrelay.integrations import wsgi
from ctxrelay.integrations.asgi import RelayMiddleware
from tests.servers import call

Scope = MutableMapping[str, Any]
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Probe:
    """A raw ASGI app that records the context it ran in and answers 200."""

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.contexts: list[ctxrelay.Context] = []
        self.start: dict[str, Any] = {
            "type": "http.response.start",
            "status": 200,
            "headers": headers or [],
        }

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.contexts.append(ctxrelay.current())
        await send(self.start)
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(*headers: Any, client: tuple[str, int] = ("10.0.0.9", 5000)) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "query_string": b"",
        "headers": list(headers),
        "client": client,
        "server": ("10.0.0.1", 8000),
    }


def test_names_a_server_did_not_lowercase_are_still_captured_and_traced() -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant"}))
    probe = Probe()
    app = RelayMiddleware(probe)
    call(app, http_scope((b"host", b"a"), (b"accept", b"*/*")))  # names learned first
    call(app, http_scope((b"X-Tenant", b"acme"), (b"Traceparent", TRACEPARENT)))
    call(app, http_scope((b" x-tenant ", b"padded")))
    learned, upper, padded = probe.contexts
    assert "x-tenant" not in learned
    assert upper["x-tenant"] == "acme"
    assert upper["traceparent"] == TRACEPARENT.decode()
    assert padded["x-tenant"] == "padded"


def test_a_repeated_request_id_header_keeps_its_first_value() -> None:
    probe = Probe()
    sent = call(
        RelayMiddleware(probe),
        http_scope((b"x-request-id", b"first"), (b"accept", b"a"), (b"x-request-id", b"second")),
    )
    assert probe.contexts[0]["request_id"] == "first"
    assert (b"x-request-id", b"first") in sent[0]["headers"]


def test_a_header_captured_after_its_name_was_learned_as_plain_is_extracted() -> None:
    probe = Probe()
    app = RelayMiddleware(probe)
    call(app, http_scope((b"x-tenant", b"acme")))  # not captured: learned as plain
    _policy.configure(_policy.Policy(capture={"x-tenant"}))
    call(app, http_scope((b"x-tenant", b"acme")))
    before, after = probe.contexts
    assert "x-tenant" not in before
    assert after["x-tenant"] == "acme"


def test_baggage_is_read_only_from_trusted_peers_on_the_fast_path() -> None:
    _policy.configure(_policy.Policy(trusted_peers=("10.0.0.7",)))
    probe = Probe()
    app = RelayMiddleware(probe)
    for client in [("10.0.0.7", 1), ("203.0.113.9", 1), ("10.0.0.7", 2)]:
        call(app, http_scope((b"baggage", b"user=alice"), client=client))
    trusted, internet, again = probe.contexts
    assert trusted["user"] == again["user"] == "alice"
    assert "user" not in internet


def test_malformed_entries_among_good_ones_take_the_careful_path_and_keep_the_id() -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant"}))
    probe = Probe()
    call(
        RelayMiddleware(probe),
        http_scope(
            (b"x-request-id", b"rid-1"), ("x-str", b"v"), [b"x-tenant", b"acme"], (b"a", b"b", b"c")
        ),
    )
    ctx = probe.contexts[0]
    assert ctx["request_id"] == "rid-1"
    assert ctx["x-tenant"] == "acme"
    assert ctx.request is not None
    assert ctx.request.headers.multi_items() == [("x-request-id", "rid-1"), ("x-tenant", "acme")]


def test_an_id_the_app_set_in_any_case_is_not_echoed_twice() -> None:
    probe = Probe(headers=[(b"content-type", b"text/plain"), (b"X-Request-ID", b"from-app")])
    sent = call(RelayMiddleware(probe), http_scope((b"x-request-id", b"inbound")))
    names = [name.lower() for name, _ in sent[0]["headers"]]
    assert names.count(b"x-request-id") == 1
    assert (b"X-Request-ID", b"from-app") in sent[0]["headers"]


def test_an_oversized_traceparent_is_not_bound_on_the_fast_path() -> None:
    # Under the snapshot's 8192-byte line cap but over the 4096-byte field limit.
    probe = Probe()
    future = b"01" + TRACEPARENT[2:] + b"-" + b"x" * 5000  # a later version may add more
    call(RelayMiddleware(probe), http_scope((b"traceparent", future)))
    assert "traceparent" not in probe.contexts[0]


def test_headers_an_app_sends_as_an_iterator_all_reach_the_server() -> None:
    # ASGI headers are any iterable: the echo reads a one-shot iterator once,
    # and must hand the server what it read, the app's own id included.
    lines = [(b"content-type", b"text/plain"), (b"x-request-id", b"from-app")]

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": iter(lines)})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = call(RelayMiddleware(app), http_scope((b"x-request-id", b"inbound")))
    assert list(sent[0]["headers"]) == lines


def test_the_echo_leaves_the_apps_message_and_header_list_unchanged() -> None:
    headers = [(b"content-type", b"text/plain")]
    probe = Probe(headers=headers)
    app = RelayMiddleware(probe)
    first = call(app, http_scope((b"x-request-id", b"one")))
    second = call(app, http_scope((b"x-request-id", b"two")))  # the app reuses its message
    assert probe.start["headers"] is headers
    assert headers == [(b"content-type", b"text/plain")]
    assert (b"x-request-id", b"one") in first[0]["headers"]
    assert (b"x-request-id", b"two") in second[0]["headers"]
    assert (b"x-request-id", b"one") not in second[0]["headers"]


def test_generated_ids_are_32_hex_digits_and_distinct_across_threads() -> None:
    probe = Probe()
    app = RelayMiddleware(probe)
    per_thread, threads = 250, 8

    def serve() -> None:
        for _ in range(per_thread):
            call(app, http_scope((b"host", b"a")))

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    ids = [ctx["request_id"] for ctx in probe.contexts]
    assert len(ids) == per_thread * threads
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)


# -- WSGI -------------------------------------------------------------------------------


def wsgi_call(app: Any, environ: dict[str, Any]) -> ctxrelay.Context:
    seen: list[ctxrelay.Context] = []

    def inner(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(ctxrelay.current())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return lambda data: None

    list(app(inner)(environ, start_response))
    return seen[0]


def environ(**headers: Any) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "app.internal",
        "SERVER_PORT": "8080",
        "REMOTE_ADDR": "10.0.0.9",
        "wsgi.url_scheme": "http",
        **headers,
    }


def test_wsgi_keys_a_server_did_not_uppercase_are_still_captured() -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant", "content-type"}))
    app = wsgi.RelayMiddleware
    standard = wsgi_call(app, environ(HTTP_X_TENANT="acme", CONTENT_TYPE="text/csv"))
    odd = wsgi_call(app, environ(HTTP_x_tenant="acme"))
    plain = wsgi_call(app, environ(HTTP_ACCEPT="*/*", HTTP_X_REQUEST_ID="rid-7"))
    assert standard["x-tenant"] == "acme"
    assert standard["content-type"] == "text/csv"
    assert odd["x-tenant"] == "acme"
    assert "x-tenant" not in plain
    assert plain["request_id"] == "rid-7"


# -- the fast path reads exactly what the decoded snapshot holds ------------------------

NAMES = [b"x-tenant", b"cookie", b"traceparent", b"tracestate", b"baggage", b"x-request-id"]
VALUES = st.one_of(
    st.sampled_from([TRACEPARENT, b"acme", b"user=alice,team=a%20b", b"k=v; k2=v2", b"rojo=1"]),
    st.binary(max_size=40),
    st.builds(lambda n: b"v" * n, st.sampled_from([4096, 8192, 8193])),
)
PAIRS = st.lists(
    st.tuples(st.one_of(st.sampled_from(NAMES), st.sampled_from([b"host", b"Accept"])), VALUES),
    max_size=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=PAIRS,
    capture=st.sets(st.sampled_from(["x-tenant", "cookie", "x-request-id"])),
    trusted=st.booleans(),
)
def test_the_fast_path_extracts_exactly_what_the_decoded_snapshot_gives(
    pairs: list[tuple[bytes, bytes]], capture: set[str], trusted: bool
) -> None:
    _policy.configure(
        _policy.Policy(capture=capture, trusted_peers=("10.0.0.9",) if trusted else ())
    )
    probe = Probe()
    call(RelayMiddleware(probe), http_scope(*pairs))
    got = dict(probe.contexts[0])
    snapshot = RequestSnapshot.from_asgi(http_scope(*pairs))
    expected = dict(ctxrelay.extract(snapshot.headers, peer="10.0.0.9:5000"))
    expected.pop("request_id", None)  # the door's own rule decides the id
    got.pop("request_id")
    assert got == expected


@pytest.mark.parametrize("name", ["x-réquest-id", "x request id", "x-id\r\n", "x:id"])
def test_a_request_id_header_name_that_is_not_a_token_is_refused_at_setup(name: str) -> None:
    with pytest.raises(ValueError, match="not an HTTP header name"):
        RelayMiddleware(Probe(), header_name=name)
    with pytest.raises(ValueError, match="not an HTTP header name"):
        wsgi.RelayMiddleware(lambda environ, start_response: [], header_name=name)
