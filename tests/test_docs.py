"""The examples in the README and the docs run as written.

Every ```python block of the README and of every page in docs/ runs
standalone in a fresh interpreter.  A snippet that needs something outside
that cannot be brought up here (a worker process, a remote host) is fenced
as ```py instead, and is exercised by the integration tests.

An example that talks to Redis names ``redis://127.0.0.1:6379/0``, as a
reader would write it; the test runs it against the suite's own database
(:data:`DOCS_DB`, claimed and emptied like the queue tests' databases) and
skips, with one line, when Redis is down (fails under ``CI=true``).  So a
documentation example never writes to database 0.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import flush_redis, need_rabbitmq, need_redis

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/**/*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)

#: The Redis database the documentation's examples run against.
DOCS_DB = 15
#: How the examples name Redis (the reader's default database).
EXAMPLE_REDIS = "redis://127.0.0.1:6379/0"
REDIS_LIKE = re.compile(r"redis://|Redis\(|StrictRedis\(")


def examples() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for n, code in enumerate(BLOCK.findall((ROOT / page).read_text())):
            found.append((f"{page}#{n}", code))
    return found


def _params() -> list[object]:
    """One case per example; those that need a broker are marked ``broker``."""
    return [
        pytest.param(
            where,
            code,
            id=where,
            marks=[pytest.mark.broker] if REDIS_LIKE.search(code) or "amqp://" in code else [],
        )
        for where, code in examples()
    ]


def _on_test_brokers(where: str, code: str) -> tuple[str, bool]:
    """``code`` pointed at the suite's brokers, and whether it claimed the
    docs' Redis database; skip if the brokers are down."""
    claimed = bool(REDIS_LIKE.search(code))
    if claimed:
        elsewhere = REDIS_LIKE.findall(code.replace(EXAMPLE_REDIS, ""))
        assert not elsewhere, (
            f"{where} reaches Redis other than through {EXAMPLE_REDIS!r}: "
            "name that URL, so the test can run it on its own database"
        )
        code = code.replace(EXAMPLE_REDIS, need_redis(DOCS_DB))
    if "amqp://" in code:
        need_rabbitmq()
    return code, claimed


@pytest.mark.parametrize(("where", "code"), _params())
def test_documented_example_runs(where: str, code: str) -> None:
    runnable, claimed = _on_test_brokers(where, code)
    try:
        result = subprocess.run(
            [sys.executable, "-c", runnable], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    finally:
        if claimed:
            flush_redis(DOCS_DB)
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"


def test_examples_are_found_on_every_page_that_has_them() -> None:
    pages = {where.split("#")[0] for where, _ in examples()}
    assert {"README.md", "docs/core.md", "docs/queues.md"} <= pages
