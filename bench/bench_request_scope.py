"""The request scope: what it costs the door, and the reads and binds in a request.

Each web request gets a scope that its own work can add fields to from any
thread (``ctxrelay.bind_request``, or a ``bind()`` held by a sync FastAPI
dependency).  Measured side by side in one process, interleaved:

* the ASGI door over a bare Starlette app, with the request scope and with
  the door's context made without one (the code before it existed);
* ``current()``, ``get()`` and ``with bind()`` outside a request, inside one,
  and inside one after a field was added to its scope;
* ``bind_request()`` itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import sys
import timeit
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.middleware import Middleware

import ctxrelay
from bench_middleware import batch_ns, make_app, scope_for
from ctxrelay import _context, _inbound
from ctxrelay.integrations.asgi import RelayMiddleware
from harness import markdown_table, rotations


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int
    batch: int
    number: int


FULL = Settings(reps=31, batch=1000, number=20000)
QUICK = Settings(reps=3, batch=100, number=2000)


def door_rows(settings: Settings) -> list[list[str]]:
    """The door's CPU time per request with and without the request scope."""
    # The door's own name for it, swapped below for the variant without.
    names = vars(_inbound)
    with_scope = names["make_request_context"]

    async def measure() -> list[list[str]]:
        apps = {"bare": make_app([]), "door": make_app([Middleware(RelayMiddleware)])}
        scope = scope_for(str(uuid.uuid4()))
        variants = ["bare", "door, no scope", "door, request scope"]

        async def one(variant: str, count: int) -> float:
            if variant == "bare":
                return await batch_ns(apps["bare"], scope, count)
            scoped = variant == "door, request scope"
            names["make_request_context"] = with_scope if scoped else _context.make_context
            try:
                return await batch_ns(apps["door"], scope, count)
            finally:
                names["make_request_context"] = with_scope

        for variant in variants:
            await one(variant, max(50, settings.batch // 10))
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for order in rotations(variants, settings.reps):
            gc.collect()
            for variant in order:
                samples[variant].append(await one(variant, settings.batch))
        bare = statistics.median(samples["bare"])
        without = statistics.median(
            [a - b for a, b in zip(samples["door, no scope"], samples["bare"], strict=True)]
        )
        rows = []
        for variant in variants[1:]:
            over = statistics.median(
                [a - b for a, b in zip(samples[variant], samples["bare"], strict=True)]
            )
            rows.append(
                [
                    variant,
                    f"{statistics.median(samples[variant]) / 1000:.2f}",
                    f"{over / 1000:+.2f}",
                    "-" if variant == "door, no scope" else f"{(over - without) / 1000:+.2f}",
                ]
            )
        rows.insert(0, ["bare Starlette", f"{bare / 1000:.2f}", "-", "-"])
        return rows

    return asyncio.run(measure())


def _in_request(run: Callable[[], Any]) -> Any:
    """Call ``run`` inside a real door's request (a WSGI call in process)."""
    from ctxrelay.integrations.wsgi import RelayMiddleware as WsgiDoor

    result: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        result.append(run())
        start_response("200 OK", [])
        return [b""]

    start: Any = lambda *args: None  # noqa: E731
    list(WsgiDoor(app)({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, start))
    return result[0]


def op_rows(settings: Settings) -> list[list[str]]:
    """ns per operation, outside a request and inside one (with and without
    a field added to its scope), each interleaved with the others."""

    def bind_block() -> None:
        with ctxrelay.bind(user="u"):
            pass

    ops: dict[str, Callable[[], Any]] = {
        "current()": ctxrelay.current,
        "get('user')": lambda: ctxrelay.get("user"),
        "with bind(user=...)": bind_block,
    }
    places = ["outside a request", "in a request", "in a request, after bind_request()"]

    def timed(place: str, op: Callable[[], Any]) -> float:
        def run() -> float:
            if place.endswith("bind_request()"):
                ctxrelay.bind_request(tenant="acme")
            return min(timeit.repeat(op, number=settings.number, repeat=3)) / settings.number

        if place == "outside a request":
            with ctxrelay.bind(request_id="r-1"):
                return run()
        return float(_in_request(run))

    samples: dict[tuple[str, str], list[float]] = {(p, o): [] for p in places for o in ops}
    cells = list(samples)
    for order in rotations(cells, max(3, settings.reps // 3)):
        for place, name in order:
            samples[(place, name)].append(timed(place, ops[name]) * 1e9)
    rows = []
    for name in ops:
        rows.append([name, *(f"{statistics.median(samples[(p, name)]):.0f}" for p in places)])

    def write() -> float:
        fields = [{"user": f"u{i}"} for i in range(200)]

        def run() -> float:
            start = timeit.default_timer()
            for one in fields:
                ctxrelay.bind_request(one)
            return (timeit.default_timer() - start) / len(fields)

        return float(_in_request(run))

    writes = [write() * 1e9 for _ in range(max(3, settings.reps // 3))]
    rows.append(["bind_request(user=...)", "-", f"{statistics.median(writes):.0f}", "-"])
    return [["operation (ns)", *places], *rows]


def run(settings: Settings) -> None:
    print("## The request scope\n")
    print(
        "The ASGI door over a bare Starlette app, valid inbound id; in-process calls, "
        f"CPU time, {settings.reps} interleaved repetitions of {settings.batch} requests; "
        "medians.  'no scope' is the door with its context made as before the request "
        "scope existed.\n"
    )
    header = ["variant", "µs/request", "over bare µs", "the scope's cost µs"]
    print(markdown_table(header, door_rows(settings)))
    print()
    print("Reads and binds: the best of 3 timings of each, medians over interleaved rounds.\n")
    rows = op_rows(settings)
    print(markdown_table(rows[0], rows[1:]))
    print()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python bench/bench_request_scope.py [--quick] [--reps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="repetitions per variant")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
