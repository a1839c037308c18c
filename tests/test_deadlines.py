"""Deadlines and cancellation: part of the context, so they follow the work.

The core API, the relay's "not started once expired" rule, processes (the
time remaining travels, not an instant), the wire (a header by policy,
honoured inbound only from trusted peers, only narrowing), and the web doors'
``timeout=`` through real servers.  No test asserts on elapsed time: each
asserts what the user sees (a 504, an exception, a value that only shrinks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import multiprocessing
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import ctxrelay
from ctxrelay import DeadlineExceeded, Policy, RequestCancelled
from ctxrelay.integrations.asgi import RelayMiddleware
from tests.servers import WAIT, Mailbox, serve_asgi, serve_wsgi


@pytest.fixture(autouse=True)
def _policy() -> Iterator[None]:
    before = ctxrelay.active_policy()
    try:
        yield
    finally:
        ctxrelay.configure(before)


# -- the core ------------------------------------------------------------------------------


def test_no_deadline_by_default() -> None:
    assert ctxrelay.remaining() is None
    assert not ctxrelay.cancelled()
    ctxrelay.checkpoint()  # nothing to raise


def test_a_deadline_only_ever_narrows_and_is_restored_after() -> None:
    with ctxrelay.deadline(10) as outer:
        assert outer is not None
        assert 0 < outer <= 10
        with ctxrelay.deadline(100):  # wider: no effect
            remaining = ctxrelay.remaining()
            assert remaining is not None
            assert remaining <= 10
        with ctxrelay.deadline(1):
            inner = ctxrelay.remaining()
            assert inner is not None
            assert inner <= 1
        after = ctxrelay.remaining()
        assert after is not None
        assert 1 < after <= 10
    assert ctxrelay.remaining() is None


def test_fields_bound_inside_keep_the_deadline_and_values_are_unchanged() -> None:
    with ctxrelay.bind(user="alice"), ctxrelay.deadline(5):
        with ctxrelay.bind(tenant="t1"):
            remaining = ctxrelay.remaining()
            assert remaining is not None
            assert remaining <= 5
            assert ctxrelay.current() == {"user": "alice", "tenant": "t1"}
        assert ctxrelay.current().set(x="1").remove("x") == {"user": "alice"}


def test_a_passed_deadline_raises_at_the_checkpoint() -> None:
    with ctxrelay.deadline(0):
        assert ctxrelay.cancelled()
        assert ctxrelay.remaining() == 0.0
        with pytest.raises(DeadlineExceeded):
            ctxrelay.checkpoint()
    assert issubclass(DeadlineExceeded, TimeoutError)


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", True])
def test_bad_seconds_are_clear_errors(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        ctxrelay.deadline(bad)


def test_the_async_form_times_out_awaits_at_the_deadline() -> None:
    async def main() -> str:
        try:
            async with ctxrelay.deadline(0.05):
                await asyncio.sleep(30)
        except DeadlineExceeded:
            return "timed out"
        return "slept"

    assert asyncio.run(main()) == "timed out"


def test_the_async_form_leaves_other_cancellations_alone() -> None:
    async def main() -> str:
        async def work() -> None:
            async with ctxrelay.deadline(30):
                await asyncio.sleep(30)

        task = asyncio.ensure_future(work())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "?"

    assert asyncio.run(main()) == "cancelled"


def test_without_deadline_keeps_fields_and_detached_drops_everything() -> None:
    with ctxrelay.bind(user="alice"), ctxrelay.deadline(0):
        with ctxrelay.without_deadline():
            assert ctxrelay.get("user") == "alice"
            assert ctxrelay.remaining() is None
            ctxrelay.checkpoint()
        with ctxrelay.detached():
            assert ctxrelay.current() == {}
            assert ctxrelay.remaining() is None


# -- pools: work is not started once its deadline passed ------------------------------


def _user() -> str | None:
    return ctxrelay.get("user")


@pytest.mark.parametrize("kind", ["drop-in", "context-executor", "instrumented"])
def test_a_pool_task_whose_deadline_passed_before_it_starts_is_not_run(kind: str) -> None:
    if kind == "instrumented":
        ctxrelay.instrument()
        pool: concurrent.futures.Executor = concurrent.futures.ThreadPoolExecutor(1)
    elif kind == "drop-in":
        pool = ctxrelay.ThreadPoolExecutor(1)
    else:
        pool = ctxrelay.ContextExecutor(concurrent.futures.ThreadPoolExecutor(1))
    ran: list[str] = []
    gate = threading.Event()
    try:
        blocker = pool.submit(gate.wait, WAIT)
        with ctxrelay.bind(user="alice"), ctxrelay.deadline(0.01):
            late = pool.submit(ran.append, "late")
        time.sleep(0.05)  # the deadline passes while the task waits in the queue
        gate.set()
        blocker.result(WAIT)
        with pytest.raises(DeadlineExceeded):
            late.result(WAIT)
        with ctxrelay.bind(user="bob"), ctxrelay.deadline(30):
            assert pool.submit(_user).result(WAIT) == "bob"  # in time: runs
    finally:
        gate.set()
        pool.shutdown()
        ctxrelay.uninstrument()
    assert ran == []


def test_a_pool_task_of_a_cancelled_request_is_not_run() -> None:
    from ctxrelay._deadline import for_request

    ctx, cancel = for_request(ctxrelay.Context(user="alice"), None)
    with ctxrelay.ThreadPoolExecutor(1) as pool, ctxrelay.use(ctx):
        cancel.cancel("the client disconnected")
        future = pool.submit(_user)
        with pytest.raises(RequestCancelled, match="disconnected"):
            future.result(WAIT)


def test_the_deadline_travels_with_the_capture_into_threads_and_tasks() -> None:
    seen: list[float | None] = []
    with ctxrelay.deadline(30):
        t = ctxrelay.Thread(target=lambda: seen.append(ctxrelay.remaining()))
        t.start()
        t.join(WAIT)
        with ctxrelay.ThreadPoolExecutor(1) as pool:
            seen.append(pool.submit(ctxrelay.remaining).result(WAIT))
    assert all(s is not None and 0 < s <= 30 for s in seen)


# -- processes: the time remaining travels ------------------------------------------------


def _remaining_in_worker() -> float | None:
    return ctxrelay.remaining()


def test_a_pickled_context_carries_the_time_remaining_not_an_instant() -> None:
    with ctxrelay.deadline(30):
        sent = pickle.dumps(ctxrelay.current())
    arrived = pickle.loads(sent)
    with ctxrelay.use(arrived):
        left = ctxrelay.remaining()
    assert left is not None
    assert 0 < left <= 30
    with ctxrelay.deadline(0):
        expired = pickle.loads(pickle.dumps(ctxrelay.current()))
    with ctxrelay.use(expired), pytest.raises(DeadlineExceeded):
        ctxrelay.checkpoint()


def test_a_forged_pickled_deadline_is_dropped() -> None:
    from ctxrelay._context import _unpickle

    for forged in ("10", -5.0, float("inf"), 10**12, None):
        ctx = _unpickle({"user": "u"}, None, forged)
        with ctxrelay.use(ctx):
            assert ctxrelay.remaining() is None


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_a_process_pool_task_sees_the_remaining_time_and_an_expired_one_is_not_run() -> None:
    with ctxrelay.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        with ctxrelay.deadline(30):
            left = pool.submit(_remaining_in_worker).result(WAIT)
        assert left is not None
        assert 0 < left <= 30
        with ctxrelay.deadline(0):
            future = pool.submit(_remaining_in_worker)
        with pytest.raises(DeadlineExceeded):
            future.result(WAIT)


# -- the wire -------------------------------------------------------------------------------


def test_the_time_left_goes_to_routed_destinations_not_to_foreign_ones() -> None:
    ctxrelay.configure(Policy(routes=(Policy.Route(hosts=("internal.example",)),)))
    with ctxrelay.deadline(5):
        internal: dict[str, str] = {}
        ctxrelay.inject(internal, destination="http://internal.example/a")
        foreign: dict[str, str] = {}
        ctxrelay.inject(foreign, destination="http://other.example/a")
        carrier: dict[str, str] = {}
        ctxrelay.inject(carrier)  # a queue message: in-house
    assert 0 < int(internal["x-request-timeout-ms"]) <= 5000
    assert "x-request-timeout-ms" not in foreign
    assert 0 < int(carrier["x-request-timeout-ms"]) <= 5000


def test_the_header_name_is_one_setting() -> None:
    ctxrelay.configure(Policy(deadline_header="X-Envoy-Expected-Rq-Timeout-Ms"))
    with ctxrelay.deadline(5):
        out: dict[str, str] = {}
        ctxrelay.inject(out)
    assert "x-envoy-expected-rq-timeout-ms" in out
    with pytest.raises(ValueError, match="header name"):
        Policy(deadline_header="bad header")


def test_an_inbound_deadline_is_honoured_from_trusted_peers_only_and_only_narrows() -> None:
    ctxrelay.configure(Policy(trusted_peers=("10.0.0.1",), max_inbound_timeout=60))
    header = {"x-request-timeout-ms": "2000"}
    trusted = ctxrelay.extract(header, peer="10.0.0.1:5000")
    untrusted = ctxrelay.extract(header, peer="203.0.113.9:5000")
    with ctxrelay.use(trusted):
        left = ctxrelay.remaining()
        assert left is not None
        assert 0 < left <= 2
        with ctxrelay.deadline(10):  # cannot widen what arrived
            wider = ctxrelay.remaining()
            assert wider is not None
            assert wider <= 2
    with ctxrelay.use(untrusted):
        assert ctxrelay.remaining() is None
    huge = ctxrelay.extract({"x-request-timeout-ms": "999999999999"}, peer="10.0.0.1")
    with ctxrelay.use(huge):
        capped = ctxrelay.remaining()
        assert capped is not None
        assert capped <= 60


@pytest.mark.parametrize(
    "value", ["-5", "abc", "1e3", " ", "", "12.5", "٣٣", "1" * 40, "5\r\nx-evil: 1"]
)
def test_hostile_inbound_deadline_headers_change_nothing(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctxrelay.configure(Policy(trusted_peers=("10.0.0.1",)))
    ctx = ctxrelay.extract({"x-request-timeout-ms": value, "x-request-id": "r-1"}, peer="10.0.0.1")
    with ctxrelay.use(ctx):
        assert ctxrelay.remaining() is None


def test_a_repeated_inbound_deadline_header_is_refused() -> None:
    ctxrelay.configure(Policy(trusted_peers=("10.0.0.1",)))
    ctx = ctxrelay.extract(
        [("x-request-timeout-ms", "1000"), ("x-request-timeout-ms", "9000")], peer="10.0.0.1"
    )
    with ctxrelay.use(ctx):
        assert ctxrelay.remaining() is None


# -- the doors, through real servers ------------------------------------------------------

BOX = Mailbox()


async def _slow(request: Request) -> PlainTextResponse:
    BOX.post(f"slow-{request.query_params['n']}", ctxrelay.remaining())
    await asyncio.sleep(30)
    return PlainTextResponse("late")


async def _fast(request: Request) -> PlainTextResponse:
    left = ctxrelay.remaining()
    return PlainTextResponse(f"{left:.3f}")


def _sync_loop(request: Request) -> PlainTextResponse:
    key = request.query_params["key"]
    for _ in range(int(WAIT / 0.02)):
        if ctxrelay.cancelled():
            BOX.post(key, "cancelled seen")
            try:
                ctxrelay.checkpoint()
            except (DeadlineExceeded, RequestCancelled) as exc:
                BOX.post(key + "-error", type(exc).__name__)
            return PlainTextResponse("stopped")
        time.sleep(0.02)
    BOX.post(key, "never cancelled")
    return PlainTextResponse("done")


def _app(timeout: float | None) -> Any:
    routes = [Route("/slow", _slow), Route("/fast", _fast), Route("/loop", _sync_loop)]
    return RelayMiddleware(Starlette(routes=routes), timeout=timeout)


def test_asgi_timeout_answers_504_with_the_request_id_when_the_handler_is_too_slow() -> None:
    with serve_asgi(_app(0.3)) as base, httpx.Client(base_url=base, timeout=WAIT) as client:
        got = client.get("/slow?n=1", headers={"x-request-id": "req-late"})
        fast = client.get("/fast")
    assert got.status_code == 504
    assert got.headers["x-request-id"] == "req-late"
    assert "req-late" in got.text
    assert fast.status_code == 200
    assert 0 < float(fast.text) <= 0.3
    seen = BOX.wait(["slow-1"])["slow-1"]
    assert seen is not None
    assert seen <= 0.3


def test_asgi_sync_code_sees_the_deadline_through_the_check() -> None:
    with serve_asgi(_app(0.3)) as base:
        got = httpx.get(base + "/loop?key=deadline", timeout=WAIT)
    assert got.status_code == 504
    found = BOX.wait(["deadline", "deadline-error"])
    assert found == {"deadline": "cancelled seen", "deadline-error": "DeadlineExceeded"}


def test_asgi_a_client_that_disconnects_cancels_the_request() -> None:
    with serve_asgi(_app(30)) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
            sock.sendall(b"GET /loop?key=gone HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
        found = BOX.wait(["gone"])
        if found["gone"] == "cancelled seen":
            found = BOX.wait(["gone", "gone-error"])
    assert found == {"gone": "cancelled seen", "gone-error": "RequestCancelled"}


def test_asgi_many_requests_with_distinct_budgets_each_see_their_own() -> None:
    ctxrelay.configure(Policy(trusted_peers=("127.0.0.1",)))

    async def main(base: str) -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:

            async def one(ms: int) -> tuple[int, float]:
                got = await client.get("/fast", headers={"x-request-timeout-ms": str(ms)})
                return ms, float(got.text)

            return await asyncio.gather(*(one(1000 + i * 37) for i in range(200)))

    with serve_asgi(_app(60)) as base:
        results = asyncio.run(main(base))
    for budget_ms, seen in results:
        assert 0 < seen <= budget_ms / 1000  # each request's own budget, only narrowed


def test_a_bad_timeout_is_refused_at_construction() -> None:
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises((TypeError, ValueError)):
            RelayMiddleware(Starlette(), timeout=bad)  # type: ignore[arg-type]


def test_wsgi_timeout_binds_the_deadline_for_the_request() -> None:
    from ctxrelay.integrations.wsgi import RelayMiddleware as WsgiDoor

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        left = ctxrelay.remaining()
        start_response("200 OK", [("content-type", "text/plain")])
        return [f"{left:.3f}".encode()]

    with serve_wsgi(WsgiDoor(app, timeout=2.0)) as base:
        got = httpx.get(base + "/", timeout=WAIT)
    assert 0 < float(got.text) <= 2.0


def test_the_deadline_is_not_shared_between_requests() -> None:
    seen: dict[str, float | None] = {}

    def request(name: str, seconds: float | None) -> None:
        def run() -> None:
            if seconds is None:
                seen[name] = ctxrelay.remaining()
                return
            with ctxrelay.deadline(seconds):
                seen[name] = ctxrelay.remaining()

        contextvars.Context().run(run)

    request("a", 1.0)
    request("b", None)
    request("c", 50.0)
    assert seen["b"] is None
    a, c = seen["a"], seen["c"]
    assert a is not None
    assert c is not None
    assert a <= 1.0 < c


async def _echo_body(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{len(body)} {await request.is_disconnected()}")


def test_asgi_timeout_leaves_request_bodies_and_disconnect_checks_working() -> None:
    app = RelayMiddleware(
        Starlette(routes=[Route("/echo", _echo_body, methods=["POST"])]), timeout=30
    )
    with serve_asgi(app) as base:
        got = httpx.post(base + "/echo", content=b"x" * 3_000_000, timeout=WAIT)
    assert got.text == "3000000 False"


@pytest.mark.parametrize("not_an_app", [None, "app", 42, {"type": "http"}])
def test_the_doors_refuse_what_is_not_an_app_when_they_are_built(not_an_app: Any) -> None:
    from ctxrelay.integrations.wsgi import RelayMiddleware as WsgiDoor

    with pytest.raises(TypeError, match="ASGI app"):
        RelayMiddleware(not_an_app)
    with pytest.raises(TypeError, match="WSGI app"):
        WsgiDoor(not_an_app)
