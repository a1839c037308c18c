"""Deadlines on queues and in logs: a task that can no longer be useful is not
run, and log lines show the time left.

Real brokers, real worker processes.  Celery (Redis): the published message
expires at the publisher's deadline (never later than the caller's own
``expires``); a task delayed past its deadline is discarded by the worker --
Celery's ``REVOKED`` state, and a warning with the request id in the worker's
log -- and a task published with time left sees less of it than the
publisher had.  RQ and Dramatiq: the same with what each offers.  Logs: the
stdlib filter, structlog and loguru show ``deadline_ms`` while a deadline is
bound, and the WSGI/Django doors log a request that ended after its deadline.

The Redis database is the one tests/brokers.py lists for this module (the
modules sharing it run one after another in one process: the claim is this
process's).
"""

from __future__ import annotations

import io
import json
import logging
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from celery import Celery, signals  # type: ignore[import-untyped]
from celery.exceptions import TaskRevokedError  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay._deadline import expired
from ctxrelay.integrations.celery import uninstall
from ctxrelay.integrations.logging import ContextFilter, setup
from ctxrelay.integrations.loguru import ContextPatcher, patcher
from ctxrelay.integrations.structlog import MergeContext, merge_context
from tests.brokers import REDIS_DATABASES, WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations import deadline_celery_app
from tests.integrations.celery_app import make_app

DB = next((db for db, user in REDIS_DATABASES.items() if "test_queue_deadlines.py" in user), 14)
DEADLINE_KEY = "ctxrelay-deadline"  # the header next to Celery's expires
RUN = uuid.uuid4().hex[:8]
TIMEOUT = 60


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = need_redis(DB)
    yield url
    flush_redis(DB)


def _logged(process: WorkerProcess, *needles: str) -> bool:
    return any(all(n in line for n in needles) for line in process.output().splitlines())


# -- Celery -------------------------------------------------------------------
class CeleryWorker:
    def __init__(self, app: Celery, process: WorkerProcess) -> None:
        self.app = app
        self.process = process


@pytest.fixture(scope="module")
def celery_worker(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[CeleryWorker]:
    queue = f"ctxrelay-deadline-celery-{RUN}"
    app = make_app(redis_url, redis_url, queue)
    deadline_celery_app.register(app)
    args = ["celery", "-A", "tests.integrations.deadline_celery_app", "worker", "-P", "solo"]
    args += ["-Q", queue, "-n", f"deadline-{RUN}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_DEADLINE_BROKER": redis_url, "CTXRELAY_DEADLINE_QUEUE": queue}
    log = tmp_path_factory.mktemp("celery-deadline") / "worker.log"
    process = WorkerProcess(args, log, env).start()
    try:
        app.signature("d.remaining").delay().get(timeout=TIMEOUT)  # ready: it served a task
        yield CeleryWorker(app, process)
    finally:
        process.stop()
        uninstall(app)


@pytest.mark.broker
def test_celery_task_delayed_past_its_deadline_is_not_run(
    celery_worker: CeleryWorker, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    with ctxrelay.bind(request_id="r-celery-late"), ctxrelay.deadline(0.5):
        result = celery_worker.app.signature("d.mark", (str(marker),)).apply_async(countdown=1.5)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=TIMEOUT)
    assert result.state == "REVOKED"
    assert not marker.exists()
    wait_until(
        lambda: _logged(celery_worker.process, "rid=r-celery-late", result.id, "deadline passed"),
        "the worker's line about the expired task, with its request id",
    )
    # The worker keeps serving, and a task with time left runs.
    with ctxrelay.bind(request_id="r-celery-after"), ctxrelay.deadline(30):
        after = celery_worker.app.signature("d.mark", (str(marker),)).delay()
    assert after.get(timeout=TIMEOUT) == str(marker)
    assert marker.read_text() == "r-celery-after"


@pytest.mark.broker
def test_celery_task_published_with_time_left_sees_less_of_it(
    celery_worker: CeleryWorker,
) -> None:
    with ctxrelay.bind(request_id="r-celery-left"), ctxrelay.deadline(30):
        before = ctxrelay.remaining()
        result = celery_worker.app.signature("d.remaining").delay()
    seen = result.get(timeout=TIMEOUT)
    assert before is not None
    assert seen["remaining"] is not None
    assert 0 < seen["remaining"] < before
    assert seen["fields"]["request_id"] == "r-celery-left"


@pytest.mark.broker
def test_celery_task_without_a_deadline_has_none(celery_worker: CeleryWorker) -> None:
    with ctxrelay.bind(request_id="r-celery-none"):
        result = celery_worker.app.signature("d.remaining").delay()
    seen = result.get(timeout=TIMEOUT)
    assert seen["remaining"] is None
    assert seen["fields"]["request_id"] == "r-celery-none"


class _Published:
    """The headers of messages as they leave (after ctxrelay's publish hook)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []

    def __call__(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers is not None:
            self.headers.append(dict(headers))


@pytest.fixture
def published() -> Iterator[_Published]:
    spy = _Published()
    signals.after_task_publish.connect(spy, weak=False)
    try:
        yield spy
    finally:
        signals.after_task_publish.disconnect(spy)


def _expires(headers: dict[str, Any]) -> float:
    """Seconds from now to the message's ``expires``."""
    at = datetime.fromisoformat(headers["expires"])
    if at.tzinfo is None:
        at = at.astimezone()
    return (at - datetime.now(timezone.utc)).total_seconds()


@pytest.mark.broker
def test_celery_expires_is_the_deadline_and_never_lengthened(
    celery_worker: CeleryWorker, published: _Published
) -> None:
    task = celery_worker.app.signature("d.remaining")
    with ctxrelay.bind(request_id="r-celery-expires"):
        with ctxrelay.deadline(20):
            task.apply_async(expires=3600).get(timeout=TIMEOUT)  # the deadline is earlier
            task.apply_async(expires=5).get(timeout=TIMEOUT)  # the caller's is earlier
        task.delay().get(timeout=TIMEOUT)  # no deadline: nothing set
    narrowed, kept, untouched = published.headers[-3:]
    assert _expires(narrowed) <= 20
    assert DEADLINE_KEY in narrowed
    assert _expires(kept) <= 5
    assert untouched.get("expires") is None
    assert DEADLINE_KEY not in untouched


# -- logs ---------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        fmt = "%(request_id)s %(deadline_ms)s %(message)s"
        self.setFormatter(logging.Formatter(fmt, defaults={"deadline_ms": "-"}))

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # the format string never fails
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("tests.deadline_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_stdlib_records_show_the_time_left_only_under_a_deadline(records: _Records) -> None:
    log = logging.getLogger("tests.deadline_logs")
    with ctxrelay.bind(request_id="r-log"):
        log.info("no deadline")
        with ctxrelay.deadline(30):
            log.info("under a deadline")
            log.info("again, same context")
        with ctxrelay.deadline(0):
            log.info("past it")
    log.info("outside")
    none, timed, again, past, outside = records.records
    assert not hasattr(none, "deadline_ms")
    for record in (timed, again):
        left = record.deadline_ms  # type: ignore[attr-defined]
        assert isinstance(left, int)
        assert 0 < left <= 30_000
        # Not in the shared per-context dict: it changes with every record.
        assert "deadline_ms" not in record.ctxrelay  # type: ignore[attr-defined]
    assert past.deadline_ms == 0  # type: ignore[attr-defined]
    assert not hasattr(outside, "deadline_ms")
    assert outside.request_id == "-"  # type: ignore[attr-defined]


def test_a_record_set_up_already_keeps_its_deadline_ms(records: _Records) -> None:
    # A record that already carries a request id (extra=, or a filter where it
    # was made, e.g. before a QueueHandler) keeps what it has, deadline_ms too.
    extra = {"request_id": "r-made", "deadline_ms": 1234}
    with ctxrelay.deadline(30):
        logging.getLogger("tests.deadline_logs").info("x", extra=extra)
    assert records.records[0].deadline_ms == 1234  # type: ignore[attr-defined]


def test_setups_format_shows_a_dash_without_a_deadline() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.deadline_setup")
    logger.propagate = False
    try:
        setup("%(request_id)s %(deadline_ms)s %(message)s", logger=logger, stream=stream)
        logger.warning("before")
        with ctxrelay.bind(request_id="r-setup"), ctxrelay.deadline(0):
            logger.warning("after")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    assert stream.getvalue().splitlines() == ["- - before", "r-setup 0 after"]


def test_a_field_cannot_take_the_deadline_attribute() -> None:
    with pytest.raises(ValueError, match="deadline_ms"):
        ContextFilter(fields={"deadline_ms": "tenant"})


def _render(processor: Any) -> Any:
    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[processor, structlog.processors.JSONRenderer(sort_keys=True)],
    )


def test_structlog_events_show_the_time_left_only_under_a_deadline() -> None:
    log = _render(merge_context)
    with ctxrelay.bind(request_id="r-sl"):
        assert json.loads(log.info("x")) == {"event": "x", "request_id": "r-sl"}
        with ctxrelay.deadline(30):
            event = json.loads(log.info("y"))
    assert event["request_id"] == "r-sl"
    assert 0 < event["deadline_ms"] <= 30_000
    with ctxrelay.deadline(0):  # a deadline and no field
        assert json.loads(log.info("z")) == {"event": "z", "deadline_ms": 0}
    nested = _render(MergeContext(key="ctx"))
    with ctxrelay.bind(request_id="r-sl"), ctxrelay.deadline(0):
        assert json.loads(nested.info("n")) == {
            "event": "n",
            "ctx": {"request_id": "r-sl", "deadline_ms": 0},
        }


def test_loguru_extra_shows_the_time_left_only_under_a_deadline() -> None:
    from loguru import logger

    stream = io.StringIO()
    handler_id = logger.add(stream, format="{extra[request_id]} {extra[deadline_ms]} {message}")
    try:
        log = logger.patch(ContextPatcher(fields=["deadline_ms"]))
        with ctxrelay.bind(request_id="r-lg"):
            log.info("none")
            with ctxrelay.deadline(0):
                log.info("past")
        seen: list[dict[str, Any]] = []
        logger.patch(patcher).patch(lambda r: seen.append(dict(r["extra"]))).info("outside")
        with ctxrelay.deadline(30):
            logger.patch(patcher).patch(lambda r: seen.append(dict(r["extra"]))).info("timed")
    finally:
        logger.remove(handler_id)
    assert stream.getvalue().splitlines()[:2] == ["r-lg - none", "r-lg 0 past"]
    assert "deadline_ms" not in seen[0]
    assert 0 < seen[1]["deadline_ms"] <= 30_000


def _wsgi_call(app: Any, path: str) -> bytes:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.url_scheme": "http"}
    environ |= {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "HTTP_X_REQUEST_ID": "r-wsgi"}
    body = app(environ, lambda status, headers, exc_info=None: None)
    return b"".join(body)


def test_wsgi_door_logs_a_request_that_ended_after_its_deadline() -> None:
    from ctxrelay.integrations.wsgi import RelayMiddleware

    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        while not ctxrelay.cancelled():  # runs past the deadline, as WSGI views can
            ctxrelay.remaining()
        start_response("200 OK", [])
        return [b"late"]

    def quick(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"on time"]

    handler = _Records()
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("ctxrelay.wsgi")
    logger.addHandler(handler)
    try:
        assert _wsgi_call(RelayMiddleware(quick, timeout=30), "/quick") == b"on time"
        assert _wsgi_call(RelayMiddleware(slow, timeout=0.05), "/slow\nINFO forged") == b"late"
    finally:
        logger.removeHandler(handler)
    (line,) = handler.records
    assert line.levelno == logging.ERROR
    assert line.getMessage().startswith("deadline exceeded in GET /slow\\nINFO forged (finished ")
    assert line.request_id == "r-wsgi"  # type: ignore[attr-defined]


# -- RQ -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rq_connection(redis_url: str) -> Iterator[Any]:
    import redis

    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.mark.broker
def test_rq_job_sees_less_time_than_its_creator_had(
    rq_connection: Any, redis_url: str, tmp_path: Path
) -> None:
    from rq import Queue

    from tests.integrations.rq_jobs import SignedJob

    name = f"ctxrelay-deadline-rq-{RUN}"
    queue = Queue(name, connection=rq_connection, job_class=SignedJob)
    with ctxrelay.bind(request_id="r-rq-left"), ctxrelay.deadline(30):
        before = ctxrelay.remaining()
        job = queue.enqueue("tests.integrations.deadline_celery_app.remaining")
    assert job.ttl is not None
    assert job.ttl <= 30  # the job may wait in the queue no longer than the deadline
    args = ["rq.cli", "worker", name, "--url", redis_url, "-n", name, "--burst"]
    args += ["--worker-class", "ctxrelay.integrations.rq.RelaySimpleWorker"]
    args += ["--job-class", "tests.integrations.rq_jobs.SignedJob"]
    process = WorkerProcess(args, tmp_path / "rq.log", {}).start()
    try:
        wait_until(lambda: job.get_status(refresh=True) == "finished", f"job {job.id}", TIMEOUT)
    finally:
        process.stop()
    seen: Any = job.return_value(refresh=True)
    assert before is not None
    assert 0 < seen["remaining"] < before
    assert seen["fields"]["request_id"] == "r-rq-left"


@pytest.mark.broker
def test_rq_job_whose_deadline_passed_is_not_run(rq_connection: Any, tmp_path: Path) -> None:
    from rq import Queue

    from ctxrelay.integrations.rq import RelaySimpleWorker
    from tests.integrations import rq_jobs

    name = f"ctxrelay-deadline-rq-late-{RUN}"
    queue = Queue(name, connection=rq_connection, job_class=rq_jobs.SignedJob)
    marker = tmp_path / "ran"
    with ctxrelay.bind(request_id="r-rq-late"), ctxrelay.deadline(0.3):
        job = queue.enqueue(rq_jobs.fails_first, str(marker))
        late = ctxrelay.current()
    wait_until(lambda: expired(late) is not None, "the deadline to pass")
    handler = _Records()
    handler.addFilter(ContextFilter())
    logging.getLogger("ctxrelay").addHandler(handler)
    try:
        # RQ's SimpleWorker, burst, in this process: the job's key lives for
        # its ttl (1 s here, the deadline rounded up), so the worker must
        # take it before Redis drops it.
        worker = RelaySimpleWorker([queue], connection=rq_connection, job_class=rq_jobs.SignedJob)
        # An in-process worker installs its own SIGINT/SIGTERM handlers: put
        # ours back, or every process forked later in this run (a pool's
        # workers) ignores SIGTERM and pool.terminate() hangs.
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            worker.work(burst=True)
        finally:
            for sig, previous in saved.items():
                signal.signal(sig, previous)
    finally:
        logging.getLogger("ctxrelay").removeHandler(handler)
    assert not marker.exists()
    assert job.get_status(refresh=True) == "failed"
    result = job.latest_result()
    assert result is not None
    assert "DeadlineExceeded" in (result.exc_string or "")
    lines = [r for r in handler.records if "not run" in r.getMessage()]
    assert [r.request_id for r in lines] == ["r-rq-late"]  # type: ignore[attr-defined]


# -- Dramatiq -------------------------------------------------------------------
@pytest.mark.broker
def test_dramatiq_message_delayed_past_its_deadline_is_not_run(
    redis_url: str, tmp_path: Path
) -> None:
    from tests.integrations.dramatiq_app import make_broker

    queue = f"ctxrelay-deadline-dramatiq-{RUN}"
    broker, backend, actors = make_broker(redis_url, queue)
    args = ["dramatiq", "tests.integrations.dramatiq_app:broker", "-p", "1", "-t", "1"]
    args += ["-Q", queue]
    env = {"CTXRELAY_TEST_BROKER": redis_url, "CTXRELAY_TEST_QUEUE": queue}
    process = WorkerProcess(args, tmp_path / "dramatiq.log", env).start()
    marker = tmp_path / "ran"
    try:
        with ctxrelay.bind(request_id="r-dq-left"), ctxrelay.deadline(30):
            message = actors["fields"].send()
        assert message.options["max_age"] <= 30_000
        assert backend is not None
        with ctxrelay.bind(request_id="r-dq-late"), ctxrelay.deadline(0.5):
            late = actors["fails_first"].send_with_options(args=(str(marker),), delay=1500)
        wait_until(
            lambda: _logged(process, late.message_id, "not run", "deadline passed"),
            "the worker's line about the late message",
            TIMEOUT,
        )
        assert not marker.exists()
        # The worker keeps serving.
        fields = message.get_result(backend=backend, block=True, timeout=TIMEOUT * 1000)
        assert fields["request_id"] == "r-dq-left"
    finally:
        process.stop()
        broker.close()
