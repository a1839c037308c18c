"""What ctxrelay costs a whole service under load, against the bare service
and against what users assemble today.

A FastAPI front service on uvicorn (one worker, its own process; see
``bench/service_app.py``) answers ``GET /work``: it reads the request id,
fans out two tasks on a thread pool (each logs a line), makes one outgoing
httpx call to a downstream service (plain ASGI on uvicorn, its own
process), logs a third line, and answers.  Log lines go through a stdlib
``FileHandler`` to a file.  Variants, one front process each, all calling
the same downstream process:

* **bare**: no context at all;
* **ctxrelay**: ``RelayMiddleware`` + ``ctxrelay.ThreadPoolExecutor`` +
  httpx ``install()`` + ``ContextFilter``;
* **users' stack**: asgi-correlation-id's middleware and log filter,
  starlette-context, OpenTelemetry's threading and httpx instrumentations,
  a hand-written ``copy_context().run`` at the pool and an httpx hook that
  sends ``X-Request-ID``;
* **ctxrelay, strict** and **ctxrelay, strict 0.01**: ctxrelay with
  ``CTXRELAY_STRICT=1`` (every place captured) and with
  ``CTXRELAY_STRICT_SAMPLE=0.01``.

Load: ``wrk`` (or ``bench/service_load.py`` if wrk is not installed), one
thread, 32 keep-alive connections, every request carrying a valid
``x-request-id`` (a UUID4, which every stack keeps).  With two or more CPUs
and ``taskset``, the load generator is pinned to one core and every server
to another.  Variants run one after another, the order rotated one place
per round; each variant gets a warm-up run first, which is not counted.

Reported per variant: requests/s, p50 and p99 latency (medians over
rounds), the front process's CPU time per request (``/proc/<pid>/stat``,
so other processes on the machine do not count), and the throughput ratios
to bare and to the users' stack -- medians (and ranges) of per-round ratios.
Before the load, one request per variant checks what actually arrived where
(handler, pool tasks, downstream service, log lines).

Run: ``python bench/bench_service.py`` (about four minutes), ``--quick``
(a smoke run of a few seconds), ``--rounds N --duration S``, ``--twins``
(adds a second bare and a second ctxrelay process: how far two identical
processes differ), ``--where SECONDS`` (then profiles each front process
with py-spy, if installed, under the same load: the share of its CPU spent
in the context libraries' own frames).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import markdown_table, rotations

HERE = Path(__file__).resolve().parent
CONNECTIONS = 32
STRICT_VARS = ("CTXRELAY_STRICT", "CTXRELAY_STRICT_SAMPLE")


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    rounds: int
    duration: int  # seconds per variant per round
    warmup: int  # seconds per variant before the first round (0: none)


FULL = Settings(rounds=4, duration=10, warmup=3)
QUICK = Settings(rounds=1, duration=1, warmup=0)


@dataclass(frozen=True)
class Variant:
    name: str
    stack: str
    env: dict[str, str] = field(default_factory=dict)


VARIANTS = [
    Variant("bare", "bare"),
    Variant("ctxrelay", "ctxrelay"),
    Variant("users' stack", "users"),
    Variant("ctxrelay, strict", "ctxrelay", {"CTXRELAY_STRICT": "1"}),
    Variant(
        "ctxrelay, strict 0.01",
        "ctxrelay",
        {"CTXRELAY_STRICT": "1", "CTXRELAY_STRICT_SAMPLE": "0.01"},
    ),
]
TWINS = [Variant("bare (twin)", "bare"), Variant("ctxrelay (twin)", "ctxrelay")]


@dataclass
class Run:
    """One load run against one variant."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    front_cpu_us: float  # front process CPU per request (nan if unknown)
    down_cpu_us: float


# ------------------------------------------------------------ the processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinning() -> tuple[list[str], list[str], str]:
    """taskset prefixes for the load generator and the servers, and what they
    mean in words; no pinning with fewer than two CPUs or without taskset."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    taskset = shutil.which("taskset")
    if len(cpus) < 2 or taskset is None:
        return [], [], "not pinned (needs two CPUs and taskset)"
    load, server = cpus[0], cpus[1]
    probe = subprocess.run([taskset, "-c", str(server), "true"], check=False)
    if probe.returncode != 0:
        return [], [], "not pinned (taskset failed)"
    return (
        [taskset, "-c", str(load)],
        [taskset, "-c", str(server)],
        f"load generator pinned to CPU {load}, every server process to CPU {server}",
    )


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a service exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no service listening on port {port} after {timeout} s")


@dataclass
class Front:
    variant: Variant
    port: int
    log: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def services(
    variants: Sequence[Variant], pin: list[str], workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], list[Front]]]:
    """The downstream service and one front process per variant, all started
    at once (unpinned: they start faster on every core), then each pinned
    with all its threads (``pin``: a ``taskset`` prefix); stopped on the way
    out, the fronts first.  Their output goes to a file in ``workdir``."""
    app = str(HERE / "service_app.py")
    base_env = {k: v for k, v in os.environ.items() if k not in STRICT_VARS}
    procs: list[subprocess.Popen[bytes]] = []
    output = (workdir / "services.out").open("wb")
    try:
        down_port = free_port()
        down = subprocess.Popen(
            [sys.executable, app, "downstream", "--port", str(down_port)],
            env=base_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        fronts = []
        for index, variant in enumerate(variants):
            port = free_port()
            log = workdir / f"front-{index}.log"
            command = [
                *(sys.executable, app, "front", "--stack", variant.stack),
                *("--port", str(port), "--downstream-port", str(down_port), "--log", str(log)),
            ]
            proc = subprocess.Popen(
                command, env={**base_env, **variant.env}, stdout=output, stderr=subprocess.STDOUT
            )
            procs.append(proc)
            fronts.append(Front(variant, port, log, proc))
        procs.append(down)  # stopped last: the fronts may still be calling it
        try:
            wait_listening(down_port, down)
            for front in fronts:
                wait_listening(front.port, front.proc)
        except RuntimeError:
            output.flush()
            sys.stderr.write((workdir / "services.out").read_text(errors="replace")[-4000:])
            raise
        for proc in procs if pin else ():
            command = [*pin[:1], "-a", "-p", *pin[1:], str(proc.pid)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        yield down, fronts
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        output.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads); nan
    where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- checking


def check(front: Front) -> list[str]:
    """One request with a fresh id: where did the id arrive?"""
    sent = str(uuid.uuid4())
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        conn.request("GET", "/work", headers={"x-request-id": sent})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    time.sleep(0.05)  # the pool tasks' lines are written by now; be sure
    lines = sum(sent in line for line in front.log.read_text().splitlines())
    tasks = sum(seen == sent for seen in body["tasks"])
    return [
        front.variant.name,
        "yes" if body["request_id"] == sent else "no",
        f"{tasks} of 2",
        "yes" if body["downstream"] == sent else "no",
        f"{lines} of 3",
    ]


# -------------------------------------------------------------------- load

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        return float("nan")
    return float(match[1]) * _UNITS[match[2]]


def load_generator() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "bench/service_load.py (Python, asyncio; wrk is not installed)"
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    version = (out.stdout + out.stderr).split("[")[0].strip() or "wrk"
    return version


def run_load(port: int, duration: int, request_id: str, prefix: list[str]) -> Run:
    """One load run; the figures as the load generator reports them."""
    wrk = shutil.which("wrk")
    header = f"x-request-id: {request_id}"
    if wrk is not None:
        command = [
            *prefix,
            *(wrk, "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "-H", header),
            f"http://127.0.0.1:{port}/work",
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        found = re.search(r"(\d+) requests in", out)
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
        p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        if found is None or rps is None or p50 is None or p99 is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        errors = int(bad[1]) if bad else 0
        errors += sum(int(n) for n in sock.groups()) if sock else 0
        return Run(
            float(rps[1]), _ms(p50[1]), _ms(p99[1]), int(found[1]), errors, float("nan"), 0.0
        )
    command = [
        *prefix,
        *(sys.executable, str(HERE / "service_load.py"), "127.0.0.1", str(port), "/work"),
        *("--connections", str(CONNECTIONS), "--duration", str(duration), "--header", header),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    return Run(
        result["requests"] / result["seconds"],
        result["p50_ms"],
        result["p99_ms"],
        int(result["requests"]),
        int(result["errors"]),
        float("nan"),
        0.0,
    )


def measured(front: Front, down: subprocess.Popen[bytes], duration: int, prefix: list[str]) -> Run:
    """A load run, with the CPU time the front and downstream processes spent."""
    front_before, down_before = cpu_seconds(front.proc.pid), cpu_seconds(down.pid)
    run = run_load(front.port, duration, str(uuid.uuid4()), prefix)
    front_cpu = cpu_seconds(front.proc.pid) - front_before
    down_cpu = cpu_seconds(down.pid) - down_before
    count = max(run.requests, 1)
    return dataclasses.replace(
        run, front_cpu_us=front_cpu / count * 1e6, down_cpu_us=down_cpu / count * 1e6
    )


# ----------------------------------------------------------- where it goes

#: The libraries that carry context, in any of the stacks.
CONTEXT_LIBS = ("ctxrelay", "asgi_correlation_id", "starlette_context", "opentelemetry")


def _owner(path: str) -> str | None:
    """Who a frame's file belongs to: a context library, another package,
    ``app`` (the bench's own code), or None for the standard library."""
    if path.startswith("<") or path.startswith(STDLIB):
        return None
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/ctxrelay/" in path:
        return "ctxrelay"
    return "app"


STDLIB = sysconfig.get_paths()["stdlib"]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):\d+\)$")


#: Where a sample was spent, by the outermost frame of its stack that names
#: one of the request's steps (first match wins, in this order).
BUCKETS = (
    ("log calls", ("Logger.info",)),
    ("pool hand-off", ("BaseEventLoop.run_in_executor",)),
    ("pool thread", ("_worker",)),
    ("httpx call", ("AsyncClient.get",)),
)
REST = "rest"


@dataclass
class Profile:
    """A py-spy profile of one front process, summed up."""

    name: str
    total: int = 0
    own: dict[str, int] = field(default_factory=dict)  # the context libraries' own frames
    buckets: dict[str, int] = field(default_factory=dict)


def attribute(name: str, raw: str) -> Profile:
    """Sum up a py-spy raw profile: every sample by step (:data:`BUCKETS`,
    inclusive of what the step calls), and the samples whose innermost frame
    outside the standard library is a context library's, by library.  The
    latter over-counts a library that runs standard-library work under its
    own frame (ctxrelay's pool ``submit`` is the stdlib body, OpenTelemetry
    wraps the worker thread's ``run``): the steps compare like with like."""
    profile = Profile(name)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        profile.total += n
        frames = [m for m in map(_FRAME.match, stack.split(";")) if m is not None]
        funcs = {m["func"] for m in frames}
        bucket = next((b for b, names in BUCKETS if funcs.intersection(names)), REST)
        profile.buckets[bucket] = profile.buckets.get(bucket, 0) + n
        owners = [_owner(m["path"]) for m in frames]
        lib = next((o for o in reversed(owners) if o is not None), None)
        if lib in CONTEXT_LIBS:
            assert lib is not None
            profile.own[lib] = profile.own.get(lib, 0) + n
    return profile


def where(
    fronts: Sequence[Front], seconds: int, load_prefix: list[str], workdir: Path
) -> list[Profile] | None:
    """A py-spy profile of each front process under the same load, or None
    without py-spy.  py-spy runs beside the load generator, non-blocking."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    results: list[Profile] = []
    wrk = shutil.which("wrk")
    for front in fronts:
        if wrk is not None:
            header = f"x-request-id: {uuid.uuid4()}"
            command = [*load_prefix, wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds + 2}s"]
            command += ["-H", header, f"http://127.0.0.1:{front.port}/work"]
        else:
            command = [*load_prefix, sys.executable, str(HERE / "service_load.py")]
            command += ["127.0.0.1", str(front.port), "/work", "--duration", str(seconds + 2)]
        load = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        time.sleep(1)
        out = workdir / "profile.raw"
        record = [*load_prefix, spy, "record", "-p", str(front.proc.pid), "-d", str(seconds)]
        record += ["-r", "250", "--nonblocking", "-F", "--full-filenames", "-f", "raw"]
        subprocess.run([*record, "-o", str(out)], check=True, capture_output=True)
        load.wait()
        results.append(attribute(front.variant.name, out.read_text()))
    return results


# ------------------------------------------------------------------ report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ratios(runs: list[list[Run]], index: int, ref: int) -> list[float]:
    return [r[index].rps / r[ref].rps for r in runs]


def _span(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def report(
    variants: Sequence[Variant], runs: list[list[Run]], settings: Settings
) -> list[list[str]]:
    bare = 0
    users = next(i for i, v in enumerate(variants) if v.stack == "users")
    rows = []
    for i, variant in enumerate(variants):
        mine = [r[i] for r in runs]
        rps = [r.rps for r in mine]
        x_bare = _ratios(runs, i, bare)
        x_users = _ratios(runs, i, users)
        cpu = [r.front_cpu_us for r in mine]
        cpu_vs_bare = [r[i].front_cpu_us - r[bare].front_cpu_us for r in runs]
        rows.append(
            [
                variant.name,
                f"{statistics.median(rps):.0f}",
                _span(rps, ".0f"),
                f"{statistics.median(r.p50_ms for r in mine):.1f}",
                f"{statistics.median(r.p99_ms for r in mine):.1f}",
                f"{statistics.median(x_bare):.3f}",
                _span(x_bare, ".3f"),
                f"{statistics.median(x_users):.3f}",
                _span(x_users, ".3f"),
                f"{statistics.median(cpu):.0f}",
                "-" if i == bare else f"{statistics.median(cpu_vs_bare):+.0f}",
                str(sum(r.errors for r in mine)),
            ]
        )
    return rows


def run(settings: Settings, variants: Sequence[Variant], profile: int = 0) -> None:
    load_prefix, server_prefix, pinned = pinning()
    print("## A whole service under load\n")
    print(
        f"FastAPI {version('fastapi')} on uvicorn {version('uvicorn')} (one worker, asyncio "
        f"loop, h11), httpx {version('httpx')}; {settings.rounds} interleaved round(s) of "
        f"{settings.duration} s per variant, {CONNECTIONS} connections"
        + (f", after a {settings.warmup} s warm-up each" if settings.warmup else "")
        + ".\n"
    )
    print(f"- CPU: {cpu_model()}; {os.cpu_count()} CPUs; {pinned}")
    print(f"- Python {platform.python_version()}, {platform.platform()}")
    print(f"- load generator: {load_generator()}, 1 thread, {CONNECTIONS} connections")
    print(f"- load average at start: {load_average()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ctxrelay-bench-service-") as tmp:
        with services(variants, server_prefix, Path(tmp)) as (down, fronts):
            checks = [check(front) for front in fronts]
            for front in fronts:
                if settings.warmup:
                    measured(front, down, settings.warmup, load_prefix)
            runs: list[list[Run]] = []
            for order in rotations(list(range(len(fronts))), settings.rounds):
                this_round: dict[int, Run] = {}
                for i in order:
                    this_round[i] = measured(fronts[i], down, settings.duration, load_prefix)
                runs.append([this_round[i] for i in range(len(fronts))])
            profiles = where(fronts, profile, load_prefix, Path(tmp)) if profile else None
        loads_end = load_average()
    print(f"- load average at end: {loads_end}\n")

    print("### What arrived where (one request per variant, a fresh id)\n")
    header = ["variant", "handler", "pool tasks", "downstream", "log lines"]
    print(markdown_table(header, checks))
    print()
    print("### Throughput and latency\n")
    print(
        "req/s, p50 and p99 are medians over rounds; `x bare` and `x users` are medians "
        "(and ranges) of per-round throughput ratios; `front CPU` is the front process's "
        "CPU time per request (all its threads), `vs bare` the median per-round difference.\n"
    )
    header = [
        "variant",
        "req/s",
        "range",
        "p50 ms",
        "p99 ms",
        "x bare",
        "range",
        "x users",
        "range",
        "front CPU µs/req",
        "vs bare",
        "errors",
    ]
    print(markdown_table(header, report(variants, runs, settings)))
    print()
    down_cpu = statistics.median(r.down_cpu_us for rnd in runs for r in rnd)
    print(f"Downstream service: {down_cpu:.0f} µs CPU per request (median over all runs).\n")
    print("### Requests/s per round\n")
    rows = [[v.name, *(f"{rnd[i].rps:.0f}" for rnd in runs)] for i, v in enumerate(variants)]
    print(markdown_table(["variant", *(f"round {n + 1}" for n in range(len(runs)))], rows))
    print()
    if profile:
        print_profiles(profiles, runs, profile)


def print_profiles(profiles: list[Profile] | None, runs: list[list[Run]], seconds: int) -> None:
    print("### Where the front's CPU goes (py-spy)\n")
    if profiles is None:
        print("py-spy is not installed: no profile.\n")
        return
    print(
        f"py-spy, {seconds} s of each front under the same load, 250 samples/s, "
        "non-blocking.  Each step's share of the samples (what it calls included) times the "
        "front CPU per request measured above: µs per request, and in brackets the "
        "difference from bare.  `own frames`: samples whose innermost frame outside the "
        "standard library is a context library's (an upper bound: a wrapper around "
        "standard-library work counts it all).\n"
    )
    steps = [b for b, _ in BUCKETS] + [REST]
    cpu = [statistics.median(rnd[i].front_cpu_us for rnd in runs) for i in range(len(profiles))]

    def us(i: int, step: str) -> float:
        p = profiles[i]
        return p.buckets.get(step, 0) / p.total * cpu[i] if p.total else 0.0

    rows = []
    for i, p in enumerate(profiles):
        cells = [p.name, str(p.total)]
        for step in steps:
            mine = us(i, step)
            cells.append(f"{mine:.0f}" if i == 0 else f"{mine:.0f} ({mine - us(0, step):+.0f})")
        own = sum(p.own.values()) / p.total if p.total else 0.0
        cells.append(f"{own:.1%} ≈ {own * cpu[i]:.0f} µs")
        rows.append(cells)
    print(markdown_table(["variant", "samples", *steps, "own frames"], rows))
    print()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python bench/bench_service.py [--quick] [--rounds N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--duration", type=int, help="seconds per variant per round")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per variant")
    parser.add_argument(
        "--where",
        type=int,
        default=0,
        metavar="SECONDS",
        help="then profile each front with py-spy for SECONDS under load",
    )
    parser.add_argument(
        "--twins", action="store_true", help="add a second bare and a second ctxrelay process"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    for name in ("rounds", "duration", "warmup"):
        if getattr(args, name) is not None:
            settings = dataclasses.replace(settings, **{name: getattr(args, name)})
    variants = [*VARIANTS, *(TWINS if args.twins else [])]
    run(settings, variants, args.where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
