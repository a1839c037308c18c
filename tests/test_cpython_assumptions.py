"""Every assumption ctxrelay makes about CPython's own code, asserted on the
running interpreter (see ``ctxrelay._cpython``); and the relay's tests run
again with the fast paths off, so the fallbacks stay right."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.pool
import multiprocessing.process
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import ctxrelay
from ctxrelay import _cpython, _relay

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 reworked the executor")
def test_thread_pool_submit_has_the_body_the_twin_copies() -> None:
    assert _cpython.submit_has_known_shape()
    if _cpython.FAST_PATH:
        assert _relay.relaying_submit is not None


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 reworked the executor")
def test_the_work_item_run_has_the_body_the_guarded_item_copies() -> None:
    # The guarded work item (a task with a deadline) is a copy of
    # _WorkItem.run with the deadline check inlined; it is used only where
    # the standard body reads exactly these names, in this order.
    run = concurrent.futures.thread._WorkItem.run
    assert run.__code__.co_names == _cpython._RUN_NAMES


def test_a_task_whose_deadline_passed_is_refused_by_the_guarded_item() -> None:
    with ctxrelay.ThreadPoolExecutor(1) as pool, ctxrelay.deadline(0.05):
        gate = threading.Event()
        first = pool.submit(gate.wait, 5)  # holds the only worker past the deadline
        late = pool.submit(lambda: "ran")
        threading.Event().wait(0.1)
        gate.set()
        assert first.result(timeout=5) is True
        with pytest.raises(ctxrelay.DeadlineExceeded):
            late.result(timeout=5)


def test_the_twin_refuses_work_exactly_as_the_standard_submit() -> None:
    twin = _relay.new_relaying_submit()
    if twin is None:
        pytest.skip("no fast path on this interpreter (or it is switched off)")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        twin(pool, print)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        _cpython.STDLIB_SUBMIT(pool, print)


def test_a_future_keeps_its_done_callbacks_in_a_plain_list_it_iterates() -> None:
    future: Future[int] = Future()
    assert type(future._done_callbacks) is list  # type: ignore[attr-defined]
    seen: list[str] = []

    class Spy(list[Any]):
        def append(self, fn: Any) -> None:
            seen.append("append")
            list.append(self, fn)

        def __iter__(self) -> Any:
            seen.append("iterate")
            return list.__iter__(self)

    assert _cpython.swap_done_callbacks(future, Spy) is _cpython.FAST_PATH
    if not _cpython.FAST_PATH:
        return
    future.add_done_callback(lambda f: seen.append("called"))
    future.set_result(1)
    assert seen == ["append", "iterate", "called"]


def test_the_python_314_flags_match_this_interpreter() -> None:
    assert _cpython.THREAD_TAKES_CONTEXT is (sys.version_info >= (3, 14))
    free_threaded = not getattr(sys, "_is_gil_enabled", lambda: True)()
    if not free_threaded:
        assert _cpython.THREADS_INHERIT_CONTEXT is False


def test_what_instrument_patches_exists_under_those_names() -> None:
    for owner, name in [
        (threading.Thread, "start"),
        (concurrent.futures.ThreadPoolExecutor, "submit"),
        (concurrent.futures.ProcessPoolExecutor, "submit"),
        (asyncio.BaseEventLoop, "run_in_executor"),
        (multiprocessing.process.BaseProcess, "start"),
        (multiprocessing.pool.Pool, "__init__"),
        *[
            (multiprocessing.pool.Pool, name)
            for name in ("apply_async", "map", "map_async", "starmap", "starmap_async")
        ],
        (multiprocessing.pool.Pool, "imap"),
        (multiprocessing.pool.Pool, "imap_unordered"),
    ]:
        assert callable(owner.__dict__.get(name)), f"{owner.__qualname__}.{name}"


def test_executor_map_goes_through_submit() -> None:
    # ContextExecutor and instrument() rely on Executor.map calling
    # self.submit once per item (ProcessPoolExecutor.map: once per chunk).
    calls: list[int] = []

    class Counting(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return super().submit(fn, *args, **kwargs)

    with Counting(2) as pool:
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
    assert len(calls) == 3


@pytest.mark.skipif(
    os.environ.get("CTXRELAY_NO_FAST_PATH") == "1", reason="already the fallback run"
)
def test_the_relay_tests_pass_with_the_fast_paths_off() -> None:
    env = {**os.environ, "CTXRELAY_NO_FAST_PATH": "1"}
    modules = [
        "tests/test_relay.py",
        "tests/test_boundaries.py",
        "tests/test_instrument.py",
        "tests/test_stress.py",
        "tests/test_cpython_assumptions.py",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_with_the_fast_paths_off_the_pools_still_relay() -> None:
    code = (
        "import ctxrelay, ctxrelay._relay as r, concurrent.futures as cf\n"
        "assert r.relaying_submit is None\n"
        "ctxrelay.instrument()\n"
        "with ctxrelay.bind(user='alice'):\n"
        "    with ctxrelay.ThreadPoolExecutor(2) as p:\n"
        "        assert p.submit(ctxrelay.get, 'user').result() == 'alice'\n"
        "    with cf.ThreadPoolExecutor(2) as p:\n"
        "        f = p.submit(ctxrelay.get, 'user')\n"
        "        assert f.result() == 'alice'\n"
    )
    env = {**os.environ, "CTXRELAY_NO_FAST_PATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert ctxrelay.current() == {}
