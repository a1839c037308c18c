"""What strict mode costs: off, on at a staging sample rate (0.01), and on
capturing every place (1.0), side by side, interleaved, in one process.

Three paths every request takes: ``with ctxrelay.bind(user="u"): pass``, a
pooled no-op task through ``ctxrelay.ThreadPoolExecutor`` (submit 200, then
wait), and a request through the ASGI door over a bare Starlette app.

Run: ``python bench/bench_strict.py`` (about half a minute) or ``--quick``.
Targets (issue "Find where context is lost"): off within noise of today;
on at 0.01 at most 1.10x off; on at 1.0 measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from harness import markdown_table, rotations

MODES: dict[str, tuple[bool, float]] = {
    "off": (False, 1.0),
    "on, sample 0.01": (True, 0.01),
    "on, sample 1.0": (True, 1.0),
}


def _set(mode: str) -> None:
    on, rate = MODES[mode]
    ctxrelay.strict(on, sample=rate)


def bind_ns(count: int) -> float:
    bind = ctxrelay.bind
    start = time.perf_counter_ns()
    for _ in range(count):
        with bind(user="u"):
            pass
    return (time.perf_counter_ns() - start) / count


def pool_ns(pool: ctxrelay.ThreadPoolExecutor, count: int) -> float:
    def noop() -> None:
        pass

    with ctxrelay.bind(request_id="r-1", user="u"):
        start = time.perf_counter_ns()
        futures = [pool.submit(noop) for _ in range(count)]
        for future in futures:
            future.result()
        return (time.perf_counter_ns() - start) / count


async def _endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


APP = RelayMiddleware(Starlette(routes=[Route("/", _endpoint)]))
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"x"), (b"x-request-id", b"req-1")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    pass


def door_ns(loop: asyncio.AbstractEventLoop, count: int) -> float:
    async def batch() -> float:
        start = time.perf_counter_ns()
        for _ in range(count):
            await APP(dict(SCOPE), _receive, _send)
        return (time.perf_counter_ns() - start) / count

    return loop.run_until_complete(batch())


def measure(reps: int, counts: dict[str, int]) -> dict[tuple[str, str], list[float]]:
    loop = asyncio.new_event_loop()
    pool = ctxrelay.ThreadPoolExecutor(4)
    paths: dict[str, Callable[[], float]] = {
        "`with bind(user=...)`": lambda: bind_ns(counts["bind"]),
        "pooled no-op task": lambda: pool_ns(pool, counts["pool"]),
        "ASGI door request": lambda: door_ns(loop, counts["door"]),
    }
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for path, run in paths.items():
            run()  # warm up
            for order in rotations(list(MODES), reps):
                for mode in order:
                    _set(mode)
                    samples.setdefault((path, mode), []).append(run())
    finally:
        ctxrelay.strict(False, sample=1.0)
        pool.shutdown()
        loop.close()
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    reps = 3 if args.quick else 21
    counts = (
        {"bind": 2000, "pool": 200, "door": 200}
        if args.quick
        else {"bind": 20000, "pool": 200, "door": 2000}
    )
    samples = measure(reps, counts)
    rows = []
    for path in dict.fromkeys(p for p, _ in samples):
        off = statistics.median(samples[(path, "off")])
        for mode in MODES:
            value = statistics.median(samples[(path, mode)])
            rows.append([path, mode, f"{value:,.0f}", f"{value / off:.3f}"])
    print(f"Strict mode's cost: medians of {reps} interleaved repetitions (ns per operation).\n")
    print(markdown_table(["path", "strict mode", "ns/op", "x off"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
