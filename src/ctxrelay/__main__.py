"""``ctxrelay`` command line: ``ctxrelay demo`` runs the walk-through."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctxrelay`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from ctxrelay.demo import main as demo

        return demo(args[1:])
    print("usage: ctxrelay demo [--json] [--broker URL]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
