"""What ctxrelay's span processor costs per span, side by side with the bare SDK.

Every variant starts and ends spans (``with tracer.start_as_current_span(...):
pass``) on a ``TracerProvider`` of its own, from inside a request-like
context of 10 fields:

* **bare** -- a provider without processors: the SDK's own cost of a span;
* **by hand** -- a processor that does what one writes without ctxrelay,
  ``span.set_attribute("ctxrelay.request_id", ctxrelay.request_id())`` (no
  masking, no check that there is a request);
* **``ContextSpanProcessor()``** -- ctxrelay's, with its default (the request
  id alone);
* **``ContextSpanProcessor`` with 5 fields**;
* **``ContextSpanProcessor()`` outside any request** -- the same processor
  where no context is bound (spans of background work).

The "span carries" column is checked, not assumed: a span of each variant
is exported to memory and its attributes listed.

Times are CPU time of the benchmarking thread (``time.thread_time``), so
other processes on a shared machine do not count.  Variants are
interleaved: each repetition runs one sample of each, in an order rotated
by one place per repetition (``harness.rotations``), so drift hits all
alike.  Reported: the median ns per span, the quartiles, and the overhead
over bare -- the median over repetitions of (variant - bare) in the same
repetition.

Run: ``python bench/bench_otel_spans.py`` (about 20 s) or ``--quick``.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

import ctxrelay
from ctxrelay.integrations.opentelemetry import ContextSpanProcessor
from harness import markdown_table, rotations

#: The request-like context every span but the "outside" variant's starts in.
FIELDS = {
    "request_id": "bench-0001",
    "user": "u-42",
    "tenant": "acme",
    "x-gray": "canary",
    "session": "s-1",
    **{f"field{n}": f"value-{n}" for n in range(5)},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int  # interleaved repetitions
    spans: int  # spans per sample


FULL = Settings(reps=101, spans=2000)
QUICK = Settings(reps=3, spans=100)


class ByHand(SpanProcessor):
    """What one writes without ctxrelay: read the id, set it."""

    def on_start(self, span: Span, parent_context: object = None) -> None:
        span.set_attribute("ctxrelay.request_id", ctxrelay.request_id() or "-")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    processor: Callable[[], SpanProcessor | None]
    outside: bool = False  # start spans where no context is bound

    def provider(self, *more: SpanProcessor) -> TracerProvider:
        provider = TracerProvider()
        made = self.processor()
        if made is not None:
            provider.add_span_processor(made)
        for processor in more:
            provider.add_span_processor(processor)
        return provider


VARIANTS = [
    Variant("bare (no processor)", lambda: None),
    Variant("by hand: `span.set_attribute(..., request_id())`", ByHand),
    Variant("`ContextSpanProcessor()` (request_id)", ContextSpanProcessor),
    Variant(
        "`ContextSpanProcessor` with 5 fields",
        lambda: ContextSpanProcessor(["request_id", "user", "tenant", "x-gray", "session"]),
    ),
    Variant("`ContextSpanProcessor()` outside any request", ContextSpanProcessor, outside=True),
]


@contextmanager
def _no_gc() -> Iterator[None]:
    """No collection inside a sample, as ``timeit`` does."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _carries(variant: Variant) -> str:
    """The attributes a span of ``variant`` is exported with."""
    exporter = InMemorySpanExporter()
    provider = variant.provider(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    _in_place(variant, functools.partial(_spans, tracer, 1))
    provider.shutdown()
    (span,) = exporter.get_finished_spans()
    return ", ".join(sorted(span.attributes or {})) or "nothing"


def _spans(tracer: Tracer, count: int) -> float:
    """CPU seconds per span, ``count`` spans started and ended."""
    with _no_gc():
        start = time.thread_time()
        for _ in range(count):
            with tracer.start_as_current_span("bench"):
                pass
        return (time.thread_time() - start) / count


def _in_place(variant: Variant, measure: Callable[[], float]) -> float:
    if variant.outside:
        return contextvars.Context().run(measure)
    with ctxrelay.bind(FIELDS):
        return measure()


def _quartiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def run(settings: Settings) -> None:
    print(
        f"Python {sys.version.split()[0]}; {settings.reps} interleaved repetitions of "
        f"{settings.spans} spans per variant; a context of {len(FIELDS)} fields\n",
        flush=True,
    )
    carries = {variant.name: _carries(variant) for variant in VARIANTS}
    providers = {variant.name: variant.provider() for variant in VARIANTS}
    tracers = {name: provider.get_tracer("bench") for name, provider in providers.items()}
    samples: dict[str, list[float]] = {variant.name: [] for variant in VARIANTS}
    try:
        for variant in VARIANTS:  # warm up
            _in_place(variant, functools.partial(_spans, tracers[variant.name], 50))
        for order in rotations(VARIANTS, settings.reps):
            for variant in order:
                measure = functools.partial(_spans, tracers[variant.name], settings.spans)
                samples[variant.name].append(_in_place(variant, measure))
    finally:
        for provider in providers.values():
            provider.shutdown()
    bare = samples[VARIANTS[0].name]
    rows = []
    for variant in VARIANTS:
        mine = samples[variant.name]
        low, high = _quartiles(mine)
        over = statistics.median(m - b for m, b in zip(mine, bare, strict=True))
        ratio = statistics.median(m / b for m, b in zip(mine, bare, strict=True))
        rows.append(
            [
                variant.name,
                f"{statistics.median(mine) * 1e9:.0f}",
                f"{low * 1e9:.0f}-{high * 1e9:.0f}",
                f"{over * 1e9:+.0f}",
                f"{ratio:.2f}",
                carries[variant.name],
            ]
        )
    print("### Per span: `with tracer.start_as_current_span(...): pass` (CPU ns)\n")
    header = ["variant", "ns/span", "q1-q3", "ns vs bare", "x bare", "span carries"]
    print(markdown_table(header, rows), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark ctxrelay's span processor.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="interleaved repetitions")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
