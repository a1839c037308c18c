"""What ctxrelay assumes about CPython's own code, in one place.

Each assumption is looked up tolerantly (``getattr(..., None)``, a shape
check) and, where it fails, ctxrelay takes the plain path: slower, never
wrong.  ``tests/test_cpython_assumptions.py`` asserts every one of them on the
running interpreter, so a new Python that breaks one shows up as a failed
assumption, not as a wrong context.  ``CTXRELAY_NO_FAST_PATH=1`` turns the
fast paths off, and the suite runs the relay tests that way too.

The assumptions:

* ``concurrent.futures.ThreadPoolExecutor.submit`` has the body it has had
  from CPython 3.9 to 3.13 (:func:`make_relaying_submit` folds the relay into
  a copy of it, one Python frame less per task);
* ``Future._done_callbacks`` is a plain list that ``add_done_callback``
  appends to and ``_invoke_callbacks`` iterates (:func:`swap_done_callbacks`);
* Python 3.14 flags: ``sys.flags.thread_inherit_context`` (free-threaded
  builds copy the caller's context into new threads) and ``Thread(context=)``.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import contextvars
import inspect
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from time import monotonic
from typing import Any

__all__ = [
    "FAST_PATH",
    "STDLIB_SUBMIT",
    "THREADS_INHERIT_CONTEXT",
    "THREAD_TAKES_CONTEXT",
    "make_relaying_submit",
    "submit_has_known_shape",
    "swap_done_callbacks",
]

#: Off with ``CTXRELAY_NO_FAST_PATH=1``: every fast path takes its fallback.
FAST_PATH = os.environ.get("CTXRELAY_NO_FAST_PATH", "") not in ("1", "true", "yes")

#: Python 3.14 free-threaded builds copy the caller's context into every new
#: thread: a pool worker would keep the context of the request that happened
#: to create it.  Pool workers created by ctxrelay then start empty.
THREADS_INHERIT_CONTEXT = bool(getattr(sys.flags, "thread_inherit_context", 0))

#: Python 3.14 added ``Thread(context=...)``: the thread runs in that context.
THREAD_TAKES_CONTEXT = "context" in inspect.signature(threading.Thread.__init__).parameters

#: The standard ``ThreadPoolExecutor.submit``, as ctxrelay found it.
STDLIB_SUBMIT = concurrent.futures.ThreadPoolExecutor.submit

_SUBMIT_NAMES = {
    "_shutdown_lock", "_global_shutdown_lock", "_broken", "BrokenThreadPool", "_shutdown",
    "Future", "_WorkItem", "_work_queue", "put", "_adjust_thread_count", "_base", "RuntimeError",
}  # fmt: skip


def submit_has_known_shape() -> bool:
    """Whether this Python's ``ThreadPoolExecutor.submit`` is the 3.9-3.13 body."""
    thread = concurrent.futures.thread
    work_item = getattr(thread, "_WorkItem", None)
    code = getattr(STDLIB_SUBMIT, "__code__", None)
    if work_item is None or code is None:
        return False
    try:
        params = list(inspect.signature(work_item.__init__).parameters)
    except (TypeError, ValueError):
        return False
    return (
        set(code.co_names) == _SUBMIT_NAMES
        and params == ["self", "future", "fn", "args", "kwargs"]
        and isinstance(getattr(thread, "_shutdown", None), bool)
        and getattr(thread, "_global_shutdown_lock", None) is not None
        and getattr(thread, "BrokenThreadPool", None) is not None
    )


#: What ``_WorkItem.run`` reads, on the Pythons whose body the guarded item
#: below copies (3.9-3.13).
_RUN_NAMES = (
    "future", "set_running_or_notify_cancel", "fn", "args", "kwargs", "set_result",
    "BaseException", "set_exception",
)  # fmt: skip


def make_relaying_submit(
    relayed: type,
    new_future: Callable[[], Future[Any]],
    prepare: Callable[[], tuple[Callable[..., Any], Any] | None] | None = None,
    guard: Callable[..., Any] | None = None,
    refuse: Callable[[Any], BaseException | None] | None = None,
) -> Callable[..., Future[Any]] | None:
    """A relaying twin of ``ThreadPoolExecutor.submit``, or ``None`` (fallback).

    Wrapping the standard ``submit`` costs a second Python frame and a
    re-packing of ``*args``/``**kwargs`` per task; this twin does the same
    work as the standard method with the relay folded in, which keeps the
    per-task cost at the floor of ``copy_context().run``.  ``relayed`` is the
    type of a task that already carries its capture (passed through);
    ``new_future`` makes the future.  ``prepare()``, when it returns
    something, gives the capture's ``run`` to use instead of a plain
    ``copy_context().run``, and the ctxrelay ``Context`` whose deadline and
    cancellation the task must honour (or None).  Such a task is not started
    once its deadline passed or its request was cancelled: its future fails
    with ``refuse(context)``.  The check is made by the work item itself, a
    copy of ``_WorkItem.run`` with it inlined, so it costs no Python frame
    (where ``_WorkItem.run`` has another body, the task runs through
    ``guard(fn, ...)`` instead, which raises that error).  ``None`` when the
    fast path is off or this Python's ``submit`` has another shape: callers
    then wrap ``submit``.
    """
    if not FAST_PATH or not submit_has_known_shape():
        return None
    thread = concurrent.futures.thread
    work_item = thread._WorkItem
    global_lock = thread._global_shutdown_lock
    broken_pool = thread.BrokenThreadPool
    copy_context = contextvars.copy_context
    guarded_item: Callable[..., Any] | None = None
    run_code = getattr(work_item.run, "__code__", None)
    if refuse is not None and run_code is not None and run_code.co_names == _RUN_NAMES:
        guarded_item = _guarded_work_item(work_item, refuse)

    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with self._shutdown_lock, global_lock:
            if self._broken:
                raise broken_pool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if thread._shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future = new_future()
            if type(fn) is relayed:
                self._work_queue.put(work_item(future, fn, args, kwargs))
            else:
                # What the floor does by hand, pool.submit(copy_context().run,
                # fn, ...): no wrapper object, no extra call when it runs.
                special = prepare() if prepare is not None else None
                if special is None:
                    self._work_queue.put(work_item(future, copy_context().run, (fn, *args), kwargs))
                else:
                    # A request's frozen capture; a task with a deadline is
                    # checked when it starts.
                    run, bound = special
                    if bound is None:
                        item = work_item(future, run, (fn, *args), kwargs)
                    elif guarded_item is not None:
                        item = guarded_item(future, run, (fn, *args), kwargs, bound)
                    else:
                        item = work_item(future, run, (guard, fn, *args), kwargs)
                    self._work_queue.put(item)
            self._adjust_thread_count()
            return future

    submit.__doc__ = STDLIB_SUBMIT.__doc__
    return submit


def _guarded_work_item(work_item: type, refuse: Callable[[Any], BaseException | None]) -> type:
    """``_WorkItem`` that does not start its task once the deadline of the
    ctxrelay ``Context`` it was given passed or its request was cancelled:
    the future fails with ``refuse(context)`` instead.  ``run`` is the
    standard body with that check inlined (a guard function around the task
    would cost a Python frame per task, half a pooled no-op's overhead)."""

    class GuardedWorkItem(work_item):  # type: ignore[misc]
        def __init__(
            self,
            future: Future[Any],
            fn: Callable[..., Any],
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            bound: Any,
        ) -> None:
            self.future = future
            self.fn = fn
            self.args = args
            self.kwargs = kwargs
            self.bound = bound

        def run(self) -> None:
            if not self.future.set_running_or_notify_cancel():
                return
            bound = self.bound
            at = bound._deadline
            cancel = bound._cancel
            try:
                if (at is not None and monotonic() >= at) or (
                    cancel is not None and cancel.cancelled
                ):
                    error = refuse(bound)
                    if error is not None:
                        raise error
                result = self.fn(*self.args, **self.kwargs)
            except BaseException as exc:
                self.future.set_exception(exc)
                # Break a reference cycle with the exception 'exc'
                self = None  # type: ignore[assignment]
            else:
                self.future.set_result(result)

    return GuardedWorkItem


def swap_done_callbacks(future: Future[Any], make: Callable[[list[Any]], list[Any]]) -> bool:
    """Replace ``future``'s done-callback list by ``make(list)``; False when
    this Python's futures keep their callbacks some other way (then the
    caller leaves the future alone, and callbacks run where they complete)."""
    if not FAST_PATH:
        return False
    callbacks = getattr(future, "_done_callbacks", None)
    if type(callbacks) is not list:
        return False
    future._done_callbacks = make(callbacks)  # type: ignore[attr-defined]
    return True
