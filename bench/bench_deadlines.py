"""What a deadline costs: per pooled task, and at the ASGI door.

* **Pooled no-op task**: ``ctxrelay.ThreadPoolExecutor(1)``, a batch of
  no-op tasks submitted, then all waited for (pipelined), under a bound
  request id, with and without ``ctxrelay.deadline(3600)`` around the
  submits.  With a deadline every task is checked before it starts (not
  started once it passed).  Target: the deadline adds <= 2 %.  The wall
  time crosses threads and is noisy on a shared machine, so the same tasks
  are also measured on one thread: submitted to a pool whose queue this
  thread empties itself, running each work item inline (CPU time of the
  thread: the relay's own cost, submit and run, without the hand-off).
* **The ASGI door**: ``RelayMiddleware`` around a raw ASGI app answering
  ``ok`` in one message, called in process (no server, no socket), with and
  without ``timeout=30``.  With ``timeout=`` the door arms a timer for the
  request, watches for the client's disconnect and answers 504 when the
  timer fires.  Each batch ends by yielding to the event loop once, inside
  the timing, so the loop's own work for the timers (a cancelled timer
  handle left in its heap, the watcher's callback) is counted too.
  Target: <= 0.5 us more per request.

Times: the pool's wall time per task (the work crosses threads), the door's
CPU time of the benchmarking thread (``time.thread_time_ns``).  Variants are
interleaved, the order rotated each repetition; reported are medians over
repetitions, and the overhead is the median of the per-repetition
differences.

Run: ``python bench/bench_deadlines.py`` (about ten seconds) or ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import queue
import statistics
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from time import perf_counter_ns, thread_time_ns
from typing import Any

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from harness import markdown_table, rotations


@dataclass(frozen=True)
class Settings:
    reps: int
    tasks: int
    requests: int


FULL = Settings(reps=31, tasks=5000, requests=2000)
QUICK = Settings(reps=3, tasks=200, requests=100)


def noop() -> None:
    return None


def pool_batch(pool: ctxrelay.ThreadPoolExecutor, count: int, bound: bool) -> float:
    """Wall ns per task for ``count`` pipelined no-op tasks."""
    with ctxrelay.bind(request_id="bench"):
        start = perf_counter_ns()
        if bound:
            with ctxrelay.deadline(3600):
                futures = [pool.submit(noop) for _ in range(count)]
        else:
            futures = [pool.submit(noop) for _ in range(count)]
        for future in futures:
            future.result()
        return (perf_counter_ns() - start) / count


def inline_batch(pool: ctxrelay.ThreadPoolExecutor, count: int, bound: bool) -> float:
    """CPU ns per task for ``count`` no-op tasks submitted and run on this
    thread (the pool's queue emptied here, each work item run inline)."""
    work: queue.SimpleQueue[Any] = pool._work_queue
    with ctxrelay.bind(request_id="bench"):
        start = thread_time_ns()
        if bound:
            with ctxrelay.deadline(3600):
                futures = [pool.submit(noop) for _ in range(count)]
        else:
            futures = [pool.submit(noop) for _ in range(count)]
        while not work.empty():
            work.get().run()
        for future in futures:
            future.result()
        return (thread_time_ns() - start) / count


def measure_inline(settings: Settings) -> list[list[str]]:
    variants = {"no deadline": False, "`ctxrelay.deadline(3600)`": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    pool = ctxrelay.ThreadPoolExecutor(1)
    pool._adjust_thread_count = lambda: None  # type: ignore[method-assign]  # no worker
    pool._work_queue = queue.SimpleQueue()
    for bound in variants.values():
        inline_batch(pool, settings.tasks, bound)  # warm up
    for order in rotations(list(variants), settings.reps):
        gc.collect()
        for name in order:
            times[name].append(inline_batch(pool, settings.tasks, variants[name]))
    base = times["no deadline"]
    rows = []
    for name, ns in times.items():
        diffs = [(v - b) / b * 100 for v, b in zip(ns, base, strict=True)]
        rows.append([name, f"{statistics.median(ns):,.0f}", f"{statistics.median(diffs):+.1f} %"])
    return rows


def measure_pool(settings: Settings) -> list[list[str]]:
    variants = {"no deadline": False, "`ctxrelay.deadline(3600)`": True}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with ctxrelay.ThreadPoolExecutor(1) as pool:
        for bound in variants.values():
            pool_batch(pool, settings.tasks, bound)  # warm up
        for order in rotations(list(variants), settings.reps):
            gc.collect()
            for name in order:
                times[name].append(pool_batch(pool, settings.tasks, variants[name]))
    base = times["no deadline"]
    rows = []
    for name, ns in times.items():
        diffs = [(v - b) / b * 100 for v, b in zip(ns, base, strict=True)]
        rows.append([name, f"{statistics.median(ns):,.0f}", f"{statistics.median(diffs):+.1f} %"])
    return rows


# -- the door -----------------------------------------------------------------------------
Scope = MutableMapping[str, Any]

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok"}


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"api.example.com"), (b"x-request-id", b"req-bench-1")],
    "client": ("10.0.0.9", 50000),
    "server": ("10.0.0.1", 8000),
}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: MutableMapping[str, Any]) -> None:
    return None


async def door_batch(app: Callable[..., Any], count: int) -> float:
    start = thread_time_ns()
    for _ in range(count):
        await app({**SCOPE, "headers": list(SCOPE["headers"])}, receive, send)
    await asyncio.sleep(0)  # the loop's housekeeping, as a server's loop does it
    return (thread_time_ns() - start) / count


async def measure_door(settings: Settings) -> list[list[str]]:
    apps = {
        "`RelayMiddleware(app)`": RelayMiddleware(ok_app),
        "`RelayMiddleware(app, timeout=30)`": RelayMiddleware(ok_app, timeout=30),
    }
    for app in apps.values():
        await door_batch(app, settings.requests)  # warm up
    times: dict[str, list[float]] = {name: [] for name in apps}
    for order in rotations(list(apps), settings.reps):
        gc.collect()
        for name in order:
            times[name].append(await door_batch(apps[name], settings.requests))
    base = times["`RelayMiddleware(app)`"]
    rows = []
    for name, ns in times.items():
        diffs = [v - b for v, b in zip(ns, base, strict=True)]
        rows.append(
            [name, f"{statistics.median(ns):,.0f}", f"{statistics.median(diffs) / 1000:+.2f} us"]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    settings = QUICK if parser.parse_args(argv).quick else FULL
    print("## bench_deadlines\n")
    print(f"### Pooled no-op task ({settings.tasks} pipelined tasks x {settings.reps} reps)\n")
    header = ["variant", "median ns per task", "vs no deadline"]
    print(markdown_table(header, measure_pool(settings)))
    print("\n### The same tasks submitted and run on one thread (CPU time)\n")
    header = ["variant", "median CPU ns per task", "vs no deadline"]
    print(markdown_table(header, measure_inline(settings)))
    print("\nTarget: the deadline adds <= 2 %.\n")
    print(f"### The ASGI door ({settings.requests} requests x {settings.reps} reps)\n")
    header = ["door", "median CPU ns per request", "vs no timeout"]
    print(markdown_table(header, asyncio.run(measure_door(settings))))
    print("\nTarget: `timeout=` adds <= 0.5 us.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
