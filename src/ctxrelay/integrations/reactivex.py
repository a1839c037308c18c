"""reactivex (RxPY 4+): every scheduled action runs in the context of whoever scheduled it.

A reactivex scheduler runs an action wherever and whenever it likes: on its
own thread (``EventLoopScheduler``), on a timer thread (``TimeoutScheduler``),
on a new thread or a pool thread (``NewThreadScheduler``,
``ThreadPoolScheduler``), on an event loop (``AsyncIOScheduler``), or when a
test clock is advanced (``HistoricalScheduler``).  The action then sees
whatever context that thread has: nothing at all (the request's fields are
lost), or -- one ``EventLoopScheduler`` shared by every request -- whatever
the thread happened to start with.  RxJava closed this with
``RxJavaHooks.setOnScheduleAction``; this module is that hook:

* :func:`install` patches reactivex's scheduler classes once, so that every
  ``schedule``, ``schedule_relative``, ``schedule_absolute`` and
  ``schedule_periodic`` call captures the caller's context, and the action
  runs in it (:func:`uninstall` puts the classes back exactly);
* :class:`RelayScheduler` wraps one scheduler -- any ``SchedulerBase``,
  a third-party one too -- to the same effect, without patching anything.

The rule is ``ctxrelay.wrap()``'s: capture at hand-off (the schedule call),
never at thread creation; a one-shot action runs in its capture, restored
afterwards, so the scheduler's thread goes back to what it had; each run of
a periodic action runs in its own copy of the capture taken when it was
scheduled, so one run's changes never reach the next.  Example::

    import ctxrelay
    from reactivex.scheduler import EventLoopScheduler
    from ctxrelay.integrations import reactivex as rx_relay

    rx_relay.install()                      # once, at start-up
    shared = EventLoopScheduler()
    with ctxrelay.bind(request_id="r-1"):
        shared.schedule(lambda scheduler, state: print(ctxrelay.request_id()))  # r-1

The synchronous schedulers (``ImmediateScheduler``, ``CurrentThreadScheduler``,
``TrampolineScheduler``) are left alone: they run an action on the calling
thread before the scheduling call returns (or within the trampoline that
call joined), inside the caller's own context already.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Final, TypeVar

try:
    import reactivex.scheduler
    from reactivex import abc, typing
    from reactivex.scheduler.periodicscheduler import PeriodicScheduler
    from reactivex.scheduler.scheduler import Scheduler
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.reactivex needs reactivex: pip install 'ctxrelay[reactivex]'"
    ) from _exc

from .._context import capture

__all__ = ["RelayScheduler", "install", "installed", "uninstall"]

_log = logging.getLogger("ctxrelay")
# A hand-off's capture: copy_context(), with a request's context frozen as
# it reads now (work scheduled before a bind_request() keeps what it had).
_copy_context: Final = capture
_TState = TypeVar("_TState")


#: A relayed one-shot action is ``partial(captured.run, action)``: called by
#: the scheduler as ``action(scheduler, state)``, it runs
#: ``captured.run(action, scheduler, state)`` -- C-level calls, so the cost per
#: action is the floor (``copy_context()`` when scheduled, ``run`` when run).
#: A plain ``partial``, not a subclass: a subclass loses ``partial``'s fast
#: call path and costs 130 ns more per action.
_partial: Final = functools.partial
_Context: Final = contextvars.Context


def _is_relayed(action: Any) -> bool:
    """Whether ``action`` already runs in a captured context: relayed by an
    outer layer of the same schedule call (``EventLoopScheduler.schedule``
    calls ``schedule_absolute``; ``NewThreadScheduler`` hands the action to
    an ``EventLoopScheduler``), by a ``RelayScheduler``, or by hand
    (``partial(copy_context().run, action)``).  It passes through: captured
    once, and a capture the caller chose is kept."""
    return type(action) is _partial and type(getattr(action.func, "__self__", None)) is _Context


class _Periodic:
    """A periodic action: each run in its own copy of the capture.

    A periodic action runs again and again, from the scheduler's thread or a
    timer's: one run's changes to the context (a ``bind()`` left open, another
    library's variable) must not reach the next run, and two runs must never
    enter one ``contextvars.Context`` at once (``RuntimeError``).
    """

    __slots__ = ("action", "captured")

    def __init__(self, action: Callable[[Any], Any], captured: contextvars.Context) -> None:
        self.action = action
        self.captured = captured

    def __call__(self, state: Any = None) -> Any:
        return self.captured.copy().run(self.action, state)


def _relayed_periodic(action: Any) -> Any:
    if type(action) is _Periodic:
        return action
    return _Periodic(action, _copy_context())


# -- install / uninstall --------------------------------------------------------
#: The scheduling methods: ``schedule(action, state)``, the others
#: ``(time, action, state)``; ``schedule_periodic``'s action is ``action(state)``.
_METHODS: Final = ("schedule", "schedule_relative", "schedule_absolute", "schedule_periodic")

_lock = threading.Lock()
# (class, method name, the attribute before we patched, our patch)
_patches: list[tuple[type, str, Any, Any]] = []


def _bound(previous: Any) -> Callable[..., Any]:
    """``previous`` as a plain function of ``(self, ...)``."""
    if isinstance(previous, types.FunctionType):
        return previous  # the usual case: no descriptor call per action

    def call(self: Any, *args: Any) -> Any:
        # Another library's wrapper object: bind it as Python would.
        return previous.__get__(self, type(self))(*args)

    return call


def _patch(previous: Any, name: str) -> Callable[..., Any]:
    original = _bound(previous)
    # The relay is inlined, not a helper call: it runs once per layer of
    # every schedule call (EventLoopScheduler.schedule goes through two:
    # schedule -> schedule_absolute), an action already relayed by an outer
    # layer passing through.
    if name == "schedule":

        def schedule(self: Any, action: Any, state: Any = None) -> Any:
            if type(action) is not _partial or not _is_relayed(action):
                action = _partial(_copy_context().run, action)
            return original(self, action, state)

        return schedule
    if name == "schedule_periodic":

        def schedule_periodic(self: Any, period: Any, action: Any, state: Any = None) -> Any:
            return original(self, period, _relayed_periodic(action), state)

        return schedule_periodic

    def schedule_at(self: Any, duetime: Any, action: Any, state: Any = None) -> Any:
        if type(action) is not _partial or not _is_relayed(action):
            action = _partial(_copy_context().run, action)
        return original(self, duetime, action, state)

    return schedule_at


def _synchronous() -> tuple[type, ...]:
    """Schedulers that run an action on the calling thread, inside the
    scheduling call (or the trampoline it joined): already in its context."""
    return (reactivex.scheduler.ImmediateScheduler, reactivex.scheduler.TrampolineScheduler)


def _scheduler_classes() -> Iterator[type]:
    """Every subclass of reactivex's ``Scheduler`` defined so far, the
    event-loop and main-loop ones included (their modules import their
    frameworks lazily, so importing them here costs nothing and needs none)."""
    import reactivex.scheduler.eventloop
    import reactivex.scheduler.mainloop  # noqa: F401  # defines the main-loop schedulers

    seen: set[type] = set()
    stack: list[type] = [Scheduler]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        if issubclass(cls, (*_synchronous(), RelayScheduler)):
            continue
        yield cls


def install() -> None:
    """Make every reactivex scheduler run each action in the context of
    the code that scheduled it.

    Patches, on every subclass of reactivex's ``Scheduler`` that defines them
    (``EventLoopScheduler``, ``TimeoutScheduler``, ``NewThreadScheduler``,
    ``ThreadPoolScheduler``, ``AsyncIOScheduler``,
    ``AsyncIOThreadSafeScheduler``, ``HistoricalScheduler``/
    ``VirtualTimeScheduler``, ``CatchScheduler``, the event-loop and
    main-loop ones), the methods ``schedule``, ``schedule_relative``,
    ``schedule_absolute`` and ``schedule_periodic``; the synchronous
    schedulers are left alone (see the module's docstring).  Idempotent and
    thread-safe; a scheduler class defined after the call is patched by
    calling it again (or wrap its instances in :class:`RelayScheduler`).
    Undo with :func:`uninstall`.
    """
    with _lock:
        done = {(owner, name) for owner, name, _, _ in _patches}
        for cls in _scheduler_classes():
            for name in _METHODS:
                previous = cls.__dict__.get(name)
                if (
                    previous is None
                    or (cls, name) in done
                    or getattr(previous, "__isabstractmethod__", False)
                ):
                    continue
                patch = _patch(previous, name)
                patch.__wrapped__ = previous  # type: ignore[attr-defined]
                patch.__name__ = name
                patch.__qualname__ = f"{cls.__qualname__}.{name}"
                patch.__doc__ = getattr(previous, "__doc__", None)
                setattr(cls, name, patch)
                _patches.append((cls, name, previous, patch))


def uninstall() -> None:
    """Undo :func:`install` exactly; a no-op when not installed.

    Actions scheduled before keep the context they captured.  A method that
    another library patched over ours since is left in place (restoring ours'
    original would drop its patch), with a warning on the ``ctxrelay``
    logger.
    """
    with _lock:
        while _patches:
            owner, name, previous, patch = _patches.pop()
            if owner.__dict__.get(name) is not patch:
                _log.warning(
                    "ctxrelay: %s.%s was patched again after install(); leaving it",
                    owner.__qualname__,
                    name,
                )
                continue
            setattr(owner, name, previous)


def installed() -> bool:
    """True while :func:`install` is in effect."""
    return bool(_patches)


# -- RelayScheduler -------------------------------------------------------------
def _with(relay: abc.SchedulerBase, action: Any, _inner: Any, state: Any) -> Any:
    # The action gets the relaying scheduler, not the inner one: what it
    # schedules from inside itself (recursive scheduling, a repeat, the next
    # item of an interval) goes through the relay too.
    return action(relay, state)


class RelayScheduler(PeriodicScheduler):
    """Wraps any reactivex scheduler: every action scheduled through it runs
    in the context of the code that scheduled it.

    ``RelayScheduler(EventLoopScheduler())`` can be shared by every request;
    pass it wherever a scheduler goes (``ops.observe_on(...)``,
    ``reactivex.interval(1.0, scheduler=...)``, ``subscribe(scheduler=...)``).
    Actions receive the ``RelayScheduler`` as their scheduler, so what they
    schedule in turn is relayed as well.  ``now``, ``dispose()`` and any
    other attribute are the wrapped scheduler's.  Needs no :func:`install`,
    and works under it (the capture is taken once).
    """

    def __init__(self, scheduler: abc.SchedulerBase) -> None:
        if not isinstance(scheduler, abc.SchedulerBase):
            raise TypeError(f"RelayScheduler wraps a reactivex scheduler, not {scheduler!r}")
        super().__init__()
        self.scheduler = scheduler

    def _relay(self, action: Any) -> Any:
        if _is_relayed(action):
            return action
        # mypy's partial plugin wants _with's last two arguments here; the
        # scheduler passes them, (scheduler, state), when it runs the action.
        run: Callable[..., Any] = _copy_context().run
        return _partial(run, _with, self, action)

    @property
    def now(self) -> datetime:
        """The wrapped scheduler's notion of time."""
        return self.scheduler.now

    def schedule(
        self, action: abc.ScheduledAction[_TState], state: _TState | None = None
    ) -> abc.DisposableBase:
        """Schedule ``action`` on the wrapped scheduler, in the caller's context."""
        return self.scheduler.schedule(self._relay(action), state)

    def schedule_relative(
        self,
        duetime: typing.RelativeTime,
        action: abc.ScheduledAction[_TState],
        state: _TState | None = None,
    ) -> abc.DisposableBase:
        """Schedule ``action`` after ``duetime``, in the caller's context."""
        return self.scheduler.schedule_relative(duetime, self._relay(action), state)

    def schedule_absolute(
        self,
        duetime: typing.AbsoluteTime,
        action: abc.ScheduledAction[_TState],
        state: _TState | None = None,
    ) -> abc.DisposableBase:
        """Schedule ``action`` at ``duetime``, in the caller's context."""
        return self.scheduler.schedule_absolute(duetime, self._relay(action), state)

    def schedule_periodic(
        self,
        period: typing.RelativeTime,
        action: typing.ScheduledPeriodicAction[_TState],
        state: _TState | None = None,
    ) -> abc.DisposableBase:
        """Run ``action`` every ``period``, each run in its own copy of the
        caller's context (the wrapped scheduler's own periodic scheduling
        when it has one)."""
        inner = getattr(self.scheduler, "schedule_periodic", None)
        if inner is None:
            # Through our schedule_relative: every run relayed.
            return super().schedule_periodic(period, action, state)
        disposable: abc.DisposableBase = inner(period, _relayed_periodic(action), state)
        return disposable

    def dispose(self) -> None:
        """Dispose of the wrapped scheduler, if it can be (``EventLoopScheduler``)."""
        dispose = getattr(self.scheduler, "dispose", None)
        if dispose is not None:
            dispose()

    def __getattr__(self, name: str) -> Any:
        # Only called for what the wrapper lacks: the wrapped scheduler's own
        # attributes (an executor, a loop) stay reachable.
        if name == "scheduler":  # not set yet (unpickling, a failed __init__)
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"RelayScheduler({self.scheduler!r})"
