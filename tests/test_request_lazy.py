"""``RequestSnapshot`` taken raw at the door and decoded on first access.

The door keeps the scope's raw data and decodes ``headers``, ``cookies`` and
``host`` only when someone reads them.  These tests pin what that must not
change: the snapshot is still a value copy of the request *as it arrived*
(seed 002), equal to one decoded at once, safe to read from many threads,
and never raising on what a broken server put in the scope.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ctxrelay import Headers, RequestSnapshot
from ctxrelay._request import MAX_HEADER_BYTES, MAX_HEADERS, MAX_HEADERS_TOTAL_BYTES

Scope = dict[str, Any]


def http_scope(*headers: Any, **overrides: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/orders",
        "query_string": b"page=2",
        "headers": list(headers),
        "client": ("10.0.0.5", 61000),
        "server": ("10.0.0.1", 8000),
    }
    scope.update(overrides)
    return scope


def test_a_snapshot_keeps_the_request_as_it_arrived_when_the_app_rewrites_the_scope() -> None:
    scope = http_scope((b"host", b"shop.example"), (b"cookie", b"session=s1"), (b"x-a", b"1"))
    snap = RequestSnapshot.from_asgi(scope)
    # What middleware and frameworks do to a live scope after the door.
    scope["headers"].append((b"x-added", b"later"))
    scope["headers"][2] = (b"x-a", b"rewritten")
    scope["headers"][1] = (b"cookie", b"session=other")
    scope["path"] = "/rewritten"
    scope["query_string"] = b"x=9"
    assert snap.headers.multi_items() == [
        ("host", "shop.example"),
        ("cookie", "session=s1"),
        ("x-a", "1"),
    ]
    assert dict(snap.cookies) == {"session": "s1"}
    assert (snap.path, snap.query, snap.host) == ("/orders", "page=2", "shop.example")


def test_header_pairs_given_as_lists_or_bytearrays_are_copied_at_once() -> None:
    pair = [b"x-list", b"before"]
    value = bytearray(b"before")
    scope = http_scope(pair, (b"x-bytearray", value))
    snap = RequestSnapshot.from_asgi(scope)
    pair[1] = b"after"  # mutable entries: the snapshot must not read them later
    value[:] = b"after!"
    assert snap.headers.multi_items() == [("x-list", "before"), ("x-bytearray", "before")]


def test_client_and_server_given_as_lists_are_copied_at_once() -> None:
    client, server = ["10.0.0.5", 61000], ["10.0.0.1", 8000]
    snap = RequestSnapshot.from_asgi(http_scope(client=client, server=server))
    client[1], server[0] = 1, "evil.example"
    assert (snap.client, snap.host) == ("10.0.0.5:61000", "10.0.0.1:8000")


def test_a_snapshot_read_later_equals_one_built_from_the_same_values_at_once() -> None:
    lazy = RequestSnapshot.from_asgi(
        http_scope((b"Host", b"shop.example"), (b"accept", b"a"), (b"accept", b"b"))
    )
    eager = RequestSnapshot(
        method="GET",
        scheme="http",
        host="shop.example",
        path="/orders",
        query="page=2",
        client="10.0.0.5:61000",
        headers=[("host", "shop.example"), ("accept", "a"), ("accept", "b")],
    )
    # Nothing read yet on `lazy`: equality, hash and pickling decode it.
    assert lazy == eager
    assert hash(RequestSnapshot.from_asgi(http_scope((b"host", b"shop.example")))) == hash(
        RequestSnapshot.from_asgi(http_scope((b"host", b"shop.example")))
    )
    fresh = RequestSnapshot.from_asgi(http_scope((b"cookie", b"k=v")))
    back = pickle.loads(pickle.dumps(fresh))
    assert back == fresh
    assert dict(back.cookies) == {"k": "v"}


def test_many_threads_reading_a_fresh_snapshot_at_once_see_the_same_values() -> None:
    rounds, readers = 20, 8
    for i in range(rounds):
        snap = RequestSnapshot.from_asgi(
            http_scope((b"host", f"h{i}.example".encode()), (b"cookie", f"id={i}".encode()))
        )
        start = threading.Barrier(readers)
        seen: list[tuple[Any, ...]] = []
        threads = [threading.Thread(target=_read, args=(snap, start, seen)) for _ in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        expected = (
            f"h{i}.example",
            {"id": str(i)},
            [("host", f"h{i}.example"), ("cookie", f"id={i}")],
        )
        assert seen == [expected] * readers


def _read(snap: RequestSnapshot, start: threading.Barrier, seen: list[tuple[Any, ...]]) -> None:
    start.wait(timeout=10)  # all first reads at once
    seen.append((snap.host, dict(snap.cookies), snap.headers.multi_items()))


def test_odd_client_and_server_values_never_make_an_attribute_raise() -> None:
    for client, server in [
        (("only-host",), ("only-host",) * 3),
        ((), ()),
        (("h", None), ("srv", None)),
        (None, None),
    ]:
        snap = RequestSnapshot.from_asgi(http_scope(client=client, server=server))
        assert isinstance(snap.client, (str, type(None)))
        assert isinstance(snap.host, str)
        repr(snap)
    unix = RequestSnapshot.from_asgi(http_scope(server=("/tmp/app.sock", None)))
    assert unix.host == ""
    assert RequestSnapshot.from_asgi(http_scope(client=())).client is None


@pytest.mark.parametrize(
    ("client", "server"),
    [(["h"], None), (5, None), (None, 5), (None, ["h"]), (None, ("h",)), (object(), object())],
)
def test_a_broken_servers_client_and_server_values_never_make_the_snapshot_raise(
    client: object, server: object
) -> None:
    # The careful path promises to normalize whatever a broken server sent.
    snap = RequestSnapshot.from_asgi(http_scope(client=client, server=server))
    assert isinstance(snap.client, (str, type(None)))
    assert isinstance(snap.host, str)
    assert snap == pickle.loads(pickle.dumps(snap))
    repr(snap)


def test_a_scope_without_optional_keys_still_snapshots() -> None:
    snap = RequestSnapshot.from_asgi({"type": "http", "headers": [(b"host", b"a.example")]})
    assert (snap.method, snap.scheme, snap.path, snap.query) == ("GET", "http", "/", "")
    assert (snap.host, snap.client) == ("a.example", None)
    websocket = RequestSnapshot.from_asgi({"type": "websocket", "path": "/ws"})
    assert websocket.scheme == "ws"


# -- the bulk check for usual headers keeps exactly what line-by-line rules keep ---------

CONTROL = {chr(c) for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)}


def kept_by_the_rules(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The snapshot's header rules, written out plainly as the reference."""
    kept: list[tuple[str, str]] = []
    total = 0
    for raw_name, value in lines:
        name = raw_name.strip().lower()
        if not name or not all("!" <= ch <= "~" and ch != ":" for ch in name):
            continue
        if CONTROL.intersection(value) or len(value) > MAX_HEADER_BYTES:
            continue
        if len(kept) >= MAX_HEADERS or total + len(name) + len(value) > MAX_HEADERS_TOTAL_BYTES:
            continue
        total += len(name) + len(value)
        kept.append((name, value))
    return kept


clean_names = st.sampled_from(["accept", "x-id", "cookie", "x.y_z~1"])
odd_names = st.one_of(
    st.sampled_from(["Host", " pad ", "a:b", "", "é", "x\x7f", "a b"]), st.text(max_size=8)
)
values = st.one_of(
    st.sampled_from(["v", "a\tb", "", "x" * MAX_HEADER_BYTES, "a\rb", "nul\x00"]),
    st.text(max_size=20),
    st.just("y" * (MAX_HEADER_BYTES + 1)),
)
# Mostly the usual headers, so that the bulk check is taken -- and then
# tripped by one odd name or value -- as often as the line-by-line path.
header_text_lines = st.lists(
    st.tuples(st.one_of(clean_names, clean_names, clean_names, odd_names), values), max_size=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=header_text_lines, copies=st.sampled_from([1, 1, 9, 30]))
@example(lines=[("accept", "x" * MAX_HEADER_BYTES)], copies=9)  # over the total size
@example(lines=[("x-id", "1")], copies=MAX_HEADERS + 2)  # over the count
@example(lines=[("accept", "v"), ("x-id", "y" * (MAX_HEADER_BYTES + 1))], copies=1)
def test_headers_keep_exactly_the_lines_the_rules_keep(
    lines: list[tuple[str, str]], copies: int
) -> None:
    lines = lines * copies  # past the count and size caps now and then
    assert Headers(lines).multi_items() == kept_by_the_rules(lines)
