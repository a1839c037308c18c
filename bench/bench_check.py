"""``ctxrelay check``: precision and recall on real fixes, and speed on Django.

    python bench/bench_check.py                 # corpus + speed (Django from the venv)
    python bench/bench_check.py --corpus-only   # precision/recall only
    python bench/bench_check.py --real /work/.mirror   # also the full files of the fixes

Corpus: tests/check_corpus/ (reductions of real before/after pairs, labelled with
``# expect: CODE``).  A finding on a labelled line with that code is a true positive,
any other finding a false positive, a label without its finding a false negative.

Real mode: for each fix commit below, the whole files it changed, before (the parent)
and after, read with ``git show`` from a directory of bare mirrors (not part of this
repository: none of that code is kept here).  Each hunk whose new side hands off with a
copy of the context (the fix) is one site: recall is the share of sites flagged before
the fix, false alarms the sites still flagged after it.  Findings elsewhere in those
files are listed for a human to judge.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ctxrelay.check import Config, check_paths  # noqa: E402

CORPUS = ROOT / "tests" / "check_corpus"
_EXPECT = re.compile(r"#\s*expect:\s*([A-Z0-9,\s]+)$")

# (mirror directory name, fix commit, what the fix hands off with, expected code after)
REAL_FIXES: list[tuple[str, str, str, str]] = [
    ("crewAIInc+crewAI", "48eb7c6937bf", r"copy_context|ctx\.run", ""),
    ("infiniflow+ragflow", "11e14a835333", r"ctx\.run", ""),
    ("pydantic+pydantic-ai", "be255a71d597", r"run_sync", ""),
    # bengal PR #159: the first commit moved copy_context() INTO the lambda (CTX105),
    # the second hoisted one copy out of the loop (CTX106), the third fixed it.
    ("lbliii+bengal", "a63821fb7", r"copy_context", "CTX105"),
    ("lbliii+bengal", "446e4b71f", r"ctx\.run", "CTX106"),
    ("lbliii+bengal", "c57e5a97f", r"copy_context", ""),
]


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    rows: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def expectations(path: Path) -> set[tuple[int, str]]:
    """The (line, code) pairs a corpus file is labelled with."""
    wanted: set[tuple[int, str]] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _EXPECT.search(line)
        if match:
            wanted.update((number, c.strip()) for c in match.group(1).split(",") if c.strip())
    return wanted


def score_corpus(corpus: Path = CORPUS) -> Score:
    """Precision and recall of ``ctxrelay check`` over the labelled corpus."""
    score = Score()
    for path in sorted(corpus.glob("*.py.txt")):
        wanted = expectations(path)
        found = {(f.line, f.code) for f in check_paths([str(path)], Config()).findings}
        tp, fp, fn = len(found & wanted), len(found - wanted), len(wanted - found)
        score.tp += tp
        score.fp += fp
        score.fn += fn
        score.rows.append((path.name, tp, fp, fn))
    return score


def speed(target: Path, repeat: int = 3) -> tuple[int, int, float]:
    """(files, lines, best seconds) for one whole run over ``target``."""
    best = float("inf")
    files = lines = 0
    for _ in range(repeat):
        start = time.perf_counter()
        result = check_paths([str(target)], Config())
        best = min(best, time.perf_counter() - start)
        files, lines = result.files, result.lines
    return files, lines, best


def _git(mirror: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(mirror), *args], capture_output=True, text=True, check=False
    ).stdout


def _hunks(diff: str, fix: re.Pattern[str]) -> list[tuple[str, int, int, int, int]]:
    """(path, old_start, old_end, new_start, new_end) of the hunks that hand off a copy."""
    out: list[tuple[str, int, int, int, int]] = []
    path = ""
    header = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
    current: list[int] | None = None
    added: list[str] = []

    def close() -> None:
        if current is None or not any(fix.search(line) for line in added):
            return
        if all(line.strip().startswith(("import ", "from ")) for line in added):
            return
        if out and out[-1][0] == path and current[2] - out[-1][4] <= 6:
            # the copy and the hand-off it feeds, a few lines apart: one site
            last = out.pop()
            out.append((path, last[1], current[1], last[3], current[3]))
        else:
            out.append((path, current[0], current[1], current[2], current[3]))

    for line in diff.splitlines():
        if line.startswith("+++ b/"):
            close()
            current, added, path = None, [], line[6:]
        elif line.startswith("@@"):
            close()
            m = header.match(line)
            assert m is not None
            old, old_n, new, new_n = (int(g) if g else 1 for g in m.groups())
            current, added = [old, old + old_n, new, new + new_n], []
        elif line.startswith("+") and current is not None:
            added.append(line[1:])
    close()
    return out


def score_real(mirrors: Path) -> None:
    """Sites flagged before and after each fix, on the whole files it changed."""
    print("\n### Real fixes, whole files (read from mirrors, not kept here)\n")
    print("| fix | sites | flagged before | still flagged after | other findings (before/after) |")
    print("|---|---:|---:|---:|---|")
    others: list[str] = []
    for name, commit, pattern, after_code in REAL_FIXES:
        mirror = mirrors / name / "repo"
        if not mirror.is_dir():
            print(f"| {name} {commit} | mirror not present | | | |")
            continue
        files = [
            f
            for f in _git(mirror, "show", "--format=", "--name-only", commit).split()
            if f.endswith(".py") and "test" not in f.split("/")[-1] and "/tests/" not in f
        ]
        hunks = _hunks(
            _git(mirror, "show", "--format=", "-U0", commit, "--", *files), re.compile(pattern)
        )
        with tempfile.TemporaryDirectory() as tmp:
            found: dict[str, list[tuple[str, int, str]]] = {"before": [], "after": []}
            for state, rev in (("before", f"{commit}^"), ("after", commit)):
                for f in files:
                    text = _git(mirror, "show", f"{rev}:{f}")
                    if not text:
                        continue
                    target = Path(tmp, state, f)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                    for finding in check_paths([str(target)], Config()).findings:
                        found[state].append((f, finding.line, finding.code))
            flagged_before = flagged_after = 0
            used: set[tuple[str, str, int, str]] = set()
            for path, old_a, old_b, new_a, new_b in hunks:
                hit_before = [
                    x for x in found["before"] if x[0] == path and old_a - 3 <= x[1] <= old_b + 1
                ]
                hit_after = [
                    x for x in found["after"] if x[0] == path and new_a - 3 <= x[1] <= new_b + 1
                ]
                used.update(("before", *x) for x in hit_before)
                used.update(("after", *x) for x in hit_after)
                if after_code:  # the commit introduced the mistake: expect it after
                    flagged_before += bool(hit_before)
                    flagged_after += any(x[2] == after_code for x in hit_after)
                else:
                    flagged_before += bool(hit_before)
                    flagged_after += bool(hit_after)
            rest = {
                state: [x for x in found[state] if (state, *x) not in used]
                for state in ("before", "after")
            }
            others.extend(f"{name} {commit} {s}: {p}:{n} {c}" for s in rest for p, n, c in rest[s])
            label = f"{name.split('+')[1]} {commit[:9]}" + (
                f" (expects {after_code} after)" if after_code else ""
            )
            print(
                f"| {label} | {len(hunks)} | {flagged_before} | {flagged_after} | "
                f"{len(rest['before'])}/{len(rest['after'])} |"
            )
    if others:
        print("\nOther findings in those files (to be judged by hand):\n")
        for line in others:
            print(f"- {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--corpus-only", action="store_true")
    parser.add_argument("--real", metavar="MIRRORS", help="a directory of bare git mirrors")
    parser.add_argument("--target", metavar="PATH", help="tree to time (default: Django)")
    parser.add_argument("--quick", action="store_true", help="one timed run instead of three")
    args = parser.parse_args(argv)

    score = score_corpus()
    print("### Labelled corpus (tests/check_corpus)\n")
    print("| file | true positives | false positives | false negatives |")
    print("|---|---:|---:|---:|")
    for name, tp, fp, fn in score.rows:
        print(f"| {name} | {tp} | {fp} | {fn} |")
    print(
        f"| **all {len(score.rows)} files** | **{score.tp}** | **{score.fp}** | **{score.fn}** |\n"
    )
    print(f"precision {score.precision:.3f}, recall {score.recall:.3f}")

    if args.real:
        score_real(Path(args.real))
    if args.corpus_only:
        return 0
    target = Path(args.target) if args.target else None
    if target is None:
        spec = importlib.util.find_spec("django")
        if spec is None or spec.origin is None:
            print("\nspeed: Django is not installed (pip install django, or --target PATH)")
            return 0
        target = Path(spec.origin).parent
    repeat = 1 if args.quick else 3
    files, lines, seconds = speed(target, repeat)
    print(
        f"\n### Speed\n\n{target.name}: {files} files, {lines} lines in {seconds:.2f} s "
        f"(best of {repeat}, in-process): {lines / seconds:,.0f} lines/s "
        f"(Python {sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
