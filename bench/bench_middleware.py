"""What the request-id middleware costs per request, over the bare app.

One minimal Starlette app (one async route answering ``"ok"``), called in
process through ASGI -- no server, no socket, so the middleware's cost is not
lost in network noise -- with four stacks:

* **bare**: the app alone;
* **ctxrelay**: ``ctxrelay.integrations.asgi.RelayMiddleware`` (request id
  from the header or generated, request snapshot -- a raw value copy whose
  headers and cookies are decoded on first read -- policy extraction,
  bind/reset by token, the id echoed);
* **asgi-correlation-id**: ``CorrelationIdMiddleware`` (one id, validated as
  a UUID4, echoed);
* **starlette-context**: ``RawContextMiddleware`` with its ``RequestIdPlugin``
  (one id, validated, echoed).

Three cases: the request brings a valid id (a UUID4, which all three
accept), or brings none (each generates one), or brings a valid id and a
W3C ``traceparent`` -- which ctxrelay relays (it becomes a field) and the
two others ignore.  The request carries six ordinary headers, two cookies
among them.

A last table shows what an app pays when it does read the snapshot: the
first read of ``headers`` and ``cookies`` decodes the raw copy (later reads
are cached).

Times are CPU time of the benchmarking thread (``time.thread_time_ns``), so
other processes on a shared machine do not count.  Variants are interleaved:
each repetition runs a batch of every variant, the order rotated by one place
per repetition.  Reported: the median ns per request, and the overhead -- the
median over repetitions of (variant - bare) from the same repetition.

Run: ``python bench/bench_middleware.py`` (about ten seconds) or ``--quick``.

Instruction counts, which the machine's load does not move: ``--one VARIANT
CASE --requests N`` serves N requests through one stack, untimed, after a
fixed warm-up; run it under ``valgrind --tool=callgrind`` for N and for 0
and divide the difference by N (run it once first, so the ``.pyc`` files
exist)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/bench_middleware.py --one ctxrelay valid --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import statistics
import sys
import uuid
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from time import thread_time_ns
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins import RequestIdPlugin

from ctxrelay import RequestSnapshot
from ctxrelay.integrations.asgi import RelayMiddleware
from harness import markdown_table, rotations

Scope = MutableMapping[str, Any]
App = Callable[..., Any]


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int
    batch: int


FULL = Settings(reps=31, batch=1000)
QUICK = Settings(reps=3, batch=100)


async def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def make_app(middleware: list[Middleware]) -> App:
    return Starlette(routes=[Route("/", endpoint)], middleware=middleware)


VARIANTS: dict[str, list[Middleware]] = {
    "bare": [],
    "ctxrelay": [Middleware(RelayMiddleware)],
    "asgi-correlation-id": [Middleware(CorrelationIdMiddleware)],
    "starlette-context": [Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
}

BASE_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"cookie", b"session=abc123; theme=dark"),
]


TRACEPARENT = (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


def scope_for(inbound_id: str | None, *extra: tuple[bytes, bytes]) -> Scope:
    headers = [*BASE_HEADERS, *extra]
    if inbound_id is not None:
        headers.append((b"x-request-id", inbound_id.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("10.0.0.9", 50000),
        "server": ("10.0.0.1", 8000),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: MutableMapping[str, Any]) -> None:
    return None


async def batch_ns(app: App, scope: Scope, count: int) -> float:
    """CPU ns per request over ``count`` sequential in-process requests."""
    headers = scope["headers"]
    start = thread_time_ns()
    for _ in range(count):
        # A fresh scope per request, as a server gives (Starlette writes into it).
        await app({**scope, "headers": list(headers)}, receive, send)
    return (thread_time_ns() - start) / count


async def measure(
    case: str, inbound_id: str | None, settings: Settings, *extra: tuple[bytes, bytes]
) -> list[list[str]]:
    apps = {name: make_app(mw) for name, mw in VARIANTS.items()}
    scope = scope_for(inbound_id, *extra)
    names = list(apps)
    for name in names:  # warm up: imports, caches, lazily built stacks
        await batch_ns(apps[name], scope, max(50, settings.batch // 10))
    samples: dict[str, list[float]] = {name: [] for name in names}
    overheads: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, settings.reps):
        this_rep: dict[str, float] = {}
        gc.collect()
        for name in order:
            this_rep[name] = await batch_ns(apps[name], scope, settings.batch)
        for name in names:
            samples[name].append(this_rep[name])
            overheads[name].append(this_rep[name] - this_rep["bare"])
    bare = statistics.median(samples["bare"])
    rows = []
    for name in names:
        median = statistics.median(samples[name])
        overhead = statistics.median(overheads[name])
        rows.append(
            [
                case,
                name,
                f"{median / 1000:.1f}",
                "-" if name == "bare" else f"{overhead / 1000:+.1f}",
                "-" if name == "bare" else f"{overhead / bare:+.0%}",
            ]
        )
    return rows


#: The cases by their ``--one`` name: the inbound id and the extra header lines.
CASES: dict[str, tuple[str | None, tuple[tuple[bytes, bytes], ...]]] = {
    "valid": ("6f1c0f0e-0d2a-4a49-9d0b-3c2e5f4b1a77", ()),
    "none": (None, ()),
    "traceparent": ("6f1c0f0e-0d2a-4a49-9d0b-3c2e5f4b1a77", (TRACEPARENT,)),
}


def run_one(variant: str, case: str, requests: int) -> None:
    """Serve ``requests`` requests through one stack, after a fixed warm-up,
    untimed: for instruction counts (callgrind) of N against 0 requests."""
    app = make_app(VARIANTS[variant])
    inbound_id, extra = CASES[case]
    scope = scope_for(inbound_id, *extra)

    async def serve() -> None:
        await batch_ns(app, scope, 200)  # warm-up: the same in every run
        if requests:
            await batch_ns(app, scope, requests)

    asyncio.run(serve())


def run(settings: Settings) -> None:
    print("## Web middleware: per-request cost over the bare Starlette app\n")
    print(
        f"In-process ASGI calls, CPU time, {settings.reps} interleaved repetitions "
        f"of {settings.batch} requests per variant; medians.\n"
    )
    rows: list[list[str]] = []
    rows += asyncio.run(measure("valid inbound id", str(uuid.uuid4()), settings))
    rows += asyncio.run(measure("no inbound id", None, settings))
    rows += asyncio.run(measure("valid id + traceparent", str(uuid.uuid4()), settings, TRACEPARENT))
    header = ["case", "middleware", "µs/request", "overhead µs", "overhead vs bare"]
    print(markdown_table(header, rows))
    print()
    print("## Reading the snapshot: the first read decodes the raw copy\n")
    print(markdown_table(["read", "µs per snapshot"], first_read_rows(settings)))
    print()


def first_read_rows(settings: Settings) -> list[list[str]]:
    """CPU µs per snapshot to read its headers, then headers and cookies: on
    fresh snapshots (the first read decodes), then on one already read."""
    scope = scope_for(str(uuid.uuid4()))
    count = settings.batch
    read_once = RequestSnapshot.from_asgi(scope)
    read_once.cookies  # noqa: B018 -- decoded and cached from here on

    def headers(snap: RequestSnapshot) -> object:
        return snap.headers

    def both(snap: RequestSnapshot) -> object:
        return snap.headers, snap.cookies

    def per_snapshot(read: Callable[[RequestSnapshot], object], fresh: bool) -> float:
        snaps = [RequestSnapshot.from_asgi(scope) if fresh else read_once for _ in range(count)]
        start = thread_time_ns()
        for snap in snaps:
            read(snap)
        return (thread_time_ns() - start) / count

    rows = []
    for label, read, fresh in [
        ("headers, first read", headers, True),
        ("headers + cookies, first read", both, True),
        ("headers + cookies, cached", both, False),
    ]:
        samples = [per_snapshot(read, fresh) for _ in range(settings.reps)]
        rows.append([label, f"{statistics.median(samples) / 1000:.2f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python bench/bench_middleware.py [--quick] [--reps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="repetitions per variant")
    parser.add_argument(
        "--one",
        nargs=2,
        metavar=("VARIANT", "CASE"),
        help=f"only serve requests through one stack ({', '.join(VARIANTS)}) "
        f"for one case ({', '.join(CASES)}), untimed",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests served, with --one")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one[0], args.one[1], args.requests)
        return 0
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
