"""What the in-process relay costs, side by side with the alternatives.

Four measurements, each printed as a Markdown table:

1. **Round trip** -- ``pool.submit(noop).result()`` one task at a time, the
   way a request handler fans out and waits.  Waking a worker thread
   dominates, so a relay's cost mostly hides in the noise.
2. **Pipelined** -- submit 200 no-op tasks, then wait for all: the per-task
   cost where the relay's own work shows.
3. **Where it goes** -- CPU time per task on the submitting side (workers
   held) and on the running side, so a relay's cost can be located.
4. **Micro** -- ``current()``, ``get()``, ``bind()`` enter+exit, ``wrap``,
   and the ``contextvars`` operations they build on, with the cost of an empty
   loop subtracted.

The six pool variants (bare ``ThreadPoolExecutor``; bare plus
``copy_context().run`` by hand, the floor; ``ctxrelay.ThreadPoolExecutor``;
``ctxrelay.ContextExecutor``; a bare pool under ``ctxrelay.instrument()``; a
bare pool under OpenTelemetry's ``ThreadingInstrumentor``) all run in this one
process, each on its own pool of the same size, interleaved: every repetition
runs one short sample of each, in an order rotated by one place per
repetition, so drift on a shared machine hits all of them alike.  Samples are
short and repetitions many, because a pool with more threads than cores
switches between a fast and a slow regime from batch to batch (GIL hand-offs);
the ratios are medians of per-repetition ratios (variant / reference in the
same repetition), which that drift does not bias.

Run: ``python bench/bench_relay.py`` (70-90 s) or ``--quick`` (under 1 s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextvars
import dataclasses
import gc
import statistics
import sys
import threading
import timeit
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from time import perf_counter, process_time
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.instrumentation.threading import ThreadingInstrumentor

import ctxrelay
from ctxrelay._context import _CURRENT
from harness import markdown_table, rotations

Task = Callable[[], object]
Submit = Callable[[Task], "Future[Any]"]
T = TypeVar("T")

#: Tasks per pipelined batch (the issue's "submit 200, then wait for all").
BATCH = 200


def noop() -> None:
    """The task: nothing, so that only the hand-off and the relay are timed."""


def _nothing() -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int  # interleaved repetitions of the pool benchmarks
    round_trips: int  # tasks per round-trip sample
    batches: int  # pipelined batches of BATCH tasks per sample
    split_reps: int  # interleaved repetitions of the submit/run split
    split_tasks: int  # tasks per split sample
    micro_reps: int  # interleaved repetitions of the micro benchmarks
    micro_seconds: float  # duration of one micro sample
    workers: int  # threads per pool, the same for every variant


FULL = Settings(
    reps=1001,
    round_trips=100,
    batches=1,
    split_reps=201,
    split_tasks=1000,
    micro_reps=51,
    micro_seconds=0.02,
    workers=4,
)
QUICK = Settings(
    reps=5,
    round_trips=20,
    batches=1,
    split_reps=3,
    split_tasks=50,
    micro_reps=3,
    micro_seconds=0.001,
    workers=4,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of handing a task to a pool; ``enter``/``leave`` bracket each
    sample (patching the standard library, then undoing it)."""

    name: str
    submit: Submit
    enter: Callable[[], None] = _nothing
    leave: Callable[[], None] = _nothing


@contextmanager
def _variants(workers: int) -> Iterator[list[Variant]]:
    """The six variants, each on its own pool of ``workers`` threads.

    Every ``submit`` is a lambda, so the harness costs all variants the same
    and the instrumented ones look ``submit`` up on the (patched) class per
    call.  The first two are the references: bare, then the floor.
    """
    pools: list[concurrent.futures.ThreadPoolExecutor] = [
        concurrent.futures.ThreadPoolExecutor(workers) for _ in range(5)
    ]
    bare, floor, wrapped_pool, patched, otel_pool = pools
    relay = ctxrelay.ThreadPoolExecutor(workers)
    pools.append(relay)
    wrapped = ctxrelay.ContextExecutor(wrapped_pool)
    copy = contextvars.copy_context
    otel = ThreadingInstrumentor()
    variants = [
        Variant("bare `ThreadPoolExecutor`", lambda fn: bare.submit(fn)),
        Variant("bare + `copy_context().run` (floor)", lambda fn: floor.submit(copy().run, fn)),
        Variant("`ctxrelay.ThreadPoolExecutor`", lambda fn: relay.submit(fn)),
        Variant("`ctxrelay.ContextExecutor(bare)`", lambda fn: wrapped.submit(fn)),
        Variant(
            "bare under `ctxrelay.instrument()`",
            lambda fn: patched.submit(fn),
            ctxrelay.instrument,
            ctxrelay.uninstrument,
        ),
        Variant(
            "bare under OTel `ThreadingInstrumentor`",
            lambda fn: otel_pool.submit(fn),
            otel.instrument,
            otel.uninstrument,
        ),
    ]
    try:
        yield variants
    finally:
        for pool in pools:
            pool.shutdown()


def _relays(variant: Variant) -> str:
    """Which of the submitter's context variables a task sees: ctxrelay's
    field, and an OpenTelemetry context value."""
    variant.enter()
    try:
        token = otel_context.attach(otel_context.set_value("bench", "v"))
        try:
            seen = variant.submit(_what_task_sees).result()
        finally:
            otel_context.detach(token)
    finally:
        variant.leave()
    return ", ".join(seen) or "nothing"


def _what_task_sees() -> list[str]:
    seen = ["ctxrelay"] if ctxrelay.get("user") == "u" else []
    if otel_context.get_value("bench") == "v":
        seen.append("OTel")
    return seen


# -- timing ---------------------------------------------------------------------
@contextmanager
def _no_gc() -> Iterator[None]:
    """No collection inside a sample, as ``timeit`` does."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def round_trip(submit: Submit, tasks: int) -> float:
    """Seconds per ``submit(noop).result()``, one task at a time."""
    with _no_gc():
        start = perf_counter()
        for _ in range(tasks):
            submit(noop).result()
        return (perf_counter() - start) / tasks


def pipelined(submit: Submit, batches: int) -> float:
    """Seconds per task when submitting BATCH tasks, then waiting for all."""
    with _no_gc():
        start = perf_counter()
        for _ in range(batches):
            futures = [submit(noop) for _ in range(BATCH)]
            for future in futures:
                future.result()
        return (perf_counter() - start) / (batches * BATCH)


def split(submit: Submit, tasks: int, workers: int) -> tuple[float, float]:
    """CPU seconds per task spent submitting, then running, with the two apart.

    Every worker is held while ``tasks`` tasks are submitted, so the
    submitting side is timed alone; then the workers drain the queue.  CPU
    time of the whole process, not wall time: time other processes take
    from this one does not count.
    """
    started, gate = threading.Semaphore(0), threading.Event()

    def hold() -> None:
        started.release()
        gate.wait()

    held = [submit(hold) for _ in range(workers)]
    for _ in range(workers):
        started.acquire()
    try:
        with _no_gc():
            start = process_time()
            futures = [submit(noop) for _ in range(tasks)]
            submitted = process_time()
            gate.set()
            for future in futures:
                future.result()
            ran = process_time()
    finally:
        gate.set()
        for future in held:
            future.result()
    return (submitted - start) / tasks, (ran - submitted) / tasks


def interleaved(
    variants: Sequence[Variant], measure: Callable[[Submit], T], reps: int
) -> dict[str, list[T]]:
    """Per-variant samples: all variants once per repetition, order rotated."""
    samples: dict[str, list[T]] = {v.name: [] for v in variants}
    for order in rotations(variants, reps):
        for variant in order:
            variant.enter()
            try:
                samples[variant.name].append(measure(variant.submit))
            finally:
                variant.leave()
    return samples


# -- statistics -------------------------------------------------------------------
def paired_ratio(samples: Sequence[float], base: Sequence[float]) -> float:
    """Median of per-repetition ratios: drift between repetitions cancels."""
    return statistics.median(s / b for s, b in zip(samples, base, strict=True))


def paired_difference(samples: Sequence[float], base: Sequence[float]) -> float:
    """Median of per-repetition differences."""
    return statistics.median(s - b for s, b in zip(samples, base, strict=True))


def _quartiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def pool_table(
    samples: dict[str, list[float]], variants: Sequence[Variant], sees: dict[str, str]
) -> str:
    """Median us/task, spread, ratio to bare and to the floor, per variant."""
    bare, floor = samples[variants[0].name], samples[variants[1].name]
    rows = []
    for variant in variants:
        mine = samples[variant.name]
        low, high = _quartiles(mine)
        rows.append(
            [
                variant.name,
                f"{statistics.median(mine) * 1e6:.2f}",
                f"{low * 1e6:.2f}-{high * 1e6:.2f}",
                f"{paired_ratio(mine, bare):.3f}",
                f"{paired_ratio(mine, floor):.3f}",
                f"{paired_difference(mine, floor) * 1e9:+.0f}",
                sees[variant.name],
            ]
        )
    header = ["variant", "us/task", "q1-q3", "x bare", "x floor", "ns vs floor", "task sees"]
    return markdown_table(header, rows)


def split_table(samples: dict[str, list[tuple[float, float]]], variants: Sequence[Variant]) -> str:
    """Median CPU ns per task on each side, and each side's excess over the floor."""
    floor = samples[variants[1].name]
    floor_submit, floor_run = [s for s, _ in floor], [r for _, r in floor]
    floor_total = [s + r for s, r in floor]
    rows = []
    for variant in variants:
        mine = samples[variant.name]
        submit, ran, total = [s for s, _ in mine], [r for _, r in mine], [s + r for s, r in mine]
        rows.append(
            [
                variant.name,
                f"{statistics.median(submit) * 1e9:.0f}",
                f"{statistics.median(ran) * 1e9:.0f}",
                f"{paired_difference(submit, floor_submit) * 1e9:+.0f}",
                f"{paired_difference(ran, floor_run) * 1e9:+.0f}",
                f"{paired_ratio(total, floor_total):.3f}",
            ]
        )
    header = ["variant", "submit ns", "run ns", "submit vs floor", "run vs floor", "x floor"]
    return markdown_table(header, rows)


# -- micro benchmarks ---------------------------------------------------------------
#: (label, statement, target in ns or None); the first is the loop baseline.
MICRO: list[tuple[str, str, float | None]] = [
    ("empty loop (baseline, subtracted)", "pass", None),
    ("`noop()` (reference: a Python call)", "noop()", None),
    ("`ContextVar.get()` (reference)", "var_get()", None),
    ("`ctxrelay.current()`", "current()", 100),
    ('`ctxrelay.get("user")`', "get('user')", None),
    ('`with ctxrelay.bind(user="u"): pass`', "with bind(user='u'):\n    pass", 2000),
    ("`copy_context()` (reference)", "copy_context()", None),
    ("`copy_context().run(noop)` (reference)", "copy_context().run(noop)", None),
    ("`wrapped()` (call a `wrap`ped noop)", "wrapped()", None),
    ("`wrap(noop)()` (capture + call)", "wrap(noop)()", None),
]


def _micro_namespace() -> dict[str, Any]:
    return {
        "noop": noop,
        "var_get": _CURRENT.get,
        "current": ctxrelay.current,
        "get": ctxrelay.get,
        "bind": ctxrelay.bind,
        "copy_context": contextvars.copy_context,
        "wrap": ctxrelay.wrap,
        "wrapped": ctxrelay.wrap(noop),
    }


def _calibrate(timer: timeit.Timer, seconds: float) -> int:
    """Iterations for one sample of about ``seconds``."""
    number = 100
    while (elapsed := timer.timeit(number)) < 0.001:
        number *= 10
    return max(100, int(number * seconds / elapsed))


def micro(settings: Settings) -> dict[str, list[float]]:
    """Seconds per operation for each MICRO row, empty loop subtracted."""
    namespace = _micro_namespace()
    timers = {label: timeit.Timer(stmt, globals=namespace) for label, stmt, _ in MICRO}
    numbers = {label: _calibrate(timer, settings.micro_seconds) for label, timer in timers.items()}
    raw: dict[str, list[float]] = {label: [] for label in timers}
    for order in rotations(list(timers), settings.micro_reps):
        for label in order:
            raw[label].append(timers[label].timeit(numbers[label]) / numbers[label])
    baseline = raw[MICRO[0][0]]
    return {
        label: [s - b for s, b in zip(samples, baseline, strict=True)]
        for label, samples in raw.items()
    }


def micro_table(samples: dict[str, list[float]]) -> str:
    rows = []
    for label, _stmt, target in MICRO[1:]:
        median_ns = statistics.median(samples[label]) * 1e9
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.0f} ns: {'meets' if median_ns <= target else 'MISSES'}"
        rows.append([label, f"{median_ns:.0f}", verdict])
    return markdown_table(["operation", "ns/op", "target"], rows)


# -- report -------------------------------------------------------------------------
def targets_table(
    trips: dict[str, list[float]], batches: dict[str, list[float]], variants: Sequence[Variant]
) -> str:
    """ctxrelay against its target (within 5% of the floor, both modes), and
    the measured references against ANCHORS.md's figures."""
    bare, floor, otel = variants[0].name, variants[1].name, variants[5].name
    rows = []
    for mode, samples in (("round trip", trips), ("pipelined", batches)):
        for variant in variants[2:5]:
            ratio = paired_ratio(samples[variant.name], samples[floor])
            verdict = "meets" if ratio <= 1.05 else "MISSES"
            rows.append([f"{mode}: {variant.name} x floor", "<= 1.050", f"{ratio:.3f} {verdict}"])
    rows += [
        ["round trip: bare us/task", "18-36", f"{statistics.median(trips[bare]) * 1e6:.1f}"],
        ["pipelined: bare us/task", "17-20", f"{statistics.median(batches[bare]) * 1e6:.1f}"],
        [
            "pipelined: floor x bare",
            "1.05-1.10",
            f"{paired_ratio(batches[floor], batches[bare]):.3f}",
        ],
        [
            "pipelined: OTel x bare",
            "1.40-1.60",
            f"{paired_ratio(batches[otel], batches[bare]):.3f}",
        ],
    ]
    return markdown_table(["figure", "target / anchor", "measured"], rows)


def run(settings: Settings) -> None:
    """Measure everything and print the tables."""
    print(
        f"Python {sys.version.split()[0]}; {settings.workers} workers per pool; "
        f"{settings.reps} interleaved repetitions per pool variant "
        f"(round trip: {settings.round_trips} tasks/sample; pipelined: "
        f"{settings.batches} x {BATCH} tasks/sample); split: {settings.split_reps} "
        f"repetitions of {settings.split_tasks} tasks; micro: {settings.micro_reps} "
        f"repetitions of ~{settings.micro_seconds * 1e3:g} ms\n",
        flush=True,
    )
    # Every task is submitted from inside a request-like context.
    with ctxrelay.bind(request_id="bench-0001", user="u"), _variants(settings.workers) as variants:
        for variant in variants:  # warm up: start every worker thread
            variant.enter()
            try:
                pipelined(variant.submit, 2)
            finally:
                variant.leave()
        sees = {variant.name: _relays(variant) for variant in variants}
        trips = interleaved(variants, lambda s: round_trip(s, settings.round_trips), settings.reps)
        print("### Round trip: `submit(noop).result()`, one task at a time\n")
        print(pool_table(trips, variants, sees) + "\n", flush=True)
        batches = interleaved(variants, lambda s: pipelined(s, settings.batches), settings.reps)
        print(f"### Pipelined: submit {BATCH} no-op tasks, then wait for all\n")
        print(pool_table(batches, variants, sees) + "\n", flush=True)
        parts = interleaved(
            variants,
            lambda s: split(s, settings.split_tasks, settings.workers),
            settings.split_reps,
        )
        print(
            f"### Where it goes: CPU ns per task, submitting {settings.split_tasks} "
            "with the workers held, then running them\n"
        )
        print(split_table(parts, variants) + "\n", flush=True)
        print("### Micro: median ns per operation, empty-loop cost subtracted\n")
        print(micro_table(micro(settings)) + "\n", flush=True)
        print("### Targets (ctxrelay) and anchors (ANCHORS.md), medians of paired ratios\n")
        print(targets_table(trips, batches, variants), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the in-process relay.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="repetitions per pool variant")
    parser.add_argument("--workers", type=int, help="threads per pool (default 4)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    if args.workers:
        settings = dataclasses.replace(settings, workers=args.workers)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
