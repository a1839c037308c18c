"""What a package index shows of ctxrelay, checked without building it.

``make dist`` builds and installs the artefacts; these are the cheap checks
that keep the sources it builds from honest: one version, valid classifiers,
absolute links in the long description, every link into the docs site
pointing at a page and heading that exist, and well-formed changelog
fragments.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

import ctxrelay
import ctxrelay.demo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the oldest Python reads the file with the dev extra's parser
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]
DOCS_SITE: str = PROJECT["urls"]["Documentation"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FRAGMENT = re.compile(r"^(\+[a-z0-9][a-z0-9-]*|[0-9]+)\.(?P<type>[a-z]+)\.md$")


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug, as MkDocs makes a heading's anchor."""
    text = re.sub(r"`|\*|\[|\]\([^)]*\)", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE)}


def test_the_version_has_one_source() -> None:
    assert "version" not in PROJECT
    assert PROJECT["dynamic"] == ["version"]
    setuptools = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert setuptools == {"attr": "ctxrelay.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", ctxrelay.__version__)


def test_the_license_file_is_shipped() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_classifiers_are_known_to_the_package_index_and_match_requires_python() -> None:
    trove = pytest.importorskip("trove_classifiers")
    classifiers: list[str] = PROJECT["classifiers"]
    assert [c for c in classifiers if c not in trove.classifiers] == []
    pythons = [c.rsplit(" ", 1)[1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)]
    assert pythons[0] == PROJECT["requires-python"].removeprefix(">=")
    assert pythons == sorted(pythons, key=lambda v: tuple(map(int, v.split("."))))


def test_the_long_description_has_only_absolute_links() -> None:
    readme = (ROOT / PROJECT["readme"]).read_text()
    relative = [t for t in LINK.findall(readme) if not t.startswith(("https://", "http://"))]
    assert relative == [], (
        f"README.md is the package index page, where relative links break: {relative}; "
        f"link docs pages as {DOCS_SITE}<page>/ and repository files as "
        f"{PROJECT['urls']['Source']}/blob/main/<path>"
    )


def test_every_link_into_the_docs_site_points_at_a_page_and_heading_that_exist() -> None:
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md"]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if not target.startswith(DOCS_SITE):
                continue
            path, _, anchor = target.removeprefix(DOCS_SITE).partition("#")
            name = path.strip("/")
            doc = ROOT / "docs" / (f"{name}.md" if name else "index.md")
            if name and not doc.exists():
                doc = ROOT / "docs" / name / "index.md"
            if not doc.exists():
                broken.append(f"{page.name}: {target} (no {doc.relative_to(ROOT)})")
            elif anchor and anchor not in _anchors(doc):
                broken.append(f"{page.name}: {target} (no heading #{anchor})")
    assert broken == []


def test_changelog_fragments_are_typed() -> None:
    types = {t["directory"] for t in PYPROJECT["tool"]["towncrier"]["type"]}
    fragments = sorted(p.name for p in (ROOT / "changelog.d").iterdir() if p.name != "README.md")
    bad = [n for n in fragments if not (m := FRAGMENT.match(n)) or m["type"] not in types]
    assert bad == [], f"name fragments <issue>.<type>.md or +<slug>.<type>.md, type in {types}"
    assert all((ROOT / "changelog.d" / n).read_text().strip() for n in fragments)


def test_the_demo_extra_installs_what_the_demo_imports() -> None:
    demo = " ".join(PROJECT["optional-dependencies"]["demo"]).lower()
    assert [name for name in ctxrelay.demo.NEEDS if name not in demo] == []


def test_the_core_has_no_dependency() -> None:
    assert PROJECT["dependencies"] == []


def test_the_project_has_one_address_everywhere() -> None:
    # The repository and the docs site are published with the first release (the
    # README says so); until then every address must at least be the same one, so
    # that moving it is one change that this test checks was made everywhere.
    urls: dict[str, str] = PROJECT["urls"]
    source = urls["Source"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", source)
    assert urls["Homepage"] == source
    assert urls["Changelog"] == f"{source}/blob/main/CHANGELOG.md"
    assert urls["Issues"] == f"{source}/issues"
    assert DOCS_SITE.startswith("https://")
    assert DOCS_SITE.endswith("/")
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert re.search(rf"^repo_url: {re.escape(source)}$", mkdocs, re.MULTILINE)
    assert re.search(rf"^site_url: {re.escape(DOCS_SITE)}$", mkdocs, re.MULTILINE)
    towncrier = PYPROJECT["tool"]["towncrier"]
    assert towncrier["issue_format"].startswith(f"[#{{issue}}]({source}/issues/")
    assert f"({source}/tree/v{{version}})" in towncrier["title_format"]
    pages = [ROOT / n for n in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "SECURITY.md")]
    pages += sorted((ROOT / "docs").rglob("*.md"))
    elsewhere = {
        f"{page.relative_to(ROOT)}: {repo}"
        for page in pages
        for repo in re.findall(r"https://github\.com/([\w.-]+/[\w.-]+)", page.read_text())
        if repo.lower().startswith("ctxrelay/") and f"https://github.com/{repo}" != source
    }
    assert elsewhere == set()
