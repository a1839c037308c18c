"""The examples in the README and the docs run as written.

Every ```python block runs standalone in a fresh interpreter.  A snippet that
needs something outside (a broker with a worker, a remote host) is fenced as
```py instead, and is exercised by the integration tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    "docs/core.md",
    "docs/wire.md",
    "docs/web.md",
    "docs/queues.md",
    "docs/logging.md",
]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for n, code in enumerate(BLOCK.findall((ROOT / page).read_text())):
            found.append((f"{page}#{n}", code))
    return found


@pytest.mark.parametrize(("where", "code"), examples(), ids=[w for w, _ in examples()])
def test_documented_example_runs(where: str, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
