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

The score is 100%, and pinned by name: a symbol whose type is incomplete
fails the run unless it is in ``KNOWN_INCOMPLETE`` below (empty: keep it
so); one listed there that became complete is reported, to be taken off.

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

#: Symbols allowed to be incomplete, each with the file that owns it (none:
#: an annotation completes a new one; an integration's import guard is
#: ``except ImportError as _exc``, a private name).
KNOWN_INCOMPLETE: dict[str, str] = {}


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
