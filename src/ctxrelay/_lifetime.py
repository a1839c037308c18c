"""Which new threads and processes carry the context of whoever starts them.

Under :func:`ctxrelay.instrument` a new thread (and a forked process) would
capture the context of the code that starts it.  That is right for
application code handing work off -- an audit after the response, a fan-out
-- and wrong for a thread that a *library* starts for its own long-lived
work: redis-py's ``PubSub.run_in_thread()``, APScheduler's scheduler thread,
``socketserver``'s per-connection threads (and so ``prometheus_client``'s
metrics server), OpenTelemetry's ``BatchSpanProcessor``, Sentry's and
kafka-python's workers.  Such a thread, started lazily inside request A,
would handle every later event as request A, cookie included.  Without
``instrument()`` that work sees no context (lost, but safe); instrument()
must never turn a loss into a leak.

The rule is general, not a list of thread names: **the code that calls
``start()`` owns the thread.**  ctxrelay walks up from the ``start()`` call,
past the layers installed as ``Thread.start`` itself (OpenTelemetry's and
Sentry's threading integrations wrap it) and past ctxrelay's own frames.  If the
first frame left belongs to the standard library or to an installed package
(site-packages, dist-packages), the thread is that library's own: it starts
from an empty context.  A library's ``Thread`` subclass that overrides
``start()`` owns what it starts, whoever calls it.  Otherwise it is application code, and the thread
relays.  ``instrument(library_modules=..., application_modules=...)`` names
more modules either way (an application installed as a package, a vendored
library in the application's tree), and ``with ctxrelay.detached():`` starts
anything from an empty context on purpose.
"""

from __future__ import annotations

import contextlib
import os
import site
import sysconfig
import threading
from collections.abc import Iterable
from types import FrameType

__all__ = ["configure_owners", "is_library_file", "owners", "started_by_library"]

# How many frames above start() are looked at before deciding "application".
_MAX_FRAMES = 32
# Verdicts per source file: files are code, not input, but stay bounded.
_MAX_FILES = 4096


def _library_roots() -> tuple[str, ...]:
    roots: set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(key):
            roots.add(paths[key])
    with contextlib.suppress(AttributeError):  # some embedded/virtualenv builds
        roots.update(site.getsitepackages())
    user = getattr(site, "getusersitepackages", None)
    if user is not None:
        with contextlib.suppress(Exception):  # no home directory
            roots.add(user())
    normalised = {os.path.normcase(os.path.realpath(root)) for root in roots if root}
    return tuple(sorted(root.rstrip(os.sep) + os.sep for root in normalised))


_roots: tuple[str, ...] | None = None
_verdicts: dict[str, bool] = {}
_PACKAGE_DIRS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def is_library_file(filename: str) -> bool:
    """Whether ``filename`` is the standard library's or an installed package's."""
    verdict = _verdicts.get(filename)
    if verdict is not None:
        return verdict
    global _roots
    if _roots is None:
        _roots = _library_roots()
    if filename.startswith("<"):
        verdict = filename.startswith("<frozen")  # frozen stdlib modules
    else:
        path = os.path.normcase(os.path.realpath(filename))
        verdict = path.startswith(_roots) or any(part in path for part in _PACKAGE_DIRS)
    if len(_verdicts) < _MAX_FILES:
        _verdicts[filename] = verdict
    return verdict


class _Owners:
    """Modules the user named, as prefixes (``"apscheduler"`` covers its submodules)."""

    __slots__ = ("application", "library")

    def __init__(self, library: tuple[str, ...] = (), application: tuple[str, ...] = ()) -> None:
        self.library = library
        self.application = application


_owners = _Owners()
_lock = threading.Lock()


def _module_names(names: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    result = []
    for name in names:
        if (
            not isinstance(name, str)
            or not name
            or not all(part.isidentifier() for part in name.split("."))
        ):
            raise ValueError(f"{what}: {name!r} is not a module name such as 'apscheduler'")
        result.append(name)
    return tuple(result)


def configure_owners(library: Iterable[str] = (), application: Iterable[str] = ()) -> None:
    """Name more modules whose threads start empty (``library``) or relay
    (``application``); replaces the previous names."""
    global _owners
    owners = _Owners(
        _module_names(library, "library_modules"),
        _module_names(application, "application_modules"),
    )
    with _lock:
        _owners = owners


def owners() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The configured (library, application) module names."""
    return _owners.library, _owners.application


def _named(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


# Modules whose classes define the start() that others wrap.
_START_OWNERS = frozenset({"threading", "multiprocessing.process"})


def _layer_codes(owner: type, name: str) -> set[object]:
    """Code objects of every layer installed as ``owner.name``: ctxrelay's
    patch, OpenTelemetry's wrapt wrapper, Sentry's ``sentry_start``, ..."""
    codes: set[object] = set()
    layer: object = owner.__dict__.get(name)
    for _ in range(16):
        if layer is None:
            break
        for part in (layer, getattr(layer, "_self_wrapper", None)):  # wrapt keeps both
            part = getattr(part, "__func__", part)
            code = getattr(part, "__code__", None)
            if code is not None:
                codes.add(code)
        layer = getattr(layer, "__wrapped__", None)
    return codes


def started_by_library(frame: FrameType | None, started: object) -> bool:
    """Whether the code that called ``started.start()`` (``frame`` and above)
    is a library's: then ``started`` (a thread, a process) is that library's
    own long-lived work, and must start from an empty context."""
    layers: set[object] = set()
    for cls in type(started).__mro__:
        if cls.__module__ in _START_OWNERS:
            layers |= _layer_codes(cls, "start")
    names = _owners
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return True  # started from no Python code at all: not the application's
        module = frame.f_globals.get("__name__")
        module = module if isinstance(module, str) else ""
        if (
            frame.f_code in layers
            or module == "ctxrelay"
            or (module.startswith("ctxrelay.") and not module.startswith("ctxrelay.demo"))
        ):
            # A layer of start() itself (another library's wrapper around
            # it) or ctxrelay's own frames: the owner is further up.
            frame = frame.f_back
            continue
        if (names.application and _named(module, names.application)) or module.startswith(
            "ctxrelay.demo"
        ):
            return False  # (the walk-through is application code, even when installed)
        if names.library and _named(module, names.library):
            return True
        return is_library_file(frame.f_code.co_filename)
    return False
