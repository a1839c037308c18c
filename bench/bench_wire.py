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

Run: ``python bench/bench_wire.py`` (about a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Callable, Sequence
from time import perf_counter

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import ctxrelay
from harness import rotations

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE = TraceContextTextMapPropagator()
BAGGAGE = W3CBaggagePropagator()


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
    ctx = TRACE.extract({"traceparent": TRACEPARENT})
    for name, value in {"request_id": "req-1", **fields(count)}.items():
        ctx = otel_baggage.set_baggage(name, value, context=ctx)
    headers: dict[str, str] = {}
    TRACE.inject(headers, context=ctx)
    BAGGAGE.inject(headers, context=ctx)

    def inject() -> object:
        out: dict[str, str] = {}
        token = otel_context.attach(ctx)  # what a traced call site has: a current context
        try:
            TRACE.inject(out)
            BAGGAGE.inject(out)
        finally:
            otel_context.detach(token)
        return out

    def extract() -> object:
        return BAGGAGE.extract(headers, context=TRACE.extract(headers))

    return inject, extract


# -- trace formats: inject for an HTTP destination, per global propagator --------
DESTINATION = "https://orders.internal.example/api"
DEFAULT = propagate.get_global_textmap()
FORMATS: dict[str, TextMapPropagator] = {"default (W3C)": DEFAULT}
try:  # the Makefile's test install has them; an extras-only venv may not
    from opentelemetry.propagators.aws import AwsXRayPropagator
    from opentelemetry.propagators.b3 import B3MultiFormat

    FORMATS |= {"B3 multi": B3MultiFormat(), "X-Ray": AwsXRayPropagator()}
except ImportError:
    pass


def formats_variants() -> dict[str, tuple[TextMapPropagator, Callable[[], object]]]:
    """(global propagator, call) per row: ctxrelay's inject, relayed and
    under a span, and the propagator's own inject under the same span."""
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

    def alone(textmap: TextMapPropagator) -> Callable[[], object]:
        def call() -> object:
            out: dict[str, str] = {}
            textmap.inject(out, context=traced)
            return out

        return call

    variants: dict[str, tuple[TextMapPropagator, Callable[[], object]]] = {}
    for name, textmap in FORMATS.items():
        variants[f"{name}|relayed"] = (textmap, relayed)
        variants[f"{name}|span"] = (textmap, under_span)
        variants[f"{name}|alone"] = (textmap, alone(textmap))
    return variants


def formats_table(reps: int, loops: int) -> None:
    """Print the trace-formats table (Markdown), variants interleaved."""
    ctxrelay.configure(
        ctxrelay.Policy(routes=(ctxrelay.Policy.Route(hosts=("*.internal.example",)),))
    )
    variants = formats_variants()
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
        propagate.set_global_textmap(DEFAULT)
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
    for name in FORMATS:
        relayed, span, alone = (median[f"{name}|{k}"] for k in ("relayed", "span", "alone"))
        print(
            f"| {name} | {relayed:.2f} | {relayed / base:.2f} | {span:.2f} | "
            f"{span / base:.2f} | {alone:.2f} |"
        )


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
    args = parser.parse_args(argv)
    reps, loops = (7, 300) if args.quick else (41, 1000)
    print(f"Python {sys.version.split()[0]}, {reps} interleaved repetitions x {loops} calls")
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
