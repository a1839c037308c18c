"""The ASGI door's fast paths decide exactly as the slow rules do.

The door checks a common inbound id (hex, a UUID) on the bytes that arrived
and skips the regular expression; without an inbound id it appends the new
id to the snapshot it already took instead of taking it again.  Both must
give what the plain rules give, for any input.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import ctxrelay
from ctxrelay import RequestSnapshot
from ctxrelay.integrations.asgi import RelayMiddleware, valid_request_id
from tests.servers import call
from tests.test_hostile_input import http_scope


class Probe:
    """Keeps the request id and snapshot each request ran with."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, RequestSnapshot | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen.append((ctxrelay.request_id(), ctxrelay.request()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


IDS = st.one_of(
    st.uuids().map(str),
    st.text(alphabet="0123456789abcdefABCDEF-", min_size=1, max_size=80),
    st.text(alphabet="abcXYZ019._:-/+= ~", min_size=1, max_size=140),
    st.sampled_from(["a.b:c_d", "-abc", "abc-", "A_B", "x" * 128, "x" * 129, "a b", "ab/cd"]),
)


@settings(max_examples=300, deadline=None)
@given(IDS)
def test_an_inbound_id_is_kept_exactly_when_the_rule_accepts_it(rid: str) -> None:
    probe = Probe()
    sent = call(RelayMiddleware(probe), http_scope([(b"x-request-id", rid.encode("latin-1"))]))
    bound = probe.seen[0][0]
    assert bound is not None
    if valid_request_id(rid):
        assert bound == rid
    else:
        assert bound != rid
        assert valid_request_id(bound)
    echoed = dict(sent[0]["headers"])[b"x-request-id"]
    assert echoed == bound.encode("latin-1")


def test_without_an_inbound_id_the_snapshot_carries_the_new_id_as_a_fresh_one_would() -> None:
    probe = Probe()
    headers = [(b"host", b"shop"), (b"x-tenant", b"acme"), (b"cookie", b"a=1")]
    scope = http_scope(list(headers))
    call(RelayMiddleware(probe), scope)
    rid, snapshot = probe.seen[0]
    assert rid is not None
    assert snapshot is not None
    # The same request, arriving with the id the door made: its snapshot is
    # the one the door built by appending.
    again = Probe()
    call(RelayMiddleware(again), http_scope([*headers, (b"x-request-id", rid.encode())]))
    assert again.seen[0][1] == snapshot
    assert snapshot.headers.get("x-request-id") == rid
    assert (b"x-request-id", rid.encode()) in scope["headers"]
