"""Each boundary of BRIEF.md's Python table: the bug without ctxrelay, fixed with it.

The "without" tests document CPython's behaviour (3.10-3.13, non-free-threaded):
if one of them starts failing, the standard library changed and the docs'
table must be updated.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ctxrelay

pytestmark = pytest.mark.skipif(
    bool(getattr(sys.flags, "thread_inherit_context", 0)),
    reason="free-threaded builds inherit context into new threads",
)

OTHER: contextvars.ContextVar[str] = contextvars.ContextVar("other_library", default="-")


def seen() -> tuple[str | None, str]:
    """What a task sees: our field, and another library's ContextVar."""
    return ctxrelay.get("user"), OTHER.get()


@contextlib.contextmanager
def in_request() -> Iterator[None]:
    # "Another library" sets its own variable in the same context, to show
    # that every context variable travels in-process.
    token = OTHER.set("other-value")
    try:
        with ctxrelay.bind(user="alice"):
            yield
    finally:
        OTHER.reset(token)


def run_thread(cls: type[threading.Thread]) -> tuple[str | None, str]:
    box: list[tuple[str | None, str]] = []
    t = cls(target=lambda: box.append(seen()))
    t.start()
    t.join()
    return box[0]


# -- asyncio copies the context by itself ----------------------------------------
def test_asyncio_create_task_call_soon_and_to_thread_already_copy_the_context() -> None:
    async def main() -> list[tuple[str | None, str]]:
        with in_request():
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[tuple[str | None, str]] = loop.create_future()
            loop.call_soon(lambda: fut.set_result(seen()))
            return [
                await asyncio.create_task(asyncio.sleep(0, seen())),
                await fut,
                await asyncio.to_thread(seen),
            ]

    assert asyncio.run(main()) == [("alice", "other-value")] * 3


# -- threads ---------------------------------------------------------------------
def test_plain_thread_loses_the_context() -> None:
    with in_request():
        assert run_thread(threading.Thread) == (None, "-")


def test_ctxrelay_thread_carries_every_contextvar() -> None:
    with in_request():
        assert run_thread(ctxrelay.Thread) == ("alice", "other-value")


def test_plain_timer_loses_the_context() -> None:
    box: list[tuple[str | None, str]] = []
    with in_request():
        t = threading.Timer(0.01, lambda: box.append(seen()))
        t.start()
    t.join()
    assert box == [(None, "-")]


def test_ctxrelay_timer_carries_the_context_of_start() -> None:
    box: list[tuple[str | None, str]] = []
    t = ctxrelay.Timer(0.01, lambda: box.append(seen()))  # created outside any request
    with in_request():
        t.start()
    t.join()
    assert box == [("alice", "other-value")]


# -- thread pools ----------------------------------------------------------------
def test_plain_thread_pool_submit_and_map_lose_the_context() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool, in_request():
        assert pool.submit(seen).result() == (None, "-")
        assert list(pool.map(lambda _: seen(), range(3))) == [(None, "-")] * 3


def test_ctxrelay_thread_pool_submit_and_map_carry_the_context() -> None:
    with ctxrelay.ThreadPoolExecutor(2) as pool, in_request():
        assert pool.submit(seen).result() == ("alice", "other-value")
        assert list(pool.map(lambda _: seen(), range(3))) == [("alice", "other-value")] * 3


def test_context_executor_wraps_any_executor() -> None:
    with ctxrelay.ContextExecutor(concurrent.futures.ThreadPoolExecutor(2)) as pool:
        with in_request():
            assert pool.submit(seen).result() == ("alice", "other-value")
            assert list(pool.map(lambda _: seen(), range(3))) == [("alice", "other-value")] * 3


# -- run_in_executor ---------------------------------------------------------------
def test_run_in_executor_loses_the_context() -> None:
    async def main() -> tuple[str | None, str]:
        with in_request():
            return await asyncio.get_running_loop().run_in_executor(None, seen)

    assert asyncio.run(main()) == (None, "-")


def test_run_in_executor_carries_the_context_with_a_ctxrelay_pool_or_wrap() -> None:
    async def main() -> list[tuple[str | None, str]]:
        loop = asyncio.get_running_loop()
        with ctxrelay.ThreadPoolExecutor(2) as pool, in_request():
            return [
                await loop.run_in_executor(pool, seen),
                await loop.run_in_executor(None, ctxrelay.wrap(seen)),
            ]

    assert asyncio.run(main()) == [("alice", "other-value")] * 2


def test_run_in_executor_carries_the_context_under_instrument() -> None:
    async def main() -> list[tuple[str | None, str]]:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(2) as pool, in_request():
            return [
                await loop.run_in_executor(None, seen),
                await loop.run_in_executor(pool, seen),
            ]

    ctxrelay.instrument()
    assert asyncio.run(main()) == [("alice", "other-value")] * 2


# -- process pools ---------------------------------------------------------------
def report() -> tuple[str | None, str | None, str | None]:
    snapshot = ctxrelay.request()
    return (
        ctxrelay.get("user"),
        ctxrelay.request_id(),
        snapshot.headers.get("x-gray") if snapshot else None,
    )


SNAPSHOT = ctxrelay.RequestSnapshot(path="/order", headers=[("x-gray", "canary")])


def test_plain_process_pool_loses_the_context_or_keeps_a_stale_one() -> None:
    first = ctxrelay.Context(user="alice", request_id="r-1").with_request(SNAPSHOT)
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        with ctxrelay.use(first):
            first_saw = pool.submit(report).result()
        with ctxrelay.bind(user="bob", request_id="r-2"):
            second_saw = pool.submit(report).result()
    if multiprocessing.get_start_method() == "fork":
        # The worker was forked inside the first request and keeps its
        # context for life: every later task sees alice -- a leak.
        assert first_saw == second_saw == ("alice", "r-1", "canary")
    else:
        assert first_saw == second_saw == (None, None, None)


def test_ctxrelay_process_pool_forks_workers_without_the_submitters_context() -> None:
    with ctxrelay.ProcessPoolExecutor(1) as pool:
        with in_request(), ctxrelay.bind(request_id="r-1"):
            assert pool.submit(report).result() == ("alice", "r-1", None)
            # Fields travel; other variables can't, and none leaked in by fork.
            assert pool.submit(other_value).result() == "-"
        assert pool.submit(report).result() == (None, None, None)


def other_value() -> str:
    return OTHER.get()


def test_ctxrelay_process_pool_carries_fields_and_request_snapshot() -> None:
    ctx = ctxrelay.Context(user="alice", request_id="r-1").with_request(SNAPSHOT)
    with ctxrelay.ProcessPoolExecutor(1) as pool:
        with ctxrelay.use(ctx):
            submitted = pool.submit(report)
            mapped = pool.map(report_n, range(5), chunksize=2)
            assert submitted.result() == ("alice", "r-1", "canary")
            assert list(mapped) == [("alice", "r-1", "canary")] * 5
        # The worker process ran the tasks above; its binding ended with them.
        assert pool.submit(report).result() == (None, None, None)


def test_context_executor_over_a_process_pool_relays_fields() -> None:
    with ctxrelay.ContextExecutor(concurrent.futures.ProcessPoolExecutor(1)) as pool:
        with in_request(), ctxrelay.bind(user="bob", request_id="r-2"):
            assert pool.submit(report).result() == ("bob", "r-2", None)
            assert pool.submit(other_value).result() == "-"  # forked clean
            assert list(pool.map(report_n, range(3), chunksize=2)) == [("bob", "r-2", None)] * 3


def test_run_in_executor_with_a_process_pool_relays_fields_under_instrument() -> None:
    async def main() -> tuple[str | None, str | None, str | None]:
        with concurrent.futures.ProcessPoolExecutor(1) as pool:
            with in_request(), ctxrelay.bind(user="carol", request_id="r-3"):
                loop = asyncio.get_running_loop()
                seen = await loop.run_in_executor(pool, report)
                assert await loop.run_in_executor(pool, other_value) == "-"  # forked clean
                return seen

    ctxrelay.instrument()
    assert asyncio.run(main()) == ("carol", "r-3", None)


def report_n(_: int) -> tuple[str | None, str | None, str | None]:
    return report()


PROCESS_POOLS: dict[str, Callable[[], concurrent.futures.Executor]] = {
    "plain": lambda: concurrent.futures.ProcessPoolExecutor(1),
    "context-executor": lambda: ctxrelay.ContextExecutor(concurrent.futures.ProcessPoolExecutor(1)),
    "ctxrelay": lambda: ctxrelay.ProcessPoolExecutor(1),
}


@pytest.mark.parametrize("kind", PROCESS_POOLS)
def test_run_async_on_a_process_pool_relays_fields_and_forks_workers_clean(kind: str) -> None:
    with PROCESS_POOLS[kind]() as pool:
        do_report = ctxrelay.run_async(executor=pool)(report)
        read_other = ctxrelay.run_async(executor=pool)(other_value)
        with in_request(), ctxrelay.bind(request_id="r-1"):
            assert do_report().result(60) == ("alice", "r-1", None)
            assert read_other().result(60) == "-"  # no worker forked inside the request
        assert do_report().result(60) == (None, None, None)


def test_run_in_executor_with_a_context_executor_over_a_process_pool_under_instrument() -> None:
    async def main() -> tuple[str | None, str | None, str | None]:
        with ctxrelay.ContextExecutor(concurrent.futures.ProcessPoolExecutor(1)) as pool:
            with in_request(), ctxrelay.bind(request_id="r-4"):
                return await asyncio.get_running_loop().run_in_executor(pool, report)

    ctxrelay.instrument()
    assert asyncio.run(main()) == ("alice", "r-4", None)


# Not started until the test below submits to it; it shuts it down.
_DECORATED_POOL = ctxrelay.ProcessPoolExecutor(1)


@ctxrelay.run_async(executor=_DECORATED_POOL)
def report_in_a_worker() -> tuple[str | None, str | None, str | None]:
    return report()


class Reports:
    @ctxrelay.run_async(executor=_DECORATED_POOL)
    def report(self) -> tuple[str | None, str | None, str | None]:
        return report()


def test_run_async_decorating_functions_and_methods_runs_them_in_a_process_pool() -> None:
    # The decorator rebinds the name: the worker must still find the function.
    try:
        with ctxrelay.bind(user="dave", request_id="r-5"):
            assert report_in_a_worker().result(60) == ("dave", "r-5", None)
            assert Reports().report().result(60) == ("dave", "r-5", None)
    finally:
        _DECORATED_POOL.shutdown()


_gate: Any = None


def _keep_gate(gate: Any) -> None:
    global _gate
    _gate = gate


def wait_for_gate() -> bool:
    return bool(_gate.wait(60))


def test_process_pool_done_callbacks_never_see_the_request_that_started_the_pool() -> None:
    # Under instrument(), the pool's manager thread -- which runs the done-
    # callbacks -- is started inside the first request: it must not keep it.
    ctxrelay.instrument()
    gate = multiprocessing.get_context().Event()
    seen_by_callback: list[tuple[str | None, str]] = []
    called = threading.Event()

    def callback(_: concurrent.futures.Future[bool]) -> None:
        seen_by_callback.append(seen())
        called.set()

    with concurrent.futures.ProcessPoolExecutor(
        1, initializer=_keep_gate, initargs=(gate,)
    ) as pool:
        with in_request():
            assert pool.submit(other_value).result(60) is not None  # starts the manager
        held = pool.submit(wait_for_gate)
        held.add_done_callback(callback)  # pending: runs on the manager thread
        gate.set()
        assert called.wait(60)
        assert held.result(60) is True
    assert seen_by_callback == [(None, "-")]
