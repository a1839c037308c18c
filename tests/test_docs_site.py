"""The documentation site: built strictly, with every public name in its API reference.

``make docs`` (and so ``make test``) builds the site with ``mkdocs build
--strict``; this module builds it once more into a temporary directory and
checks what a strict build cannot: that the reference documents every name
of ``ctxrelay.__all__`` and of each integration's ``__all__``, and that no
page speaks the project's in-house shorthand.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctxrelay

ROOT = Path(__file__).resolve().parent.parent

INTEGRATIONS_SRC = ROOT / "src" / "ctxrelay" / "integrations"

#: Every integration module; its page is docs/integrations/<module>.md.
INTEGRATIONS = sorted(p.stem for p in INTEGRATIONS_SRC.glob("*.py") if not p.stem.startswith("_"))


def _all_of(module: str) -> list[str]:
    """A module's ``__all__``, read without importing it (its package may be absent)."""
    tree = ast.parse((INTEGRATIONS_SRC / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return [str(ast.literal_eval(element)) for element in node.value.elts]  # type: ignore[attr-defined]
    return []


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


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_each_integration_has_a_page_that_documents_every_name_of_its_module(
    site: Path, name: str
) -> None:
    page = ROOT / "docs" / "integrations" / f"{name}.md"
    text = page.read_text() if page.exists() else ""
    assert f"::: ctxrelay.integrations.{name}" in text, (
        f"ctxrelay.integrations.{name} has no docs page: add docs/integrations/{name}.md "
        f"(what it does, how to install and use it, then '::: ctxrelay.integrations.{name}') "
        "and list it in mkdocs.yml's nav"
    )
    ids = _ids(site / "integrations" / name / "index.html")
    prefix = f"ctxrelay.integrations.{name}"
    assert [n for n in _all_of(name) if f"{prefix}.{n}" not in ids] == []


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
