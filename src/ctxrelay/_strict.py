"""Strict mode: report where a context was lost, or kept where it does not belong.

Off by default, and then free: the hooks it needs are swapped in only while
it is on (``bind()``/``use()`` scopes that remember where they were entered,
a log-record factory, a watchdog thread), and the hot paths read one flag.

On (``CTXRELAY_STRICT=1`` or :func:`strict`), it reports once per distinct
place, on the standard logger ``ctxrelay.strict`` at WARNING, each record
carrying ``ctxrelay_report``: a dict with ``kind``, a ``message`` and the
``file``/``line`` pairs of the places involved.  The kinds:

``foreign-exit``
    a ``bind()``/``use()`` scope exited in another context than its own
    (``entered_file``/``entered_line``, ``exited_file``/``exited_line``);
``out-of-order``
    a scope exited while a scope entered inside it was still open;
``dirty-start``
    a request, task or job started with a context already bound on its
    thread or task: something leaked from earlier work (``started_*``, and
    ``bound_*`` when strict mode saw where that context was bound);
``stale-thread``
    a thread that relays a request's context still runs long after that
    request ended: a likely service thread (``started_*``);
``lost-context``
    work handed off from inside a request without relay then logged or made
    an outgoing call with no context (``handoff_*``: the place to change;
    ``used_*``).  Needs ``instrument(relay=False)`` (observe only) or a
    hand-off ctxrelay does not relay.

Capturing a place walks the stack, which costs far more than a context
switch (Armeria measured 1.35 M vs 139 M ops/s), so it can be sampled:
``CTXRELAY_STRICT_SAMPLE=0.01`` (or ``strict(sample=0.01)``) captures one
scope entry or hand-off in a hundred, for staging.  Plain strict mode
captures every one, so the first occurrence is always reported.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = [
    "LOST_FROM",
    "STATE",
    "WATCHED",
    "Site",
    "bound_at",
    "check_threads",
    "enabled",
    "from_environment",
    "handoff_site",
    "lost_call",
    "note_bound",
    "note_ended",
    "note_thread",
    "on_switch",
    "report",
    "strict_reports",
    "threads_with_context",
    "sample",
    "set_context_probe",
    "site",
    "site_of",
    "strict",
]

_log = logging.getLogger("ctxrelay.strict")

#: A place in the source: (file, line, function).
Site = tuple[str, int, str]

#: Set while work runs that was handed off from inside a request without
#: relay (observe-only instrument()): the hand-off's place.
LOST_FROM: contextvars.ContextVar[Site | None] = contextvars.ContextVar(
    "ctxrelay.lost_from", default=None
)

_MAX_REPORTS = 1000
_MAX_SITES = 4096
_MAX_BOUND = 4096
_MAX_THREADS = 1024


def _ticker(rate: float) -> Callable[[], int]:
    # Sampling by count, not a random draw per occurrence: every Nth one is
    # captured (N = 1 / rate), the first one always.  next() over a cycle,
    # called through a C partial: no Python frame per occurrence.
    every = max(1, round(1.0 / rate))
    return functools.partial(next, itertools.cycle([0, *[1] * (every - 1)]))


class _State:
    __slots__ = ("on", "rate", "thread_age", "tick")

    def __init__(self) -> None:
        self.on = False
        self.rate = 1.0
        self.thread_age = 10.0
        #: 0 for an occurrence whose place is to be captured (see sample()).
        self.tick: Callable[[], int] = _ticker(1.0)


STATE = _State()
_lock = threading.Lock()
_switches: list[Callable[[bool], None]] = []
_reported: set[tuple[Any, ...]] = set()
_reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_REPORTS)
# id(context) -> (a weak reference to it, where it was bound): weak, so
# strict mode never keeps a request's context (and its snapshot) alive, and a
# recycled id never matches; bounded, oldest dropped first.
_bound: collections.OrderedDict[int, tuple[weakref.ref[Any], Site]] = collections.OrderedDict()
# id(context) -> (a weak reference to it, monotonic time its request ended).
_ended: collections.OrderedDict[int, tuple[weakref.ref[Any], float]] = collections.OrderedDict()
_threads: list[tuple[weakref.ref[threading.Thread], weakref.ref[Any], Site]] = []
# ids of the contexts threads were seen starting with: only their end matters.
WATCHED: dict[int, None] = {}
_watchdog: threading.Thread | None = None


def enabled() -> bool:
    """Whether strict mode is on."""
    return STATE.on


def sample() -> bool:
    """Whether to capture this occurrence's place (the sampling rate)."""
    return STATE.tick() == 0


def on_switch(switch: Callable[[bool], None]) -> None:
    """Register a module's hook swap, called with the new state."""
    _switches.append(switch)
    switch(STATE.on)


def strict(
    enabled: bool = True, *, sample: float | None = None, thread_age: float | None = None
) -> None:
    """Turn strict mode on (or off with ``strict(False)``).

    ``sample`` is the share of scope entries and hand-offs whose place is
    captured (1.0: all; 0.01 for staging).  ``thread_age`` is how many
    seconds a thread may go on with a request's context after the request
    ended before it is reported as a likely service thread.
    """
    if sample is not None:
        if not 0.0 < sample <= 1.0:
            raise ValueError(f"strict(sample=...) is a rate in (0, 1], not {sample!r}")
        STATE.rate = float(sample)
        STATE.tick = _ticker(STATE.rate)
    if thread_age is not None:
        if thread_age < 0:
            raise ValueError(f"strict(thread_age=...) is seconds >= 0, not {thread_age!r}")
        STATE.thread_age = float(thread_age)
    with _lock:
        STATE.on = bool(enabled)
        for switch in _switches:
            switch(STATE.on)
        _switch_record_factory(STATE.on)
        if STATE.on:
            _start_watchdog()


def strict_reports(*, clear: bool = False) -> list[dict[str, Any]]:
    """The reports made so far (newest last; at most the last 1000)."""
    with _lock:
        found = list(_reports)
        if clear:
            _reports.clear()
            _reported.clear()
    return found


# -- places --------------------------------------------------------------------
def site_of(frame: FrameType | None) -> Site | None:
    """The place of ``frame``, or None."""
    if frame is None:
        return None
    return (frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)


def site(depth: int) -> Site | None:
    """The place ``depth`` frames above the caller (0: the caller itself)."""
    try:
        return site_of(sys._getframe(depth + 1))
    except ValueError:
        return None


def handoff_site(frame: FrameType | None) -> Site | None:
    """The first frame from ``frame`` up that is the application's: where a
    hand-off was written (past the standard library's and ctxrelay's own
    frames, e.g. ``Executor.map`` calling ``submit``)."""
    from ._lifetime import is_library_file  # lazy: only when strict mode captures

    for _ in range(32):
        if frame is None:
            return None
        module = frame.f_globals.get("__name__", "")
        module = module if isinstance(module, str) else ""
        if module.startswith("ctxrelay.demo"):  # the walk-through is application code
            return site_of(frame)
        own = module.startswith("ctxrelay.")
        if not own and not is_library_file(frame.f_code.co_filename):
            return site_of(frame)
        frame = frame.f_back
    return None


def _places(**places: Site | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, place in places.items():
        if place is not None:
            out[f"{name}_file"], out[f"{name}_line"] = place[0], place[1]
            out[f"{name}_function"] = place[2]
    return out


def report(kind: str, message: str, **places: Site | None) -> None:
    """Report ``kind`` once per distinct set of places.  Never raises."""
    try:
        key = (kind, *(p[:2] if p else None for p in places.values()))
        with _lock:
            if key in _reported:
                return
            if len(_reported) < _MAX_SITES:
                _reported.add(key)
            entry = {"kind": kind, "message": message, **_places(**places)}
            first = next((p for p in places.values() if p is not None), None)
            if first is not None:
                entry["file"], entry["line"] = first[0], first[1]
            _reports.append(entry)
        where = "; ".join(
            f"{name} at {place[0]}:{place[1]} (in {place[2]})"
            for name, place in places.items()
            if place is not None
        )
        _log.warning(
            "ctxrelay strict: %s: %s%s",
            kind,
            message,
            f" [{where}]" if where else "",
            extra={"ctxrelay_report": entry},
        )
    except Exception:  # strict mode must never break the program it watches
        pass


# -- what contexts were bound where, and when requests ended -------------------
def note_bound(ctx: object, place: Site | None) -> None:
    """Remember where ``ctx`` was bound (for a later ``dirty-start`` report)."""
    if place is None:
        return
    key = id(ctx)
    with _lock:
        # The entry goes when its context does: strict mode then holds what
        # is alive, not the last _MAX_BOUND contexts ever bound.
        _bound[key] = (weakref.ref(ctx, functools.partial(_forget_bound, key)), place)
        if len(_bound) > _MAX_BOUND:
            _bound.popitem(last=False)


def _forget_bound(key: int, ref: weakref.ref[object]) -> None:
    # Called by the garbage collector, on any thread, maybe while _lock is
    # held by that thread: a single dict operation, no lock.
    entry = _bound.get(key)
    if entry is not None and entry[0] is ref:
        _bound.pop(key, None)


def bound_at(ctx: object) -> Site | None:
    """Where strict mode saw ``ctx`` bound, if it did."""
    entry = _bound.get(id(ctx))
    return entry[1] if entry is not None and entry[0]() is ctx else None


def note_ended(ctx: object) -> None:
    """The request (or task) that bound ``ctx`` ended now (remembered only
    when a thread was seen starting with it: a dict lookup otherwise)."""
    if id(ctx) not in WATCHED:
        return
    with _lock:
        _ended[id(ctx)] = (weakref.ref(ctx), time.monotonic())
        if len(_ended) > _MAX_BOUND:
            _ended.popitem(last=False)


def note_thread(thread: threading.Thread, ctx: object, place: Site | None) -> None:
    """A thread started with ``ctx`` relayed into it, from ``place``."""
    if place is None:
        return
    with _lock:
        if len(_threads) >= _MAX_THREADS:
            _threads[:] = [t for t in _threads if t[0]() is not None]
            if len(_threads) >= _MAX_THREADS:
                return
        _threads.append((weakref.ref(thread), weakref.ref(ctx), place))
        WATCHED[id(ctx)] = None
        if len(WATCHED) > _MAX_BOUND:
            del WATCHED[next(iter(WATCHED))]


def threads_with_context() -> list[threading.Thread]:
    """Threads strict mode saw start with a request's context, still running."""
    with _lock:
        found = [t[0]() for t in _threads]
    return [t for t in found if t is not None and t.is_alive()]


def check_threads(now: float | None = None) -> None:
    """Report threads still running with a request's context long after it ended."""
    now = time.monotonic() if now is None else now
    with _lock:
        alive = [t for t in _threads if (t[0]() or _DEAD).is_alive()]
        _threads[:] = alive
        stale = []
        for ref, ctx_ref, place in alive:
            ctx = ctx_ref()
            ended = _ended.get(id(ctx)) if ctx is not None else None
            if ended is not None and ended[0]() is ctx and now - ended[1] >= STATE.thread_age:
                stale.append((ref(), place))
    for thread, place in stale:
        name = thread.name if thread is not None else "?"
        report(
            "stale-thread",
            f"thread {name!r} still runs with the context of a request that ended "
            f"{STATE.thread_age:g}+ s ago: a long-lived thread started inside a request. "
            "Start it outside requests, or inside `with ctxrelay.detached():`",
            started=place,
        )


class _Dead:
    @staticmethod
    def is_alive() -> bool:
        return False


_DEAD = _Dead()


def _watch() -> None:
    while STATE.on:
        time.sleep(min(1.0, max(STATE.thread_age / 4, 0.05)))
        with contextlib.suppress(Exception):  # never break the program it watches
            check_threads()


def _start_watchdog() -> None:
    global _watchdog
    if _watchdog is not None and _watchdog.is_alive():
        return
    # Never a request's: it watches them all.
    _watchdog = threading.Thread(target=_watch, name="ctxrelay-strict-watchdog", daemon=True)
    contextvars.Context().run(_watchdog.start)


# -- lost context: a record made with no context by work handed off unrelayed ---
_factory_before: Callable[..., logging.LogRecord] | None = None


def _lost_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = (_factory_before or logging.LogRecord)(*args, **kwargs)
    handoff = LOST_FROM.get()
    # ctxrelay's own records (this report's, to begin with) are not the work's.
    if handoff is not None and not record.name.startswith("ctxrelay") and not _context_bound():
        report(
            "lost-context",
            "work handed off from inside a request without relay logged with no context; "
            "relay it at the hand-off (ctxrelay.wrap, a ctxrelay executor, or instrument())",
            handoff=handoff,
            used=(record.pathname, record.lineno, record.funcName),
        )
    return record


def lost_call(used: Site | None) -> None:
    """An outgoing call is made with no context: report it if it is lost work."""
    handoff = LOST_FROM.get()
    if handoff is not None:
        report(
            "lost-context",
            "work handed off from inside a request without relay made an outgoing call with "
            "no context; relay it at the hand-off (ctxrelay.wrap, a ctxrelay executor, or "
            "instrument())",
            handoff=handoff,
            used=used,
        )


_context_bound: Callable[[], bool] = lambda: False  # noqa: E731  # set by _context


def set_context_probe(probe: Callable[[], bool]) -> None:
    """How strict mode tells whether a context is bound (set by ``_context``)."""
    global _context_bound
    _context_bound = probe


def _switch_record_factory(on: bool) -> None:
    global _factory_before
    current = logging.getLogRecordFactory()
    if on and current is not _lost_record_factory:
        _factory_before = current
        logging.setLogRecordFactory(_lost_record_factory)
    elif not on and current is _lost_record_factory:
        logging.setLogRecordFactory(_factory_before or logging.LogRecord)
        _factory_before = None


def from_environment() -> None:
    """Turn strict mode on when ``CTXRELAY_STRICT`` says so (at import)."""
    flag = os.environ.get("CTXRELAY_STRICT", "").strip().lower()
    if flag in ("", "0", "false", "no", "off"):
        return
    rate = os.environ.get("CTXRELAY_STRICT_SAMPLE", "").strip()
    try:
        strict(sample=float(rate) if rate else None)
    except ValueError:
        _log.warning("ctxrelay: CTXRELAY_STRICT_SAMPLE=%r is not a rate in (0, 1]", rate)
        strict()
