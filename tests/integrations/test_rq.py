"""RQ: the context is stored with the job and restored, then reset, by real workers.

Workers are ``rq worker`` processes on Redis: the forking ``RelayWorker`` and
the one-process ``RelaySimpleWorker`` (where a leak into the next job would
show).  Every job is signed (``rq_jobs.SignedJob``).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus

import ctxrelay
from ctxrelay._signing import KEY, SIGNATURE, Signer, capture
from ctxrelay.integrations.rq import RelayWorkerMixin
from tests.brokers import WorkerProcess, flush_redis, need_redis, redis_url, wait_until
from tests.integrations import rq_jobs
from tests.integrations.fresh_ids import fresh, relayed
from tests.integrations.rq_jobs import SECRET, SignedJob

pytestmark = pytest.mark.broker

DB = 12
RUN = uuid.uuid4().hex[:8]


class RQWorker:
    def __init__(self, queue: Queue, process: WorkerProcess) -> None:
        self.queue = queue
        self.process = process

    def result(self, job: Job, timeout: float = 60) -> Any:
        done = (JobStatus.FINISHED, JobStatus.FAILED)
        wait_until(lambda: job.get_status(refresh=True) in done, f"job {job.id}", timeout)
        assert job.get_status() == JobStatus.FINISHED, self.process.output()[-3000:]
        return job.return_value(refresh=True)


@pytest.fixture(scope="module")
def connection() -> Iterator[redis.Redis]:
    url = need_redis(DB)
    conn = redis.Redis.from_url(url)
    yield conn
    flush_redis(DB)


def _worker(tmp: Path, conn: redis.Redis, kind: str) -> Iterator[RQWorker]:
    name = f"ctxrelay-rq-{kind}-{RUN}"
    args = ["rq.cli", "worker", name, "--url", redis_url(DB), "-n", name]
    args += ["--worker-class", f"ctxrelay.integrations.rq.{kind}", "--with-scheduler"]
    args += ["--job-class", "tests.integrations.rq_jobs.SignedJob"]
    process = WorkerProcess(args, tmp / f"{kind}.log", {}).start()
    try:
        yield RQWorker(Queue(name, connection=conn, job_class=SignedJob), process)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def simple(tmp_path_factory: pytest.TempPathFactory, connection: redis.Redis) -> Iterator[RQWorker]:
    yield from _worker(tmp_path_factory.mktemp("rq"), connection, "RelaySimpleWorker")


@pytest.fixture(scope="module")
def forking(
    tmp_path_factory: pytest.TempPathFactory, connection: redis.Redis
) -> Iterator[RQWorker]:
    yield from _worker(tmp_path_factory.mktemp("rq"), connection, "RelayWorker")


@pytest.mark.parametrize("kind", ["simple", "forking"])
def test_enqueue_carries_the_context_to_the_worker(
    kind: str, request: pytest.FixtureRequest
) -> None:
    worker: RQWorker = request.getfixturevalue(kind)
    with ctxrelay.bind(request_id=f"r-rq-{kind}", tenant="acme"):
        job = worker.queue.enqueue(rq_jobs.fields)
    fields = worker.result(job)
    assert relayed(fields) == {"request_id": f"r-rq-{kind}", "tenant": "acme"}
    assert fields["job_id"] == job.id


def test_job_enqueued_outside_any_context_sees_only_its_job_id(simple: RQWorker) -> None:
    job = simple.queue.enqueue(rq_jobs.fields)
    assert fresh(simple.result(job)) == {"job_id": job.id}


def test_back_to_back_jobs_in_one_process_do_not_bleed(simple: RQWorker) -> None:
    expected: list[tuple[Job, dict[str, str]]] = []
    for i in range(60):
        if i % 3 == 0:
            simple.queue.enqueue(rq_jobs.leaky)
        if i % 2:
            expected.append((simple.queue.enqueue(rq_jobs.where), {}))
            continue
        with ctxrelay.bind(request_id=f"rq-b-{i}", user=f"u{i}"):
            job = simple.queue.enqueue(rq_jobs.where)
        expected.append((job, {"request_id": f"rq-b-{i}", "user": f"u{i}"}))
    outcomes = [(simple.result(job), fields) for job, fields in expected]
    assert len({o["pid"] for o, _ in outcomes}) == 1  # one process ran them all
    for outcome, fields in outcomes:
        assert relayed(outcome["fields"]) == fields


def test_retried_job_keeps_its_context(simple: RQWorker, tmp_path: Path) -> None:
    with ctxrelay.bind(request_id="r-rq-retry"):
        job = simple.queue.enqueue(
            rq_jobs.fails_first, str(tmp_path / "marker"), retry=Retry(max=1, interval=1)
        )
    assert relayed(simple.result(job)) == {"request_id": "r-rq-retry"}


def test_scheduled_job_keeps_its_context(simple: RQWorker) -> None:
    with ctxrelay.bind(request_id="r-rq-later"):
        job = simple.queue.enqueue_in(timedelta(seconds=1), rq_jobs.fields)
    assert relayed(simple.result(job)) == {"request_id": "r-rq-later"}


def test_dependent_job_keeps_its_creators_context(simple: RQWorker) -> None:
    with ctxrelay.bind(request_id="r-rq-first"):
        first = simple.queue.enqueue(rq_jobs.fields)
    with ctxrelay.bind(request_id="r-rq-then"):
        then = simple.queue.enqueue(rq_jobs.fields, depends_on=first)
    assert relayed(simple.result(then)) == {"request_id": "r-rq-then"}
    assert relayed(simple.result(first)) == {"request_id": "r-rq-first"}


def test_job_enqueued_by_a_job_gets_the_context_and_its_own_job_id(simple: RQWorker) -> None:
    with ctxrelay.bind(request_id="r-rq-parent"):
        parent = simple.queue.enqueue(rq_jobs.enqueue_child)
    child = SignedJob.fetch(simple.result(parent), connection=simple.queue.connection)
    fields = simple.result(child)
    assert fields == {"request_id": "r-rq-parent", "job_id": child.id}


def _tampered(job_id: str) -> object:
    with ctxrelay.bind(request_id="r-bad", user="ada"):
        carrier = capture(job_id, Signer(SECRET))
    carrier["baggage"] = carrier["baggage"].replace("ada", "root")
    return carrier


def _unsigned(job_id: str) -> object:
    with ctxrelay.bind(request_id="r-bad"):
        carrier = capture(job_id, Signer(SECRET))
    del carrier[SIGNATURE]
    return carrier


BAD: dict[str, tuple[str, Callable[[str], object]]] = {
    "not-a-mapping": ("malformed", lambda _: ["x-request-id", "r-bad"]),
    "oversized": ("malformed", lambda _: {"baggage": "a=" + "x" * 50_000}),
    "tampered": ("signature that does not match", _tampered),
    "unsigned": ("no signature", _unsigned),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_context_runs_with_an_empty_one_and_a_log_line(simple: RQWorker, kind: str) -> None:
    reason, make = BAD[kind]
    job = simple.queue.create_job(rq_jobs.fields)
    job.meta[KEY] = make(job.id)
    simple.queue.enqueue_job(job)
    # None of the refused context: a fresh request id, made by the worker.
    assert fresh(simple.result(job)) == {"job_id": job.id}

    # The worker's log reaches its file asynchronously: wait for the line.
    def logged() -> bool:
        lines = simple.process.output().splitlines()
        return any(job.id in line and "ctxrelay" in line and reason in line for line in lines)

    wait_until(logged, "the worker's log line about the bad context")
    with ctxrelay.bind(request_id="r-rq-after-bad"):
        after = simple.queue.enqueue(rq_jobs.fields)
    assert relayed(simple.result(after)) == {"request_id": "r-rq-after-bad"}


_TOO_OLD = """
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = lambda name: "1.15.1" if name == "rq" else real(name)
try:
    import ctxrelay.integrations.rq
except ImportError as exc:
    print(exc)
    sys.exit(3)
"""


def test_an_rq_older_than_the_supported_range_is_refused_naming_the_range() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _TOO_OLD], capture_output=True, text=True, timeout=60, check=False
    )
    assert finished.returncode == 3, finished.stderr
    assert finished.stdout.strip() == (
        "ctxrelay.integrations.rq supports rq 1.16 to 3.x, not rq 1.15.1: "
        "pip install 'ctxrelay[rq]'"
    )


def test_the_workers_bind_under_the_installed_rq_whatever_perform_job_receives() -> None:
    # RQ 3 calls perform_job(job, queue, execution); 1.16 and 2.x call perform_job(job, queue).
    seen: list[tuple[object, ...]] = []

    class Base:
        def perform_job(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> bool:
            seen.append((job, queue, *args, dict(ctxrelay.current())))
            return True

    class Probe(RelayWorkerMixin, Base):
        pass

    connection = redis.Redis()  # never used: nothing is saved or fetched
    with ctxrelay.bind(request_id="r-rq-probe"):
        job = SignedJob.create(rq_jobs.fields, connection=connection)
    for extra in ((), ("execution",)):
        assert Probe().perform_job(job, Queue("probe", connection=connection), *extra) is True
    assert [s[2:-1] for s in seen] == [(), ("execution",)]
    assert all(s[-1] == {"request_id": "r-rq-probe", "job_id": job.id} for s in seen)
    assert ctxrelay.current() == ctxrelay.Context()


def test_a_job_sets_a_field_for_the_rest_of_itself_and_the_next_job_never_sees_it(
    simple: RQWorker,
) -> None:
    jobs: list[tuple[Job, str | None]] = []
    for i in range(20):
        with ctxrelay.bind(request_id=f"rq-scope-{i}"):
            jobs.append((simple.queue.enqueue(rq_jobs.sets_user, f"u{i}"), f"u{i}"))
            jobs.append((simple.queue.enqueue(rq_jobs.fields), None))
    for job, user in jobs:
        result = simple.result(job)
        if user is not None:
            assert result == {"job": user, "pool": user}
        else:
            assert "user" not in result  # the job before set one; none reaches here
