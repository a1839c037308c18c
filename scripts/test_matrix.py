"""``make test-matrix``: the suites on every CPython here, and every extra at the ends of its range.

Sessions, each in a fresh virtual environment made with uv, with the project
installed from this checkout and the test extras (what ``make test``
installs):

* ``py3.X`` -- for every CPython found (pyenv's versions, ``python3.X`` on
  ``PATH``) that ``requires-python`` allows: the whole suite, every
  dependency at the newest version the resolver picks for that Python.  The
  newest Python's session is the "newest" end of every extra's range.
* ``oldest-<extra>`` -- on the oldest Python: the extra's package pinned to
  the lowest version its extra allows (``rq>=1.16`` -> ``rq==1.16``), the rest
  resolved around it; that integration's tests.
* ``<dist>-<version>`` -- a few versions inside a range worth a session of
  their own (RQ 2.x, whose worker API differs from both ends).

The suite's Redis databases live in a private ``redis-server`` on a free
port (``CTXRELAY_TEST_REDIS``), so a matrix run and a ``make test`` can run
side by side; RabbitMQ is the shared one on 127.0.0.1:5672 (``make
services``), where the tests use queue names of their own.

Results: ``build/matrix/<session>.log`` for each session, and
``build/matrix/results.md`` / ``results.json``: per session the Python, the
versions of the packages under test, pytest's counts and the outcome.  The
exit status is 0 only if every session passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "matrix"

#: The extras every session installs (``make test``'s).
TEST_EXTRAS = next(
    line.split(":=", 1)[1].strip()
    for line in (ROOT / "Makefile").read_text().splitlines()
    if line.startswith("EXTRAS")
)
#: Installed after the extras without their dependencies, as the Makefile does
#: (arq pins redis<6; Celery needs >=6.4, and arq works with it).
NO_DEPS = ("arq>=0.28",)

#: extra -> the tests that exercise it.
TESTS: dict[str, tuple[str, ...]] = {
    "asgi": (
        "tests/integrations/test_asgi.py",
        "tests/integrations/test_asgi_door.py",
        "tests/integrations/test_asgi_websocket.py",
        "tests/test_leaks_scope.py",
    ),
    "fastapi": (
        "tests/integrations/test_asgi.py",
        "tests/integrations/test_asgi_websocket.py",
        "tests/integrations/test_logging_end_to_end.py",
        "tests/test_demo.py",
    ),
    "flask": ("tests/integrations/test_wsgi_flask.py",),
    "django": (
        "tests/integrations/test_django.py",
        "tests/integrations/test_django_dropped_stream.py",
    ),
    "celery": (
        "tests/integrations/test_celery.py",
        "tests/integrations/test_celery_revoke.py",
        "tests/integrations/test_logging_end_to_end.py",
        "tests/test_demo.py",
    ),
    "rq": ("tests/integrations/test_rq.py",),
    "dramatiq": ("tests/integrations/test_dramatiq.py",),
    "requests": (
        "tests/integrations/test_http_requests.py",
        "tests/integrations/test_http_redirects.py",
    ),
    "httpx": (
        "tests/integrations/test_http_httpx.py",
        "tests/integrations/test_http_redirects.py",
        "tests/test_demo.py",
    ),
    "aiohttp": (
        "tests/integrations/test_http_aiohttp.py",
        "tests/integrations/test_http_redirects.py",
    ),
    "structlog": (
        "tests/integrations/test_structlog.py",
        "tests/integrations/test_logging.py",
        "tests/integrations/test_log_forging.py",
    ),
    "loguru": (
        "tests/integrations/test_loguru.py",
        "tests/integrations/test_logging.py",
        "tests/integrations/test_log_forging.py",
    ),
    "opentelemetry": (
        "tests/test_wire.py",
        "tests/test_wire_leaks.py",
        "tests/integrations/test_opentelemetry_spans.py",
    ),
    "grpc": ("tests/integrations/test_grpc.py", "tests/integrations/test_grpc_deadlines.py"),
    "nats": ("tests/integrations/test_nats.py",),
    "arq": ("tests/integrations/test_arq.py",),
    "taskiq": ("tests/integrations/test_taskiq.py",),
    "reactivex": ("tests/integrations/test_reactivex.py",),
    "sentry": ("tests/integrations/test_sentry.py",),
}

#: extra -> extras that cannot be installed beside that extra's oldest version
#: (dramatiq 1.16's redis extra caps redis<6; taskiq-redis needs redis>=7).
CONFLICTS: dict[str, tuple[str, ...]] = {"dramatiq": ("taskiq",)}

#: Versions inside a range that get a session of their own: (extra, version).
POINTS: tuple[tuple[str, str], ...] = (("rq", "2.0.0"), ("rq", "2.12.0"))

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?>=([0-9][^,;\s]*)")
_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


@dataclass
class Session:
    """One environment and the tests run in it."""

    name: str
    python: str
    pins: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()  # distributions whose versions the report shows
    without: tuple[str, ...] = ()  # extras left out: they cannot be installed beside the pins


@dataclass
class Outcome:
    session: str
    python: str
    versions: dict[str, str]
    counts: dict[str, int]
    ok: bool
    summary: str
    seconds: float
    log: str
    notes: list[str] = field(default_factory=list)


def _requirements() -> list[str]:
    """The project's requirements as metadata spells them (``...; extra == "x"``),
    from pyproject.toml where the Python can read it, else from the installed
    metadata (which may predate the last edit of pyproject.toml)."""
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        return [
            f'{req}; extra == "{extra}"'
            for extra, reqs in project["optional-dependencies"].items()
            for req in reqs
        ]
    return metadata.requires("ctxrelay") or []


def ranges() -> dict[str, tuple[str, str]]:
    """extra -> (distribution, lowest allowed version)."""
    found: dict[str, tuple[str, str]] = {}
    for requirement in _requirements():
        spec, _, marker = requirement.partition(";")
        extra = re.search(r'extra == "([^"]+)"', marker)
        match = _REQUIREMENT.match(spec.replace(" ", ""))
        if extra and match and extra[1] in TESTS:
            found.setdefault(extra[1], (match[1].lower(), match[3]))  # the first package
    return found


def pythons(oldest_allowed: tuple[int, int]) -> dict[str, str]:
    """'3.X' -> an interpreter, for every CPython found that the project allows."""
    found: dict[str, str] = {}
    candidates = glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
    candidates += [p for n in range(10, 20) if (p := shutil.which(f"python3.{n}"))]
    candidates.append(sys.executable)
    for candidate in candidates:
        try:
            out = subprocess.run(
                [
                    candidate,
                    "-c",
                    "import sys, platform; print(*sys.version_info[:2], "
                    "platform.python_implementation())",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        major, minor, implementation = int(out[0]), int(out[1]), out[2]
        if implementation == "CPython" and (major, minor) >= oldest_allowed:
            found.setdefault(f"{major}.{minor}", candidate)
    return dict(sorted(found.items(), key=lambda kv: tuple(map(int, kv[0].split(".")))))


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        sys.exit("test_matrix: uv is needed (it is in the dev extra)")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of the matrix's own on a free port; 'host:port'."""
    server = shutil.which("redis-server")
    if server is None:
        yield "127.0.0.1:6379"  # the tests skip (or fail under CI) without it
        return
    port = _free_port()
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\nfor n in sys.argv[1:]:\n"
        "    try: out[n] = version(n)\n    except PackageNotFoundError: out[n] = '-'\n"
        "print(json.dumps(out))"
    )
    finished = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=False
    )
    return dict(json.loads(finished.stdout)) if finished.returncode == 0 else {}


def run_session(session: Session, redis_at: str, timeout: float) -> Outcome:
    log = OUT / f"{session.name}.log"
    where = OUT / "venvs" / session.name
    shutil.rmtree(where, ignore_errors=True)
    started = time.monotonic()
    python = where / "bin" / "python"
    with log.open("w") as out:

        def step(command: Sequence[str], limit: float) -> int:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            try:
                return subprocess.run(
                    command,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=limit,
                    env={
                        **os.environ,
                        "CTXRELAY_TEST_REDIS": redis_at,
                        "UV_PYTHON_DOWNLOADS": "never",
                    },
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                out.write(f"\n(timed out after {limit:.0f} s)\n")
                return 124

        uv = _uv()
        status = step([uv, "venv", "--quiet", "--python", session.python, str(where)], 300)
        no_deps_names = {r.split(">")[0] for r in NO_DEPS}
        pins = [p for p in session.pins if p.split("==")[0] not in no_deps_names]
        loose = [p for p in session.pins if p.split("==")[0] in no_deps_names]
        loose += [r for r in NO_DEPS if not any(p.startswith(r.split(">")[0]) for p in loose)]
        extras = ",".join(e for e in TEST_EXTRAS.split(",") if e not in session.without)
        if status == 0:
            install = [uv, "pip", "install", "--python", str(python)]
            status = step([*install, "-e", f".[{extras}]", *pins], 1200)
        if status == 0:  # as the Makefile: these without their dependencies (a pin wins)
            status = step([*install, "--no-deps", *loose], 600)
        if status != 0:
            return Outcome(
                session.name,
                session.python,
                {},
                {},
                False,
                "could not install",
                time.monotonic() - started,
                str(log.relative_to(ROOT)),
            )
        # A module that cannot be collected (its package missing) is an error in
        # the counts, and the rest still runs.
        pytest = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
        pytest.append("--continue-on-collection-errors")
        status = step([*pytest, *session.tests], timeout)
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if _COUNTS.search(ln) and " in " in ln]
    summary = lines[-1].strip("= ") if lines else "(no pytest summary)"
    counts = {
        kind.rstrip("s") if kind.startswith("error") else kind: int(n)
        for n, kind in _COUNTS.findall(summary)
    }
    versions = _versions(python, ("python", *session.watch)) if python.exists() else {}
    versions.pop("python", None)
    return Outcome(
        session.name,
        _python_version(python),
        versions,
        counts,
        status == 0,
        summary,
        time.monotonic() - started,
        str(log.relative_to(ROOT)),
    )


def _python_version(python: Path) -> str:
    finished = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return finished.stdout.strip() or "?"


def plan(only: set[str] | None) -> list[Session]:
    lowest = ranges()
    requires = metadata.metadata("ctxrelay")["Requires-Python"] or ">=3.10"
    floor = tuple(int(p) for p in requires.removeprefix(">=").split(".")[:2])
    found = pythons((floor[0], floor[1]))
    if not found:
        sys.exit("test_matrix: no CPython found")
    watch = tuple(dist for dist, _ in lowest.values())
    sessions = [Session(f"py{v}", p, watch=watch) for v, p in found.items()]
    oldest_python = next(iter(found.values()))
    for extra, (dist, version) in lowest.items():
        sessions.append(
            Session(
                f"oldest-{extra}",
                oldest_python,
                (f"{dist}=={version}",),
                TESTS[extra],
                (dist,),
                CONFLICTS.get(extra, ()),
            )
        )
    for extra, version in POINTS:
        dist = lowest[extra][0]
        sessions.append(
            Session(
                f"{dist}-{version}", oldest_python, (f"{dist}=={version}",), TESTS[extra], (dist,)
            )
        )
    if only:
        sessions = [s for s in sessions if s.name in only or s.name.split("-", 1)[-1] in only]
    return sessions


def report(outcomes: Sequence[Outcome]) -> str:
    rows = [
        "| session | Python | versions under test | pytest | result |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(o.versions.items()))
        rows.append(
            f"| {o.session} | {o.python} | {versions} | {o.summary} | "
            f"{'passed' if o.ok else 'FAILED'} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="test_matrix", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("sessions", nargs="*", help="run only these (py3.12, oldest-rq, rq ...)")
    parser.add_argument("--list", action="store_true", help="print the sessions and exit")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds per session's tests")
    args = parser.parse_args(argv)
    sessions = plan(set(args.sessions) or None)
    if args.list:
        for s in sessions:
            print(f"{s.name:24} {s.python}  {' '.join(s.pins)}  {' '.join(s.tests) or '(all)'}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    with private_redis() as redis_at:
        print(
            f"test_matrix: {len(sessions)} sessions; Redis at {redis_at}; logs in {OUT}", flush=True
        )
        for session in sessions:
            outcome = run_session(session, redis_at, args.timeout)
            outcomes.append(outcome)
            mark = "ok  " if outcome.ok else "FAIL"
            versions = " ".join(f"{k}=={v}" for k, v in outcome.versions.items())
            print(
                f"{mark} {outcome.session:22} py{outcome.python:8} {versions[:60]:60} "
                f"{outcome.summary}",
                flush=True,
            )
            (OUT / "results.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
            (OUT / "results.md").write_text(report(outcomes))
    failed = [o.session for o in outcomes if not o.ok]
    print(
        f"test_matrix: {len(outcomes) - len(failed)} passed, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
