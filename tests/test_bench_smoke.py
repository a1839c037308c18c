"""Every benchmark still runs and prints its tables (never a timing check).

Benchmarks are not tests (STYLE.md): here each one only runs in its
``--quick`` mode, through ``bench/run.py`` as ``make bench`` would, so a
benchmark broken by an API change is noticed before someone needs its figures.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


@functools.cache  # one quick run per benchmark serves every test
def _run_quick(*names: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", *names],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_there_are_benchmarks_to_run() -> None:
    assert BENCH / "bench_relay.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_benchmark_runs_quick_and_prints_a_table(script: Path) -> None:
    out = _run_quick(script.stem.removeprefix("bench_"))
    assert "## Machine" in out
    assert f"## {script.stem}" in out
    assert "|---|" in out  # a Markdown table's separator row


def test_relay_benchmark_prints_every_variant_and_operation() -> None:
    out = _run_quick("relay")
    for heading in ("### Round trip", "### Pipelined", "### Micro", "### Targets"):
        assert heading in out
    for row in (
        "| bare `ThreadPoolExecutor` |",
        "| bare + `copy_context().run` (floor) |",
        "| `ctxrelay.ThreadPoolExecutor` |",
        "| `ctxrelay.ContextExecutor(bare)` |",
        "| bare under `ctxrelay.instrument()` |",
        "| bare under OTel `ThreadingInstrumentor` |",
        "| `ctxrelay.current()` |",
        '| `with ctxrelay.bind(user="u"): pass` |',
    ):
        assert row in out


def test_relay_benchmark_checks_which_variants_actually_relay() -> None:
    # The comparison is only fair if the relaying variants really relay: the
    # table says what a task saw, and bare sees nothing of the submitter's.
    out = _run_quick("relay")
    rows: dict[str, str] = {}
    for line in out.splitlines():  # the first table that names a variant: round trip
        rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    assert rows["bare `ThreadPoolExecutor`"].endswith("| nothing |")
    for name in ("`ctxrelay.ThreadPoolExecutor`", "bare under `ctxrelay.instrument()`"):
        assert rows[name].endswith("| ctxrelay, OTel |")
    assert rows["bare under OTel `ThreadingInstrumentor`"].endswith("| OTel |")
