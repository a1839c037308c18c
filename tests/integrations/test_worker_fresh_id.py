"""A job that arrives without a request id runs with a fresh one.

Celery beat, a cron script, a management command, a producer without
ctxrelay, a context refused by the signature check: the worker still binds a
request id for the job, made as the web door makes one (``generator=``,
validated; a failing generator falls back to a random id with a warning), so
the job's log lines belong together -- distinct per job, never another
job's.  ``generate_id=False`` turns it off.  A retry keeps the id its first
run had where the queue re-sends the job (Celery, RQ, Dramatiq).

Real workers on real Redis, each test with its own configuration: a Celery
worker process of 4 threads (its log lines show ``[rid=...]``), and in this
process RQ's ``SimpleWorker``, Dramatiq's ``Worker`` (4 threads), arq's
``Worker`` and taskiq's ``Receiver`` (their lines reach a handler with
ctxrelay's ``ContextFilter``).  The jobs are published with each library's
own API, with nothing of ctxrelay on the producer side.  The request id on
each job's log line is what is checked.  The Redis database is the one
tests/brokers.py lists for this module (or, until it lists one, the
queue-deadline tests': the modules sharing it run one after another in one
process).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import ctxrelay
from ctxrelay.integrations.logging import ContextFilter
from tests.brokers import REDIS_DATABASES, WorkerProcess, flush_redis, need_redis, wait_until

pytestmark = [
    pytest.mark.broker,
    # arq 0.28 passes redis-py 6 an argument it deprecated (see test_arq.py).
    pytest.mark.filterwarnings(
        "ignore:Call to '__init__' function with deprecated usage of input argument/s "
        "'retry_on_timeout':DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:Call to deprecated close. \\(Use aclose\\(\\) instead\\):DeprecationWarning"
    ),
]

DB = next(
    (db for db, user in REDIS_DATABASES.items() if "test_worker_fresh_id.py" in user),
    next(db for db, user in REDIS_DATABASES.items() if "test_queue_deadlines.py" in user),
)
RUN = uuid.uuid4().hex[:8]
N = 24
WAIT = 60.0
SECRET = "ctxrelay-fresh-id-test-secret-0123"
LOGGER = "tests.fresh_id"
#: What the default generator makes.
RANDOM_ID = re.compile(r"[0-9a-f]{32}")


# -- what the jobs log ------------------------------------------------------------
class Lines(logging.Handler):
    """Every job's line: (job tag, the request id on the line)."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.lines: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == LOGGER:
            self.lines.append((record.getMessage(), record.request_id))  # type: ignore[attr-defined]
        elif record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())

    def ids(self, count: int) -> dict[str, str]:
        wait_until(lambda: len(self.lines) >= count, f"{count} job log lines", WAIT)
        return dict(self.lines)


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    job_log = logging.getLogger(LOGGER)
    relay_log = logging.getLogger("ctxrelay")
    job_log.addHandler(handler)
    job_log.setLevel(logging.INFO)
    relay_log.addHandler(handler)
    try:
        yield handler
    finally:
        job_log.removeHandler(handler)
        relay_log.removeHandler(handler)


def job(tag: str) -> str | None:
    """The job every queue runs: one log line, and the id it saw."""
    logging.getLogger(LOGGER).info(tag)
    return ctxrelay.request_id()


def fields_seen() -> dict[str, str]:
    return dict(ctxrelay.current())


def fails_first(tag: str, marker: str) -> None:
    """Logs, then fails on its first run only."""
    logging.getLogger(LOGGER).info("%s try", tag)
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("the first run fails")


def assert_distinct_random_ids(seen: dict[str, str], count: int) -> None:
    assert len(seen) == count
    assert all(RANDOM_ID.fullmatch(rid) for rid in seen.values()), seen
    assert len(set(seen.values())) == count  # no job saw another's


class Counter:
    """A generator: ``job-1``, ``job-2``, ..."""

    def __init__(self) -> None:
        self.count = itertools.count(1)

    def __call__(self) -> str:
        return f"job-{next(self.count)}"


def raising() -> str:
    raise RuntimeError("the generator's own bug")


def invalid() -> str:
    return "not a valid id\nINFO forged"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = need_redis(DB)
    yield url
    flush_redis(DB)


# -- Celery -----------------------------------------------------------------------
# The worker is ``celery -A tests.integrations.test_worker_fresh_id worker``
# (4 threads): this module builds its app from CTXRELAY_FRESH_* variables.
CELERY_LINE = re.compile(r"\[rid=(\S+)\] tests\.fresh_id: (.+)$")
CELERY_OPTIONS: dict[str, dict[str, Any]] = {
    "": {},
    "off": {"generate_id": False},
    "counter": {"generator": Counter()},
    "raises": {"generator": raising},
    "invalid": {"generator": invalid},
}


def celery_retried(self: Any, tag: str, marker: str) -> None:
    try:
        fails_first(tag, marker)
    except RuntimeError as exc:
        raise self.retry(exc=exc, countdown=0.1) from exc


def make_celery_app(broker: str, queue: str, option: str) -> Any:
    """The worker's app: ctxrelay installed with ``CELERY_OPTIONS[option]``."""
    from celery import Celery, signals  # type: ignore[import-untyped]

    from ctxrelay.integrations import logging as relay_logging
    from ctxrelay.integrations.celery import install

    app = Celery("ctxrelay_fresh", broker=broker, backend=broker, set_as_current=False)
    log_format = "%(levelname)s [rid=%(request_id)s] %(name)s: %(message)s"
    app.conf.update(
        task_default_queue=queue,
        worker_prefetch_multiplier=1,
        result_expires=600,
        worker_log_format=log_format,
        worker_task_log_format=log_format,
        broker_connection_retry_on_startup=True,
    )
    install(app, secret=SECRET, **CELERY_OPTIONS[option])
    app.task(name="fresh.job")(job)
    app.task(name="fresh.fields")(fields_seen)
    app.task(name="fresh.retried", bind=True, max_retries=1)(celery_retried)

    def relay_logs(logger: logging.Logger, **_: Any) -> None:
        if logger.handlers:
            relay_logging.install(logger=logger)

    signals.after_setup_logger.connect(relay_logs, weak=False)
    return app


class CeleryWorker:
    def __init__(self, producer: Any, process: WorkerProcess) -> None:
        #: Plain Celery, never given to ctxrelay.
        self.producer = producer
        self.process = process

    def lines(self, count: int) -> dict[str, str]:
        """tag -> the request id on the job's line in the worker's log."""

        def found() -> dict[str, str]:
            lines = self.process.output().splitlines()
            return {m[2]: m[1] for m in map(CELERY_LINE.search, lines) if m}

        wait_until(lambda: len(found()) >= count, f"{count} job lines in the worker's log", WAIT)
        return found()


@contextmanager
def celery_worker(redis_url: str, log: Path, option: str = "") -> Iterator[CeleryWorker]:
    from celery import Celery

    queue = f"ctxrelay-fresh-celery-{uuid.uuid4().hex[:8]}"
    args = ["celery", "-A", "tests.integrations.test_worker_fresh_id", "worker", "-P", "threads"]
    args += ["-c", "4", "-Q", queue, "-n", f"fresh-{queue}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {
        "CTXRELAY_FRESH_BROKER": redis_url,
        "CTXRELAY_FRESH_QUEUE": queue,
        "CTXRELAY_FRESH_OPTION": option,
    }
    process = WorkerProcess(args, log, env).start()
    producer = Celery("plain", broker=redis_url, backend=redis_url, set_as_current=False)
    producer.conf.update(task_default_queue=queue)
    try:
        yield CeleryWorker(producer, process)
    finally:
        process.stop()


def test_celery_jobs_from_a_plain_producer_get_distinct_ids_on_their_lines(
    redis_url: str, tmp_path: Path
) -> None:
    with celery_worker(redis_url, tmp_path / "worker.log") as worker:
        results = [worker.producer.send_task("fresh.job", (f"c{i}",)) for i in range(N)]
        returned = {f"c{i}": r.get(timeout=WAIT) for i, r in enumerate(results)}
        seen = worker.lines(N)
    assert_distinct_random_ids(seen, N)
    assert returned == seen  # the job and its log line saw the same id


def test_celery_a_forged_context_is_refused_and_the_job_gets_a_fresh_id(
    redis_url: str, tmp_path: Path
) -> None:
    from celery import signals

    def forge(headers: Any = None, **_: Any) -> None:
        # Last to run: an unsigned context, as a forger would write it.
        headers["ctxrelay"] = {"x-request-id": "r-forged", "baggage": "user=admin"}

    signals.before_task_publish.connect(forge, weak=False)
    try:
        with celery_worker(redis_url, tmp_path / "worker.log") as worker:
            rid = worker.producer.send_task("fresh.job", ("forged",)).get(timeout=WAIT)
            seen = worker.lines(1)
            output = worker.process.output()
    finally:
        signals.before_task_publish.disconnect(forge)
    assert seen == {"forged": rid}
    assert RANDOM_ID.fullmatch(rid)
    assert "no signature" in output


def test_celery_a_context_without_a_request_id_gets_one_and_keeps_its_fields(
    redis_url: str, tmp_path: Path
) -> None:
    from ctxrelay.integrations.celery import install, uninstall

    with celery_worker(redis_url, tmp_path / "worker.log") as worker:
        install(worker.producer, secret=SECRET)  # this time the producer relays
        try:
            with ctxrelay.bind(tenant="acme"):
                seen = worker.producer.send_task("fresh.fields").get(timeout=WAIT)
        finally:
            uninstall(worker.producer)
    assert seen["tenant"] == "acme"
    assert RANDOM_ID.fullmatch(seen["request_id"])


def test_celery_a_retry_keeps_the_id_of_the_first_run(redis_url: str, tmp_path: Path) -> None:
    with celery_worker(redis_url, tmp_path / "worker.log") as worker:
        marker = str(tmp_path / "m")
        worker.producer.send_task("fresh.retried", ("retried", marker)).get(timeout=WAIT)
        wait_until(lambda: worker.process.output().count("retried try") == 2, "both runs' lines")
        rids = [
            m[1]
            for m in map(CELERY_LINE.search, worker.process.output().splitlines())
            if m and m[2] == "retried try"
        ]
    assert len(rids) == 2
    assert RANDOM_ID.fullmatch(rids[0])
    assert rids[1] == rids[0]


def test_celery_turned_off_the_job_has_no_id(redis_url: str, tmp_path: Path) -> None:
    with celery_worker(redis_url, tmp_path / "worker.log", "off") as worker:
        assert worker.producer.send_task("fresh.job", ("off",)).get(timeout=WAIT) is None
        assert worker.lines(1) == {"off": "-"}


def test_celery_uses_the_generator_given(redis_url: str, tmp_path: Path) -> None:
    with celery_worker(redis_url, tmp_path / "worker.log", "counter") as worker:
        results = [worker.producer.send_task("fresh.job", (f"g{i}",)) for i in range(N)]
        for r in results:
            r.get(timeout=WAIT)
        seen = worker.lines(N)
    assert sorted(seen.values()) == sorted(f"job-{i}" for i in range(1, N + 1))


@pytest.mark.parametrize("option", ["raises", "invalid"])
def test_celery_a_broken_generator_falls_back_to_a_random_id(
    redis_url: str, tmp_path: Path, option: str
) -> None:
    with celery_worker(redis_url, tmp_path / "worker.log", option) as worker:
        rid = worker.producer.send_task("fresh.job", ("broken",)).get(timeout=WAIT)
        seen = worker.lines(1)
        output = worker.process.output()
    assert rid is not None
    assert RANDOM_ID.fullmatch(rid)
    assert seen == {"broken": rid}
    assert "request id generator failed" in output


# -- RQ ---------------------------------------------------------------------------
@contextmanager
def rq_queue(redis_url: str) -> Iterator[tuple[Any, Any]]:
    """A plain RQ queue (no ctxrelay job class) and its connection."""
    import redis
    from rq import Queue

    conn = redis.Redis.from_url(redis_url)
    try:
        yield Queue(f"ctxrelay-fresh-rq-{uuid.uuid4().hex[:8]}", connection=conn), conn
    finally:
        conn.close()


def rq_work(queue: Any, conn: Any, job_class: Any = None) -> None:
    """Run every job of ``queue`` in a RelaySimpleWorker, in this process."""
    from ctxrelay.integrations.rq import RelayJob, RelaySimpleWorker

    worker = RelaySimpleWorker([queue], connection=conn, job_class=job_class or RelayJob)
    # It installs its own signal handlers: put ours back (see test_queue_deadlines).
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.work(burst=True)
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def test_rq_jobs_from_a_plain_queue_get_distinct_ids_on_their_lines(
    redis_url: str, lines: Lines
) -> None:
    with rq_queue(redis_url) as (queue, conn):
        jobs = [queue.enqueue(job, f"q{i}") for i in range(N)]
        rq_work(queue, conn)
        returned = {f"q{i}": j.return_value(refresh=True) for i, j in enumerate(jobs)}
    seen = lines.ids(N)
    assert_distinct_random_ids(seen, N)
    assert returned == seen


class CountingJob:
    """RelayJob subclasses, made once the integration is imported."""

    @staticmethod
    def make(**attributes: Any) -> Any:
        from ctxrelay.integrations.rq import RelayJob

        return type("FreshJob", (RelayJob,), attributes)


def test_rq_a_retry_keeps_the_id_of_the_first_run(
    redis_url: str, lines: Lines, tmp_path: Path
) -> None:
    from rq import Retry

    with rq_queue(redis_url) as (queue, conn):
        queue.enqueue(fails_first, "retried", str(tmp_path / "m"), retry=Retry(max=1))
        rq_work(queue, conn)
    first, second = lines.lines
    assert first[0] == second[0] == "retried try"
    assert RANDOM_ID.fullmatch(first[1])
    assert second[1] == first[1]


def test_rq_a_badly_signed_context_is_refused_and_the_job_gets_a_fresh_id(
    redis_url: str, lines: Lines
) -> None:
    from ctxrelay.integrations.rq import Signer

    signed = CountingJob.make(signer=Signer(SECRET))
    forger = CountingJob.make(signer=Signer("another-secret-0123456789"))
    with rq_queue(redis_url) as (queue, conn):
        queue.job_class = forger
        with ctxrelay.bind(request_id="r-forged"):
            queue.enqueue(job, "forged")
        rq_work(queue, conn, signed)
    assert RANDOM_ID.fullmatch(lines.ids(1)["forged"])
    assert any("does not match" in w for w in lines.warnings)


def test_rq_turned_off_the_job_has_no_id(redis_url: str, lines: Lines) -> None:
    with rq_queue(redis_url) as (queue, conn):
        queue.enqueue(job, "off")
        rq_work(queue, conn, CountingJob.make(generate_id=False))
    assert lines.ids(1) == {"off": "-"}


def test_rq_uses_the_generator_given_and_survives_a_broken_one(
    redis_url: str, lines: Lines
) -> None:
    with rq_queue(redis_url) as (queue, conn):
        for i in range(3):
            queue.enqueue(job, f"g{i}")
        rq_work(queue, conn, CountingJob.make(generator=Counter()))
        queue.enqueue(job, "broken")
        rq_work(queue, conn, CountingJob.make(generator=raising))
    seen = lines.ids(4)
    assert [seen[f"g{i}"] for i in range(3)] == ["job-1", "job-2", "job-3"]
    assert RANDOM_ID.fullmatch(seen["broken"])
    assert any("request id generator failed" in w for w in lines.warnings)


# -- Dramatiq -----------------------------------------------------------------------
@contextmanager
def dramatiq_worker(redis_url: str, **options: Any) -> Iterator[tuple[Any, str]]:
    """A broker with ctxrelay installed (``options``), its actors and a
    worker of 4 threads; yields (a plain producer broker, the queue)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from ctxrelay.integrations.dramatiq import install

    queue = f"ctxrelay-fresh-dramatiq-{uuid.uuid4().hex[:8]}"
    untyped: Any = RedisBroker
    broker = untyped(url=redis_url)
    install(broker, secret=SECRET, **options)
    retry = {"max_retries": 1, "min_backoff": 10, "max_backoff": 50}
    actor: Any = dramatiq.actor  # its overloads do not take a function and options at once
    actor(job, broker=broker, queue_name=queue, actor_name="job", max_retries=0)
    actor(fails_first, broker=broker, queue_name=queue, actor_name="retried", **retry)
    producer = untyped(url=redis_url)  # plain Dramatiq: no ctxrelay middleware
    producer.declare_queue(queue)
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        yield producer, queue
    finally:
        worker.stop()
        broker.close()
        producer.close()


def dramatiq_send(producer: Any, queue: str, actor: str, *args: str) -> None:
    from dramatiq import Message

    producer.enqueue(Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}))


def test_dramatiq_messages_from_a_plain_producer_get_distinct_ids_on_their_lines(
    redis_url: str, lines: Lines
) -> None:
    with dramatiq_worker(redis_url) as (producer, queue):
        for i in range(N):
            dramatiq_send(producer, queue, "job", f"d{i}")
        seen = lines.ids(N)
    assert_distinct_random_ids(seen, N)


def test_dramatiq_a_retry_keeps_the_id_of_the_first_run(
    redis_url: str, lines: Lines, tmp_path: Path
) -> None:
    with dramatiq_worker(redis_url) as (producer, queue):
        dramatiq_send(producer, queue, "retried", "retried", str(tmp_path / "m"))
        wait_until(lambda: len(lines.lines) >= 2, "the retry", WAIT)
    first, second = lines.lines
    assert RANDOM_ID.fullmatch(first[1])
    assert second == first


def test_dramatiq_a_retry_of_a_forged_context_keeps_the_fresh_id(
    redis_url: str, lines: Lines, tmp_path: Path
) -> None:
    from dramatiq import Message

    with dramatiq_worker(redis_url) as (producer, queue):
        forged = {"x-request-id": "r-forged", "ctxrelay-signature": "v1=00"}
        producer.enqueue(
            Message(
                queue_name=queue,
                actor_name="retried",
                args=("forged", str(tmp_path / "m")),
                kwargs={},
                options={"ctxrelay": forged},
            )
        )
        wait_until(lambda: len(lines.lines) >= 2, "the retry", WAIT)
    first, second = lines.lines
    assert RANDOM_ID.fullmatch(first[1])
    assert second == first
    assert any("does not match" in w for w in lines.warnings)


def test_dramatiq_turned_off_or_with_a_generator(redis_url: str, lines: Lines) -> None:
    with dramatiq_worker(redis_url, generate_id=False) as (producer, queue):
        dramatiq_send(producer, queue, "job", "off")
        lines.ids(1)
    with dramatiq_worker(redis_url, generator=Counter()) as (producer, queue):
        dramatiq_send(producer, queue, "job", "counted")
        lines.ids(2)
    with dramatiq_worker(redis_url, generator=invalid) as (producer, queue):
        dramatiq_send(producer, queue, "job", "broken")
        seen = lines.ids(3)
    assert seen["off"] == "-"
    assert seen["counted"] == "job-1"
    assert RANDOM_ID.fullmatch(seen["broken"])
    assert any("request id generator failed" in w for w in lines.warnings)


# -- arq --------------------------------------------------------------------------
async def arq_job(ctx: dict[str, Any], tag: str) -> str | None:
    return job(tag)


def arq_run(redis_url: str, count: int, **options: Any) -> dict[str, str | None]:
    """``count`` jobs enqueued by a plain pool, run by an installed worker."""
    from arq import Worker, create_pool
    from arq.connections import RedisSettings

    from ctxrelay.integrations.arq import install_worker

    queue = f"ctxrelay-fresh-arq-{uuid.uuid4().hex[:8]}"
    settings = RedisSettings.from_dsn(redis_url)

    async def main() -> dict[str, str | None]:
        pool = await create_pool(settings, default_queue_name=queue)  # no ctxrelay
        try:
            jobs = {f"a{i}": await pool.enqueue_job("arq_job", f"a{i}") for i in range(count)}
            config = install_worker(
                {"functions": [arq_job], "queue_name": queue, "redis_settings": settings},
                secret=SECRET,
                **options,
            )
            worker = Worker(
                **config, burst=True, max_jobs=10, handle_signals=False, poll_delay=0.05
            )
            try:
                await worker.main()
            finally:
                await worker.close()
            return {tag: await j.result(timeout=WAIT) for tag, j in jobs.items() if j}
        finally:
            await pool.aclose()

    result: dict[str, str | None] = asyncio.run(asyncio.wait_for(main(), 110))
    return result


def test_arq_jobs_from_a_plain_pool_get_distinct_ids_on_their_lines(
    redis_url: str, lines: Lines
) -> None:
    returned = arq_run(redis_url, N)
    seen = lines.ids(N)
    assert_distinct_random_ids(seen, N)
    assert returned == seen


def test_arq_turned_off_or_with_a_generator(redis_url: str, lines: Lines) -> None:
    assert arq_run(redis_url, 1, generate_id=False) == {"a0": None}
    assert arq_run(redis_url, 1, generator=Counter()) == {"a0": "job-1"}
    broken = arq_run(redis_url, 1, generator=raising)["a0"]
    assert broken is not None
    assert RANDOM_ID.fullmatch(broken)
    assert any("request id generator failed" in w for w in lines.warnings)


# -- taskiq -----------------------------------------------------------------------
def taskiq_run(redis_url: str, count: int, **options: Any) -> None:
    """``count`` tasks kicked by a plain broker, run by an installed one's
    receiver (up to 50 at once)."""
    from taskiq.receiver import Receiver
    from taskiq_redis import ListQueueBroker

    from ctxrelay.integrations.taskiq import install

    queue = f"ctxrelay-fresh-taskiq-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        worker_broker = ListQueueBroker(redis_url, queue_name=queue)
        worker_broker.is_worker_process = True
        install(worker_broker, secret=SECRET, **options)
        worker_broker.register_task(job, task_name="fresh.job")
        producer = ListQueueBroker(redis_url, queue_name=queue)  # no ctxrelay
        await producer.startup()
        try:
            task = producer.register_task(job, task_name="fresh.job")
            for i in range(count):
                await task.kiq(f"t{i}")
        finally:
            await producer.shutdown()
        finish = asyncio.Event()
        receiver = Receiver(worker_broker, max_async_tasks=50)
        listening = asyncio.create_task(receiver.listen(finish))
        try:
            while len(taskiq_lines) < count:
                await asyncio.sleep(0.05)
        finally:
            finish.set()
            await listening
            await worker_broker.shutdown()

    asyncio.run(asyncio.wait_for(main(), 110))


taskiq_lines: list[tuple[str, str]] = []


@pytest.fixture
def taskiq_seen(lines: Lines) -> Lines:
    global taskiq_lines
    taskiq_lines = lines.lines
    return lines


def test_taskiq_tasks_from_a_plain_broker_get_distinct_ids_on_their_lines(
    redis_url: str, taskiq_seen: Lines
) -> None:
    taskiq_run(redis_url, N)
    assert_distinct_random_ids(taskiq_seen.ids(N), N)


def test_taskiq_turned_off_the_task_has_no_id(redis_url: str, taskiq_seen: Lines) -> None:
    taskiq_run(redis_url, 1, generate_id=False)
    assert taskiq_seen.ids(1) == {"t0": "-"}


# -- setup-time checks --------------------------------------------------------------
def test_install_refuses_what_is_not_the_librarys_object() -> None:
    from ctxrelay.integrations import arq, celery, dramatiq, taskiq

    # Called as an untyped caller would (mypy refuses these calls).
    install: Any
    untyped: Any = arq
    for install in (celery.install, celery.uninstall):
        with pytest.raises(TypeError, match=r"takes a Celery app \(celery.Celery\), not NoneType"):
            install(None)
        with pytest.raises(TypeError, match=r"takes a Celery app .*, not str"):
            install("x")
    for install in (dramatiq.install, dramatiq.uninstall):
        with pytest.raises(TypeError, match=r"takes a Dramatiq broker .*, not NoneType"):
            install(None)
    for install in (taskiq.install, taskiq.uninstall):
        with pytest.raises(TypeError, match=r"takes a taskiq broker .*, not str"):
            install("redis://")
    with pytest.raises(TypeError, match=r"takes the pool arq.create_pool\(\) returns .*, not str"):
        untyped.install("redis://")
    with pytest.raises(TypeError, match=r"takes a WorkerSettings class .*, not str"):
        untyped.install_worker("shop.WorkerSettings")


def test_install_refuses_options_of_the_wrong_type(redis_url: str) -> None:
    from celery import Celery
    from dramatiq.brokers.redis import RedisBroker
    from taskiq import InMemoryBroker

    from ctxrelay.integrations import arq, celery, dramatiq, taskiq

    app = Celery("typed", broker=redis_url, set_as_current=False)
    untyped: Any = RedisBroker
    broker = untyped(url=redis_url)
    install: Any  # called as an untyped caller would (mypy refuses these calls)
    untyped_arq: Any = arq
    try:
        for install, target in (
            (celery.install, app),
            (dramatiq.install, broker),
            (taskiq.install, InMemoryBroker()),
        ):
            with pytest.raises(TypeError, match="generate_id must be True or False, not str"):
                install(target, generate_id="no")
            with pytest.raises(TypeError, match=r"generator must be a callable .*, not str"):
                install(target, generator="myproject.ids.new_id")
        with pytest.raises(TypeError, match="generate_id must be True or False, not int"):
            untyped_arq.install_worker({}, generate_id=0)
    finally:
        broker.close()


def test_rq_job_class_options_are_checked_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match=r"signer must be a ctxrelay Signer .*, not str"):
        CountingJob.make(signer=SECRET)
    with pytest.raises(TypeError, match="generate_id must be True or False, not NoneType"):
        CountingJob.make(generate_id=None)
    with pytest.raises(TypeError, match=r"generator must be a callable .*, not str"):
        CountingJob.make(generator="ids.new_id")


def _celery_app_from_environment() -> Any:
    broker = os.environ.get("CTXRELAY_FRESH_BROKER")
    if not broker:
        return None
    return make_celery_app(
        broker, os.environ["CTXRELAY_FRESH_QUEUE"], os.environ.get("CTXRELAY_FRESH_OPTION", "")
    )


#: The worker's app (``celery -A tests.integrations.test_worker_fresh_id``).
app = _celery_app_from_environment()
