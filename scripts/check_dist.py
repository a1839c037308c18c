"""``make dist``: build the sdist and the wheel, check them, install them as a user would.

1. ``python -m build`` builds the sdist, then the wheel *from the sdist* (so a
   file missing from the sdist breaks the wheel too), into ``dist/``.
2. ``twine check --strict`` on both; the wheel must hold the LICENSE, the
   ``py.typed`` marker and the console script, and no tests.
3. The wheel goes into fresh virtual environments (made with uv):
   * alone: nothing but ctxrelay is installed, the core and the stdlib-only
     integrations import, every other integration refuses with an
     ``ImportError`` naming its extra, and ``ctxrelay demo`` says in one line
     which extra it needs;
   * with each extra alone: its integration imports (others may too, when
     the extra's packages bring theirs: taskiq brings aiohttp);
   * with the ``demo`` extra: ``ctxrelay demo`` runs the walk-through and
     exits 0.
4. The sdist is unpacked, installed with its test extras, and its tests run
   from there (``--sdist-tests`` chooses which: by default those that need
   no broker).

Run from the repository root: ``python scripts/check_dist.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"

#: extra -> the modules that extra makes importable.
INTEGRATIONS: dict[str, tuple[str, ...]] = {
    "asgi": ("ctxrelay.integrations.asgi",),
    "fastapi": ("ctxrelay.integrations.asgi",),
    "flask": ("ctxrelay.integrations.wsgi",),
    "django": ("ctxrelay.integrations.django",),
    "celery": ("ctxrelay.integrations.celery",),
    "rq": ("ctxrelay.integrations.rq",),
    "dramatiq": ("ctxrelay.integrations.dramatiq",),
    "requests": ("ctxrelay.integrations.requests",),
    "httpx": ("ctxrelay.integrations.httpx",),
    "aiohttp": ("ctxrelay.integrations.aiohttp", "ctxrelay.integrations.aiohttp_server"),
    "structlog": ("ctxrelay.integrations.structlog",),
    "loguru": ("ctxrelay.integrations.loguru",),
    "opentelemetry": ("opentelemetry.trace", "ctxrelay.integrations.opentelemetry"),
    "grpc": ("ctxrelay.integrations.grpc",),
    "nats": ("ctxrelay.integrations.nats",),
    "arq": ("ctxrelay.integrations.arq",),
    "taskiq": ("ctxrelay.integrations.taskiq",),
    "reactivex": ("ctxrelay.integrations.reactivex",),
    "sentry": ("ctxrelay.integrations.sentry",),
    "demo": ("ctxrelay.demo.walk",),
}

#: Modules that need nothing beyond the standard library.
CORE = (
    "ctxrelay",
    "ctxrelay.integrations.logging",
    "ctxrelay.integrations.asgi",
    "ctxrelay.integrations.wsgi",
)

#: Integration modules that need a package, and the extra that installs it.
NEEDS_EXTRA = {
    "ctxrelay.integrations.django": "django",
    "ctxrelay.integrations.celery": "celery",
    "ctxrelay.integrations.rq": "rq",
    "ctxrelay.integrations.dramatiq": "dramatiq",
    "ctxrelay.integrations.requests": "requests",
    "ctxrelay.integrations.httpx": "httpx",
    "ctxrelay.integrations.aiohttp": "aiohttp",
    "ctxrelay.integrations.aiohttp_server": "aiohttp",
    "ctxrelay.integrations.structlog": "structlog",
    "ctxrelay.integrations.loguru": "loguru",
    "ctxrelay.integrations.opentelemetry": "opentelemetry",
    "ctxrelay.integrations.grpc": "grpc",
    "ctxrelay.integrations.nats": "nats",
    "ctxrelay.integrations.arq": "arq",
    "ctxrelay.integrations.taskiq": "taskiq",
    "ctxrelay.integrations.reactivex": "reactivex",
    "ctxrelay.integrations.sentry": "sentry",
}

#: Extras installed in the sdist's test environment: the Makefile's (``make test``'s).
TEST_EXTRAS = next(
    line.split(":=", 1)[1].strip()
    for line in (ROOT / "Makefile").read_text().splitlines()
    if line.startswith("EXTRAS")
)
#: Installed without dependencies after them, as the Makefile does.
NO_DEPS = ("arq>=0.28",)

#: Run in a fresh environment: which of ``sys.argv[1:]`` import, and how the others fail.
_PROBE = """
import importlib, json, sys
from importlib.metadata import distributions
found = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        found[name] = None
    except ImportError as exc:
        found[name] = str(exc)
dists = sorted({d.metadata["Name"].lower() for d in distributions()})
print(json.dumps({"imports": found, "dists": dists}))
"""


class Failed(Exception):
    """A check did not hold."""


def say(message: str) -> None:
    print(f"check_dist: {message}", flush=True)


def run(command: Sequence[str | Path], cwd: Path | str | None = None) -> str:
    """Run ``command``; return its output, or raise :class:`Failed` with it."""
    shown = " ".join(shlex.quote(str(part)) for part in command)
    finished = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},  # only the Pythons that are here
    )
    if finished.returncode != 0:
        raise Failed(f"{shown} exited {finished.returncode}:\n{finished.stdout}{finished.stderr}")
    return finished.stdout


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise Failed("uv is needed (it is in the dev extra): pip install uv")
    return found


def build() -> tuple[Path, Path]:
    """Build sdist then wheel (from the sdist) into dist/; return both paths."""
    shutil.rmtree(DIST, ignore_errors=True)
    run([sys.executable, "-m", "build", "--outdir", DIST, ROOT], cwd=ROOT)
    sdists = sorted(DIST.glob("ctxrelay-*.tar.gz"))
    wheels = sorted(DIST.glob("ctxrelay-*-py3-none-any.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise Failed(f"expected one sdist and one wheel in dist/, found {sorted(DIST.iterdir())}")
    say(f"built {sdists[0].name} and {wheels[0].name}")
    return sdists[0], wheels[0]


def check_artefacts(sdist: Path, wheel: Path) -> None:
    run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel])
    say("twine check --strict: both artefacts pass")
    version = _version()
    names, metadata, entry_points = _wheel(wheel)
    info = f"ctxrelay-{version}.dist-info"
    wanted = {f"{info}/licenses/LICENSE", "ctxrelay/py.typed", "ctxrelay/__init__.py"}
    if not wanted <= names:
        raise Failed(f"the wheel lacks {sorted(wanted - names)}")
    if any(name.startswith(("tests/", "bench/", "docs/")) for name in names):
        raise Failed("the wheel ships tests, benchmarks or docs")
    if "ctxrelay = ctxrelay.__main__:main" not in entry_points:
        raise Failed("the wheel has no ctxrelay console script")
    for field in ("License-Expression: MIT", "Project-URL: Documentation", "Author: "):
        if field not in metadata:
            raise Failed(f"the wheel's METADATA has no {field!r}")
    if "](docs/" in metadata or "](./" in metadata:
        raise Failed("the long description has relative links (they break on a package index)")
    with tarfile.open(sdist) as archive:
        members = {
            Path(m).relative_to(f"ctxrelay-{version}").as_posix() for m in archive.getnames()[1:]
        }
    tracked = subprocess.run(
        ["git", "ls-files", "tests", "docs", "bench", "changelog.d"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    wanted = {"LICENSE", "CHANGELOG.md", "mkdocs.yml", "Makefile", *tracked}
    missing = sorted(n for n in wanted if (ROOT / n).exists() and n not in members)
    if missing:
        raise Failed(f"the sdist lacks {missing[:10]} (MANIFEST.in)")
    say(f"wheel: LICENSE, py.typed, console script, metadata; sdist: {len(members)} files")


def _wheel(wheel: Path) -> tuple[set[str], str, str]:
    """The wheel's file names, its METADATA and its entry points."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"ctxrelay-{_version()}.dist-info"
        return (
            names,
            archive.read(f"{info}/METADATA").decode(),
            archive.read(f"{info}/entry_points.txt").decode(),
        )


def extras_of(wheel: Path) -> set[str]:
    """The extras the wheel declares (``Provides-Extra``)."""
    metadata = _wheel(wheel)[1]
    prefix = "Provides-Extra: "
    return {line[len(prefix) :] for line in metadata.splitlines() if line.startswith(prefix)}


def _version() -> str:
    namespace: dict[str, object] = {}
    for line in (ROOT / "src/ctxrelay/__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            exec(line, namespace)
    return str(namespace["__version__"])


def venv(where: Path, python: str) -> Path:
    """A fresh virtual environment (no pip, nothing else) at ``where``; its python."""
    run([uv(), "venv", "--quiet", "--python", python, where])
    return where / "bin" / "python"


def install(python: Path, *requirements: str) -> None:
    run([uv(), "pip", "install", "--quiet", "--python", python, *requirements])


def probe(python: Path, modules: Sequence[str]) -> tuple[dict[str, str | None], list[str]]:
    document = json.loads(run([python, "-c", _PROBE, *modules], cwd=tempfile.gettempdir()))
    return document["imports"], document["dists"]


def check_refusals(imports: dict[str, str | None], allowed: set[str]) -> None:
    """Every integration not in ``allowed`` refuses, naming its extra."""
    for module, extra in NEEDS_EXTRA.items():
        if module in allowed:
            continue
        error = imports[module]
        if error is None:
            raise Failed(f"{module} imported without the {extra!r} extra")
        if f"ctxrelay[{extra}]" not in error:
            raise Failed(f"{module} without its extra says {error!r}, not which extra to install")


def check_core(wheel: Path, work: Path, python: str) -> None:
    py = venv(work / "core", python)
    install(py, str(wheel))
    imports, dists = probe(py, [*CORE, *NEEDS_EXTRA])
    if dists != ["ctxrelay"]:
        raise Failed(f"the core installed more than itself: {dists}")
    broken = {m: e for m, e in imports.items() if m in CORE and e is not None}
    if broken:
        raise Failed(f"the core does not import on its own: {broken}")
    check_refusals(imports, set())
    script = py.parent / "ctxrelay"
    finished = subprocess.run(
        [str(script), "demo"], capture_output=True, text=True, check=False, timeout=120
    )
    lines = finished.stderr.splitlines()
    if finished.returncode != 2 or len(lines) != 1 or "ctxrelay[demo]" not in lines[0]:
        raise Failed(f"`ctxrelay demo` without the demo extra: {finished!r}")
    say(f"core alone: only ctxrelay installed; {', '.join(CORE)} import")
    say(f"core alone: `ctxrelay demo` says {lines[0]!r}")


def check_extra(wheel: Path, work: Path, python: str, extra: str) -> None:
    py = venv(work / extra, python)
    install(py, f"{wheel}[{extra}]")
    modules = INTEGRATIONS[extra]
    imports, dists = probe(py, [*CORE, *modules, *NEEDS_EXTRA])
    broken = {m: e for m, e in imports.items() if m in (*CORE, *modules) and e is not None}
    if broken:
        raise Failed(f"with only the {extra!r} extra: {broken}")
    say(f"[{extra}] alone: {', '.join(modules)} import ({len(dists)} distributions)")
    if extra == "demo":
        script = py.parent / "ctxrelay"
        finished = subprocess.run(
            [str(script), "demo"], capture_output=True, text=True, check=False, timeout=300
        )
        if finished.returncode != 0:
            raise Failed(
                f"`ctxrelay demo` with the demo extra:\n{finished.stdout}{finished.stderr}"
            )
        say(f"[demo]: `ctxrelay demo` exits 0: {finished.stdout.strip().splitlines()[-1]}")


def check_sdist_tests(sdist: Path, work: Path, python: str, pytest_args: Sequence[str]) -> None:
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    source = work / sdist.name.removesuffix(".tar.gz")
    py = venv(work / "sdist-venv", python)
    install(py, f"{source}[{TEST_EXTRAS}]")
    install(py, "--no-deps", *NO_DEPS)
    command = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", *pytest_args]
    say(f"sdist: running its tests from {source.name}/: pytest {' '.join(pytest_args)}")
    finished = subprocess.run(
        [str(part) for part in command], cwd=source, text=True, capture_output=True, check=False
    )
    tail = finished.stdout.strip().splitlines()[-1:] or ["(no output)"]
    if finished.returncode != 0:
        raise Failed(f"the sdist's tests failed:\n{finished.stdout[-6000:]}{finished.stderr}")
    say(f"sdist: tests pass from the unpacked sdist: {tail[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_dist", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venvs")
    parser.add_argument(
        "--sdist-tests",
        default="-m 'not broker'",
        help="pytest arguments for the sdist's own test run ('' runs them all; 'skip' skips)",
    )
    args = parser.parse_args(argv)
    try:
        sdist, wheel = build()
        check_artefacts(sdist, wheel)
        unmapped = extras_of(wheel) - set(INTEGRATIONS) - {"dev", "docs"}
        if unmapped:
            raise Failed(f"no import check for the extras {sorted(unmapped)}: add them here")
        with tempfile.TemporaryDirectory(prefix="ctxrelay-dist-") as tmp:
            work = Path(tmp)
            check_core(wheel, work, args.python)
            for extra in INTEGRATIONS:
                check_extra(wheel, work, args.python, extra)
            if args.sdist_tests != "skip":
                check_sdist_tests(sdist, work, args.python, shlex.split(args.sdist_tests))
    except Failed as exc:
        print(f"check_dist: FAILED: {exc}", file=sys.stderr)
        return 1
    say(f"OK: {sdist.name} and {wheel.name} in {DIST.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
