"""Capture -> replay -> restore, in process: wrappers, executors, threads.

The protocol (Alibaba TTL's ``Transmitter.capture/replay/restore``) maps onto
``contextvars`` directly:

* **capture** is ``contextvars.copy_context()`` at hand-off time (``submit``,
  ``map``, ``start``, the decorated call) -- never at thread creation, so a
  pooled thread never keeps the context of whoever created it (seed 001);
* **replay** is ``captured.run(task)``: the task sees exactly the captured
  variables -- all of them, ours, OpenTelemetry's, structlog's -- and nothing
  else, so values that were not captured cannot survive on a pooled thread
  (Micrometer's ``clearMissing=false`` hole, micrometer-tracing #363);
* **restore** is ``run`` returning: CPython puts the thread's previous context
  back whatever the task did (returned, raised, was cancelled, ran on the
  submitting thread itself).

Each submission gets its own copy, because one ``contextvars.Context`` cannot
be entered by two threads at once.  Across processes a ``Context`` object
cannot be pickled, so process pools carry the ctxrelay ``Context`` (fields
and request snapshot), validated again on arrival.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import concurrent.futures.thread
import contextlib
import contextvars
import functools
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from . import _strict
from ._context import (
    DETACHED,
    Context,
    capture,
    current,
    enter,
    raw_current,
    root_of,
)
from ._cpython import (
    STDLIB_SUBMIT,
    THREAD_TAKES_CONTEXT,
    THREADS_INHERIT_CONTEXT,
    make_relaying_submit,
    swap_done_callbacks,
)
from ._deadline import expired, run_unless_expired
from ._lifetime import started_by_library

__all__ = [
    "ContextExecutor",
    "ProcessPoolExecutor",
    "Thread",
    "ThreadPoolExecutor",
    "Timer",
    "fork_clean",
    "new_relaying_submit",
    "observe_start",
    "observed",
    "prepare_start",
    "relay_callbacks",
    "relayed_task",
    "run_async",
    "unprepare",
    "wrap",
]

_log = logging.getLogger("ctxrelay")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_copy_context = contextvars.copy_context


class _Task(functools.partial[Any]):
    """``partial(captured.run, fn)``: run ``fn`` inside one captured context.

    A C-level ``partial`` keeps the per-task cost at the floor
    (``copy_context().run``); the subclass marks a callable that is already
    relayed, so a second layer (``instrument()`` under a ctxrelay executor)
    passes it through instead of capturing again.
    """

    __slots__ = ()


def _task(fn: Callable[..., Any]) -> Callable[..., Any]:
    if type(fn) is _Task:
        return fn
    special = _prepare()
    if special is None:
        return _Task(_copy_context().run, fn)
    run, bound = special
    if bound is not None:
        # Work with a deadline is not started once it passed (or once its
        # request was cancelled): its future fails with that instead.
        return _Task(run, run_unless_expired, fn)
    return _Task(run, fn)


def _prepare() -> tuple[Callable[..., Any], Context | None] | None:
    """For a hand-off from a request or from work with a deadline: the
    capture's ``run`` (the request's context frozen as it reads now, see
    ``capture``) and the context whose deadline and cancellation the work
    must honour when it starts (or None).  None for everything else: a
    plain ``copy_context()`` then captures it as it is."""
    ctx = raw_current()
    if ctx._scope is None:
        if ctx._deadline is None and ctx._cancel is None:
            return None
        # Work with a deadline outside a request scope: the plain copy is
        # the capture (capture() would only add a frame to find that out).
        return _copy_context().run, ctx
    bounded = ctx._deadline is not None or ctx._cancel is not None
    return capture().run, ctx if bounded else None


def _bounded() -> bool:
    """Whether the current work has a deadline or a cancellation to honour."""
    ctx = raw_current()
    return ctx._deadline is not None or ctx._cancel is not None


class _ProcessTask:
    """Carries the ctxrelay ``Context`` to another process and binds it there.

    The task runs in a fresh copy of the worker's context, so nothing it sets
    (ours or any other variable) survives into the next task the worker runs.
    """

    __slots__ = ("context", "fn")

    def __init__(self, context: Context, fn: Callable[..., Any]) -> None:
        self.context = context
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _copy_context().run(_bound_call, self.context, self.fn, args, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ProcessTask, (self.context, self.fn))


def _bound_call(
    context: Context, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Inside a throw-away copy of the context: no token to reset.
    if not isinstance(context, Context):  # a forged pickle; Context unpickling validates fields
        _log.warning("ctxrelay: a process task arrived without a valid Context; running without")
        context = Context()
    enter(context)
    return run_unless_expired(fn, *args, **kwargs)


def relayed_task(executor: Executor, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Capture now; return ``fn`` wrapped to run in the capture on ``executor``.

    Process pools get the ctxrelay ``Context`` (picklable); everything else
    gets a copy of all context variables.
    """
    if ships_to_processes(executor):
        if isinstance(fn, _ProcessTask):
            return fn
        return _ProcessTask(current(), fn)
    return _task(fn)


def ships_to_processes(executor: Executor) -> bool:
    """True when ``executor`` pickles its tasks to other processes.

    A ``ContextExecutor`` over a process pool does too: a ``contextvars``
    capture handed to it could not be pickled on the way.
    """
    return isinstance(executor, concurrent.futures.ProcessPoolExecutor) or (
        isinstance(executor, ContextExecutor) and executor._process
    )


def fork_clean(submit: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Call a process pool's ``submit``/``map`` from an empty context.

    They may fork the worker processes, and a forked child keeps the forking
    thread's context for its whole life: every later task in that worker
    would see the request that happened to fork it -- seed 001's stale
    context, across processes.
    """
    return contextvars.Context().run(submit, *args, **kwargs)


class _RelayCallbacks(list[Any]):
    """A future's done-callback list that captures the context of each append.

    ``Future.add_done_callback`` appends to ``future._done_callbacks`` (a
    plain list since Python 3.2) and ``_invoke_callbacks`` iterates it on the
    completing thread.  Swapping that one list keeps the future a plain
    ``Future``: re-labelling it as a subclass instead (``__class__ = ...``)
    de-optimises every attribute access of its life and cost ~20% per task.
    """

    __slots__ = ()

    def append(self, fn: Any) -> None:
        list.append(self, _task(fn))


class _RelayFuture(Future[Any]):
    """A future created by ctxrelay: done-callbacks run in the context
    current when they were added (created as such, never re-labelled)."""

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        super().add_done_callback(_task(fn))


def relay_callbacks(future: Future[T]) -> Future[T]:
    """Make ``future``'s done-callbacks run in the context current when added.

    A callback added after the future is done runs at once, in the caller's
    context, which is already right.
    """
    if swap_done_callbacks(future, _RelayCallbacks):
        return future
    # The fallback, where a future keeps its callbacks some other way: a
    # ctxrelay future that mirrors it (and forwards cancel() to it).
    mirror: _Mirror[T] = _Mirror(future)
    future.add_done_callback(functools.partial(_copy_outcome, mirror))
    return mirror


class _Mirror(_RelayFuture, Generic[T]):
    """A relaying future that follows another: its outcome, its cancel()."""

    def __init__(self, inner: Future[T]) -> None:
        super().__init__()
        self._inner = inner

    def cancel(self) -> bool:
        return self._inner.cancel() and super().cancel()

    def running(self) -> bool:
        return self._inner.running()


def new_relaying_submit() -> Callable[..., Future[Any]] | None:
    """A fresh relaying twin of the standard ``submit`` (see ``_cpython``)."""
    return make_relaying_submit(_Task, _RelayFuture, _prepare, run_unless_expired, expired)


#: The relaying twin of ``ThreadPoolExecutor.submit``, or ``None`` where this
#: Python's executor has changed shape (or the fast path is off).
relaying_submit = new_relaying_submit()


# -- wrap ---------------------------------------------------------------------
def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """Capture the context now; every call of the result runs ``fn`` in it.

    Each call runs in its own copy of the capture, so one wrapper can be
    called from many threads at once, and one call's changes never reach the
    next (flask #5252/#5396: ``copy_current_request_context`` fails when the
    same wrapper runs in two pool threads).  The caller's context is restored
    when the call ends, however it ends.  Wrapping a wrapped callable returns
    it unchanged: the first capture stands.
    """
    if (
        getattr(fn, "__ctxrelay_captured__", None) is not None
        # functools.wraps copies that attribute onto a decorator around a
        # wrapped callable too; only wrap()'s own result runs this code.
        and getattr(fn, "__code__", None) is _RELAYED_CODE
    ):
        return fn
    captured = capture()

    @functools.wraps(fn)
    def relayed(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    relayed.__ctxrelay_captured__ = captured  # type: ignore[attr-defined]
    return relayed


#: The code object of every callable ``wrap`` returns.
_RELAYED_CODE = wrap(lambda: None).__code__


# -- executors ----------------------------------------------------------------
class ContextExecutor(Executor):
    """Wrap any ``concurrent.futures.Executor`` so every task runs in the
    context of its ``submit()``/``map()`` call.

    Thread-based executors relay every context variable; a
    ``ProcessPoolExecutor`` relays the ctxrelay ``Context``.  Shutting this
    wrapper down shuts the wrapped executor down.
    """

    def __init__(self, executor: Executor) -> None:
        if not isinstance(executor, Executor):
            raise TypeError(f"ContextExecutor wraps an Executor, not {type(executor).__name__}")
        self.executor = executor
        self._process = isinstance(executor, concurrent.futures.ProcessPoolExecutor)
        if relaying_submit is not None and type(executor).submit is STDLIB_SUBMIT:
            # A standard thread pool: submit through the relaying twin
            # directly, without a second Python frame per task.
            self.submit = functools.partial(relaying_submit, executor)  # type: ignore[method-assign]

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        task = relayed_task(self.executor, fn)
        if self._process:
            return relay_callbacks(fork_clean(self.executor.submit, task, *args, **kwargs))
        return relay_callbacks(self.executor.submit(task, *args, **kwargs))

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        if self._process:
            # One capture for the whole call; the pool pickles it per chunk.
            task = _ProcessTask(current(), fn)
            return fork_clean(
                self.executor.map, task, *iterables, timeout=timeout, chunksize=chunksize
            )
        # Executor.map submits item by item through self.submit: each item
        # gets its own copy of the capture (one Context can't run in two
        # threads at once).
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"ContextExecutor({self.executor!r})"


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """Drop-in ``concurrent.futures.ThreadPoolExecutor`` that relays context.

    Each ``submit()`` (and each item of ``map()``) captures the caller's
    context; worker threads themselves never hold a request's context.
    """

    if TYPE_CHECKING:
        # Typed as the standard submit: relaying_submit's own type is loose
        # (Future[Any], any arguments).
        def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
            """Submit ``fn`` to run in the context of this call."""

    elif relaying_submit is not None:
        # The standard body with the relay folded in (see _cpython).
        submit = relaying_submit
    else:  # Pythons whose executor changed shape (or CTXRELAY_NO_FAST_PATH=1)

        def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
            return relay_callbacks(super().submit(_task(fn), *args, **kwargs))

    if THREADS_INHERIT_CONTEXT:  # free-threaded 3.14+ only

        def _adjust_thread_count(self) -> None:
            # Workers are created inside submit(): start them from an empty
            # context, not a copy of the submitting request's.
            contextvars.Context().run(super()._adjust_thread_count)


class ProcessPoolExecutor(concurrent.futures.ProcessPoolExecutor):
    """Drop-in ``concurrent.futures.ProcessPoolExecutor`` that relays the
    ctxrelay ``Context`` (fields and request snapshot).

    Other context variables cannot cross a process boundary (a
    ``contextvars.Context`` cannot be pickled); the fields are validated
    again in the worker, and each task's binding ends with the task.
    """

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        task = fn if isinstance(fn, _ProcessTask) else _ProcessTask(current(), fn)
        return relay_callbacks(fork_clean(super().submit, task, *args, **kwargs))


# -- threads ------------------------------------------------------------------
class _RelayedRun:
    """Stands in for ``thread.run`` for one start: runs it in the capture."""

    __slots__ = ("context", "run", "thread")

    def __init__(
        self, thread: threading.Thread, context: contextvars.Context, run: Callable[[], None]
    ) -> None:
        self.thread = thread
        self.context = context
        self.run = run

    def __call__(self) -> None:
        try:
            self.context.run(self.run)
        finally:
            # Break the thread -> run -> thread cycle as soon as run ends.
            self.thread.__dict__.pop("run", None)


def prepare_start(thread: threading.Thread, starter: FrameType | None = None) -> bool:
    """Capture for ``thread.start()``: make its ``run`` execute in the capture.

    Works for subclasses that override ``run`` (``Timer`` does), because the
    bound ``run`` is taken from the instance.  ``starter`` is the frame that
    called ``start()`` when the decision is instrument()'s: a thread a
    library starts for its own long-lived work (the standard library's pool
    workers and servers, redis-py's pub/sub thread, a scheduler) gets an
    empty context instead (see ``_lifetime``).  Under ``detached()`` every
    thread starts empty.  The drop-ins (``ctxrelay.Thread``, ``Timer``) pass
    no starter: using one is the application's explicit choice to relay.

    Returns whether this call prepared anything: only then may a failed
    ``start()`` undo it (a second ``start()`` of a thread must leave the
    first start's relay alone).
    """
    if current() is DETACHED or (starter is not None and started_by_library(starter, thread)):
        context = contextvars.Context()
    else:
        context = capture()
        if _strict.STATE.on:
            _note_relayed_thread(thread, starter or sys._getframe(1))
    if THREAD_TAKES_CONTEXT:  # Python 3.14+
        # Pass the capture explicitly, so the thread never inherits (free-
        # threaded builds) or starts empty; a context the caller passed wins.
        if getattr(thread, "_context", None) is None:
            thread._context = context  # type: ignore[attr-defined]
            thread.__dict__["_ctxrelay_set_context"] = True
            return True
        return False
    if isinstance(thread.__dict__.get("run"), _RelayedRun):
        # Prepared by an outer layer -- or by a first start() whose thread
        # has not called run() yet: a second start() fails, and must not
        # take the stand-in away from under it.
        return False
    thread.__dict__["run"] = _RelayedRun(thread, context, thread.run)
    return True


def _note_relayed_thread(thread: threading.Thread, starter: FrameType) -> None:
    # Strict mode watches threads that carry a request's context: one that
    # outlives its request by far is likely a service thread.
    ctx = current()
    if ctx and _strict.sample():
        _strict.note_thread(thread, root_of(ctx), _strict.handoff_site(starter))


class _Observed:
    """Observe-only ``instrument(relay=False)``: ``fn`` runs as it would
    without ctxrelay (no context), marked with the place of its hand-off, so
    that strict mode can name that place if the work then logs or calls out."""

    __slots__ = ("fn", "handoff")

    def __init__(self, fn: Callable[..., Any], handoff: _strict.Site) -> None:
        self.fn = fn
        self.handoff = handoff

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = _strict.LOST_FROM.set(self.handoff)
        try:
            return self.fn(*args, **kwargs)
        finally:
            with contextlib.suppress(ValueError):
                _strict.LOST_FROM.reset(token)


def observed(fn: Callable[..., Any], starter: FrameType | None) -> Callable[..., Any]:
    """``fn`` marked for observe-only mode, when a context is lost handing it off."""
    if not current() or not _strict.sample():
        return fn  # nothing to lose, or not sampled
    handoff = _strict.handoff_site(starter)
    return fn if handoff is None else _Observed(fn, handoff)


def observe_start(thread: threading.Thread, starter: FrameType) -> None:
    """Observe-only ``Thread.start``: mark the thread's ``run`` when a
    request starts it without relay (a library's own thread is not lost)."""
    if started_by_library(starter, thread) or isinstance(thread.__dict__.get("run"), _Observed):
        return
    run = observed(thread.run, starter)
    if isinstance(run, _Observed):
        thread.__dict__["run"] = run


def unprepare(thread: threading.Thread) -> None:
    """Undo :func:`prepare_start` after a failed ``start()``."""
    if isinstance(thread.__dict__.get("run"), _RelayedRun):
        del thread.__dict__["run"]
    if thread.__dict__.pop("_ctxrelay_set_context", False):  # Python 3.14+
        thread._context = None  # type: ignore[attr-defined]


class Thread(threading.Thread):
    """Drop-in ``threading.Thread`` that runs in the context of ``start()``."""

    def start(self) -> None:
        prepared = prepare_start(self)
        try:
            super().start()
        except BaseException:
            if prepared:
                unprepare(self)
            raise


class Timer(threading.Timer):
    """Drop-in ``threading.Timer``: the function runs in the context of ``start()``."""

    def start(self) -> None:
        prepared = prepare_start(self)
        try:
            super().start()
        except BaseException:
            if prepared:
                unprepare(self)
            raise


# -- run_async ----------------------------------------------------------------
class _AsyncFuture(_RelayFuture):
    """The future of a ``run_async`` call: an exception that nobody retrieves
    is logged, with the call's context, when the future is discarded."""

    _ctxrelay_context: contextvars.Context | None = None
    _ctxrelay_name = "?"
    _ctxrelay_retrieved = False

    def result(self, timeout: float | None = None) -> Any:
        self._ctxrelay_retrieved = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._ctxrelay_retrieved = True
        return super().exception(timeout)

    def __del__(self) -> None:
        if self._ctxrelay_retrieved or not self.done() or self.cancelled():
            return
        exc = super().exception(0)
        if exc is None or self._ctxrelay_context is None:
            return
        with contextlib.suppress(Exception):  # never raise from __del__
            self._ctxrelay_context.run(_report_lost, self._ctxrelay_name, exc)


def _report_lost(name: str, exc: BaseException) -> None:
    _log.error(
        "ctxrelay: @run_async task %s raised %s and nobody retrieved it; context: %r",
        name,
        type(exc).__name__,
        current(),
        exc_info=(type(exc), exc, exc.__traceback__),
    )


def _watch(inner: Future[Any], captured: contextvars.Context, name: str) -> Future[Any]:
    if type(inner) in (Future, _RelayFuture):
        # Re-labelled (same layout, isinstance holds): only run_async pays.
        inner.__class__ = _AsyncFuture
        outer: _AsyncFuture = inner  # type: ignore[assignment]
    else:
        # A foreign Future subclass cannot be re-labelled: chain it instead.
        outer = _AsyncFuture()
        outer.set_running_or_notify_cancel()
        inner.add_done_callback(functools.partial(_copy_outcome, outer))
    outer._ctxrelay_context = captured
    outer._ctxrelay_name = name
    return outer


def _copy_outcome(outer: Future[Any], inner: Future[Any]) -> None:
    if inner.cancelled():
        if Future.cancel(outer):  # a pending mirror: cancelled as its inner was
            outer.set_running_or_notify_cancel()  # wakes waiters
        else:  # a RUNNING future cannot be cancelled; report the cancellation instead
            outer.set_exception(concurrent.futures.CancelledError())
        return
    exc = inner.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(inner.result())


_default_pool: ThreadPoolExecutor | None = None
_default_pool_lock = threading.Lock()


def default_executor() -> ThreadPoolExecutor:
    """The shared pool ``@run_async`` uses when none is named (created lazily)."""
    global _default_pool
    if _default_pool is None:
        with _default_pool_lock:
            if _default_pool is None:
                _default_pool = ThreadPoolExecutor(thread_name_prefix="ctxrelay-async")
    return _default_pool


class _AsyncCall(Generic[P, R]):
    # A class rather than a closure so that the executor is looked up at call
    # time (the default pool is created on first use, not at import).
    def __init__(self, fn: Callable[P, R], executor: Executor | None) -> None:
        functools.update_wrapper(self, fn)
        self.__wrapped__ = fn
        self._executor = executor
        self._name = getattr(fn, "__qualname__", repr(fn))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        executor = self._executor or default_executor()
        captured = capture()
        if ships_to_processes(executor):
            task = _ProcessTask(current(), self._picklable())
            # Its submit may fork the workers: from an empty context.
            inner = fork_clean(executor.submit, task, *args, **kwargs)
        else:
            fn = self.__wrapped__
            guarded = (run_unless_expired, fn) if _bounded() else (fn,)
            inner = executor.submit(_Task(captured.run, *guarded), *args, **kwargs)
        return _watch(inner, captured, self._name)

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        # Decorating a method: bind like a function would.
        return self if obj is None else functools.partial(self, obj)  # type: ignore[arg-type]

    def _picklable(self) -> Callable[..., R]:
        # Decorating took the function's name, so pickle would not find the
        # function by it: send ``self`` instead (found by that name, see
        # __reduce__) and call what it wraps over there.
        if _find(self.__wrapped__.__module__, self._name) is self:
            return functools.partial(_call_wrapped, self)
        return self.__wrapped__  # run_async(executor=...)(fn): fn keeps its name

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by reference, like the function it replaced under its name.
        return (_find, (self.__wrapped__.__module__, self._name))


def _find(module: str, qualname: str) -> object:
    try:
        found: object = sys.modules.get(module) or importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def _call_wrapped(call: _AsyncCall[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return call.__wrapped__(*args, **kwargs)


@overload
def run_async(fn: Callable[P, R], /) -> Callable[P, Future[R]]: ...
@overload
def run_async(
    *, executor: Executor | None = None
) -> Callable[[Callable[P, R]], Callable[P, Future[R]]]: ...
def run_async(
    fn: Callable[P, R] | None = None, /, *, executor: Executor | None = None
) -> Callable[P, Future[R]] | Callable[[Callable[P, R]], Callable[P, Future[R]]]:
    """Decorator, like Spring's ``@Async``: calling the function submits it.

    The call returns a ``concurrent.futures.Future`` at once; the function
    runs on ``executor`` (default: a shared ctxrelay ``ThreadPoolExecutor``)
    in the caller's context.  If it raises and nobody ever calls
    ``result()``/``exception()`` on the future, the error is logged on the
    ``ctxrelay`` logger, inside the caller's context, when the future is
    discarded -- never silently lost.
    """
    if executor is not None and not isinstance(executor, Executor):
        raise TypeError(f"run_async(executor=...) takes an Executor, not {type(executor).__name__}")

    def decorate(fn: Callable[P, R]) -> Callable[P, Future[R]]:
        return _AsyncCall(fn, executor)

    return decorate if fn is None else decorate(fn)
