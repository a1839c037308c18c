"""The documentation site: built strictly, with every public name in its API reference.

``make docs`` (and so ``make test``) builds the site with ``mkdocs build
--strict``; this module builds it once more into a temporary directory and
checks what a strict build cannot: that the reference documents every name
of ``ctxrelay.__all__`` and of each integration's ``__all__``, and that no
page speaks the project's in-house shorthand.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctxrelay

ROOT = Path(__file__).resolve().parent.parent

#: Integration module -> the docs page that holds its API reference.
INTEGRATIONS = {
    "asgi": "integrations/asgi",
    "wsgi": "integrations/wsgi",
    "django": "integrations/django",
    "celery": "integrations/celery",
    "rq": "integrations/rq",
    "dramatiq": "integrations/dramatiq",
    "requests": "integrations/requests",
    "httpx": "integrations/httpx",
    "aiohttp": "integrations/aiohttp",
    "logging": "integrations/logging",
    "structlog": "integrations/structlog",
    "loguru": "integrations/loguru",
}

#: Words that mean something only inside the project's own history.
JARGON = re.compile(r"\bseeds?\b|ANCHORS\.md|\bissue \d+\b|this session", re.IGNORECASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    where = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(where)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return where


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'id="([\w.]+)"', page.read_text()))


def test_the_reference_documents_every_core_name(site: Path) -> None:
    ids = _ids(site / "reference" / "index.html")
    assert [n for n in ctxrelay.__all__ if f"ctxrelay.{n}" not in ids] == []


@pytest.mark.parametrize("name", sorted(INTEGRATIONS))
def test_each_integration_page_documents_every_name_of_its_module(site: Path, name: str) -> None:
    module = importlib.import_module(f"ctxrelay.integrations.{name}")
    ids = _ids(site / INTEGRATIONS[name] / "index.html")
    prefix = f"ctxrelay.integrations.{name}"
    assert [n for n in module.__all__ if f"{prefix}.{n}" not in ids] == []


def test_every_integration_module_has_a_page() -> None:
    modules = {
        p.stem
        for p in (ROOT / "src" / "ctxrelay" / "integrations").glob("*.py")
        if not p.stem.startswith("_")
    }
    assert modules == set(INTEGRATIONS)


def test_the_landing_page_is_the_story(site: Path) -> None:
    landing = (site / "index.html").read_text()
    assert "The story: an order-confirmation page" in landing
    assert "Background: the same bug in Spring" in landing


@pytest.mark.parametrize(
    "page",
    ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/**/*.md"))],
)
def test_no_page_speaks_in_house_jargon(page: str) -> None:
    found = [
        f"{page}:{n}: {line.strip()}"
        for n, line in enumerate((ROOT / page).read_text().splitlines(), 1)
        if JARGON.search(line)
    ]
    assert found == [], "say what the reader knows: 'the order-confirmation story', ..."
