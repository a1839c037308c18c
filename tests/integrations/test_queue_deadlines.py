"""Deadlines on queues: a task that can no longer be useful is not run.

Real brokers, real worker processes.  Celery (Redis): the published message
expires at the publisher's deadline (never later than the caller's own
``expires``); a task delayed past its deadline is discarded by the worker --
Celery's ``REVOKED`` state, and a warning with the request id in the worker's
log -- and a task published with time left sees less of it than the
publisher had.  RQ and Dramatiq: the same with what each offers.

The Redis database is the one tests/brokers.py lists for this module (the
modules sharing it run one after another in one process: the claim is this
process's).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals  # type: ignore[import-untyped]
from celery.exceptions import TaskRevokedError  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations.celery import uninstall
from tests.brokers import REDIS_DATABASES, WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations import deadline_celery_app
from tests.integrations.celery_app import make_app

pytestmark = pytest.mark.broker

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
