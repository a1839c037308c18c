"""Run every benchmark in ``bench/`` in turn and print their tables.

``make bench`` calls this.  Each ``bench_*.py`` runs in a fresh interpreter
(no instrumentation or thread pool left over from the one before), after a
description of the machine, so the output can go into docs/benchmarks.md as
is.  ``--quick`` passes ``--quick`` on: a smoke run of a few seconds each.
Names select benchmarks (``python bench/run.py relay``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks(names: list[str]) -> list[Path]:
    """The ``bench_*.py`` scripts, all of them or those ``names`` select."""
    found = sorted(HERE.glob("bench_*.py"))
    if not names:
        return found
    wanted = {name.removesuffix(".py").removeprefix("bench_") for name in names}
    return [path for path in found if path.stem.removeprefix("bench_") in wanted]


def cpu_model() -> str:
    """The CPU model as ``lscpu`` shows it (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """What the figures depend on: CPUs, CPU model, Python, OS, current load."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        f"- CPUs: {os.cpu_count()} ({cpu_model()})",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
        f"- OS: {platform.platform()}",
    ]
    if load is not None:
        lines.append(
            f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
            "(other processes may share the machine)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the ctxrelay benchmarks.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of each benchmark")
    parser.add_argument("names", nargs="*", help="benchmarks to run (e.g. relay); default all")
    args = parser.parse_args(argv)
    selected = benchmarks(args.names)
    if not selected:
        print(f"no benchmark matches {args.names}", file=sys.stderr)
        return 2
    print("## Machine\n\n" + machine() + "\n", flush=True)
    failed = []
    for script in selected:
        print(f"## {script.stem}\n", flush=True)
        command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(script.name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
