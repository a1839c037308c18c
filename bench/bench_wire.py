"""What ``ctxrelay.inject`` / ``ctxrelay.extract`` cost, next to OpenTelemetry.

The same content both ways: a request id, a ``traceparent`` and N plain
fields.  ctxrelay writes the request id as ``x-request-id``, the fields as
W3C ``baggage`` and relays the ``traceparent``; OpenTelemetry's
``TraceContextTextMapPropagator`` + ``W3CBaggagePropagator`` write the span
context and N+1 baggage entries (the request id among them).  Extraction
reads the headers each side wrote.

Variants are interleaved: every repetition times one short sample of each,
in an order rotated by one place per repetition, so drift on a shared
machine hits all of them alike; the figures are medians over repetitions.
OpenTelemetry is imported here, so ctxrelay's inject pays its check for an
active span and for OpenTelemetry baggage, as it would in a traced service.

A second table, "Trace formats", is what OpenTelemetry's global propagator
costs ``inject`` for an outgoing HTTP call: the default (W3C trace context +
baggage) against B3 (multi-header) and X-Ray (when their packages are
installed, as ``make test`` does), with the trace relayed (no
span: the relayed ``traceparent`` converted) and with an active span, next
to the propagator's own ``inject`` alone.

A third table, "Per call", is what one ``inject`` costs for each kind of
destination, with the context reused (as a request's fan-out does) and fresh
per call (a new context each time: no cache can help), and what the httpx and
requests hooks add to a real call to a server on 127.0.0.1.

Run: ``python bench/bench_wire.py`` (about a minute) or ``--quick``.

Instruction counts, which the machine's load does not move: ``--one CASE
--calls N`` makes N calls of one case, untimed, after a fixed warm-up; run it
under ``valgrind --tool=callgrind`` for N and for 0 and divide the difference
by N (run it once first, so the ``.pyc`` files exist; ``PYTHONHASHSEED=0``)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/bench_wire.py --one route --calls 2000

The hook cases (``httpx-*``, ``requests-*``) call a server in a child process
(not traced), so the count is the client's alone; the hook's overhead is
``*-hook`` minus ``*-bare``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter
from typing import Any

import ctxrelay
from harness import rotations

# OpenTelemetry is imported where a table needs it, not here: the per-call
# cases without it (``--one foreign``, the hooks) must not pay its checks.

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def fields(count: int) -> dict[str, str]:
    """``count`` plain fields, the kind services relay: short ids and tags."""
    base = {"tenant": "acme", "user": "u-1234", "x-canary": "on", "region": "eu-west-1"}
    more = {f"field{i}": f"value-{i}" for i in range(max(count - len(base), 0))}
    return dict(list({**base, **more}.items())[:count])


def ctxrelay_pair(count: int) -> tuple[Callable[[], object], Callable[[], object]]:
    ctx = ctxrelay.Context({"request_id": "req-1", "traceparent": TRACEPARENT, **fields(count)})
    headers: dict[str, str] = {}
    with ctxrelay.use(ctx):
        ctxrelay.inject(headers)

    def inject() -> object:
        out: dict[str, str] = {}
        with ctxrelay.use(ctx):
            ctxrelay.inject(out)
        return out

    def extract() -> object:
        return ctxrelay.extract(headers, in_house=True)

    return inject, extract


def otel_pair(count: int) -> tuple[Callable[[], object], Callable[[], object]]:
    from opentelemetry import baggage as otel_baggage
    from opentelemetry import context as otel_context
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracecontext, w3c_baggage = TraceContextTextMapPropagator(), W3CBaggagePropagator()
    ctx = tracecontext.extract({"traceparent": TRACEPARENT})
    for name, value in {"request_id": "req-1", **fields(count)}.items():
        ctx = otel_baggage.set_baggage(name, value, context=ctx)
    headers: dict[str, str] = {}
    tracecontext.inject(headers, context=ctx)
    w3c_baggage.inject(headers, context=ctx)

    def inject() -> object:
        out: dict[str, str] = {}
        token = otel_context.attach(ctx)  # what a traced call site has: a current context
        try:
            tracecontext.inject(out)
            w3c_baggage.inject(out)
        finally:
            otel_context.detach(token)
        return out

    def extract() -> object:
        return w3c_baggage.extract(headers, context=tracecontext.extract(headers))

    return inject, extract


# -- trace formats: inject for an HTTP destination, per global propagator --------
DESTINATION = "https://orders.internal.example/api"


def trace_formats() -> dict[str, Any]:
    """The global propagators compared: the default, and B3 and X-Ray when
    their packages are installed (the Makefile's test install has them)."""
    from opentelemetry import propagate

    found: dict[str, Any] = {"default (W3C)": propagate.get_global_textmap()}
    try:
        from opentelemetry.propagators.aws import AwsXRayPropagator
        from opentelemetry.propagators.b3 import B3MultiFormat

        found |= {"B3 multi": B3MultiFormat(), "X-Ray": AwsXRayPropagator()}
    except ImportError:
        pass
    return found


def formats_variants(
    formats: dict[str, Any],
) -> dict[str, tuple[Any, Callable[[], object]]]:
    """(global propagator, call) per row: ctxrelay's inject, relayed and
    under a span, and the propagator's own inject under the same span."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    ctx = ctxrelay.Context({"request_id": "req-1", "traceparent": TRACEPARENT, **fields(4)})
    span = TracerProvider().get_tracer("bench").start_span("call")
    traced = trace.set_span_in_context(span)

    def relayed() -> object:
        out: dict[str, str] = {}
        with ctxrelay.use(ctx):
            ctxrelay.inject(out, destination=DESTINATION)
        return out

    def under_span() -> object:
        out: dict[str, str] = {}
        with ctxrelay.use(ctx):
            token = otel_context.attach(traced)  # current after use(): it speaks
            try:
                ctxrelay.inject(out, destination=DESTINATION)
            finally:
                otel_context.detach(token)
        return out

    def alone(textmap: Any) -> Callable[[], object]:
        def call() -> object:
            out: dict[str, str] = {}
            textmap.inject(out, context=traced)
            return out

        return call

    variants: dict[str, tuple[Any, Callable[[], object]]] = {}
    for name, textmap in formats.items():
        variants[f"{name}|relayed"] = (textmap, relayed)
        variants[f"{name}|span"] = (textmap, under_span)
        variants[f"{name}|alone"] = (textmap, alone(textmap))
    return variants


def formats_table(reps: int, loops: int) -> None:
    """Print the trace-formats table (Markdown), variants interleaved."""
    from opentelemetry import propagate

    formats = trace_formats()
    default = formats["default (W3C)"]
    ctxrelay.configure(
        ctxrelay.Policy(routes=(ctxrelay.Policy.Route(hosts=("*.internal.example",)),))
    )
    variants = formats_variants(formats)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for textmap, fn in variants.values():
        propagate.set_global_textmap(textmap)
        sample(fn, loops)  # warm up
    gc.disable()
    try:
        for order in rotations(names, reps):
            for name in order:
                textmap, fn = variants[name]
                propagate.set_global_textmap(textmap)
                times[name].append(sample(fn, loops))
    finally:
        gc.enable()
        propagate.set_global_textmap(default)
    median = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    base = median["default (W3C)|relayed"]
    print()
    print("### Trace formats")
    print()
    print(
        f"`inject` for `{DESTINATION}` (a route: baggage too), a request id, a "
        "`traceparent` and 4 fields; µs per call, x = against the default, relayed."
    )
    print()
    print("| global propagator | relayed µs | x | under a span µs | x | propagator alone µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in formats:
        relayed, span, alone = (median[f"{name}|{k}"] for k in ("relayed", "span", "alone"))
        print(
            f"| {name} | {relayed:.2f} | {relayed / base:.2f} | {span:.2f} | "
            f"{span / base:.2f} | {alone:.2f} |"
        )


# -- per call: each kind of destination, and the HTTP client hooks ---------------
ROUTED = "http://orders.internal.example/api"
FOREIGN = "https://api.partner.example/v1"
FULL = {"request_id": "req-1", "traceparent": TRACEPARENT, **fields(4)}

# A server in a child process (so callgrind counts the client alone):
# HTTP/1.1 keep-alive, "ok" to every GET.
SERVER = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer waits for a delayed ACK

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def per_call_policy() -> ctxrelay.Policy:
    """An in-house route for ``*.internal.example`` and 127.0.0.1."""
    route = ctxrelay.Policy.Route(hosts=("*.internal.example", "127.0.0.1"))
    return ctxrelay.Policy(routes=(route,))


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    """The URL of a fresh server process on 127.0.0.1."""
    child = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        yield f"http://127.0.0.1:{child.stdout.readline().strip()}/"
    finally:
        child.kill()
        child.wait()


def _inject_bound(ctx: ctxrelay.Context, destination: str) -> Callable[[], object]:
    def call() -> object:
        out: dict[str, str] = {}
        with ctxrelay.use(ctx):
            ctxrelay.inject(out, destination=destination)
        return out

    return call


def inject_cases(names: Sequence[str]) -> dict[str, Callable[[], object]]:
    """One call of each named ``inject`` case (bound with ``use()``)."""
    cases: dict[str, Callable[[], object]] = {}
    full = ctxrelay.Context(FULL)
    for name in names:
        if name == "foreign":  # a request id only, to a host no route names
            cases[name] = _inject_bound(ctxrelay.Context(request_id="req-1"), FOREIGN)
        elif name == "foreign-full":  # the full context: request id and trace go
            cases[name] = _inject_bound(full, FOREIGN)
        elif name == "route":  # reused: a request's fan-out
            cases[name] = _inject_bound(full, ROUTED)
        elif name == "route-fresh":  # a new (equal) context per call
            cases[name] = lambda: _inject_bound(ctxrelay.Context(FULL), ROUTED)()
        elif name == "fresh-floor":  # what route-fresh pays besides inject
            cases[name] = fresh_floor
        elif name == "use-floor":  # what every other case pays besides inject
            cases[name] = lambda: use_floor(full)
        elif name in ("otel-span", "otel-relayed"):
            cases[name] = otel_case(full, span=name == "otel-span")
        else:
            raise SystemExit(f"unknown case {name!r}")
    return cases


def use_floor(ctx: ctxrelay.Context) -> object:
    out: dict[str, str] = {}
    with ctxrelay.use(ctx):
        pass
    return out


def fresh_floor() -> object:
    out: dict[str, str] = {}
    with ctxrelay.use(ctxrelay.Context(FULL)):
        pass
    return out


def otel_case(ctx: ctxrelay.Context, *, span: bool) -> Callable[[], object]:
    """``inject`` to the route with OpenTelemetry imported, under a span or not."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    traced = trace.set_span_in_context(TracerProvider().get_tracer("bench").start_span("call"))

    def call() -> object:
        out: dict[str, str] = {}
        with ctxrelay.use(ctx):
            token = otel_context.attach(traced) if span else None  # after use(): it speaks
            try:
                ctxrelay.inject(out, destination=ROUTED)
            finally:
                if token is not None:
                    otel_context.detach(token)
        return out

    return call


def hook_cases(names: Sequence[str], url: str) -> tuple[dict[str, Callable[[], object]], Any]:
    """One GET of ``url`` per call, through a bare client or one with the hook,
    under the full context; and what closes the clients."""
    import httpx
    import requests

    from ctxrelay.integrations import httpx as relay_httpx
    from ctxrelay.integrations import requests as relay_requests

    stack = contextlib.ExitStack()
    clients: dict[str, Any] = {
        "httpx-bare": httpx.Client(),
        "httpx-hook": relay_httpx.install(httpx.Client()),
        "requests-bare": requests.Session(),
        "requests-hook": relay_requests.Session(),
    }
    for client in clients.values():
        stack.callback(client.close)
    stack.enter_context(ctxrelay.use(ctxrelay.Context(FULL)))
    cases: dict[str, Callable[[], object]] = {}
    for name in names:
        if name not in clients:
            raise SystemExit(f"unknown case {name!r}")
        cases[name] = _getter(clients[name], url)
    return cases, stack


def _getter(client: Any, url: str) -> Callable[[], object]:
    def call() -> object:
        return client.get(url).content

    return call


INJECT_CASES = ("foreign", "foreign-full", "route", "route-fresh", "fresh-floor")
HOOK_CASES = ("httpx-bare", "httpx-hook", "requests-bare", "requests-hook")
ONE_CASES = (*INJECT_CASES, "use-floor", "otel-relayed", "otel-span", *HOOK_CASES)


def run_one(case: str, calls: int) -> None:
    """``calls`` calls of ``case`` after a fixed warm-up, untimed: for
    instruction counts (callgrind) of N calls against 0."""
    ctxrelay.configure(per_call_policy())
    with contextlib.ExitStack() as stack:
        if case in HOOK_CASES:
            cases, closing = hook_cases([case], stack.enter_context(local_server()))
            stack.enter_context(closing)
        else:
            cases = inject_cases([case])
        call = cases[case]
        for _ in range(200):  # warm-up: the same in every run
            call()
        for _ in range(calls):
            call()


def per_call_table(reps: int, loops: int) -> None:
    """Print the per-call tables (Markdown), without OpenTelemetry imported."""
    ctxrelay.configure(per_call_policy())
    inject = measure(inject_cases(INJECT_CASES), reps, loops)
    with local_server() as url:
        cases, closing = hook_cases(HOOK_CASES, url)
        with closing:
            hooks = measure(cases, reps, max(loops // 10, 20))
    print("### Per call")
    print()
    print(
        "`inject` alone, OpenTelemetry not imported; the context bound with `use()` "
        "in each call (its cost is in every row); µs per call."
    )
    print()
    print("| case | µs |")
    print("|---|---:|")
    for name in INJECT_CASES:
        print(f"| {name} | {inject[name]:.2f} |")
    print(f"| route-fresh - fresh-floor | {inject['route-fresh'] - inject['fresh-floor']:.2f} |")
    print()
    print("A GET to a server on 127.0.0.1 (its own process) under the same context; µs per call.")
    print()
    print("| client | bare µs | with the hook µs | hook µs |")
    print("|---|---:|---:|---:|")
    for client in ("httpx", "requests"):
        bare, hooked = hooks[f"{client}-bare"], hooks[f"{client}-hook"]
        print(f"| {client} | {bare:.1f} | {hooked:.1f} | {hooked - bare:.1f} |")
    print()


def sample(fn: Callable[[], object], loops: int) -> float:
    """Seconds per call over ``loops`` calls."""
    start = perf_counter()
    for _ in range(loops):
        fn()
    return (perf_counter() - start) / loops


def measure(variants: dict[str, Callable[[], object]], reps: int, loops: int) -> dict[str, float]:
    """Median µs per call of each variant, interleaved and rotated."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for fn in variants.values():
        sample(fn, loops)  # warm up
    gc.disable()
    try:
        for order in rotations(names, reps):
            for name in order:
                times[name].append(sample(variants[name], loops))
    finally:
        gc.enable()
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the side-by-side table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    parser.add_argument("--per-call", action="store_true", help="the per-call tables only")
    parser.add_argument("--one", choices=ONE_CASES, help="one case, untimed (for callgrind)")
    parser.add_argument("--calls", type=int, default=1000, help="calls made by --one")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.calls)
        return 0
    reps, loops = (7, 300) if args.quick else (41, 1000)
    print(f"Python {sys.version.split()[0]}, {reps} interleaved repetitions x {loops} calls")
    print()
    per_call_table(reps, loops)  # first: OpenTelemetry is not imported yet
    if args.per_call:
        return 0
    print("### Against OpenTelemetry")
    print()
    print("| operation | fields | ctxrelay µs | OpenTelemetry µs | ctxrelay / OTel |")
    print("|---|---:|---:|---:|---:|")
    for count in (4, 16, 60):
        our_inject, our_extract = ctxrelay_pair(count)
        otel_inject, otel_extract = otel_pair(count)
        result = measure(
            {
                "ctxrelay inject": our_inject,
                "otel inject": otel_inject,
                "ctxrelay extract": our_extract,
                "otel extract": otel_extract,
            },
            reps,
            loops,
        )
        for op in ("inject", "extract"):
            ours, theirs = result[f"ctxrelay {op}"], result[f"otel {op}"]
            print(f"| {op} | {count} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
    formats_table(reps, loops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
