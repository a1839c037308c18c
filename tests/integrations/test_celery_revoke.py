"""Celery: a revoked, terminated or redelivered task leaves no context behind.

Real ``python -m celery worker`` processes on Redis (database 10, broker and
result backend), one task at a time each (``-c 1``), so "the next task" runs
in the same process or thread as the one before.  Each task reports what the
worker thread *held* when it arrived (recorded by a ``task_prerun`` receiver
that runs before ctxrelay's, see ``celery_revoke_app``): after a correct
reset by token that is nothing at all.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery  # type: ignore[import-untyped]
from celery.exceptions import TaskRevokedError  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay._signing import WORKER_FIELDS
from ctxrelay.integrations.celery import uninstall
from tests.brokers import WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.celery_revoke_app import RAN, make_revoke_app

pytestmark = pytest.mark.broker

DB = 10  # this module's Redis database; test_celery.py uses 11
RUN = uuid.uuid4().hex[:8]  # this run's queue and worker names
TIMEOUT = 60
NO_REDELIVERY = 3600  # s: Redis re-sends no message during these tests...
REDELIVERY = 3  # s: ... except to the worker the redelivery test kills

Report = dict[str, Any]


def relayed(fields: dict[str, str]) -> dict[str, str]:
    """The fields that travelled, without the worker-local task ids."""
    return {k: v for k, v in fields.items() if k not in WORKER_FIELDS}


class Worker:
    """A one-task-at-a-time worker process, its name and queue, and the app
    that publishes to it."""

    def __init__(self, app: Celery, process: WorkerProcess, name: str) -> None:
        self.app = app
        self.process = process
        self.name = name
        self.queue: str = app.conf.task_default_queue

    def where(self, **options: Any) -> Any:
        return self.app.signature("r.where").apply_async(**options)

    def logged(self, *parts: str) -> list[str]:
        """The worker's log lines that contain every one of ``parts``."""
        lines = self.process.output().splitlines()
        return [line for line in lines if all(part in line for part in parts)]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = need_redis(DB)
    yield url
    flush_redis(DB)


def _worker(
    factory: pytest.TempPathFactory, broker: str, pool: str, label: str, visibility: int
) -> Iterator[Worker]:
    name = f"revoke-{label}-{RUN}@ctxrelay"
    queue = f"ctxrelay-revoke-{label}-{RUN}"
    app = make_revoke_app(broker, queue, visibility)
    args = ["celery", "-A", "tests.integrations.celery_revoke_app", "worker", "-P", pool]
    args += ["-c", "1", "-Q", queue, "-n", name, "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_REVOKE_BROKER": broker, "CTXRELAY_REVOKE_QUEUE": queue}
    env["CTXRELAY_REVOKE_VISIBILITY"] = str(visibility)
    log = factory.mktemp(label) / f"{label}.log"
    worker = Worker(app, WorkerProcess(args, log, env), name)
    try:
        worker.process.start()
        worker.where().get(timeout=TIMEOUT)  # ready: it served a task
        yield worker
    finally:
        worker.process.stop()
        uninstall(app)


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    yield from _worker(tmp_path_factory, redis_url, "solo", "solo", NO_REDELIVERY)


@pytest.fixture(scope="module")
def threads(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    yield from _worker(tmp_path_factory, redis_url, "threads", "threads", NO_REDELIVERY)


@pytest.fixture(scope="module")
def prefork(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    yield from _worker(tmp_path_factory, redis_url, "prefork", "prefork", NO_REDELIVERY)


@pytest.fixture(scope="module")
def redelivering(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    # Its own worker: with so short a timeout, a message that merely waits
    # for a busy pool would be handed out twice.
    yield from _worker(tmp_path_factory, redis_url, "prefork", "redelivery", REDELIVERY)


def _ran(redis_url: str) -> set[str]:
    with redis.Redis.from_url(redis_url) as client:
        return {item.decode() for item in client.lrange(RAN, 0, -1)}


def _next_two(worker: Worker, rid: str) -> tuple[Any, Report, Any, Report]:
    """Run one task published with a context, then one published with none."""
    with ctxrelay.bind(request_id=rid, tenant="acme"):
        with_context = worker.where()
    outcome = with_context.get(timeout=TIMEOUT)
    bare = worker.where()
    return with_context, outcome, bare, bare.get(timeout=TIMEOUT)


#: The request id a worker makes for a task that arrived without one
#: (tests/integrations/test_worker_fresh_id.py tests it).
FRESH_ID = re.compile(r"[0-9a-f]{32}")


def _sees_only_its_own(result: Any, outcome: Report, expected: dict[str, str]) -> None:
    assert outcome["held"] == {}, "the thread still held a previous task's context"
    fields = dict(outcome["fields"])
    if "request_id" not in expected:  # published with none: a fresh one, no other task's
        assert FRESH_ID.fullmatch(fields.pop("request_id", "")), outcome["fields"]
    assert fields == {
        **expected,
        "task_id": result.id,
        "task_root_id": result.id,
    }


# -- revoked before it runs --------------------------------------------------
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_task_revoked_before_it_runs_never_runs_and_the_next_task_sees_only_its_own_context(
    pool: str, request: pytest.FixtureRequest, redis_url: str
) -> None:
    worker: Worker = request.getfixturevalue(pool)
    with ctxrelay.bind(request_id=f"r-{pool}-before", user="ada"):
        before = worker.where().get(timeout=TIMEOUT)
    # The task waits on a queue the worker does not consume yet, so the
    # revocation surely lands first (revoke's reply comes once it is flagged).
    waiting = f"{worker.queue}-waiting"
    with ctxrelay.bind(request_id=f"r-{pool}-revoked", user="mallory"):
        revoked = worker.where(queue=waiting)
    reply = worker.app.control.revoke(revoked.id, destination=[worker.name], reply=True)
    assert [list(r) for r in reply] == [[worker.name]]
    assert revoked.id in reply[0][worker.name]["ok"]
    worker.app.control.add_consumer(waiting, destination=[worker.name], reply=True)
    wait_until(
        lambda: bool(worker.logged("Discarding revoked task", revoked.id)),
        "the worker discarding the revoked task",
    )

    with_context, outcome, bare, bare_outcome = _next_two(worker, f"r-{pool}-after")

    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=TIMEOUT)
    assert revoked.id not in _ran(redis_url)
    # The consumer discarded it outside any task's context.
    assert all("[rid=-]" in line for line in worker.logged("Discarding", revoked.id))
    _sees_only_its_own(with_context, outcome, {"request_id": f"r-{pool}-after", "tenant": "acme"})
    _sees_only_its_own(bare, bare_outcome, {})
    # ... in the very process and thread that ran the task before.
    assert {(o["pid"], o["thread"]) for o in (before, outcome, bare_outcome)} == {
        (before["pid"], before["thread"])
    }


# -- terminated while running ------------------------------------------------
@pytest.mark.parametrize(
    ("signal", "same_process"),
    [
        # SIGUSR1 raises SoftTimeLimitExceeded in the task: the process lives
        # on, and only the reset in task_postrun cleans its context.
        ("SIGUSR1", True),
        # SIGTERM ends the pool process; the pool starts a fresh one.
        ("SIGTERM", False),
    ],
)
def test_running_task_terminated_by_revoke_leaves_nothing_for_the_next_task(
    prefork: Worker, tmp_path: Path, signal: str, same_process: bool
) -> None:
    marker = tmp_path / "running"
    with ctxrelay.bind(request_id=f"r-terminated-{signal}", user="mallory"):
        terminated = prefork.app.signature("r.block").delay(str(marker))
    wait_until(marker.exists, "the task to terminate starting")
    reply = prefork.app.control.revoke(
        terminated.id, terminate=True, signal=signal, destination=[prefork.name], reply=True
    )
    assert reply == [{prefork.name: {"ok": f"terminate: {terminated.id}"}}]  # it was running
    wait_until(terminated.ready, "the terminated task's outcome")
    assert terminated.state != "SUCCESS"

    # The worker keeps serving, and the next tasks see only their own context.
    with_context, outcome, bare, bare_outcome = _next_two(prefork, f"r-next-{signal}")
    _sees_only_its_own(with_context, outcome, {"request_id": f"r-next-{signal}", "tenant": "acme"})
    _sees_only_its_own(bare, bare_outcome, {})
    assert (outcome["pid"] == int(marker.read_text())) is same_process
    assert bare_outcome["pid"] == outcome["pid"]


# -- redelivered by Redis after a crash --------------------------------------
def test_acks_late_task_redelivered_by_redis_after_sigkill_keeps_its_context(
    redelivering: Worker, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    with ctxrelay.bind(request_id="r-redelivered-redis", user="ada"):
        result = redelivering.app.signature("t.slow_acks_late").delay(str(marker))
    wait_until(marker.exists, "the acks_late task starting")
    redelivering.process.kill()  # mid-task: the message was never acknowledged
    # Redis hands it out again once it has been unacknowledged for the
    # transport's visibility_timeout.
    redelivering.process.start()
    fields = result.get(timeout=TIMEOUT)
    assert relayed(fields) == {"request_id": "r-redelivered-redis", "user": "ada"}
    assert fields["task_id"] == result.id
