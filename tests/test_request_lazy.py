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

from ctxrelay import RequestSnapshot

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


def test_a_scope_without_optional_keys_still_snapshots() -> None:
    snap = RequestSnapshot.from_asgi({"type": "http", "headers": [(b"host", b"a.example")]})
    assert (snap.method, snap.scheme, snap.path, snap.query) == ("GET", "http", "/", "")
    assert (snap.host, snap.client) == ("a.example", None)
    websocket = RequestSnapshot.from_asgi({"type": "websocket", "path": "/ws"})
    assert websocket.scheme == "ws"
