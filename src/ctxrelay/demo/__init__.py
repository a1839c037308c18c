"""The walk-through: the order-confirmation story, broken and then relayed.

``ctxrelay demo``, ``python -m ctxrelay.demo`` or ``make demo``; ``--json``
for machines, ``--broker redis://127.0.0.1:6379/0`` (or ``amqp://...``) for a
real broker and a worker process.  See the demo's page in the documentation.

On 127.0.0.1 it starts the member, cart and order services
(:mod:`ctxrelay.demo.services`) and a Celery worker
(:mod:`ctxrelay.demo.tasks`), then sends the same request twice -- session
cookie, request id, canary tag -- with the relay off and on, and reports what
every piece of work saw (:mod:`ctxrelay.demo.report`).  The exit status is 0
only when the relayed walk is fully correct.

The demo needs packages the core does not: the ``demo`` extra
(``pip install 'ctxrelay[demo]'``).  This module imports none of them until
the demo runs, so that without them :func:`main` can say so in one line.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Result

__all__ = ["EXTRA", "NEEDS", "main", "missing", "run", "running"]

#: The extra that installs what the demo needs.
EXTRA = "demo"

#: The modules the demo imports beyond the core (the ``demo`` extra's packages).
NEEDS = ("fastapi", "uvicorn", "httpx", "celery")


def missing() -> list[str]:
    """The modules of :data:`NEEDS` that cannot be found."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def _needs_line(what: str) -> str:
    return (
        f"ctxrelay demo: {what}; install the '{EXTRA}' extra: "
        f"pip install 'ctxrelay[{EXTRA}]' (from a checkout: pip install '.[{EXTRA}]')"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print the report; 0 only if the relayed walk is fully
    correct, 1 if it is not, 2 if it cannot run: the demo's packages are not
    installed, or ``--broker`` is not supported or cannot be reached (one line
    on stderr each time).

    ``argv`` defaults to ``sys.argv[1:]``: call ``main([])`` from Python."""
    absent = missing()
    if absent:
        print(_needs_line(f"{', '.join(absent)} not installed"), file=sys.stderr)
        return 2
    try:
        from .walk import main as walk
    except ImportError as exc:
        if (exc.name or "ctxrelay").partition(".")[0] == "ctxrelay":
            raise  # ctxrelay's own bug, not a missing package: show it whole
        # A package of the extra installed, but broken or too old.
        print(_needs_line(f"cannot import {exc.name} ({exc})"), file=sys.stderr)
        return 2
    return walk(sys.argv[1:] if argv is None else argv)


def run(broker: str | None = None) -> Result:
    """Start everything, walk the request without and with the relay, stop
    everything; return the result without printing it."""
    from .walk import run as walk

    return walk(broker)


def running(broker: str | None = None) -> AbstractContextManager[Result]:
    """Start everything, walk the request without and with the relay, yield the
    result; everything is stopped when the block ends."""
    from .walk import running as walk

    return walk(broker)
