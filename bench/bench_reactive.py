"""What the reactivex hook costs per scheduled action, side by side with the bare scheduler.

Four variants, every action scheduled from inside the same bound context:

* **bare** -- the scheduler as reactivex ships it: the action sees nothing
  of the scheduler's caller (checked, in the "action sees" column);
* **by hand (floor)** -- ``scheduler.schedule(partial(copy_context().run,
  action))``: what wrapping every action yourself costs, the least any relay
  can;
* **``install()``** -- the scheduler classes patched
  (``ctxrelay.integrations.reactivex.install``), unchanged calling code;
* **``RelayScheduler``** -- the scheduler wrapped, nothing patched.

Two measurements, each printed as a Markdown table:

1. **Virtual time** -- a ``HistoricalScheduler``: schedule N actions, then
   advance the clock so they all run, on one thread.  No thread hand-off, so
   the hook's own cost shows; CPU time of the thread, split into the
   scheduling side and the running side.
2. **Shared ``EventLoopScheduler``** -- schedule N actions from the caller,
   wait for the last to run on the scheduler's thread: the way a request
   hands work to a shared scheduler.  CPU time of the whole process (both
   threads), so time other processes take does not count.

Variants are interleaved: each repetition runs one sample of each, in an
order rotated by one place per repetition (``harness.rotations``), so drift
on a shared machine hits all alike; ``install()`` is in effect only during
its own variant's samples.  Reported: the median ns per action, the
quartiles, and the overhead over bare -- the median over repetitions of
(variant - bare) in the same repetition.

Run: ``python bench/bench_reactive.py`` (about 20 s) or ``--quick``.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import functools
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from reactivex import abc
from reactivex.scheduler import EventLoopScheduler, HistoricalScheduler

import ctxrelay
from ctxrelay.integrations import reactivex as rx_relay
from ctxrelay.integrations.reactivex import RelayScheduler
from harness import markdown_table, rotations


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int  # interleaved repetitions per measurement
    actions: int  # actions per sample


FULL = Settings(reps=101, actions=2000)
QUICK = Settings(reps=3, actions=100)


def noop_action(_: abc.SchedulerBase, __: Any = None) -> None:
    """The action: nothing, so that only scheduling, the hand-off and the relay are timed."""


def _nothing() -> None:
    pass


Schedule = Callable[[Any], abc.DisposableBase]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of scheduling on a scheduler; ``enter``/``leave`` bracket each
    sample (``install()``, then ``uninstall()``)."""

    name: str
    wrap: Callable[[abc.SchedulerBase], abc.SchedulerBase]
    by_hand: bool = False
    enter: Callable[[], None] = _nothing
    leave: Callable[[], None] = _nothing

    def scheduling(self, scheduler: abc.SchedulerBase) -> Schedule:
        """``schedule(action)`` on ``scheduler`` the way this variant does."""
        target = self.wrap(scheduler)
        if self.by_hand:
            copy = contextvars.copy_context
            return lambda action: target.schedule(functools.partial(copy().run, action))
        return lambda action: target.schedule(action)


VARIANTS = [
    Variant("bare", lambda s: s),
    Variant("by hand: `partial(copy_context().run, action)` (floor)", lambda s: s, by_hand=True),
    Variant("`install()`", lambda s: s, enter=rx_relay.install, leave=rx_relay.uninstall),
    Variant("`RelayScheduler(scheduler)`", RelayScheduler),
]


@contextmanager
def _no_gc() -> Iterator[None]:
    """No collection inside a sample, as ``timeit`` does."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _sees(variant: Variant, scheduler: abc.SchedulerBase, run: Callable[[], None]) -> str:
    """Whether an action scheduled through ``variant`` on ``scheduler`` sees
    the caller's field; ``run`` makes it run (advances a clock, waits)."""
    seen: list[str | None] = []
    ran = threading.Event()

    def action(_: abc.SchedulerBase, __: Any = None) -> None:
        seen.append(ctxrelay.get("user"))
        ran.set()

    variant.enter()
    try:
        variant.scheduling(scheduler)(action)
        run()
        ran.wait(60)
    finally:
        variant.leave()
    return "ctxrelay" if seen == ["u"] else "nothing"


def _advance(clock: HistoricalScheduler) -> None:
    # From an empty context, as a test driver or another thread would: the
    # advancing caller's own context must not pass for a relay.
    contextvars.Context().run(clock.advance_by, 1.0)


# -- the measurements ---------------------------------------------------------------
def virtual_time(variant: Variant, actions: int) -> tuple[float, float]:
    """CPU seconds per action scheduling, then running, on a HistoricalScheduler."""
    clock = HistoricalScheduler()
    schedule = variant.scheduling(clock)
    with _no_gc():
        start = time.thread_time()
        for _ in range(actions):
            schedule(noop_action)
        scheduled = time.thread_time()
        clock.advance_by(1.0)
        ran = time.thread_time()
    return (scheduled - start) / actions, (ran - scheduled) / actions


def event_loop(variant: Variant, scheduler: EventLoopScheduler, actions: int) -> float:
    """CPU seconds (whole process) per action scheduled on a running
    EventLoopScheduler, up to the last one having run."""
    schedule = variant.scheduling(scheduler)
    done = threading.Event()
    with _no_gc():
        start = time.process_time()
        for _ in range(actions - 1):
            schedule(noop_action)
        schedule(lambda _, __=None: done.set())
        done.wait(60)
        end = time.process_time()
    return (end - start) / actions


def interleaved(measure: Callable[[Variant], float], reps: int) -> dict[str, list[float]]:
    """Per-variant samples: all variants once per repetition, order rotated."""
    samples: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    for order in rotations(VARIANTS, reps):
        for variant in order:
            variant.enter()
            try:
                samples[variant.name].append(measure(variant))
            finally:
                variant.leave()
    return samples


# -- statistics -----------------------------------------------------------------------
def _quartiles(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return q[0], q[2]


def _paired(samples: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """Median difference and median ratio to ``base``, per repetition."""
    pairs = list(zip(samples, base, strict=True))
    return statistics.median(s - b for s, b in pairs), statistics.median(s / b for s, b in pairs)


def table(samples: dict[str, list[float]], sees: dict[str, str]) -> str:
    bare = samples[VARIANTS[0].name]
    rows = []
    for variant in VARIANTS:
        mine = samples[variant.name]
        low, high = _quartiles(mine)
        over, ratio = _paired(mine, bare)
        rows.append(
            [
                variant.name,
                f"{statistics.median(mine) * 1e9:.0f}",
                f"{low * 1e9:.0f}-{high * 1e9:.0f}",
                f"{over * 1e9:+.0f}",
                f"{ratio:.2f}",
                sees[variant.name],
            ]
        )
    header = ["variant", "ns/action", "q1-q3", "ns vs bare", "x bare", "action sees"]
    return markdown_table(header, rows)


def split_table(parts: dict[str, list[tuple[float, float]]]) -> str:
    bare = parts[VARIANTS[0].name]
    rows = []
    for variant in VARIANTS:
        mine = parts[variant.name]
        scheduling = [s for s, _ in mine]
        running = [r for _, r in mine]
        rows.append(
            [
                variant.name,
                f"{statistics.median(scheduling) * 1e9:.0f}",
                f"{statistics.median(running) * 1e9:.0f}",
                f"{_paired(scheduling, [s for s, _ in bare])[0] * 1e9:+.0f}",
                f"{_paired(running, [r for _, r in bare])[0] * 1e9:+.0f}",
            ]
        )
    header = ["variant", "schedule ns", "run ns", "schedule vs bare", "run vs bare"]
    return markdown_table(header, rows)


def run(settings: Settings) -> None:
    print(
        f"Python {sys.version.split()[0]}; {settings.reps} interleaved repetitions "
        f"of {settings.actions} actions per variant and measurement\n",
        flush=True,
    )
    # Every action is scheduled from inside a request-like context.
    with ctxrelay.bind(request_id="bench-0001", user="u"):
        clock = HistoricalScheduler()
        sees = {v.name: _sees(v, clock, functools.partial(_advance, clock)) for v in VARIANTS}
        parts: dict[str, list[tuple[float, float]]] = {v.name: [] for v in VARIANTS}

        def virtual(variant: Variant) -> float:
            scheduling, running = virtual_time(variant, settings.actions)
            parts[variant.name].append((scheduling, running))
            return scheduling + running

        totals = interleaved(virtual, settings.reps)
        print(
            f"### Virtual time: `HistoricalScheduler`, schedule {settings.actions} actions, "
            "then advance the clock (one thread, CPU ns per action)\n"
        )
        print(table(totals, sees) + "\n")
        print("Where it goes, the same samples: CPU ns per action on each side\n")
        print(split_table(parts) + "\n", flush=True)

        schedulers = {variant.name: EventLoopScheduler() for variant in VARIANTS}
        try:
            for variant in VARIANTS:  # warm up: start each scheduler's thread
                variant.enter()
                try:
                    event_loop(variant, schedulers[variant.name], 10)
                finally:
                    variant.leave()
            sees = {v.name: _sees(v, schedulers[v.name], _nothing) for v in VARIANTS}
            shared = interleaved(
                lambda v: event_loop(v, schedulers[v.name], settings.actions), settings.reps
            )
        finally:
            for scheduler in schedulers.values():
                scheduler.dispose()
        print(
            f"### Shared `EventLoopScheduler`: schedule {settings.actions} actions, wait for "
            "the last (CPU ns per action, both threads)\n"
        )
        print(table(shared, sees), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the reactivex hook.")
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
