"""What carrying the context through Celery costs, side by side with bare Celery.

Two measurements on Redis (127.0.0.1:6379, database 14), each printed as a
Markdown table of medians.  The database is claimed as the test suite claims
its own (``tests/brokers.py``): a database holding keys that ctxrelay did not
create, or claimed by another live run, is left alone and the benchmark is
skipped; the one it claimed is emptied when it ends.

1. **Publish** -- ``apply_async`` of a no-op task (no worker consumes it), bare
   (relay not installed) against the relay installed with an empty context,
   with a three-field context, and with that context signed.
2. **Round trip** -- ``delay().get()`` one task at a time through a solo
   worker process: a bare worker and publisher against a relayed (and
   signed) pair, each on its own queue.

Variants run interleaved, in an order rotated every repetition, so drift on
a shared machine hits all of them alike; ratios are medians of
per-repetition ratios.  This module is also the Celery app the workers load
(``python -m celery -A bench.bench_queues worker``).

Run: ``python bench/bench_queues.py`` (about a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import redis
from celery import Celery  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations.celery import install, uninstall
from harness import rotations

DB = 14  # documented in the README, shared with tests/integrations/test_logging_end_to_end.py
URL = f"redis://127.0.0.1:6379/{DB}"
#: The mark of a database claimed by a ctxrelay test or benchmark run (its value: the
#: pid), the one tests/brokers.py writes: a test run and this benchmark see each other.
OWNER_KEY = "ctxrelay-tests:owner"
SECRET = "ctxrelay-bench-secret-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def make_app(queue: str, relay: bool, signed: bool = True) -> Celery:
    """An app on ``queue`` with one no-op task; the relay installed if asked."""
    app = Celery("ctxrelay_bench", broker=URL, backend=URL, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    app.task(name="bench.noop")(noop)
    if relay:
        install(app, secret=SECRET if signed else None)
    return app


def noop() -> None:
    """The task: nothing, so the relay's share is as visible as it gets."""


def _worker_app() -> Celery | None:
    queue = os.environ.get("CTXRELAY_BENCH_QUEUE")
    if not queue:
        return None
    return make_app(queue, os.environ.get("CTXRELAY_BENCH_RELAY") == "1")


app = _worker_app()


# -- measurement ---------------------------------------------------------------
def _interleaved(
    variants: dict[str, Callable[[], float]], repetitions: int
) -> dict[str, list[float]]:
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, repetitions):
        for name in order:
            samples[name].append(variants[name]())
    return samples


def _table(title: str, samples: dict[str, list[float]], baseline: str) -> str:
    rows = [f"### {title}", "", "| variant | median per call | vs bare |", "|---|---:|---:|"]
    base = samples[baseline]
    for name, values in samples.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        rows.append(f"| {name} | {statistics.median(values) * 1e6:.1f} µs | {ratio:.2f}x |")
    return "\n".join(rows)


@contextmanager
def _relay(installed: Celery | None) -> Iterator[None]:
    # The publish signal is process-wide: install only for the variant's calls.
    if installed is None:
        yield
        return
    install(installed, secret=SECRET)
    try:
        yield
    finally:
        uninstall(installed)


def bench_publish(calls: int, repetitions: int) -> str:
    """Publish cost: ``apply_async`` without and with the relay."""
    queue = f"ctxrelay-bench-publish-{uuid.uuid4().hex[:8]}"
    bare = make_app(queue, relay=False)
    task = bare.signature("bench.noop")
    task.apply_async()  # connect once before timing

    def sample(fields: dict[str, str] | None, relay: bool, signed: bool) -> Callable[[], float]:
        def run() -> float:
            if relay:
                install(bare, secret=SECRET if signed else None)
            try:
                with ctxrelay.bind(**(fields or {})):
                    start = perf_counter()
                    for _ in range(calls):
                        task.apply_async()
                    return (perf_counter() - start) / calls
            finally:
                uninstall(bare)

        return run

    three = {"request_id": uuid.uuid4().hex, "tenant": "acme", "user": "ada"}
    samples = _interleaved(
        {
            "bare apply_async": sample(None, False, False),
            "relay, empty context": sample(None, True, False),
            "relay, 3 fields": sample(three, True, False),
            "relay, 3 fields, signed": sample(three, True, True),
        },
        repetitions,
    )
    return _table(
        f"Publish (apply_async to Redis, {calls} per sample)", samples, "bare apply_async"
    )


def _start_worker(queue: str, relay: bool, log: Path) -> subprocess.Popen[bytes]:
    # The worker imports this module as bench.bench_queues: bench/ too goes
    # on the path, for its sibling harness module.
    path = os.pathsep.join([str(ROOT), str(ROOT / "bench")])
    env = {**os.environ, "PYTHONPATH": path, "CTXRELAY_BENCH_QUEUE": queue}
    env["CTXRELAY_BENCH_RELAY"] = "1" if relay else "0"
    args = [sys.executable, "-m", "celery", "-A", "bench.bench_queues", "worker", "-P", "solo"]
    args += ["-Q", queue, "-n", f"{queue}@%h", "-l", "warning", "--without-gossip"]
    args += ["--without-mingle", "--without-heartbeat"]
    with log.open("ab") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def bench_round_trip(calls: int, repetitions: int, log: Path) -> str:
    """``delay().get()`` through a solo worker: bare pair against relayed pair."""
    run = uuid.uuid4().hex[:8]
    bare = make_app(f"ctxrelay-bench-bare-{run}", relay=False)
    relayed = make_app(f"ctxrelay-bench-relay-{run}", relay=False)
    workers = [
        _start_worker(f"ctxrelay-bench-bare-{run}", False, log),
        _start_worker(f"ctxrelay-bench-relay-{run}", True, log),
    ]
    try:
        for each in (bare, relayed):
            each.signature("bench.noop").delay().get(timeout=60)  # ready

        def sample(target: Celery, relay: bool) -> Callable[[], float]:
            task = target.signature("bench.noop")

            def go() -> float:
                with _relay(target if relay else None), ctxrelay.bind(request_id="r-bench"):
                    start = perf_counter()
                    for _ in range(calls):
                        task.delay().get(timeout=60)
                    return (perf_counter() - start) / calls

            return go

        samples = _interleaved(
            {"bare Celery": sample(bare, False), "relay, signed": sample(relayed, True)},
            repetitions,
        )
    finally:
        for worker in workers:
            _stop(worker)
    return _table(
        f"Round trip (delay().get(), solo worker, {calls} per sample)", samples, "bare Celery"
    )


def bench_own_work(number: int) -> str:
    """The relay's own work per message, without the broker: capture and restore."""
    from ctxrelay._signing import Signer, capture, restore

    signer = Signer(SECRET)
    rows = ["### The relay's own work per message (no broker)", ""]
    rows += ["| step | per call |", "|---|---:|"]
    with ctxrelay.bind(request_id=uuid.uuid4().hex, tenant="acme", user="ada"):
        carrier = capture("task-id", None)
        signed = capture("task-id", signer)
        steps: dict[str, Callable[[], Any]] = {
            "capture (publish), 3 fields": lambda: capture("task-id", None),
            "capture + sign": lambda: capture("task-id", signer),
            "restore (worker), 3 fields": lambda: restore(carrier, "task-id", None, source="b"),
            "restore + verify": lambda: restore(signed, "task-id", signer, source="b"),
        }
        for name, step in steps.items():
            best = min(_timed(step, number) for _ in range(5))
            rows.append(f"| {name} | {best * 1e6:.1f} µs |")
    return "\n".join(rows)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(client: redis.Redis) -> str | None:
    """Claim the database for this process, as tests/brokers.py's ``need_redis`` does;
    None when claimed, else why it is not this run's to use (nothing was touched)."""
    where = f"Redis database {DB} on 127.0.0.1:6379"
    mark = client.get(OWNER_KEY)
    if mark is None:
        if client.dbsize() > 0:
            return (
                f"{where} holds {client.dbsize()} keys that ctxrelay did not create (no "
                f"{OWNER_KEY!r} key); left alone: empty it (redis-cli -n {DB} flushdb) "
                "if they are yours to lose"
            )
    elif mark != str(os.getpid()).encode():
        pid = int(mark) if mark.isdigit() else 0
        if pid and _alive(pid):
            return f"{where} is in use by another ctxrelay run (pid {pid})"
        client.flushdb()  # a finished run's leftovers: everything here is ctxrelay's
    if not client.set(OWNER_KEY, str(os.getpid()), nx=True) and not _ours(client):
        return f"{where} was claimed by another ctxrelay run just now"
    return None


def _ours(client: redis.Redis) -> bool:
    return bool(client.get(OWNER_KEY) == str(os.getpid()).encode())


def release(client: redis.Redis) -> None:
    """Empty the database if this process still holds it: all of it is this run's."""
    if _ours(client):
        client.flushdb()


def _timed(step: Callable[[], Any], number: int) -> float:
    start = perf_counter()
    for _ in range(number):
        step()
    return (perf_counter() - start) / number


def main(argv: list[str] | None = None) -> None:
    """Print both tables; ``--quick`` for a short run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    options = parser.parse_args(argv)
    client = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    try:
        client.ping()
    except redis.ConnectionError:
        print("bench_queues: Redis is not running on 127.0.0.1:6379 (make services); skipped")
        return
    refused = claim(client)
    if refused is not None:
        print(f"bench_queues: {refused}; skipped")
        return
    reps = 5 if options.quick else 25
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ctxrelay-bench-queues-{os.getpid()}.log"
    started = time.monotonic()
    try:
        print(bench_own_work(2000 if options.quick else 20000))
        print()
        print(bench_publish(100 if options.quick else 200, reps))
        print()
        print(bench_round_trip(20 if options.quick else 50, reps, log))
    finally:
        release(client)
    print(f"\n({time.monotonic() - started:.0f} s; Python {sys.version.split()[0]}, ", end="")
    print(f"{os.cpu_count()} CPUs; worker log: {log})")


if __name__ == "__main__":
    main()
