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
import threading
from collections.abc import Callable
from typing import Any

from ._relay import (
    STDLIB_SUBMIT,
    _make_stdlib_submit,
    _unprepare,
    fork_clean,
    prepare_start,
    relay_callbacks,
    relayed_task,
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
        prepared = prepare_start(self)
        try:
            _call(previous, self)
        except BaseException:
            if prepared:
                _unprepare(self)
            raise

    return start


def _patched_submit(previous: Callable[..., Any]) -> Callable[..., Any]:
    if previous is STDLIB_SUBMIT:
        fast = _make_stdlib_submit()  # a fresh function object: ours to decorate
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


def instrument() -> None:
    """Patch the standard library so that unchanged code relays the context.

    Idempotent and thread-safe; undo with :func:`uninstrument`.
    """
    with _lock:
        if _patches:
            return
        targets: list[tuple[type, str, Callable[[Any], Any]]] = [
            (threading.Thread, "start", _patched_start),
            (concurrent.futures.ThreadPoolExecutor, "submit", _patched_submit),
            (asyncio.BaseEventLoop, "run_in_executor", _patched_run_in_executor),
        ]
        for owner, name, make in targets:
            previous = owner.__dict__[name]
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
