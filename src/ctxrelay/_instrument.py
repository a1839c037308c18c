"""Opt-in patching of the standard library, so unchanged code relays.

What Alibaba TTL's Java agent does for ``ThreadPoolExecutor`` and ``Timer``:
after :func:`instrument`, ``threading.Thread.start`` (and so ``Timer``),
``concurrent.futures.ThreadPoolExecutor.submit`` (and so ``map`` and the
default executor of ``asyncio``) and ``asyncio``'s
``loop.run_in_executor`` capture the caller's context.

Patched once, decided at call time (sentry-python's habit): a task that
ctxrelay already relayed passes through untouched, so the drop-ins and the
patches never capture twice.  :func:`uninstrument` puts back exactly the
attributes that were there before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ._context import DETACHED, current
from ._cpython import STDLIB_SUBMIT
from ._lifetime import configure_owners, owners, started_by_library
from ._relay import (
    fork_clean,
    new_relaying_submit,
    observe_start,
    observed,
    prepare_start,
    relay_callbacks,
    relayed_task,
    unprepare,
    wrap,
)

__all__ = ["instrument", "instrumented", "uninstrument"]

_log = logging.getLogger("ctxrelay")
_lock = threading.Lock()

# (owner, attribute name, the attribute before we patched, our patch)
_patches: list[tuple[type, str, Any, Any]] = []


def _call(previous: Any, self: object, *args: Any, **kwargs: Any) -> Any:
    # Bind through the descriptor protocol: the attribute we replaced may be
    # another library's wrapper object (OpenTelemetry's are wrapt
    # FunctionWrappers), which binds differently from a plain function.
    return previous.__get__(self, type(self))(*args, **kwargs)


def _patched_start(previous: Callable[[threading.Thread], None]) -> Callable[..., None]:
    def start(self: threading.Thread) -> None:
        # The caller decides: a library's own thread starts empty (_lifetime).
        prepared = prepare_start(self, sys._getframe(1))
        try:
            _call(previous, self)
        except BaseException:
            if prepared:
                unprepare(self)
            raise

    return start


def _patched_submit(previous: Callable[..., Any]) -> Callable[..., Any]:
    if previous is STDLIB_SUBMIT:
        fast = new_relaying_submit()  # a fresh function object: ours to decorate
        if fast is not None:
            return fast

    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return relay_callbacks(_call(previous, self, relayed_task(self, fn), *args, **kwargs))

    return submit


def _patched_run_in_executor(previous: Callable[..., Any]) -> Callable[..., Any]:
    def run_in_executor(
        self: asyncio.AbstractEventLoop, executor: Any, func: Callable[..., Any], *args: Any
    ) -> Any:
        # CPython declined to copy the context here (bpo-34014).  With no
        # executor the loop's default ThreadPoolExecutor is used, whose
        # patched submit captures; any other executor is relayed here, a
        # process pool with the picklable ctxrelay Context.
        if executor is None:
            return _call(previous, self, executor, func, *args)
        func = relayed_task(executor, func)
        if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
            return fork_clean(_call, previous, self, executor, func, *args)
        return _call(previous, self, executor, func, *args)

    return run_in_executor


def _patched_process_submit(previous: Callable[..., Any]) -> Callable[..., Any]:
    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        # A process pool created lazily inside request A forks its workers
        # there: they would run request B's tasks as A.  Fork from an empty
        # context; each task carries its own submitter's fields (map goes
        # through submit, chunk by chunk).
        task = relayed_task(self, fn)
        return relay_callbacks(fork_clean(_call, previous, self, task, *args, **kwargs))

    return submit


def _patched_process_start(previous: Callable[..., Any]) -> Callable[..., Any]:
    def start(self: Any) -> Any:
        # A process a library starts for its own work (a pool's worker, a
        # manager) is forked from an empty context, as its threads are.
        if current() is DETACHED or started_by_library(sys._getframe(1), self):
            return fork_clean(_call, previous, self)
        return _call(previous, self)

    return start


def _patched_pool_init(previous: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # multiprocessing.Pool forks its workers here: never inside a request.
        fork_clean(_call, previous, self, *args, **kwargs)

    return __init__


def _pool_task(pool: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    if isinstance(pool, _thread_pool_class()):
        return wrap(fn)  # threads: every contextvar, a fresh copy per call
    return relayed_task(_AS_PROCESS_POOL, fn)  # processes: the picklable Context


def _pool_callbacks(kwargs: dict[str, Any]) -> dict[str, Any]:
    # callback/error_callback run on the pool's result thread: in the
    # submitter's context, like a future's done-callbacks.
    for name in ("callback", "error_callback"):
        if callable(kwargs.get(name)):
            kwargs[name] = wrap(kwargs[name])
    return kwargs


def _patched_pool_method(previous: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return _call(previous, self, _pool_task(self, func), *args, **_pool_callbacks(kwargs))

    return method


def _thread_pool_class() -> type:
    import multiprocessing.pool

    return multiprocessing.pool.ThreadPool


class _AsProcessPool(concurrent.futures.ProcessPoolExecutor):
    """Only a marker for relayed_task: "ships to other processes"."""

    def __init__(self) -> None:  # never starts anything
        pass


_AS_PROCESS_POOL = _AsProcessPool()

# multiprocessing.Pool's public task methods (apply calls apply_async).
_POOL_METHODS = (
    "apply_async", "map", "map_async", "starmap", "starmap_async", "imap", "imap_unordered",
)  # fmt: skip


def _observed_start(previous: Callable[[threading.Thread], None]) -> Callable[..., None]:
    def start(self: threading.Thread) -> None:
        observe_start(self, sys._getframe(1))
        _call(previous, self)

    return start


def _observed_submit(previous: Callable[..., Any]) -> Callable[..., Any]:
    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return _call(previous, self, observed(fn, sys._getframe(1)), *args, **kwargs)

    return submit


def _observed_run_in_executor(previous: Callable[..., Any]) -> Callable[..., Any]:
    def run_in_executor(
        self: asyncio.AbstractEventLoop, executor: Any, func: Callable[..., Any], *args: Any
    ) -> Any:
        if executor is None:  # the default pool's submit observes
            return _call(previous, self, executor, func, *args)
        return _call(previous, self, executor, observed(func, sys._getframe(1)), *args)

    return run_in_executor


# What instrument(relay=False) patches: it only watches hand-offs that lose a
# context, so that strict mode can name them; nothing is relayed.
_OBSERVE: list[tuple[str, str, Callable[[Any], Any]]] = [
    ("threading.Thread", "start", _observed_start),
    ("concurrent.futures.ThreadPoolExecutor", "submit", _observed_submit),
    ("asyncio.BaseEventLoop", "run_in_executor", _observed_run_in_executor),
]

_mode: list[bool] = []  # [relay] while instrumented


def instrument(
    *,
    relay: bool = True,
    library_modules: Iterable[str] | None = None,
    application_modules: Iterable[str] | None = None,
) -> None:
    """Patch the standard library so that unchanged code relays the context.

    Idempotent and thread-safe; undo with :func:`uninstrument`.

    ``relay=False`` is observe-only: nothing is relayed, but each hand-off
    (``Thread.start``, ``ThreadPoolExecutor.submit``, ``run_in_executor``)
    made from inside a request is marked with its place, so that strict mode
    (:func:`ctxrelay.strict`) reports the hand-offs whose work then logs or
    calls out with no context -- an audit before turning relay on.  Calling
    ``instrument()`` with the other ``relay`` switches the mode.

    A new thread relays the context of the code that starts it, unless that
    code is a library's (the standard library or an installed package): a
    library's own threads -- service threads, servers' per-connection
    threads -- start empty, so they never keep the request that happened to
    start them.  ``library_modules`` names more modules to treat as
    libraries (their threads start empty); ``application_modules`` names
    modules that are the application even though installed as a package
    (their threads relay).  Names cover submodules; a call that gives them
    replaces the names given before.  Process pools and ``multiprocessing``
    pools fork their workers from an empty context, and each task carries
    its submitter's fields.
    """
    if library_modules is not None or application_modules is not None:
        known_library, known_application = owners()
        configure_owners(
            known_library if library_modules is None else library_modules,
            known_application if application_modules is None else application_modules,
        )
    with _lock:
        if _patches and _mode == [relay]:
            return
        _unpatch()
        _mode[:] = [relay]
        import multiprocessing.pool
        import multiprocessing.process

        pool = multiprocessing.pool.Pool
        if not relay:
            owners_by_name = {
                "threading.Thread": threading.Thread,
                "concurrent.futures.ThreadPoolExecutor": concurrent.futures.ThreadPoolExecutor,
                "asyncio.BaseEventLoop": asyncio.BaseEventLoop,
            }
            _apply([(owners_by_name[owner], name, make) for owner, name, make in _OBSERVE])
            return
        targets: list[tuple[type, str, Callable[[Any], Any]]] = [
            (threading.Thread, "start", _patched_start),
            (concurrent.futures.ThreadPoolExecutor, "submit", _patched_submit),
            (asyncio.BaseEventLoop, "run_in_executor", _patched_run_in_executor),
            (concurrent.futures.ProcessPoolExecutor, "submit", _patched_process_submit),
            (multiprocessing.process.BaseProcess, "start", _patched_process_start),
            (pool, "__init__", _patched_pool_init),
        ]
        targets += [(pool, name, _patched_pool_method) for name in _POOL_METHODS]
        _apply(targets)


def _apply(targets: list[tuple[type, str, Callable[[Any], Any]]]) -> None:
    for owner, name, make in targets:
        previous = owner.__dict__.get(name)
        if previous is None:  # a Python without it
            _log.debug("ctxrelay: %s.%s not found; not patched", owner.__qualname__, name)
            continue
        patch = make(previous)
        patch.__wrapped__ = previous
        patch.__name__ = name
        patch.__qualname__ = f"{owner.__qualname__}.{name}"
        patch.__doc__ = previous.__doc__
        setattr(owner, name, patch)
        _patches.append((owner, name, previous, patch))


def uninstrument() -> None:
    """Undo :func:`instrument` exactly; a no-op when not instrumented."""
    with _lock:
        _unpatch()


def _unpatch() -> None:
    _mode.clear()
    while _patches:
        owner, name, previous, patch = _patches.pop()
        if owner.__dict__.get(name) is not patch:
            # Someone patched over us; restoring would drop their patch.
            _log.warning(
                "ctxrelay: %s.%s was patched again after instrument(); leaving it",
                owner.__qualname__,
                name,
            )
            continue
        setattr(owner, name, previous)
        # A wrapper instrumented on a subclass after us may have left our
        # patch behind on it: OpenTelemetry's ThreadingInstrumentor wraps
        # the inherited Timer.start and its unwrap stores the inner
        # function (ours) as Timer's own attribute.
        subclasses: list[type] = owner.__subclasses__()
        for sub in subclasses:
            if _holds(sub.__dict__.get(name), patch):
                delattr(sub, name)


def _holds(attribute: object, patch: object) -> bool:
    """True if ``attribute`` is ``patch``, or a wrapper (chain) around it."""
    for _ in range(8):
        if attribute is patch:
            return True
        attribute = getattr(attribute, "__wrapped__", None)
        if attribute is None:
            return False
    return False


def instrumented() -> bool:
    """True while :func:`instrument` is in effect."""
    return bool(_patches)
