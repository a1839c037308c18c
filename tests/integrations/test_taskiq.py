"""taskiq: a middleware carries the context to a real ``taskiq worker`` process.

The worker is ``taskiq worker tests.integrations.taskiq_app:broker`` (one
process, up to 50 tasks at once) on a Redis list queue in database 8
(claimed through tests/brokers.py), results in the same database; a
``taskiq scheduler`` process runs the deferred tasks.  Every context is
signed (``taskiq_app.SECRET``).  Bad messages are sent by a broker without
ctxrelay, with whatever label the test forges.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from taskiq import InMemoryBroker, TaskiqResult
from taskiq.kicker import AsyncKicker
from taskiq_redis import ListQueueBroker, ListRedisScheduleSource, RedisAsyncResultBackend

import ctxrelay
from ctxrelay import Policy
from ctxrelay._carrier import KEY, SIGNATURE, Signer, binding, capture
from ctxrelay.integrations.taskiq import ContextMiddleware, carry, install, uninstall
from tests.brokers import WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.fresh_ids import fresh

pytestmark = pytest.mark.broker

DB = 8
N = 200
WAIT = 60.0
SECRET = "ctxrelay-taskiq-test-secret-0123456789"
RUN = uuid.uuid4().hex[:8]
QUEUE = f"ctxrelay-taskiq-{RUN}"


class Workers:
    def __init__(self, url: str, worker: WorkerProcess, scheduler: WorkerProcess) -> None:
        self.url = url
        self.worker = worker
        self.scheduler = scheduler


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    url = need_redis(DB)
    env = {"CTXRELAY_TEST_BROKER": url, "CTXRELAY_TEST_QUEUE": QUEUE}
    logs = tmp_path_factory.mktemp("taskiq")
    worker = WorkerProcess(
        [
            *("taskiq", "worker", "tests.integrations.taskiq_app:broker", "--workers", "1"),
            *("--max-async-tasks", "50"),
        ],
        logs / "worker.log",
        env,
    )
    scheduler = WorkerProcess(
        [
            *("taskiq", "scheduler", "tests.integrations.taskiq_app:scheduler", "--skip-first-run"),
            *("--update-interval", "1", "--loop-interval", "1"),
        ],
        logs / "scheduler.log",
        env,
    )
    try:
        worker.start()
        scheduler.start()
        wait_until(lambda: "Listening started" in worker.output(), "the taskiq worker's start")
        yield Workers(url, worker, scheduler)
    finally:
        scheduler.stop()
        worker.stop()
        flush_redis(DB)


def app() -> Any:
    """The app module, imported once the broker's URL is in the environment."""
    import tests.integrations.taskiq_app as module

    return module


@pytest.fixture(scope="module")
def tasks(workers: Workers) -> Iterator[Any]:
    import os

    os.environ["CTXRELAY_TEST_BROKER"] = workers.url
    os.environ["CTXRELAY_TEST_QUEUE"] = QUEUE
    try:
        yield app()
    finally:
        os.environ.pop("CTXRELAY_TEST_BROKER", None)
        os.environ.pop("CTXRELAY_TEST_QUEUE", None)


def run(main: Callable[[], Awaitable[Any]], module: Any) -> Any:
    async def wrapped() -> Any:
        await module.broker.startup()
        try:
            return await asyncio.wait_for(main(), 110)
        finally:
            await module.broker.shutdown()

    result = asyncio.run(wrapped())
    assert ctxrelay.current() == ctxrelay.Context()
    return result


async def value(task: Any) -> Any:
    got: TaskiqResult[Any] = await task.wait_result(timeout=WAIT, check_interval=0.05)
    if got.is_err:
        raise AssertionError(f"task failed: {got.error!r}")
    return got.return_value


def relayed(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k != "task_id"}


def test_kiq_carries_the_context_and_the_task_runs_bound_to_it(tasks: Any) -> None:
    async def main() -> tuple[str, Any, Any, Any]:
        with ctxrelay.bind(request_id="r-tq", tenant="acme"):
            task = await tasks.fields.kiq()
            sync = await tasks.sync_fields.kiq()
        bare = await value(await tasks.fields.kiq())
        return task.task_id, await value(task), await value(sync), bare

    task_id, got, sync, bare = run(main, tasks)
    assert got == {"request_id": "r-tq", "tenant": "acme", "task_id": task_id}
    assert relayed(sync["fields"]) == {"request_id": "r-tq", "tenant": "acme"}
    assert set(fresh(bare)) == {"task_id"}


def test_200_concurrent_tasks_each_see_only_their_own_context(tasks: Any) -> None:
    async def main() -> list[tuple[str, Any]]:
        async def one(i: int) -> tuple[str, Any]:
            rid = f"r-{i}-{uuid.uuid4().hex[:8]}"
            with ctxrelay.bind(request_id=rid, user=f"u{i}"):
                task = await tasks.interleaved.kiq(f"t{i}")
            return rid, await value(task)

        return list(await asyncio.gather(*(one(i) for i in range(N))))

    for i, (rid, got) in enumerate(run(main, tasks)):
        assert got["tag"] == f"t{i}"
        assert relayed(got["fields"]) == {"request_id": rid, "user": f"u{i}"}
        assert got["task"] == rid


def test_failures_timeouts_and_leaks_leave_nothing_for_the_next_task(tasks: Any) -> None:
    async def main() -> list[Any]:
        out: list[Any] = []
        with ctxrelay.bind(request_id="r-leak", user="leaky"):
            out.append(relayed(await value(await tasks.leaky.kiq())))
        with ctxrelay.bind(request_id="r-fail"):
            failing = await tasks.fails.kiq()
        failed = await failing.wait_result(timeout=WAIT, check_interval=0.05)
        out.append(str(failed.error))
        with ctxrelay.bind(request_id="r-timeout"):
            timing_out = await tasks.slow.kiq()
        timed_out = await timing_out.wait_result(timeout=WAIT, check_interval=0.05)
        out.append(type(timed_out.error).__name__)
        after = [await tasks.fields.kiq() for _ in range(60)]
        out.extend([await value(task) for task in after])
        return out

    leaked, failed, timed_out, *after = run(main, tasks)
    assert leaked == {"request_id": "r-leak", "user": "leaked"}
    assert "failed in r-fail" in failed
    assert timed_out == "TimeoutError"
    assert all(set(fresh(fields)) == {"task_id"} for fields in after)
    assert len({fields["request_id"] for fields in after}) == len(after)  # each its own


def test_retried_child_and_scheduled_tasks_keep_the_context(tasks: Any, tmp_path: Path) -> None:
    async def main() -> tuple[Any, Any, str, str, Any, str]:
        with ctxrelay.bind(request_id="r-retry"):
            retried = await value(await tasks.flaky.kiq(str(tmp_path / "marker")))
        with ctxrelay.bind(request_id="r-parent", task_id="never-forwarded"):
            parent = await tasks.parent.kiq()
        child_id = await value(parent)
        from taskiq.task import AsyncTaskiqTask

        child = await value(AsyncTaskiqTask(child_id, tasks.broker.result_backend))
        await tasks.source.startup()
        try:
            when = datetime.now(timezone.utc) + timedelta(seconds=1)
            with ctxrelay.bind(request_id="r-scheduled", user="ada"):
                kicker = carry(tasks.fields.kicker())
            scheduled = await kicker.schedule_by_time(tasks.source, when)
        finally:
            await tasks.source.shutdown()
        task_id = str(kicker.custom_task_id)
        from taskiq.task import AsyncTaskiqTask as Task

        later = await value(Task(task_id, tasks.broker.result_backend))
        return retried, child, child_id, parent.task_id, later, scheduled.schedule_id

    retried, child, child_id, parent_id, later, _ = run(main, tasks)
    assert relayed(retried) == {"request_id": "r-retry"}
    assert child == {"request_id": "r-parent", "step": "child", "task_id": child_id}
    assert child_id != parent_id
    assert relayed(later) == {"request_id": "r-scheduled", "user": "ada"}


def _logged(workers: Workers, *needles: str) -> bool:
    return any(all(n in line for n in needles) for line in workers.worker.output().splitlines())


def test_a_task_delayed_past_its_deadline_is_not_run(
    tasks: Any, workers: Workers, tmp_path: Path
) -> None:
    scheduled, kicked = tmp_path / "scheduled", tmp_path / "kicked"

    async def main() -> tuple[str, TaskiqResult[Any], TaskiqResult[Any], str, Any]:
        # The scheduler process's source; a new client (one per event loop).
        source = ListRedisScheduleSource(workers.url, prefix=f"{QUEUE}-schedule")
        await source.startup()
        try:
            # Kicked by the scheduler process about 1.5 s later: past its 0.5 s.
            when = datetime.now(timezone.utc) + timedelta(seconds=1.5)
            with ctxrelay.bind(request_id="r-tq-late"), ctxrelay.deadline(0.5):
                kicker = carry(tasks.mark.kicker())
            await kicker.schedule_by_time(source, when, str(scheduled))
        finally:
            await source.shutdown()
            # taskiq-redis's shutdown leaves its connection pool open.
            await source._connection_pool.disconnect()
        task_id = str(kicker.custom_task_id)
        from taskiq.task import AsyncTaskiqTask

        late = await AsyncTaskiqTask(task_id, tasks.broker.result_backend).wait_result(
            timeout=WAIT, check_interval=0.05
        )
        # A sync task that arrives with no time left at all.
        with ctxrelay.bind(request_id="r-tq-sync-late"), ctxrelay.deadline(0):
            sync = await tasks.sync_mark.kiq(str(kicked))
        sync_late = await sync.wait_result(timeout=WAIT, check_interval=0.05)
        # The worker keeps serving, and a task with time left runs.
        with ctxrelay.bind(request_id="r-tq-after"), ctxrelay.deadline(30):
            after = await value(await tasks.mark.kiq(str(scheduled)))
        return task_id, late, sync_late, sync.task_id, after

    task_id, late, sync_late, sync_id, after = run(main, tasks)
    for refused in (late, sync_late):
        assert refused.is_err
        assert "deadline passed" in str(refused.error)
    assert after == str(scheduled)
    assert scheduled.read_text() == "r-tq-after"  # written by the last task only
    assert not kicked.exists()
    wait_until(
        lambda: _logged(workers, "[rid=r-tq-late]", task_id, "deadline passed"),
        "the worker's line about the expired task, with its request id",
    )
    wait_until(
        lambda: _logged(workers, "[rid=r-tq-sync-late]", sync_id, "deadline passed"),
        "the worker's line about the expired sync task, with its request id",
    )


def test_a_task_with_time_left_sees_less_of_it_and_is_cut_at_the_deadline(tasks: Any) -> None:
    async def main() -> tuple[float | None, Any, Any, TaskiqResult[Any], TaskiqResult[Any]]:
        with ctxrelay.bind(request_id="r-tq-left"), ctxrelay.deadline(30):
            before = ctxrelay.remaining()
            timed = await tasks.remaining.kiq()
        with ctxrelay.bind(request_id="r-tq-none"):
            untimed = await tasks.remaining.kiq()
        with ctxrelay.bind(request_id="r-tq-cut"), ctxrelay.deadline(0.5):
            cut = await tasks.remaining_slowly.kiq(30)  # its own timeout is 5 s
        with ctxrelay.bind(request_id="r-tq-own"), ctxrelay.deadline(60):
            own = await tasks.remaining_slowly.kiq(0)
        return (
            before,
            await value(timed),
            await value(untimed),
            await cut.wait_result(timeout=WAIT, check_interval=0.05),
            await own.wait_result(timeout=WAIT, check_interval=0.05),
        )

    before, seen, none, cut, own = run(main, tasks)
    assert before is not None
    assert seen["remaining"] is not None
    assert 0 < seen["remaining"] < before
    assert seen["fields"]["request_id"] == "r-tq-left"
    assert none["remaining"] is None
    assert none["fields"]["request_id"] == "r-tq-none"
    # Cut at the deadline, not at its own 5 s: taskiq's timeout label was
    # the time left (the stored result keeps the labels it ran with).
    assert cut.is_err
    assert isinstance(cut.error, TimeoutError)
    assert float(cut.labels["timeout"]) <= 0.5
    assert not own.is_err
    assert float(own.labels["timeout"]) == 5  # the task's own, shorter: kept


def test_the_in_house_route_decides_what_the_message_carries() -> None:
    fields = {"request_id": "r-p", "cookie": "session=s1", "x-gray": "canary", "user": "ada"}
    broker = InMemoryBroker()
    middleware = install(broker, secret=SECRET)
    sent: list[dict[str, str]] = []

    class Spy(ContextMiddleware):  # records what pre_send wrote, after ctxrelay's
        def pre_send(self, message: Any) -> Any:
            sent.append(json.loads(message.labels[KEY]))
            return message

    broker.add_middlewares(Spy())

    @broker.task
    async def noop() -> None:
        pass

    async def main() -> None:
        await broker.startup()
        try:
            for policy in (
                Policy(capture={"cookie", "x-gray"}),
                Policy(capture={"cookie", "x-gray"}, in_house=Policy.Route(sensitive={"cookie"})),
            ):
                ctxrelay.configure(policy)
                with ctxrelay.use(ctxrelay.Context(fields)):
                    await noop.kiq()
        finally:
            await broker.shutdown()

    asyncio.run(main())
    assert broker.middlewares[0] is middleware
    default, named = sent
    assert "cookie" not in default
    assert "session" not in default.get("baggage", "")
    assert default["x-gray"] == "canary"
    assert SIGNATURE in default
    assert named["cookie"] == "session=s1"


def test_in_place_execution_resets_in_the_kickers_own_task() -> None:
    # The in-memory broker with await_inplace runs the task in the task that
    # kicked it: the binding is made and reset there, by token.
    broker = InMemoryBroker(await_inplace=True)
    install(broker)
    seen: list[dict[str, str]] = []

    @broker.task
    async def inner() -> None:
        seen.append(dict(ctxrelay.current()))

    @broker.task
    async def outer() -> None:
        seen.append(dict(ctxrelay.current()))
        with ctxrelay.bind(request_id="r-inner"):
            await inner.kiq()
        seen.append(dict(ctxrelay.current()))
        raise RuntimeError("outer fails after")

    async def main() -> dict[str, str]:
        await broker.startup()
        try:
            with ctxrelay.bind(request_id="r-outer"):
                task = await outer.kiq()
                after = dict(ctxrelay.current())
            assert task is not None
            return after
        finally:
            await broker.shutdown()

    after = asyncio.run(main())
    assert after == {"request_id": "r-outer"}
    assert relayed(seen[0]) == {"request_id": "r-outer"}
    assert relayed(seen[1]) == {"request_id": "r-inner"}
    assert relayed(seen[2]) == {"request_id": "r-outer"}  # the inner task's binding is gone


def _signed(task_name: str, task_id: str) -> dict[str, str]:
    with ctxrelay.bind(request_id="r-admin", user="root"):
        return capture(binding(task_name, task_id), Signer(SECRET))


def _tampered(task_name: str, task_id: str) -> object:
    carrier = _signed(task_name, task_id)
    carrier["baggage"] = carrier["baggage"].replace("root", "ada")
    return json.dumps(carrier)


def _control_character(task_name: str, task_id: str) -> object:
    carrier = {"x-request-id": "r\x01admin"}
    carrier[SIGNATURE] = Signer(SECRET).sign(carrier, binding(task_name, task_id))
    return json.dumps(carrier)


def _unsigned(task_name: str, task_id: str) -> object:
    with ctxrelay.bind(request_id="r-admin"):
        return json.dumps(capture(binding(task_name, task_id), None))


BAD: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "not-json": ("malformed", lambda *_: "x-request-id=r-admin"),
    "oversized": ("malformed", lambda *_: json.dumps({"baggage": "a=" + "x" * 50_000})),
    "control-character": ("malformed", _control_character),
    "tampered": ("signature that does not match", _tampered),
    "unsigned": ("no signature", _unsigned),
    "moved-from-another-task": (
        "signature that does not match",
        lambda name, _: json.dumps(_signed(name, "another-task")),
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_context_runs_the_task_with_an_empty_one_and_a_log_line(
    tasks: Any, workers: Workers, kind: str
) -> None:
    reason, make = BAD[kind]
    task_id = f"bad-{kind}-{uuid.uuid4().hex[:8]}"
    name = tasks.fields.task_name
    bare = ListQueueBroker(workers.url, queue_name=QUEUE).with_result_backend(
        RedisAsyncResultBackend(workers.url)
    )

    async def main() -> tuple[Any, Any]:
        await bare.startup()
        try:
            labels: dict[str, Any] = {KEY: make(name, task_id)}
            kicker: AsyncKicker[Any, Any] = AsyncKicker(name, bare, labels=labels)
            got = await value(await kicker.with_task_id(task_id).kiq())
            with ctxrelay.bind(request_id="r-after-bad"):
                after = await value(await tasks.fields.kiq())
            return got, after
        finally:
            await bare.shutdown()

    got, after = run(main, tasks)
    # None of the refused context: a fresh request id, made by the worker.
    assert fresh(got) == {"task_id": task_id}
    assert relayed(after) == {"request_id": "r-after-bad"}  # the worker keeps serving

    def logged() -> bool:
        lines = workers.worker.output().splitlines()
        return any(task_id in line and "ctxrelay" in line and reason in line for line in lines)

    wait_until(logged, "the worker's log line about the bad context")
    assert "r-admin" not in workers.worker.output()


def test_install_is_idempotent_and_first_and_uninstall_removes_it() -> None:
    broker = InMemoryBroker()
    broker.add_middlewares(ContextMiddleware())  # added last by hand: install keeps it
    other = InMemoryBroker()
    first = install(other)
    assert install(other, secret=SECRET) is first
    assert other.middlewares[0] is first
    assert first.signer is not None
    uninstall(other)
    uninstall(other)
    assert not any(isinstance(m, ContextMiddleware) for m in other.middlewares)
    assert isinstance(install(broker), ContextMiddleware)


def test_the_documented_example_runs(workers: Workers) -> None:
    import subprocess
    import sys

    page = Path(__file__).resolve().parents[2] / "docs" / "arq-taskiq.md"
    (code,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
        if "ctxrelay.integrations.taskiq" in block
    ]
    code = code.replace("redis://127.0.0.1:6379/0", workers.url)
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert "o-1 confirmed for ada (r-42)" in finished.stdout
