"""``ctxrelay check`` on real fixes (tests/check_corpus): precision and recall stay at 1.

The corpus and its provenance: tests/check_corpus/README.md; the figures, with those on
the fixes' whole files: docs/check.md (bench/bench_check.py computes both).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctxrelay.check import Config, check_paths

CORPUS = Path(__file__).resolve().parent / "check_corpus"
FILES = sorted(CORPUS.glob("*.py.txt"))
_EXPECT = re.compile(r"#\s*expect:\s*([A-Z0-9,\s]+)$")


def _expected(path: Path) -> set[tuple[int, str]]:
    wanted: set[tuple[int, str]] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _EXPECT.search(line)
        if match:
            wanted.update((number, c.strip()) for c in match.group(1).split(",") if c.strip())
    return wanted


def test_the_corpus_has_before_and_after_of_every_fix() -> None:
    cases = {path.name.split(".")[0] for path in FILES}
    assert len(cases) >= 8
    for case in cases:
        states = {p.name.split(".")[1] for p in FILES if p.name.startswith(case + ".")}
        assert {"before", "after"} <= states, case
        for path in FILES:
            if path.name.startswith(case + "."):
                head = path.read_text(encoding="utf-8").splitlines()[:3]
                assert any("licence" in line or "License" in line for line in head), path.name


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_each_file_is_flagged_exactly_where_labelled(path: Path) -> None:
    found = {(f.line, f.code) for f in check_paths([str(path)], Config()).findings}
    assert found == _expected(path)


def test_before_files_have_lost_hand_offs_and_fixed_files_none() -> None:
    before = [p for p in FILES if ".before." in p.name and "bengal" not in p.name]
    assert all(_expected(p) for p in before)
    fixed = [p for p in FILES if ".after." in p.name and "bengal" not in p.name]
    assert fixed
    assert not any(_expected(p) for p in fixed)
