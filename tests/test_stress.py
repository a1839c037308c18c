"""Isolation under load: many submitters, thousands of distinct contexts.

Every task must see exactly its own request's fields, whatever the pool size,
nesting, caller-runs execution, failure or cancellation -- and afterwards every
worker thread must hold exactly the context it had before.  The suite runs
twice: explicit ctxrelay wrappers, and unchanged code under instrument().
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import Any

import pytest

import ctxrelay
from tests.conftest import Relay
from tests.test_relay import CallerRunsExecutor

SUBMITTERS = 8
TASKS_PER_SUBMITTER = 400
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("stress_var", default="unset")


class Boom(Exception):
    pass


def raw_submit(relay: Relay) -> Callable[..., concurrent.futures.Future[Any]]:
    """The executor's submit without any relay: shows a worker's own context."""
    submit = concurrent.futures.ThreadPoolExecutor.submit
    return getattr(submit, "__wrapped__", submit)


def worker_state() -> tuple[ctxrelay.Context, str, int]:
    return ctxrelay.current(), VAR.get(), threading.get_ident()


def check_task(expected: str, n: int) -> tuple[str, str | None, str]:
    """What a task sees; it also dirties its context, which must not leak."""
    seen = (expected, ctxrelay.request_id(), VAR.get())
    VAR.set(f"dirty-{expected}")
    if n % 7 == 0:
        raise Boom(expected)
    return seen


@pytest.mark.parametrize("workers", [1, 8])
def test_every_task_sees_its_own_context_and_workers_end_clean(relay: Relay, workers: int) -> None:
    results: list[tuple[str, str | None, str]] = []
    failures: list[str] = []
    cancelled = 0
    lock = threading.Lock()

    with relay.pool(workers) as pool, relay.pool(2) as inner_pool:
        caller_runs = ctxrelay.ContextExecutor(CallerRunsExecutor())

        def nested(expected: str) -> tuple[str, str | None, str]:
            # A task that fans out again to another pool and waits (nested pools).
            inner = inner_pool.submit(check_task, expected, 1)
            return inner.result()

        def submitter(s: int) -> None:
            nonlocal cancelled
            local_results = []
            local_failures = []
            futures = []
            for n in range(TASKS_PER_SUBMITTER):
                rid = f"req-{s}-{n}"
                token = VAR.set(f"var-{rid}")
                with ctxrelay.bind(request_id=rid):
                    if n % 50 == 0:
                        f = caller_runs.submit(check_task, rid, n)
                    elif n % 13 == 0:
                        f = pool.submit(nested, rid)
                    else:
                        f = pool.submit(check_task, rid, n)
                    if n % 17 == 0 and f.cancel():
                        local_failures.append(f"cancelled:{rid}")
                    futures.append((rid, f))
                VAR.reset(token)
                # The submitting thread is back to exactly what it had.
                assert ctxrelay.current() == ctxrelay.Context()
                assert VAR.get() == "unset"
            for rid, f in futures:
                if f.cancelled():
                    continue
                try:
                    local_results.append(f.result(timeout=60))
                except Boom as exc:
                    # The failure is the task's own: raised with its own id.
                    local_failures.append(f"boom:{exc.args[0] == rid}")
            with lock:
                results.extend(local_results)
                failures.extend(local_failures)

        threads = [threading.Thread(target=submitter, args=(s,)) for s in range(SUBMITTERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        cancelled = sum(1 for f in failures if f.startswith("cancelled"))
        # Every task that ran saw exactly its own request id and variable.
        for expected, seen_id, seen_var in results:
            assert seen_id == expected
            assert seen_var == f"var-{expected}"
        booms = sum(1 for f in failures if f.startswith("boom"))
        assert "boom:False" not in failures
        assert len(results) + booms + cancelled == SUBMITTERS * TASKS_PER_SUBMITTER
        assert booms > 0
        assert len({r[0] for r in results}) == len(results)

        # Afterwards every worker thread holds exactly what it held before: nothing.
        submit = raw_submit(relay)
        barrier = threading.Barrier(workers)

        def probe() -> tuple[ctxrelay.Context, str, int]:
            barrier.wait(timeout=10)  # occupy every worker once
            return worker_state()

        states = [submit(pool, probe) for _ in range(workers)]
        seen_threads = set()
        for f in states:
            ctx, var, ident = f.result(timeout=10)
            assert ctx == ctxrelay.Context()
            assert var == "unset"
            seen_threads.add(ident)
        assert len(seen_threads) == workers
