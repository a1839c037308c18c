"""``make typecheck``'s second half: ``pyright --verifytypes ctxrelay``, the public face's typing.

mypy checks that the code is consistent; ``--verifytypes`` checks what a user's
type checker sees of the installed package: every public symbol (the core,
every integration, the checker, the pytest plugin) declares its type, so that
pyright, mypy and the others infer the same thing.  ``--ignoreexternal``
leaves out what the third-party packages do not type themselves (Celery,
Dramatiq and pytest's own classes would otherwise count against ctxrelay).

Why a script and not one command: pyright finds the installed package through
the interpreter it runs (``python`` on ``PATH``), not through ``--pythonpath``,
which ``--verifytypes`` ignores; started from the Makefile without an
activated venv it picked the system Python and reported "No py.typed file
found" with a score of 0%.  Here it runs with this interpreter's ``bin/`` first
on ``PATH``, and the run fails unless pyright resolved ``ctxrelay`` to this
checkout's ``src/ctxrelay`` (the editable install's plain ``.pth`` path, which
static tools read; an import-hook editable install would not be).

The score is pinned by name: a symbol whose type is incomplete fails the run
unless it is in ``KNOWN_INCOMPLETE`` below (owned by modules being changed
elsewhere at the time of writing); one listed there that became complete is
reported, to be taken off the list.

Run from anywhere: ``.venv/bin/python scripts/verify_types.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "ctxrelay"

#: Symbols pyright finds incomplete today, each with the one-line change that
#: completes it (an annotation; for ``exc``, the ``except ImportError as exc``
#: at the top of an integration, a private name: ``as _exc``).
KNOWN_INCOMPLETE: dict[str, str] = {
    # _logfields.py: annotate each alias, e.g. `__setitem__: Callable[..., NoReturn] = _read_only`
    "ctxrelay._logfields.FrozenFields.__setitem__": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.__delitem__": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.clear": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.pop": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.popitem": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.setdefault": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.update": "_logfields.py",
    "ctxrelay._logfields.FrozenFields.__ior__": "_logfields.py",
    # integrations/logging.py: self.fields: dict[str, str]; self.request: tuple[str, ...]
    "ctxrelay.integrations.logging.ContextFilter.fields": "integrations/logging.py",
    "ctxrelay.integrations.logging.ContextFilter.request": "integrations/logging.py",
    "ctxrelay.integrations.logging.install": "integrations/logging.py",
    "ctxrelay.integrations.logging.setup": "integrations/logging.py",
    # integrations/loguru.py: self.fields / self.request: tuple[str, ...]; patcher: ContextPatcher
    "ctxrelay.integrations.loguru.exc": "integrations/loguru.py",
    "ctxrelay.integrations.loguru.ContextPatcher.fields": "integrations/loguru.py",
    "ctxrelay.integrations.loguru.ContextPatcher.request": "integrations/loguru.py",
    "ctxrelay.integrations.loguru.patcher": "integrations/loguru.py",
    # integrations/structlog.py: self.request: tuple[str, ...]; merge_context: MergeContext
    "ctxrelay.integrations.structlog.exc": "integrations/structlog.py",
    "ctxrelay.integrations.structlog.MergeContext.request": "integrations/structlog.py",
    "ctxrelay.integrations.structlog.merge_context": "integrations/structlog.py",
    # integrations/dramatiq.py, taskiq.py: self.signer: Signer | None
    # Work in progress elsewhere when this list was written (not yet committed then):
    # integrations/_worker_id.py with dramatiq's and taskiq's `ids`: `enabled: bool`,
    # ContextMiddleware's `self.ids: FreshIds`; the log integrations' new options:
    # `self.id_length: int | None`, `self.trace_ids: bool`.
    "ctxrelay.integrations.logging.ContextFilter.id_length": "integrations/logging.py",
    "ctxrelay.integrations.logging.ContextFilter.trace_ids": "integrations/logging.py",
    "ctxrelay.integrations.loguru.ContextPatcher.id_length": "integrations/loguru.py",
    "ctxrelay.integrations.loguru.ContextPatcher.trace_ids": "integrations/loguru.py",
    "ctxrelay.integrations.structlog.MergeContext.id_length": "integrations/structlog.py",
    "ctxrelay.integrations.structlog.MergeContext.trace_ids": "integrations/structlog.py",
    # demo/services.py: self.http: httpx.Client; self.response_sent: threading.Event
    "ctxrelay.demo.services.OrderService.http": "demo/services.py",
    "ctxrelay.demo.services.OrderService.response_sent": "demo/services.py",
}


def say(message: str) -> None:
    print(f"verify_types: {message}", flush=True)


def run_pyright() -> dict[str, Any]:
    """``pyright --verifytypes ctxrelay --ignoreexternal --outputjson``, parsed."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    pyright = bin_dir / "pyright"
    if not pyright.exists():
        raise SystemExit(f"verify_types: no pyright in {bin_dir} (the dev extra installs it)")
    command = [str(pyright), "--verifytypes", "ctxrelay", "--ignoreexternal", "--outputjson"]
    finished = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    try:
        document: dict[str, Any] = json.loads(finished.stdout)
    except json.JSONDecodeError:
        raise SystemExit(
            f"verify_types: pyright did not answer in JSON (exit {finished.returncode}):\n"
            f"{finished.stdout[-2000:]}{finished.stderr[-2000:]}"
        ) from None
    return document


def incomplete(report: dict[str, Any]) -> dict[str, list[str]]:
    """Symbol name -> pyright's messages, for every symbol pyright reports an error on.

    A class whose member is incomplete is "not known" too, without an error of
    its own: only the member is listed, the class follows from it.
    """
    out: dict[str, list[str]] = {}
    for symbol in report["symbols"]:
        errors = [d["message"] for d in symbol["diagnostics"] if d["severity"] == "error"]
        if errors:
            out[symbol["name"]] = errors
    return out


def main() -> int:
    started = time.perf_counter()
    report = run_pyright()["typeCompleteness"]
    where = report.get("packageRootDirectory") or ""
    if not where or Path(where).resolve() != PACKAGE:
        say(
            f"FAILED: pyright resolved ctxrelay to {where or 'nothing'!r}, not {PACKAGE}: "
            f"install this checkout into {Path(sys.executable).parent.parent} (make test does)"
        )
        return 1
    counts = report["exportedSymbolCounts"]
    total = sum(counts.values())
    score = report["completenessScore"]
    found = incomplete(report)
    new = sorted(set(found) - set(KNOWN_INCOMPLETE))
    fixed = sorted(set(KNOWN_INCOMPLETE) - set(found))
    say(
        f"type completeness {score:.1%} ({counts['withKnownType']} of {total} public symbols; "
        f"{len(found)} incomplete, all known) in {time.perf_counter() - started:.1f} s"
        if not new
        else f"type completeness {score:.1%}: {len(new)} incomplete symbol(s) not known before"
    )
    for name in fixed:
        say(f"complete (or gone): take it off KNOWN_INCOMPLETE in scripts/verify_types.py: {name}")
    if new:
        for name in new:
            messages = "; ".join(found[name]) or "type not known"
            say(f"FAILED: {name}: {messages}")
        say("annotate them (or run pyright --verifytypes ctxrelay --ignoreexternal for details)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
