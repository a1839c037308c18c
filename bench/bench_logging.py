"""What putting the request's fields on log records costs, per record.

Three sections, each printed as Markdown tables, with 10 and with 50 fields
bound:

1. **stdlib logging** -- ``logger.info(...)`` through a handler that formats
   every record (``%(asctime)s ... [%(request_id)s] ...``) and throws the line
   away: bare; asgi-correlation-id's ``CorrelationIdFilter`` (it carries one
   id); ctxrelay's ``ContextFilter`` (the id, plus every field in
   ``record.ctxrelay``); ``ContextFilter(prefix="ctx_")`` (every field also
   as an attribute); ``ContextFilter(id_length=8)``; and
   ``ContextFilter(trace_ids=True)`` with a ``traceparent`` bound and the
   format showing ``%(otelTraceID)s %(otelSpanID)s`` (OpenTelemetry not
   imported: the ids come from the relayed ``traceparent``).
2. **structlog** -- ``log.info(...)`` rendered by ``KeyValueRenderer`` into a
   ``ReturnLogger``: bare; the fields already bound with ``log.bind()`` (the
   floor: no lookup at all); ``structlog.contextvars.merge_contextvars`` with
   the fields bound by ``bind_contextvars``; ctxrelay's ``merge_context`` with
   the fields bound by ``ctxrelay.bind``.
3. **loguru** -- ``logger.info(...)`` to a sink that formats ``{extra}``:
   bare; ``logger.contextualize(**fields)`` (loguru's own); ctxrelay's patcher.

Times are CPU time of the benchmarking thread (``time.thread_time_ns``), so
that other processes on a shared machine do not count.  Each variant runs
inside its own ``contextvars.Context`` holding only its library's variables
(the best case for ``merge_contextvars``, which walks
every variable).  Variants are interleaved: each repetition runs all of them
once, the order rotated by one place per repetition, so drift on a shared
machine hits all alike.  Reported: the median ns per record, the quartiles,
and the overhead -- the median over repetitions of (variant - bare) measured
in the same repetition.

Run: ``python bench/bench_logging.py`` (a minute or two) or ``--quick``.

Timing on a shared 2-core machine moves single overheads by 100-200 ns,
the size of the differences between the stdlib filters.  ``--one SECTION
INDEX`` logs ``--records`` records through one variant and measures
nothing, for a deterministic count under an external tool::

    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        python bench/bench_logging.py --one stdlib 2 --fields 10 --records 3000

run again with ``--records 1000``: the difference of the two ``I refs``
totals, divided by 2000, is the instructions per record (with
``PYTHONHASHSEED=0``, repeat runs agree within about 1%).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import gc
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from time import thread_time_ns
from typing import Any

import structlog
from asgi_correlation_id import CorrelationIdFilter
from asgi_correlation_id.context import correlation_id
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay.integrations.logging import ContextFilter
from ctxrelay.integrations.loguru import patcher
from ctxrelay.integrations.structlog import merge_context
from harness import markdown_table, rotations

REQUEST_ID = "bench-0001"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int
    records: int  # log calls per sample
    field_counts: tuple[int, ...] = (10, 50)


FULL = Settings(reps=31, records=2000)
QUICK = Settings(reps=3, records=200)


@dataclass(frozen=True)
class Variant:
    """One way of logging: ``log()`` emits one record, inside ``context``;
    ``check()`` returns one formatted line, which must carry ``expect`` (the
    request id, or as much of it as the variant shows)."""

    name: str
    log: Callable[[], object]
    context: contextvars.Context
    check: Callable[[], str]
    expect: str = REQUEST_ID
    record_class: type[logging.LogRecord] = dataclasses.field(
        default_factory=lambda: type("BenchRecord", (logging.LogRecord,), {})
    )


def _fields(count: int) -> dict[str, str]:
    """The request id plus ``count - 1`` more, like a real request's."""
    fields = {f"field_{i:02d}": f"value-{i:02d}" for i in range(1, count)}
    return {"request_id": REQUEST_ID, **fields}


#: Scopes entered for the whole run: a generator-based one (loguru's
#: ``contextualize``) would reset its variable when garbage-collected.
_ENTERED: list[tuple[contextvars.Context, AbstractContextManager[object]]] = []


def _context_with(scope: AbstractContextManager[object]) -> contextvars.Context:
    """A fresh ``contextvars.Context`` where only ``scope`` is entered."""
    ctx = contextvars.Context()
    ctx.run(scope.__enter__)
    _ENTERED.append((ctx, scope))
    return ctx


def _leave_all() -> None:
    """Exit the scopes, each in its own context (as loguru's tokens require)."""
    while _ENTERED:
        ctx, scope = _ENTERED.pop()
        ctx.run(scope.__exit__, None, None, None)


# -- stdlib logging -----------------------------------------------------------
class FormattingHandler(logging.Handler):
    """Formats every record, like a real handler, and keeps only the last line."""

    last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = self.format(record)


def _stdlib_variant(
    name: str,
    fmt: str,
    log_filter: logging.Filter | None,
    context: contextvars.Context,
    expect: str = REQUEST_ID,
) -> Variant:
    handler = FormattingHandler()
    handler.setFormatter(logging.Formatter(fmt))
    if log_filter is not None:
        handler.addFilter(log_filter)
    log = logging.getLogger(f"bench.logging.{len(name)}.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)

    def emit() -> None:
        log.info("order %s confirmed", 42)

    def check() -> str:
        context.run(emit)
        return handler.last

    return Variant(name, emit, context, check, expect=expect)


def stdlib_variants(count: int) -> list[Variant]:
    """Bare, asgi-correlation-id, ctxrelay, ctxrelay with every attribute,
    with the id cut, with the trace ids."""
    fields = _fields(count)
    ours = _context_with(ctxrelay.bind(fields))
    traced = _context_with(ctxrelay.bind({**fields, "traceparent": TRACEPARENT}))
    theirs = contextvars.Context()
    theirs.run(correlation_id.set, REQUEST_ID)
    fmt = "%(asctime)s %(levelname)s [{}] %(name)s: %(message)s"
    return [
        _stdlib_variant("bare (no filter)", fmt.format(REQUEST_ID), None, ours),
        _stdlib_variant(
            "asgi-correlation-id `CorrelationIdFilter` (1 id)",
            fmt.format("%(correlation_id)s"),
            CorrelationIdFilter(),
            theirs,
        ),
        _stdlib_variant(
            f"ctxrelay `ContextFilter()` (id + {count} fields)",
            fmt.format("%(request_id)s"),
            ContextFilter(),
            ours,
        ),
        _stdlib_variant(
            f'ctxrelay `ContextFilter(prefix="ctx_")` ({count} attributes)',
            fmt.format("%(ctx_request_id)s"),
            ContextFilter(prefix="ctx_"),
            ours,
        ),
        _stdlib_variant(
            f"ctxrelay `ContextFilter(id_length=8)` (id + {count} fields)",
            fmt.format("%(request_id)s"),
            ContextFilter(id_length=8),
            ours,
            expect=REQUEST_ID[:8],
        ),
        _stdlib_variant(
            f"ctxrelay `ContextFilter(trace_ids=True)` (id + {count} fields + 2 ids shown)",
            fmt.format("%(request_id)s %(otelTraceID)s %(otelSpanID)s"),
            ContextFilter(trace_ids=True),
            traced,
        ),
    ]


# -- structlog ------------------------------------------------------------------
def _structlog_variant(
    name: str, processors: list[Any], context: contextvars.Context, bound: dict[str, str]
) -> Variant:
    renderer = structlog.processors.KeyValueRenderer(key_order=["event"])
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[*processors, renderer],
        wrapper_class=structlog.BoundLogger,
    ).bind(**bound)

    def emit() -> object:
        return log.info("order confirmed", order=42)

    def check() -> str:
        return str(context.run(emit))

    return Variant(name, emit, context, check)


def structlog_variants(count: int) -> list[Variant]:
    """Bare, fields bound on the logger, ``merge_contextvars``, ``merge_context``."""
    fields = _fields(count)
    ours = _context_with(ctxrelay.bind(fields))
    theirs = contextvars.Context()
    theirs.run(structlog.contextvars.bind_contextvars, **fields)
    merge_contextvars = structlog.contextvars.merge_contextvars
    return [
        _structlog_variant("bare (no processor)", [], contextvars.Context(), {}),
        _structlog_variant(
            f"fields bound on the logger (`log.bind`, floor; {count})", [], ours, fields
        ),
        _structlog_variant(
            f"structlog `merge_contextvars` ({count} bound)", [merge_contextvars], theirs, {}
        ),
        _structlog_variant(f"ctxrelay `merge_context` ({count} bound)", [merge_context], ours, {}),
    ]


# -- loguru -----------------------------------------------------------------------
class _LoguruSink:
    """A loguru sink that keeps only the last formatted line."""

    last = ""

    def write(self, message: str) -> None:
        self.last = message


def loguru_variants(count: int, sink: _LoguruSink) -> list[Variant]:
    """Bare, ``logger.contextualize(**fields)``, ctxrelay's patcher."""
    fields = _fields(count)
    ours = _context_with(ctxrelay.bind(fields))
    theirs = _context_with(loguru_logger.contextualize(**fields))
    patched = loguru_logger.patch(patcher)

    def variant(name: str, log: Any, context: contextvars.Context) -> Variant:
        def emit() -> None:
            log.info("order {} confirmed", 42)

        def check() -> str:
            context.run(emit)
            return sink.last

        return Variant(name, emit, context, check)

    return [
        variant("bare (no patcher)", loguru_logger, contextvars.Context()),
        variant(f"loguru `contextualize(**fields)` ({count})", loguru_logger, theirs),
        variant(f"ctxrelay `patcher` ({count} bound)", patched, ours),
    ]


# -- timing -----------------------------------------------------------------------
SECTIONS: dict[str, Callable[[int], list[Variant]]] = {
    "stdlib logging": stdlib_variants,
    "structlog": structlog_variants,
    "loguru": lambda count: loguru_variants(count, _loguru_sink()),
}

#: Per section: the indexes of ctxrelay's variants, and of the anchors they race.
RACES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "stdlib logging": ((2, 3, 4, 5), (1,)),
    "structlog": ((3,), (2,)),
    "loguru": ((2,), (1,)),
}


def _loguru_sink() -> _LoguruSink:
    sink = _LoguruSink()
    loguru_logger.remove()
    loguru_logger.add(sink, format="{time} {level} {extra} {message}", colorize=False)
    return sink


def sample(variant: Variant, records: int) -> float:
    """Nanoseconds per record: ``records`` log calls inside the variant's context."""

    def loop() -> int:
        log = variant.log
        gc.disable()  # no collection inside a sample (timeit does the same)
        try:
            start = thread_time_ns()
            for _ in range(records):
                log()
            return thread_time_ns() - start
        finally:
            gc.enable()

    # Each variant's records are of its own LogRecord subclass.  CPython
    # keeps one shared key table per class for instance dicts, with a few
    # spare slots: with one class, the first filter to add an attribute
    # would take them and every later variant's records would pay to build
    # a dict -- an order effect no real program (with one filter) sees.
    logging.setLogRecordFactory(variant.record_class)
    try:
        return variant.context.run(loop) / records
    finally:
        logging.setLogRecordFactory(logging.LogRecord)


def interleaved(variants: Sequence[Variant], settings: Settings) -> dict[str, list[float]]:
    """Per-variant samples (ns/record), all variants once per repetition."""
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for variant in variants:  # warm up
        sample(variant, max(10, settings.records // 10))
    for order in rotations(variants, settings.reps):
        for variant in order:
            samples[variant.name].append(sample(variant, settings.records))
        gc.collect()
    return samples


# -- report -------------------------------------------------------------------------
def overhead(samples: list[float], bare: list[float]) -> float:
    """Median over repetitions of (variant - bare) in the same repetition."""
    return statistics.median(s - b for s, b in zip(samples, bare, strict=True))


def table(names: Sequence[str], samples: dict[str, list[float]]) -> str:
    """Median ns/record, quartiles and overhead over bare, per variant."""
    bare = samples[names[0]]
    rows = []
    for name in names:
        mine = samples[name]
        q1, _, q3 = statistics.quantiles(mine, n=4) if len(mine) > 1 else (mine[0],) * 3
        rows.append(
            [
                name,
                f"{statistics.median(mine):.0f}",
                f"{q1:.0f}-{q3:.0f}",
                f"{overhead(mine, bare):+.0f}",
                f"{statistics.median(m / b for m, b in zip(mine, bare, strict=True)):.3f}",
            ]
        )
    return markdown_table(["variant", "ns/record", "q1-q3", "overhead ns", "x bare"], rows)


def verdict(
    samples: dict[str, list[float]], bare: str, ours: str, theirs: Sequence[str]
) -> list[list[str]]:
    """Rows comparing ctxrelay's overhead with each anchor's."""
    mine = overhead(samples[ours], samples[bare])
    rows = []
    for name in theirs:
        other = overhead(samples[name], samples[bare])
        result = "lower" if mine < other else "NOT lower"
        rows.append([ours, f"{mine:+.0f}", name, f"{other:+.0f}", result])
    return rows


def measure(section: str, count: int, settings: Settings) -> list[list[str]]:
    """Time one section's variants, print its table, return the verdict rows."""
    variants = SECTIONS[section](count)
    for variant in variants[1:]:  # the first is bare: no context on its lines
        line = variant.check()
        if variant.expect not in line:
            raise SystemExit(f"{variant.name}: the line lacks the request id: {line!r}")
    samples = interleaved(variants, settings)
    names = [v.name for v in variants]
    print(f"### {section}, {count} fields bound: ns per record\n")
    print(table(names, samples) + "\n", flush=True)
    ours, theirs = RACES[section]
    rows: list[list[str]] = []
    for i in ours:
        rows += verdict(samples, names[0], names[i], [names[j] for j in theirs])
    return rows


def run(settings: Settings) -> None:
    """Measure every section and print the tables."""
    print(
        f"Python {sys.version.split()[0]} on {platform.machine()} ({platform.system()}), "
        f"{os.cpu_count()} CPUs; {settings.reps} interleaved repetitions x "
        f"{settings.records} records\n",
        flush=True,
    )
    verdicts: list[list[str]] = []
    for count in settings.field_counts:
        for section in SECTIONS:
            verdicts += measure(section, count, settings)
    print("### ctxrelay's overhead against the anchors (ns per record over bare)\n")
    print(markdown_table(["ctxrelay", "overhead", "anchor", "overhead", "ctxrelay is"], verdicts))
    _leave_all()


def run_one(section: str, index: int, count: int, records: int) -> None:
    """Log ``records`` records through one variant (after a warm-up), untimed."""
    (name,) = [name for name in SECTIONS if name.startswith(section)]
    variant = SECTIONS[name](count)[index]
    logging.setLogRecordFactory(variant.record_class)

    def loop() -> None:
        for _ in range(200 + records):
            variant.log()

    variant.context.run(loop)
    line = variant.check()
    _leave_all()
    if index and variant.expect not in line:
        raise SystemExit(f"{variant.name}: the line lacks the request id")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python bench/bench_logging.py [--quick] [--reps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="repetitions per variant")
    parser.add_argument("--counts", help="comma-separated numbers of fields bound (default: 10,50)")
    parser.add_argument(
        "--one", nargs=2, metavar=("SECTION", "INDEX"), help="only log through one variant"
    )
    parser.add_argument("--fields", type=int, default=10, help="fields bound, with --one")
    parser.add_argument("--records", type=int, default=3000, help="records logged, with --one")
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.fields, args.records)
        return 0
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    if args.counts:
        counts = tuple(int(count) for count in args.counts.split(","))
        settings = dataclasses.replace(settings, field_counts=counts)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
