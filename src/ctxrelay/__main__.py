"""``ctxrelay`` command line: ``ctxrelay demo`` runs the walk-through, ``ctxrelay check``
finds the hand-offs that drop the context (docs/check.md)."""

from __future__ import annotations

import sys

_USAGE = (
    "usage: ctxrelay demo [--json] [--broker URL]\n"
    "       ctxrelay check [PATH ...] [--format text|json|sarif] [--select CODES] "
    "[--ignore CODES] [--assume-instrument]"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctxrelay`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from ctxrelay.demo import main as demo

        return demo(args[1:])
    if args[:1] == ["check"]:
        from ctxrelay.check import main as check

        return check(args[1:])
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
