"""Hostile input at the door (issue 10, items 7 and 8): bounded memory, no hang.

Item 7 -- memory held by the door.  The door remembers the header names it
has seen (``Plan.plain``) so that the next request skips them with one set
lookup.  Names come from clients: capped by count alone, 4096 requests each
with a new 15 KB name (uvicorn's h11 accepts one) pinned 62 MB for the life
of the process.  The cache is now bounded in bytes; these tests feed the door
thousands of distinct long (and short) names, in process and through a real
uvicorn, and measure what it retains with ``sys.getsizeof`` and
``tracemalloc`` -- and check that the request id and the extracted fields
are what they were.

Item 8 -- header data that is not bytes.  A broken server or adapter may put
an ``int``, a ``str`` or an endless iterator where ASGI says bytes.
``bytes(10**10)`` allocates 10 GB; ``bytes(iterator)`` and ``tuple(iterator)``
read until the iterator ends, maybe never.  The door now refuses them,
reports each kind once, and the request still gets a context with an id.
No server sends such scopes, so these call the middleware in process; the
hangs are guarded by pytest-timeout (thread method: a C loop never returns
to the interpreter, so a signal could not stop it).
"""

from __future__ import annotations

import gc
import itertools
import logging
import sys
import tracemalloc
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import httpx
import pytest

import ctxrelay
from ctxrelay import _policy, _request
from ctxrelay.integrations._door import PLAIN_NAME_BYTES, PLAIN_RETAINED_BYTES, Plan
from ctxrelay.integrations.asgi import RelayMiddleware, valid_request_id
from tests.servers import WAIT, call, serve_asgi

Scope = MutableMapping[str, Any]

#: A header name h11 (uvicorn) accepts whole: its header block limit is 16 KiB.
LONG = 15_000
#: What tracemalloc may see at its peak while one bad request is handled:
#: the scope, the snapshot, the context -- never the size a bad value claims.
PEAK_BOUND = 512 * 1024


class Probe:
    """A raw ASGI app: keeps what it saw as small strings, answers 200."""

    def __init__(self, response_headers: Any = ()) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.response_headers = response_headers

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.seen.append((ctxrelay.request_id() or "", ctxrelay.get("x-tenant")))
        headers = self.response_headers
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(headers: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "method": "GET",
        "scheme": "http",
        "path": "/orders",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def retained(plan: Plan) -> int:
    """Bytes the door's name cache holds: the set's table and each name."""
    return sys.getsizeof(plan.plain) + sum(map(sys.getsizeof, plan.plain))


def long_name(i: int, size: int = LONG) -> bytes:
    """A distinct lowercase token name of ``size`` bytes."""
    tag = b"x-%d-" % i
    return tag + b"a" * (size - len(tag))


@pytest.fixture(autouse=True)
def _capture_x_tenant() -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant"}))


# -- item 7: the door's caches are bounded in bytes --------------------------------


class Checking:
    """A raw ASGI app that checks each request's id and captured field against
    the expected ones and keeps only the mismatches: nothing per request, so
    that tracemalloc sees what the door keeps."""

    def __init__(self) -> None:
        self.count = 0
        self.wrong: list[tuple[int, str | None, str | None]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        rid, tenant = ctxrelay.request_id(), ctxrelay.get("x-tenant")
        if rid != f"rid-{self.count}" or tenant != "acme":
            self.wrong.append((self.count, rid, tenant))
        self.count += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


#: Allocator slack tracemalloc may see besides the name cache (free lists,
#: interned small objects made on first use).
SLACK = 64 * 1024


@pytest.mark.parametrize(("names", "size"), [(5000, LONG), (5000, 20), (3000, PLAIN_NAME_BYTES)])
def test_thousands_of_new_header_names_leave_the_door_within_its_byte_bound(
    names: int, size: int
) -> None:
    probe = Checking()
    app = RelayMiddleware(probe)

    def request(i: int) -> None:
        scope = http_scope(
            [
                (b"host", b"shop"),
                (long_name(i, size), b"1"),
                (b"x-request-id", b"rid-%d" % i),
                (b"x-tenant", b"acme"),
            ]
        )
        call(app, scope)

    request(0)  # the usual names learned, first-use allocations made
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, names):
            request(i)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    plan = app._door.current_plan
    assert retained(plan) <= PLAIN_RETAINED_BYTES
    # Everything the door, the snapshot and the context keep, measured from
    # outside: within the documented bound too.
    assert held <= PLAIN_RETAINED_BYTES + SLACK
    # Nothing changed for the requests themselves.
    assert probe.count == names
    assert probe.wrong == []
    assert b"host" in plan.plain  # the real names are still skipped in one lookup


def test_through_uvicorn_long_header_names_are_read_but_not_remembered() -> None:
    seen: list[tuple[str, str | None]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append((ctxrelay.request_id() or "", ctxrelay.get("x-tenant")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = RelayMiddleware(app)
    with serve_asgi(middleware) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        for i in range(300):
            headers = [
                (long_name(i), b"1"),
                (b"x-request-id", b"rid-%d" % i),
                (b"x-tenant", b"acme"),
            ]
            response = client.get("/orders", headers=headers)
            assert response.headers["x-request-id"] == f"rid-{i}"
    plan = middleware._door.current_plan
    assert retained(plan) <= PLAIN_RETAINED_BYTES
    assert all(len(name) <= PLAIN_NAME_BYTES for name in plan.plain)
    assert b"accept" in plan.plain  # httpx's own headers: short, remembered
    assert seen == [(f"rid-{i}", "acme") for i in range(300)]


# -- item 8: non-bytes header data is refused, cheaply --------------------------------


@pytest.fixture
def refusals(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The ``ctxrelay`` warnings, with the once-per-kind memory emptied."""
    _request._refused.clear()
    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        yield caplog
    _request._refused.clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ctxrelay"]


class Counting:
    """An iterator that would go on for ``limit`` items, counting those taken.

    Large enough that reading it whole is what the old code did (and what
    the assertions catch), small enough not to take the machine down.
    """

    def __init__(self, item: object, limit: int = 10_000_000) -> None:
        self.item = item
        self.limit = limit
        self.taken = 0

    def __iter__(self) -> Counting:
        return self

    def __next__(self) -> object:
        if self.taken >= self.limit:
            raise StopIteration
        self.taken += 1
        return self.item


def run_measured(app: Any, scope: Scope) -> tuple[list[dict[str, Any]], int]:
    """One in-process ASGI call under tracemalloc: what was sent, the peak bytes."""
    tracemalloc.start()
    try:
        sent = call(app, scope)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return sent, peak


def echoed_id(sent: list[dict[str, Any]]) -> str:
    start = sent[0]
    values = [v for k, v in start["headers"] if k == b"x-request-id"]
    assert len(values) == 1
    value: bytes = values[0]
    return value.decode()


BAD_VALUES: dict[str, Callable[[], object]] = {
    "int 10**8": lambda: 10**8,
    "str": lambda: "acme",
    "list of ints": lambda: [97] * 10,
    "memoryview": lambda: memoryview(b"acme"),
}


@pytest.mark.parametrize("header", [b"x-request-id", b"x-tenant", b"x-other"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_a_header_value_that_is_not_bytes_costs_nothing_and_is_refused_once(
    refusals: pytest.LogCaptureFixture, header: bytes, bad: str
) -> None:
    probe = Probe()
    app = RelayMiddleware(probe, update_request_header=False)
    for _ in range(3):
        scope = http_scope([(b"host", b"shop"), (header, BAD_VALUES[bad]())])
        sent, peak = run_measured(app, scope)
        assert peak < PEAK_BOUND
        request = probe.seen[-1][0]
        assert valid_request_id(request)
        assert echoed_id(sent) == request
        snapshot = ctxrelay.RequestSnapshot.from_asgi(scope)
        assert header.decode() not in snapshot.headers
    assert len(probe.seen) == 3
    assert len(warnings_of(refusals)) == 1  # once per kind, not per request
    assert "refused an ASGI header value" in warnings_of(refusals)[0]


def test_a_good_request_id_is_kept_beside_a_refused_value(
    refusals: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    scope = http_scope([(b"x-other", 10**8), (b"x-request-id", b"rid-1"), (b"x-tenant", b"acme")])
    sent, peak = run_measured(RelayMiddleware(probe), scope)
    assert peak < PEAK_BOUND
    assert probe.seen == [("rid-1", "acme")]
    assert echoed_id(sent) == "rid-1"
    assert warnings_of(refusals)


@pytest.mark.parametrize("header", [b"x-request-id", b"x-tenant"])
def test_an_iterator_as_a_header_value_is_never_read(
    refusals: pytest.LogCaptureFixture, header: bytes
) -> None:
    probe = Probe()
    value = Counting(97)
    sent, peak = run_measured(RelayMiddleware(probe), http_scope([(header, value)]))
    assert value.taken == 0
    assert peak < PEAK_BOUND
    assert valid_request_id(probe.seen[0][0])
    assert echoed_id(sent) == probe.seen[0][0]
    assert warnings_of(refusals)


@pytest.mark.timeout(30, method="thread")
def test_an_endless_iterator_as_the_request_id_value_does_not_hang(
    refusals: pytest.LogCaptureFixture,
) -> None:
    probe = Probe()
    sent, peak = run_measured(
        RelayMiddleware(probe), http_scope([(b"x-request-id", itertools.repeat(97))])
    )
    assert peak < PEAK_BOUND
    assert valid_request_id(probe.seen[0][0])
    assert echoed_id(sent) == probe.seen[0][0]


@pytest.mark.parametrize("bad_name", [10**8, "x-tenant", Counting(97)])
def test_a_header_name_that_is_not_bytes_is_refused(
    refusals: pytest.LogCaptureFixture, bad_name: object
) -> None:
    probe = Probe()
    scope = http_scope([(bad_name, b"acme"), (b"x-request-id", b"rid-2")])
    sent, peak = run_measured(RelayMiddleware(probe), scope)
    assert peak < PEAK_BOUND
    assert probe.seen == [("rid-2", None)]
    assert echoed_id(sent) == "rid-2"
    assert any("refused an ASGI header name" in m for m in warnings_of(refusals))
    if isinstance(bad_name, Counting):
        assert bad_name.taken == 0


def test_an_iterator_of_header_entries_is_read_only_up_to_the_bound(
    refusals: pytest.LogCaptureFixture,
) -> None:
    entries = Counting((b"x-filler", b"1"), limit=2_000_000)
    probe = Probe()
    sent, peak = run_measured(RelayMiddleware(probe), http_scope(entries))
    assert entries.taken <= _request.MAX_ASGI_ENTRIES + 1
    assert peak < 4 * PEAK_BOUND  # the bounded copy and its decoding
    assert valid_request_id(probe.seen[0][0])
    assert echoed_id(sent) == probe.seen[0][0]


@pytest.mark.timeout(30, method="thread")
def test_an_endless_iterator_of_header_entries_does_not_hang() -> None:
    def endless() -> Iterator[tuple[bytes, bytes]]:
        yield (b"x-request-id", b"rid-3")
        yield (b"x-tenant", b"acme")
        while True:
            yield (b"x-filler", b"1")

    probe = Probe()
    sent, peak = run_measured(RelayMiddleware(probe), http_scope(endless()))
    assert peak < 4 * PEAK_BOUND
    assert probe.seen == [("rid-3", "acme")]
    assert echoed_id(sent) == "rid-3"


def test_entries_that_are_iterators_among_good_ones_keep_the_id_and_fields(
    refusals: pytest.LogCaptureFixture,
) -> None:
    # Iterators hash (by identity), so a tuple holding one passes for a
    # value copy; each is unpacked at most a few items deep.
    odd = Counting(b"x", limit=10_000_000)
    probe = Probe()
    scope = http_scope([(b"x-request-id", b"rid-4"), odd, (b"x-tenant", b"acme")])
    sent, peak = run_measured(RelayMiddleware(probe), scope)
    assert odd.taken <= 8
    assert peak < PEAK_BOUND
    assert probe.seen == [("rid-4", "acme")]
    assert echoed_id(sent) == "rid-4"


class IntLike:
    """A broken adapter's header name: it has a length, and bytes() of it
    would allocate its integer value."""

    def __len__(self) -> int:
        return len(b"x-request-id")

    def __index__(self) -> int:
        return 10**8


@pytest.mark.parametrize("key", [IntLike(), "x-request-id", 10**8])
def test_response_header_names_that_are_not_bytes_are_never_converted(
    refusals: pytest.LogCaptureFixture, key: object
) -> None:
    probe = Probe(response_headers=[(key, b"from-app"), (b"content-type", b"text/plain")])
    sent, peak = run_measured(RelayMiddleware(probe), http_scope([(b"x-request-id", b"rid-5")]))
    assert peak < PEAK_BOUND
    assert any("refused an ASGI response header name" in m for m in warnings_of(refusals))
    if isinstance(key, int):  # no length: the headers go to the server as they are
        assert sent[0]["headers"] == probe.response_headers
    else:  # not the app's own id: ours is echoed; the server judges the bad line
        assert (b"x-request-id", b"rid-5") in sent[0]["headers"]


def test_the_policy_remembers_verdicts_only_for_names_as_short_as_real_ones() -> None:
    # Headers.__repr__ asks is_sensitive() about every inbound name: hostile
    # 15 KB names must not be kept for the life of the process.
    from ctxrelay import Policy, RequestSnapshot

    policy = Policy()
    for i in range(200):
        snapshot = RequestSnapshot(headers=[(f"x-{i:05d}-" + "a" * 15_000, "v")])
        for name in snapshot.headers:
            policy.is_sensitive(name)
    remembered = policy._verdicts
    assert sum(len(name) for name in remembered) <= 4096 * 64
    assert all(len(name) <= 64 for name in remembered)
    assert policy.is_sensitive("x-" + "a" * 15_000 + "-token")  # still judged, not cached
