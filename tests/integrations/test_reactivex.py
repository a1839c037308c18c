"""reactivex: every action scheduled from a request runs in that request's context.

One scheduler of each kind is shared by 200 requests that interleave on it:
the thread-hopping ones (``EventLoopScheduler``, ``TimeoutScheduler``,
``NewThreadScheduler``, ``ThreadPoolScheduler``, ``AsyncIOThreadSafeScheduler``)
with the requests served by 16 threads, ``AsyncIOScheduler`` with the
requests as tasks of its loop.  Each request schedules a one-shot action, a
delayed one, a recursive one (the follow-up scheduled through the scheduler
the action was given), an ``observe_on`` pipeline and a periodic action run
three times; every action reports the request id it saw.  Each test runs
with :func:`install` and with :class:`RelayScheduler`, under
``ctxrelay.instrument()`` and without it.  The control tests show the hole
the hook closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import reactivex
from reactivex import abc
from reactivex import operators as ops
from reactivex.disposable import Disposable
from reactivex.scheduler import (
    EventLoopScheduler,
    HistoricalScheduler,
    NewThreadScheduler,
    ThreadPoolScheduler,
    TimeoutScheduler,
)
from reactivex.scheduler.eventloop import AsyncIOScheduler, AsyncIOThreadSafeScheduler
from reactivex.scheduler.scheduler import Scheduler

import ctxrelay
from ctxrelay.integrations import reactivex as rx_relay
from ctxrelay.integrations.reactivex import RelayScheduler

REQUESTS = 200
SERVER_THREADS = 16
PERIODIC_RUNS = 3
#: Actions each request schedules: one-shot, delayed, recursive (2), observe_on, periodic.
PER_REQUEST = 5 + PERIODIC_RUNS
WAIT = 60.0


# -- what the actions saw -------------------------------------------------------------
Seen = tuple[str | None, str | None, str | None, int]


@dataclass
class Probe:
    """``(request id expected, request id seen, user seen, thread)`` per action."""

    seen: list[Seen] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def record(self, expected: str | None) -> None:
        entry = (expected, ctxrelay.request_id(), ctxrelay.get("user"), threading.get_ident())
        with self.lock:
            self.seen.append(entry)
            self.lock.notify_all()

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + WAIT
        with self.lock:
            while len(self.seen) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.seen)} of {count} actions ran within {WAIT} s")
                self.lock.wait(left)

    def wrong(self) -> list[Seen]:
        """Actions that saw another request than their own, or its user."""
        with self.lock:
            return [e for e in self.seen if e[1] != e[0] or e[2] != expected_user(e[0])]


def user_of(rid: str) -> str:
    """The user each request binds along with its id."""
    return f"user-of-{rid}"


def expected_user(rid: str | None) -> str | None:
    return None if rid is None else user_of(rid)


def recorder(probe: Probe, rid: str | None) -> Callable[[abc.SchedulerBase, Any], None]:
    """A scheduled action that reports what it saw, expecting ``rid``."""

    def action(_: abc.SchedulerBase, __: Any = None) -> None:
        probe.record(rid)

    return action


def schedule_request_work(scheduler: Any, probe: Probe, rid: str) -> abc.DisposableBase:
    """What one request does, inside its own ``bind()``: each way an action
    reaches a scheduler.  Returns the periodic action's disposable."""

    def one_shot(_: abc.SchedulerBase, __: Any = None) -> None:
        probe.record(rid)

    def first(given: abc.SchedulerBase, __: Any = None) -> None:
        probe.record(rid)
        given.schedule(one_shot)  # recursive: through the scheduler the action was given

    def tick(count: Any) -> int:
        count = (count or 0) + 1
        if count <= PERIODIC_RUNS:
            probe.record(rid)
        if count >= PERIODIC_RUNS and periodic:
            periodic[0].dispose()  # from inside a run: no further run
        return int(count)

    periodic: list[abc.DisposableBase] = []
    scheduler.schedule(one_shot)
    scheduler.schedule_relative(0.002, one_shot)
    scheduler.schedule(first)
    reactivex.of(rid).pipe(ops.observe_on(scheduler)).subscribe(lambda _: probe.record(rid))
    # Every run in the capture of this call.
    periodic.append(scheduler.schedule_periodic(0.005, tick))
    return periodic[0]


# -- the ways of relaying, with and without instrument() ------------------------------
@pytest.fixture(params=["install", "RelayScheduler"])
def way(request: pytest.FixtureRequest) -> Iterator[Callable[[Any], abc.SchedulerBase]]:
    if request.param == "install":
        rx_relay.install()
        try:
            yield lambda scheduler: scheduler
        finally:
            rx_relay.uninstall()
    else:
        yield RelayScheduler


@pytest.fixture(params=[False, True], ids=["plain", "instrumented"])
def instrumented(request: pytest.FixtureRequest) -> Iterator[bool]:
    if request.param:
        ctxrelay.instrument()
    try:
        yield request.param
    finally:
        ctxrelay.uninstrument()


# -- the shared schedulers --------------------------------------------------------------
class Threads:
    """A reactivex ``thread_factory`` that keeps its threads, to join them."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def __call__(self, target: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=target, daemon=True)
        self.threads.append(thread)
        return thread

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in self.threads)


@dataclass
class Shared:
    scheduler: abc.SchedulerBase
    close: Callable[[], None]
    one_thread: bool = False  # every action runs on one thread


def _event_loop() -> Shared:
    threads = Threads()
    scheduler = EventLoopScheduler(thread_factory=threads)

    def close() -> None:
        scheduler.dispose()
        threads.join()

    return Shared(scheduler, close, one_thread=True)


def _timeout() -> Shared:
    def close() -> None:
        for thread in threading.enumerate():  # its timers are the standard Timer
            if isinstance(thread, threading.Timer):
                thread.join(WAIT)

    return Shared(TimeoutScheduler(), close)


def _new_thread() -> Shared:
    threads = Threads()
    return Shared(NewThreadScheduler(thread_factory=threads), threads.join)


def _thread_pool() -> Shared:
    scheduler = ThreadPoolScheduler(max_workers=8)
    return Shared(scheduler, lambda: scheduler.executor.shutdown(wait=True))


def _asyncio_threadsafe() -> Shared:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="rx-asyncio-loop", daemon=True)
    runner.start()

    def close() -> None:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(WAIT)
        loop.close()

    return Shared(AsyncIOThreadSafeScheduler(loop), close, one_thread=True)


KINDS: dict[str, Callable[[], Shared]] = {
    "EventLoopScheduler": _event_loop,
    "TimeoutScheduler": _timeout,
    "NewThreadScheduler": _new_thread,
    "ThreadPoolScheduler": _thread_pool,
    "AsyncIOThreadSafeScheduler": _asyncio_threadsafe,
}


# -- 200 requests on one shared scheduler ---------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_200_requests_on_one_shared_scheduler_each_action_sees_its_own_request(
    kind: str, way: Callable[[Any], abc.SchedulerBase], instrumented: bool
) -> None:
    shared = KINDS[kind]()
    scheduler = way(shared.scheduler)
    probe = Probe()
    rids = [f"req-{kind}-{n}" for n in range(REQUESTS)]
    start = threading.Barrier(SERVER_THREADS)

    def serve(rid: str) -> abc.DisposableBase:
        # A request on a server thread: the first SERVER_THREADS start together.
        if rid in rids[:SERVER_THREADS]:
            start.wait(WAIT)
        with ctxrelay.bind(request_id=rid, user=user_of(rid)):
            return schedule_request_work(scheduler, probe, rid)

    periodic: list[abc.DisposableBase] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(SERVER_THREADS) as server:
            periodic += server.map(serve, rids)
        probe.wait_for(REQUESTS * PER_REQUEST)
        # After every request: an action scheduled outside any request sees none.
        scheduler.schedule(recorder(probe, None))
        probe.wait_for(REQUESTS * PER_REQUEST + 1)
    finally:
        for disposable in periodic:
            disposable.dispose()
        shared.close()
    assert probe.wrong() == []
    assert sorted(e[0] for e in probe.seen if e[0]) == sorted(rids * PER_REQUEST)
    if shared.one_thread:  # it really was one shared thread
        assert len({e[3] for e in probe.seen}) == 1


def test_200_requests_on_one_shared_asyncio_scheduler(
    way: Callable[[Any], abc.SchedulerBase], instrumented: bool
) -> None:
    probe = Probe()
    rids = [f"req-asyncio-{n}" for n in range(REQUESTS)]

    async def main() -> None:
        scheduler = way(AsyncIOScheduler(asyncio.get_running_loop()))

        async def request(rid: str) -> abc.DisposableBase:
            await asyncio.sleep(0)  # every request under way before any schedules
            with ctxrelay.bind(request_id=rid, user=user_of(rid)):
                periodic = schedule_request_work(scheduler, probe, rid)
                await asyncio.sleep(0.001)  # the others run meanwhile
                return periodic

        periodic = await asyncio.gather(*(request(rid) for rid in rids))
        try:
            deadline = time.monotonic() + WAIT
            while len(probe.seen) < REQUESTS * PER_REQUEST and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            scheduler.schedule(recorder(probe, None))
            while len(probe.seen) <= REQUESTS * PER_REQUEST and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            for disposable in periodic:
                disposable.dispose()

    asyncio.run(main())
    assert probe.wrong() == []
    assert sorted(e[0] for e in probe.seen if e[0]) == sorted(rids * PER_REQUEST)
    assert probe.seen[-1][:3] == (None, None, None)


def test_virtual_time_actions_run_in_the_context_they_were_scheduled_in(
    way: Callable[[Any], abc.SchedulerBase],
) -> None:
    # HistoricalScheduler runs everything when the clock is advanced, in the
    # advancing caller's context: without the hook, all as that caller.
    clock = HistoricalScheduler()
    scheduler = way(clock)
    probe = Probe()
    rids = [f"req-virtual-{n}" for n in range(REQUESTS)]
    for n, rid in enumerate(rids):
        with ctxrelay.bind(request_id=rid, user=user_of(rid)):
            scheduler.schedule_relative(float(REQUESTS - n), recorder(probe, rid))
            periodic: Any = scheduler  # a periodic scheduler; abc.SchedulerBase does not say so
            periodic.schedule_periodic(REQUESTS / 4, lambda _, r=rid: probe.record(r))
    with ctxrelay.bind(request_id="req-the-advancer", user="the-advancer"):
        clock.advance_by(float(REQUESTS))
    assert len(probe.seen) == REQUESTS + 4 * REQUESTS
    assert probe.wrong() == []


# -- what else the hook promises ------------------------------------------------------
def test_a_leaky_action_leaves_nothing_on_the_shared_thread(
    way: Callable[[Any], abc.SchedulerBase],
) -> None:
    shared = _event_loop()
    scheduler = way(shared.scheduler)
    probe = Probe()

    def leaky(_: abc.SchedulerBase, __: Any = None) -> None:
        ctxrelay.bind(request_id="req-leaked").__enter__()  # never exited
        probe.record("req-leaked")

    try:
        with ctxrelay.bind(request_id="req-leaky", user=user_of("req-leaky")):
            scheduler.schedule(leaky)
        scheduler.schedule(recorder(probe, None))
        probe.wait_for(2)
    finally:
        shared.close()
    assert probe.seen[0][:3] == ("req-leaked", "req-leaked", user_of("req-leaky"))
    assert probe.seen[1][:3] == (None, None, None)


def test_each_periodic_run_gets_a_fresh_copy_of_the_capture(
    way: Callable[[Any], abc.SchedulerBase],
) -> None:
    shared = _event_loop()
    scheduler = way(shared.scheduler)
    seen: list[tuple[str | None, str | None]] = []
    done = threading.Event()

    def tick(count: Any) -> int:
        seen.append((ctxrelay.request_id(), ctxrelay.get("run")))
        ctxrelay.bind(run=str(count or 0)).__enter__()  # a run's change, never exited
        if len(seen) == 3:
            done.set()
        return int(count or 0) + 1

    try:
        with ctxrelay.bind(request_id="req-periodic"):
            periodic: Any = scheduler
            disposable = periodic.schedule_periodic(0.001, tick)
        assert done.wait(WAIT)
        disposable.dispose()
    finally:
        shared.close()
    assert seen[:3] == [("req-periodic", None)] * 3


def test_a_scheduler_thread_that_kept_the_first_request_runs_each_action_as_its_own() -> None:
    # The worst case: the application starts the scheduler's thread with a
    # relaying factory inside request 0, so the thread itself holds request
    # 0's context for its whole life.  The hook puts each action's own on top.
    threads: list[threading.Thread] = []

    def relaying(target: Callable[[], None]) -> threading.Thread:
        thread = ctxrelay.Thread(target=target, daemon=True)
        threads.append(thread)
        return thread

    def run(hooked: bool) -> list[tuple[str | None, str | None, str | None, int]]:
        scheduler = EventLoopScheduler(thread_factory=relaying)
        probe = Probe()
        if hooked:
            rx_relay.install()
        try:
            for n in range(3):
                with ctxrelay.bind(request_id=f"req-{n}", user=user_of(f"req-{n}")):
                    scheduler.schedule(recorder(probe, f"req-{n}"))
            scheduler.schedule(recorder(probe, None))
            probe.wait_for(4)
        finally:
            rx_relay.uninstall()
            scheduler.dispose()
            for thread in threads:
                thread.join(WAIT)
        return probe.seen

    bare = run(hooked=False)
    assert [seen for _, seen, _, _ in bare] == ["req-0"] * 4  # request 0, everywhere
    hooked = run(hooked=True)
    assert [(expected, seen) for expected, seen, _, _ in hooked] == [
        ("req-0", "req-0"),
        ("req-1", "req-1"),
        ("req-2", "req-2"),
        (None, None),
    ]


@pytest.mark.parametrize("kind", ["EventLoopScheduler", "TimeoutScheduler", "NewThreadScheduler"])
def test_without_the_hook_actions_lose_the_request(kind: str, instrumented: bool) -> None:
    # The hole: the scheduler's threads start empty (under instrument() by
    # the library rule), so every action runs as no one.
    shared = KINDS[kind]()
    probe = Probe()
    try:
        for n in range(5):
            with ctxrelay.bind(request_id=f"req-{n}"):
                shared.scheduler.schedule(recorder(probe, f"req-{n}"))
        probe.wait_for(5)
    finally:
        shared.close()
    assert {seen for _, seen, _, _ in probe.seen} == {None}


def test_relay_scheduler_relays_what_an_action_schedules_in_turn() -> None:
    # interval() schedules each tick from inside the previous one, through
    # the scheduler it was given: the RelayScheduler, not the inner one.
    shared = _event_loop()
    scheduler = RelayScheduler(shared.scheduler)
    seen: list[tuple[int, str | None]] = []
    done = threading.Event()
    try:
        with ctxrelay.bind(request_id="req-interval"):
            reactivex.interval(0.001, scheduler=scheduler).pipe(ops.take(5)).subscribe(
                lambda n: seen.append((n, ctxrelay.request_id())), on_completed=done.set
            )
        assert done.wait(WAIT)
    finally:
        shared.close()
    assert seen == [(n, "req-interval") for n in range(5)]


def test_relay_scheduler_delegates_time_and_attributes() -> None:
    clock = HistoricalScheduler()
    relay = RelayScheduler(clock)
    assert relay.now == clock.now
    assert relay.scheduler is clock
    assert relay.advance_by is not None  # the wrapped scheduler's own API
    assert repr(relay).startswith("RelayScheduler(")
    with pytest.raises(TypeError, match="reactivex scheduler"):
        RelayScheduler(object())  # type: ignore[arg-type]


def test_relay_scheduler_under_install_captures_once() -> None:
    rx_relay.install()
    shared = _event_loop()
    probe = Probe()
    try:
        scheduler = RelayScheduler(shared.scheduler)
        with ctxrelay.bind(request_id="req-both", user=user_of("req-both")):
            scheduler.schedule(recorder(probe, "req-both"))
        probe.wait_for(1)
    finally:
        rx_relay.uninstall()
        shared.close()
    assert probe.wrong() == []


# -- install / uninstall ---------------------------------------------------------------
def _scheduler_attributes() -> dict[tuple[type, str], object]:
    found: dict[tuple[type, str], object] = {}
    stack: list[type] = [Scheduler]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        for name in ("schedule", "schedule_relative", "schedule_absolute", "schedule_periodic"):
            if name in cls.__dict__:
                found[(cls, name)] = cls.__dict__[name]
    return found


def test_uninstall_undoes_install_exactly() -> None:
    before = _scheduler_attributes()
    rx_relay.install()
    rx_relay.install()  # idempotent
    assert rx_relay.installed()
    during = _scheduler_attributes()
    changed = {key for key in before if during[key] is not before[key]}
    assert (EventLoopScheduler, "schedule") in changed
    assert (TimeoutScheduler, "schedule_relative") in changed
    assert (AsyncIOScheduler, "schedule") in changed
    # The synchronous schedulers and RelayScheduler itself are left alone.
    assert not {cls.__name__ for cls, _ in changed} & {
        "ImmediateScheduler",
        "TrampolineScheduler",
        "RelayScheduler",
    }
    assert all(during[key].__wrapped__ is before[key] for key in changed)  # type: ignore[attr-defined]
    rx_relay.uninstall()
    assert not rx_relay.installed()
    after = _scheduler_attributes()
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    rx_relay.uninstall()  # a no-op


def test_install_again_patches_a_scheduler_class_defined_since() -> None:
    timers: list[threading.Timer] = []
    probe = Probe()
    rx_relay.install()
    try:

        class Later(TimeoutScheduler):  # defined after install()
            def schedule(self, action: Any, state: Any = None) -> abc.DisposableBase:
                # Does the work itself, without calling up to a patched method.
                timer = threading.Timer(0, self.invoke_action, (action, state))
                timers.append(timer)
                timer.start()
                return Disposable(timer.cancel)

        with ctxrelay.bind(request_id="req-before"):
            Later().schedule(recorder(probe, "req-before"))
        probe.wait_for(1)
        rx_relay.install()  # again: Later is patched now
        assert hasattr(Later.__dict__["schedule"], "__wrapped__")
        with ctxrelay.bind(request_id="req-later", user=user_of("req-later")):
            Later().schedule(recorder(probe, "req-later"))
        probe.wait_for(2)
    finally:
        rx_relay.uninstall()
        for timer in timers:
            timer.join(WAIT)
    assert probe.seen[0][:2] == ("req-before", None)  # not patched yet: lost
    assert probe.seen[1][:3] == ("req-later", "req-later", user_of("req-later"))
    assert not hasattr(Later.__dict__["schedule"], "__wrapped__")


def test_uninstall_leaves_a_patch_made_over_ours_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = EventLoopScheduler.__dict__["schedule"]
    rx_relay.install()
    ours = EventLoopScheduler.__dict__["schedule"]

    def theirs(self: Any, action: Any, state: Any = None) -> Any:
        return ours(self, action, state)

    EventLoopScheduler.schedule = theirs  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="ctxrelay"):
            rx_relay.uninstall()
        assert EventLoopScheduler.__dict__["schedule"] is theirs
        assert "EventLoopScheduler.schedule was patched again" in caplog.text
        assert TimeoutScheduler.__dict__["schedule"].__name__ == "schedule"
        assert not hasattr(TimeoutScheduler.__dict__["schedule"], "__wrapped__")
    finally:
        EventLoopScheduler.schedule = original  # type: ignore[method-assign]
