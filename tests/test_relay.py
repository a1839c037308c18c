"""capture -> replay -> restore: wrap, executors, threads, done-callbacks, run_async."""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import gc
import inspect
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import ctxrelay
from tests.conftest import Relay

if TYPE_CHECKING:  # typing.assert_type is 3.11+; the oldest supported Python is 3.10
    from typing_extensions import assert_type

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_relay_var", default="unset")


def user() -> str | None:
    return ctxrelay.get("user")


# -- wrap -------------------------------------------------------------------------
def test_wrap_captures_at_wrap_time_not_call_time() -> None:
    with ctxrelay.bind(user="alice"):
        wrapped = ctxrelay.wrap(user)
    with ctxrelay.bind(user="mallory"):
        assert wrapped() == "alice"
    assert wrapped() == "alice"


def test_wrap_restores_the_callers_context_after_return_and_raise() -> None:
    def fails() -> None:
        VAR.set("inside")
        raise KeyError("boom")

    with ctxrelay.bind(user="alice"):
        wrapped = ctxrelay.wrap(fails)
    with ctxrelay.bind(user="caller"):
        token = VAR.set("caller-var")
        with pytest.raises(KeyError):
            wrapped()
        assert (ctxrelay.get("user"), VAR.get()) == ("caller", "caller-var")
        VAR.reset(token)


def test_wrap_is_idempotent_and_keeps_metadata() -> None:
    def documented(a: int, b: str = "x") -> str:
        """Doc."""
        return f"{a}{b}"

    with ctxrelay.bind(user="first"):
        once = ctxrelay.wrap(documented)
    with ctxrelay.bind(user="second"):
        twice = ctxrelay.wrap(once)
    assert twice is once
    assert once.__wrapped__ is documented  # type: ignore[attr-defined]
    assert once.__name__ == "documented"
    assert once.__doc__ == "Doc."
    assert inspect.signature(once) == inspect.signature(documented)
    assert once(1, b="y") == "1y"


def test_wrap_captures_anew_for_a_decorator_around_a_wrapped_callable() -> None:
    # functools.wraps copies the wrapped function's __dict__ onto the
    # decorator: the decorator is not relayed itself, so wrap() must capture.
    with ctxrelay.bind(user="first"):
        inner = ctxrelay.wrap(user)

    @functools.wraps(inner)
    def logged() -> tuple[str | None, str | None]:
        return user(), inner()

    with ctxrelay.bind(user="second"):
        outer = ctxrelay.wrap(logged)
    assert outer is not logged
    assert outer() == ("second", "first")


def test_one_wrapper_runs_in_many_threads_at_once_each_in_its_own_copy() -> None:
    # flask #5252/#5396: a wrapper that enters one captured Context fails
    # when two pool threads run it at the same time.
    barrier = threading.Barrier(8)

    def task(n: int) -> tuple[str | None, str]:
        before = VAR.get()
        VAR.set(f"call-{n}")
        barrier.wait(timeout=10)
        return ctxrelay.get("user"), before

    with ctxrelay.bind(user="alice"):
        wrapped = ctxrelay.wrap(task)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(wrapped, range(8)))
    # Every call saw the capture, and no call saw another call's change.
    assert results == [("alice", "unset")] * 8


# -- executors: capture at submit, not at thread creation --------------------------
def test_pool_threads_created_in_one_request_serve_the_next_with_its_own(relay: Relay) -> None:
    with relay.pool(2) as pool:
        with ctxrelay.bind(user="creator"):
            # These submissions create the worker threads inside "creator".
            assert [f.result() for f in [pool.submit(user), pool.submit(user)]] == ["creator"] * 2
        with ctxrelay.bind(user="next"):
            assert pool.submit(user).result() == "next"
        # Outside any request, a pooled thread shows nothing stale (seed 001).
        assert pool.submit(user).result() is None


def test_thread_captures_at_start_not_at_creation(relay: Relay) -> None:
    box: list[str | None] = []
    with ctxrelay.bind(user="creator"):
        t = relay.thread(target=lambda: box.append(user()))
    with ctxrelay.bind(user="starter"):
        t.start()
    t.join()
    assert box == ["starter"]


def test_thread_subclass_overriding_run_is_relayed(relay: Relay) -> None:
    base = ctxrelay.Thread if relay.mode == "explicit" else threading.Thread

    class Worker(base):  # type: ignore[valid-type,misc]
        seen: str | None = "not run"

        def run(self) -> None:
            self.seen = user()

    worker = Worker()
    with ctxrelay.bind(user="alice"):
        worker.start()
    worker.join()
    assert worker.seen == "alice"
    assert "run" not in worker.__dict__  # the per-start stand-in is gone


def test_starting_a_thread_twice_raises_and_leaves_nothing_behind(relay: Relay) -> None:
    t = relay.thread(target=lambda: None)
    t.start()
    t.join()
    with pytest.raises(RuntimeError):
        t.start()
    assert "run" not in t.__dict__


class _HeldStart(threading.Event):
    """A thread's ``_started`` event that holds the new thread, once it has
    told start() it is running, until the test lets it go on to run()."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def set(self) -> None:
        super().set()
        self.go.wait(10)


def test_a_failed_second_start_leaves_the_first_starts_relay_in_place(relay: Relay) -> None:
    seen: list[str | None] = []
    t = relay.thread(target=lambda: seen.append(user()))
    held = _HeldStart()
    t._started = held  # type: ignore[attr-defined]  # CPython's start() handshake
    with ctxrelay.bind(user="alice"):
        t.start()  # returns once the thread runs, before it calls run()
        with pytest.raises(RuntimeError, match="once"):
            t.start()
    held.go.set()
    t.join()
    assert seen == ["alice"]


def test_timer_runs_in_the_context_of_start(relay: Relay) -> None:
    box: list[str | None] = []
    with ctxrelay.bind(user="alice"):
        timer = relay.timer(0.01, lambda: box.append(user()))
        timer.start()
    timer.join()
    assert box == ["alice"]


# -- caller-runs and cancellation ---------------------------------------------------
class CallerRunsExecutor(concurrent.futures.Executor):
    """Runs each task in submit(), on the submitting thread (Java's CallerRunsPolicy)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def test_caller_runs_leaves_the_submitting_thread_exactly_as_it_was() -> None:
    def task() -> str | None:
        VAR.set("set-by-task")
        with ctxrelay.bind(user="changed-by-task"):
            pass
        return user()

    pool = ctxrelay.ContextExecutor(CallerRunsExecutor())
    with ctxrelay.bind(user="caller"):
        token = VAR.set("caller-var")
        assert pool.submit(task).result() == "caller"
        assert (user(), VAR.get()) == ("caller", "caller-var")
        VAR.reset(token)


def test_cancelled_tasks_never_run_and_callbacks_keep_their_context(relay: Relay) -> None:
    gate = threading.Event()
    seen: list[tuple[str, str | None]] = []
    with relay.pool(1) as pool:
        blocker = pool.submit(gate.wait, 10)
        with ctxrelay.bind(user="queued"):
            queued = pool.submit(user)
            queued.add_done_callback(lambda f: seen.append(("callback", user())))
        assert queued.cancel()
        gate.set()
        blocker.result()
        assert pool.submit(user).result() is None
    assert queued.cancelled()
    assert seen == [("callback", "queued")]


# -- done-callbacks -------------------------------------------------------------------
def test_done_callbacks_run_in_the_context_current_when_added(relay: Relay) -> None:
    gate = threading.Event()
    seen: list[str | None] = []
    done = threading.Event()
    with relay.pool(1) as pool:
        with ctxrelay.bind(user="submitter"):
            future = pool.submit(gate.wait, 10)

        def watch(_: object) -> None:
            seen.append(user())
            done.set()

        with ctxrelay.bind(user="watcher"):
            future.add_done_callback(watch)
        gate.set()  # the callback runs on the worker thread, in "watcher"
        assert done.wait(10)
        with ctxrelay.bind(user="late"):
            future.add_done_callback(lambda f: seen.append(user()))  # already done: runs now
    assert seen == ["watcher", "late"]


# -- run_async ------------------------------------------------------------------------
def test_run_async_bare_returns_a_future_running_in_the_callers_context() -> None:
    @ctxrelay.run_async
    def lookup(prefix: str) -> str:
        return f"{prefix}:{user()}:{threading.current_thread().name}"

    with ctxrelay.bind(user="alice"):
        future = lookup("addr")
    assert isinstance(future, concurrent.futures.Future)
    prefix, who, thread = future.result(10).split(":")
    assert (prefix, who) == ("addr", "alice")
    assert thread.startswith("ctxrelay-async")


def test_run_async_with_a_named_executor_and_on_methods() -> None:
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="named") as pool:

        class Service:
            @ctxrelay.run_async(executor=pool)
            def lookup(self, n: int) -> tuple[str | None, int, str]:
                return user(), n, threading.current_thread().name

        with ctxrelay.bind(user="bob"):
            who, n, thread = Service().lookup(7).result(10)
    assert (who, n) == ("bob", 7)
    assert thread.startswith("named")


def test_run_async_exception_nobody_retrieves_is_logged_with_the_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @ctxrelay.run_async
    def fails() -> None:
        raise ValueError("lost in the pool")

    caplog.set_level(logging.ERROR, logger="ctxrelay")
    with ctxrelay.bind(user="alice", request_id="req-42"):
        future = fails()
    concurrent.futures.wait([future], timeout=10)
    del future
    gc.collect()
    records = [r for r in caplog.records if r.name == "ctxrelay"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "fails" in message
    assert "ValueError" in message
    assert "req-42" in message
    assert records[0].exc_info is not None


def test_run_async_exception_that_is_retrieved_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @ctxrelay.run_async
    def fails() -> None:
        raise ValueError("handled")

    caplog.set_level(logging.ERROR, logger="ctxrelay")
    future = fails()
    assert isinstance(future.exception(10), ValueError)
    del future
    gc.collect()
    assert [r for r in caplog.records if r.name == "ctxrelay"] == []


class OtherFuture(concurrent.futures.Future[Any]):
    pass


class ForeignExecutor(concurrent.futures.Executor):
    """An executor whose futures are its own Future subclass."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future = OtherFuture()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._pool.submit(run)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait)


def test_run_async_on_an_executor_with_its_own_future_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    executor = ForeignExecutor()

    @ctxrelay.run_async(executor=executor)
    def work(fail: bool) -> str | None:
        if fail:
            raise RuntimeError("foreign")
        return user()

    caplog.set_level(logging.ERROR, logger="ctxrelay")
    with ctxrelay.bind(user="alice", request_id="req-7"):
        assert work(False).result(10) == "alice"
        lost = work(True)
    concurrent.futures.wait([lost], timeout=10)
    del lost
    gc.collect()
    executor.shutdown()
    assert any("req-7" in r.getMessage() for r in caplog.records if r.name == "ctxrelay")


def test_run_async_rejects_a_non_executor() -> None:
    with pytest.raises(TypeError, match="Executor"):
        ctxrelay.run_async(executor="pool")  # type: ignore[call-overload]


def test_context_executor_rejects_a_non_executor() -> None:
    with pytest.raises(TypeError, match="Executor"):
        ctxrelay.ContextExecutor(object())  # type: ignore[arg-type]


# -- typing: the drop-ins keep the standard signatures ------------------------------
def add(a: int, b: int) -> int:
    return a + b


def test_drop_in_pool_submit_keeps_the_standard_typing() -> None:
    # Checked by mypy --strict on this file: submit() is typed like the
    # standard one (Future[T], arguments checked against fn), not Future[Any].
    with ctxrelay.ThreadPoolExecutor(1) as pool:
        future = pool.submit(add, 1, 2)
        if TYPE_CHECKING:
            assert_type(future, concurrent.futures.Future[int])
            pool.submit(add, 1, "2")  # type: ignore[arg-type]
        assert future.result(10) == 3


# -- the relaying submit behaves like the standard one ----------------------------------
def test_submit_after_shutdown_raises_like_the_standard_pool(relay: Relay) -> None:
    pool = relay.pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(user)


def test_a_broken_pool_raises_broken_thread_pool_like_the_standard_one(relay: Relay) -> None:
    def fail() -> None:
        raise OSError("initializer failed")

    pool = relay.pool(1, initializer=fail)
    first = pool.submit(user)
    with pytest.raises(concurrent.futures.thread.BrokenThreadPool):
        first.result(10)
    with pytest.raises(concurrent.futures.thread.BrokenThreadPool):
        pool.submit(user)
    pool.shutdown()
