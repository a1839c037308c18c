"""arq: the context travels with the job to a real ``arq`` worker process.

The worker is ``python -m arq tests.integrations.arq_app.WorkerSettings`` on
Redis database 7 (claimed through tests/brokers.py), up to 50 jobs at once;
it signs and checks contexts with ``arq_app.SECRET``.  Bad jobs are written
by a pool without ctxrelay, with whatever carrier the test forges.
"""

from __future__ import annotations

import asyncio
import pickle
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import Job

import ctxrelay
from ctxrelay import Policy
from ctxrelay._carrier import KEY, SIGNATURE, Signer, binding, capture
from ctxrelay.integrations.arq import EXPIRY_GRACE, install, install_worker
from tests.brokers import WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.arq_app import SECRET
from tests.integrations.fresh_ids import fresh

pytestmark = [
    pytest.mark.broker,
    # arq 0.28 pins redis-py < 6 (arq #454); the suite runs it on the redis-py
    # that Celery needs (>= 6.4), where arq's create_pool passes an argument
    # redis-py 6 deprecated.  Not ctxrelay's: ignored here, nowhere else.
    pytest.mark.filterwarnings(
        "ignore:Call to '__init__' function with deprecated usage of input argument/s "
        "'retry_on_timeout':DeprecationWarning"
    ),
]

DB = 7
N = 200
WAIT = 60.0


class ArqWorker:
    def __init__(self, url: str, queue: str, process: WorkerProcess) -> None:
        self.url = url
        self.queue = queue
        self.process = process

    async def pool(self, relay: bool = True, **options: Any) -> ArqRedis:
        settings = RedisSettings.from_dsn(self.url)
        pool = await create_pool(settings, default_queue_name=self.queue, **options)
        return install(pool, secret=SECRET) if relay else pool


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArqWorker]:
    url = need_redis(DB)
    queue = f"ctxrelay-arq-{uuid.uuid4().hex[:8]}"
    env = {"CTXRELAY_TEST_BROKER": url, "CTXRELAY_TEST_QUEUE": queue}
    log = tmp_path_factory.mktemp("arq") / "worker.log"
    process = WorkerProcess(["arq", "tests.integrations.arq_app.WorkerSettings"], log, env)
    process.start()
    try:
        wait_until(lambda: "Starting worker" in process.output(), "the arq worker's start")
        yield ArqWorker(url, queue, process)
    finally:
        process.stop()
        flush_redis(DB)


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    result = asyncio.run(asyncio.wait_for(main(), 110))
    assert ctxrelay.current() == ctxrelay.Context()
    return result


async def result(job: Job | None) -> Any:
    assert job is not None
    return await job.result(timeout=WAIT, poll_delay=0.05)


def relayed(fields: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k != "job_id"}


def test_enqueue_carries_the_context_and_the_job_runs_bound_to_it(worker: ArqWorker) -> None:
    async def main() -> tuple[str, dict[str, str], dict[str, str], Any]:
        pool = await worker.pool()
        try:
            with ctxrelay.bind(request_id="r-arq", tenant="acme"):
                job = await pool.enqueue_job("fields")
                hook = await pool.enqueue_job("hook_saw")
            bare = await result(await pool.enqueue_job("fields"))
            assert job is not None
            return job.job_id, await result(job), bare, await result(hook)
        finally:
            await pool.aclose()

    job_id, got, bare, hook = run(main)
    assert got == {"request_id": "r-arq", "tenant": "acme", "job_id": job_id}
    assert set(fresh(bare)) == {"job_id"}  # enqueued outside any context: its own ids only
    assert hook == "r-arq"  # the settings' own on_job_start runs inside the context


def test_200_concurrent_jobs_each_see_only_their_own_context(worker: ArqWorker) -> None:
    async def main() -> list[tuple[str, dict[str, Any]]]:
        pool = await worker.pool()
        gate = asyncio.Semaphore(16)  # the pool's connections, not the worker's 50 slots
        try:

            async def one(i: int) -> tuple[str, dict[str, Any]]:
                rid = f"r-{i}-{uuid.uuid4().hex[:8]}"
                async with gate:
                    with ctxrelay.bind(request_id=rid, user=f"u{i}"):
                        job = await pool.enqueue_job("interleaved", f"t{i}")
                await asyncio.sleep(0.5)  # all enqueued: the worker runs them 50 at a time
                async with gate:
                    return rid, await result(job)

            return list(await asyncio.gather(*(one(i) for i in range(N))))
        finally:
            await pool.aclose()

    results = run(main)
    for i, (rid, got) in enumerate(results):
        assert got["tag"] == f"t{i}"
        assert relayed(got["fields"]) == {"request_id": rid, "user": f"u{i}"}
        assert got["task"] == rid


def test_failures_timeouts_aborts_and_leaks_leave_nothing_for_the_next_job(
    worker: ArqWorker,
) -> None:
    async def main() -> list[Any]:
        pool = await worker.pool()
        try:
            out: list[Any] = []
            with ctxrelay.bind(request_id="r-leak", user="leaky"):
                out.append(relayed(await result(await pool.enqueue_job("leaky"))))
            with ctxrelay.bind(request_id="r-fail"):
                failing = await pool.enqueue_job("fails")
            with pytest.raises(RuntimeError, match="failed in r-fail"):
                await result(failing)
            with ctxrelay.bind(request_id="r-timeout"):
                timing_out = await pool.enqueue_job("slow")
            with pytest.raises(asyncio.TimeoutError):
                await result(timing_out)
            with ctxrelay.bind(request_id="r-abort"):
                aborted = await pool.enqueue_job("slow")
            assert aborted is not None
            await asyncio.sleep(0.3)  # running, then aborted: the job's task is cancelled
            assert await aborted.abort(timeout=WAIT, poll_delay=0.05)
            # Many contextless jobs after them, on the worker's 50 slots.
            jobs = [await pool.enqueue_job("fields") for _ in range(60)]
            out.extend([await result(job) for job in jobs])
            return out
        finally:
            await pool.aclose()

    leaked, *after = run(main)
    assert leaked == {"request_id": "r-leak", "user": "leaked"}
    assert all(set(fresh(fields)) == {"job_id"} for fields in after)
    assert len({fields["request_id"] for fields in after}) == len(after)  # each its own


def test_retried_deferred_and_child_jobs_keep_the_context(worker: ArqWorker) -> None:
    async def main() -> tuple[Any, Any, Any, str, Any]:
        pool = await worker.pool()
        try:
            with ctxrelay.bind(request_id="r-retry"):
                retry = await result(await pool.enqueue_job("retried"))
            with ctxrelay.bind(request_id="r-defer"):
                deferred = await result(await pool.enqueue_job("fields", _defer_by=0.5))
            with ctxrelay.bind(request_id="r-parent", task_id="never-forwarded"):
                parent = await pool.enqueue_job("parent")
            child_id = await result(parent)
            child = await result(Job(child_id, pool, _queue_name=worker.queue))
            assert parent is not None
            return retry, deferred, child, parent.job_id, child_id
        finally:
            await pool.aclose()

    retry, deferred, child, parent_id, child_id = run(main)
    assert retry["try"] == 2
    assert relayed(retry["fields"]) == {"request_id": "r-retry"}
    assert relayed(deferred) == {"request_id": "r-defer"}
    # The child carries its parent's fields on, with its own job id.
    assert child == {"request_id": "r-parent", "step": "child", "job_id": child_id}
    assert child_id != parent_id


def test_a_job_delayed_past_its_deadline_is_not_run(worker: ArqWorker, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    async def main() -> tuple[str, str]:
        pool = await worker.pool()
        try:
            with ctxrelay.bind(request_id="r-arq-late"), ctxrelay.deadline(0.5):
                late = await pool.enqueue_job("mark", str(marker), _defer_by=1.5)
            assert late is not None
            with pytest.raises(ctxrelay.DeadlineExceeded):
                await result(late)
            # The worker keeps serving, and a job with time left runs.
            with ctxrelay.bind(request_id="r-arq-after"), ctxrelay.deadline(30):
                after = await result(await pool.enqueue_job("mark", str(marker)))
            return late.job_id, after
        finally:
            await pool.aclose()

    job_id, after = run(main)
    assert after == str(marker)
    assert marker.read_text() == "r-arq-after"  # written by the second job only

    def logged() -> bool:
        return any(
            "[rid=r-arq-late]" in line and job_id in line and "deadline passed" in line
            for line in worker.process.output().splitlines()
        )

    wait_until(logged, "the worker's line about the expired job, with its request id")


def test_a_job_with_time_left_sees_less_of_it(worker: ArqWorker) -> None:
    async def main() -> tuple[float | None, Any, Any]:
        pool = await worker.pool()
        try:
            with ctxrelay.bind(request_id="r-arq-left"), ctxrelay.deadline(30):
                before = ctxrelay.remaining()
                timed = await pool.enqueue_job("remaining")
            with ctxrelay.bind(request_id="r-arq-none"):
                untimed = await pool.enqueue_job("remaining")
            return before, await result(timed), await result(untimed)
        finally:
            await pool.aclose()

    before, seen, none = run(main)
    assert before is not None
    assert seen["remaining"] is not None
    assert 0 < seen["remaining"] < before
    assert seen["fields"]["request_id"] == "r-arq-left"
    assert none["remaining"] is None
    assert none["fields"]["request_id"] == "r-arq-none"


def test_the_stored_job_expires_after_the_deadline_never_later_than_the_callers(
    worker: ArqWorker,
) -> None:
    async def main() -> list[int]:
        pool = await worker.pool()
        try:
            ttls = []
            for deadline, expires in ((20, None), (20, 5), (20, 3600), (None, None)):
                # A queue no worker reads: the stored job is looked at, not run.
                with ctxrelay.deadline(deadline):
                    job = await pool.enqueue_job(
                        "fields", _queue_name="ctxrelay-arq-nobody", _expires=expires
                    )
                assert job is not None
                ttls.append(await pool.pttl(job_key_prefix + job.job_id))
            return ttls
        finally:
            await pool.aclose()

    narrowed, kept, capped, untouched = run(main)
    limit = (20 + EXPIRY_GRACE) * 1000
    assert 0 < narrowed <= limit
    assert 0 < kept <= 5000  # the caller's own, shorter: kept
    assert 0 < capped <= limit  # the caller's own, longer: the deadline's
    assert untouched > limit  # no deadline: arq's own default (a day)


def test_the_in_house_route_decides_what_the_stored_job_carries(worker: ArqWorker) -> None:
    fields = {"request_id": "r-p", "cookie": "session=s1", "x-gray": "canary", "user": "ada"}

    async def main() -> list[dict[str, str]]:
        pool = await worker.pool()
        try:
            carried = []
            for policy in (
                Policy(capture={"cookie", "x-gray"}),
                Policy(capture={"cookie", "x-gray"}, in_house=Policy.Route(sensitive={"cookie"})),
            ):
                ctxrelay.configure(policy)
                with ctxrelay.use(ctxrelay.Context(fields)):
                    # A queue no worker reads: the stored job is looked at, not run.
                    job = await pool.enqueue_job("fields", _queue_name="ctxrelay-arq-nobody")
                assert job is not None
                raw = await pool.get(job_key_prefix + job.job_id)
                assert isinstance(raw, bytes)
                carried.append(pickle.loads(raw)[KEY])
            return carried
        finally:
            await pool.aclose()

    default, named = run(main)
    assert "cookie" not in default
    assert "session" not in default.get("baggage", "")
    assert default["x-gray"] == "canary"
    assert default["x-request-id"] == "r-p"
    assert SIGNATURE in default
    assert named["cookie"] == "session=s1"


def _signed(job_id: str) -> dict[str, str]:
    with ctxrelay.bind(request_id="r-admin", user="root"):
        return capture(binding("fields", job_id), Signer(SECRET))


def _tampered(job_id: str) -> object:
    carrier = _signed(job_id)
    carrier["baggage"] = carrier["baggage"].replace("root", "ada")
    return carrier


def _control_character(job_id: str) -> object:
    # Signed with the secret (a publisher's bug, not an attacker): the
    # signature holds, the value still cannot become a field.
    carrier = {"x-request-id": "r\x01admin"}
    carrier[SIGNATURE] = Signer(SECRET).sign(carrier, binding("fields", job_id))
    return carrier


def _unsigned(job_id: str) -> object:
    with ctxrelay.bind(request_id="r-admin"):
        return capture(binding("fields", job_id), None)


BAD: dict[str, tuple[str, Callable[[str], object]]] = {
    "not-a-mapping": ("malformed", lambda _: "x-request-id=r-admin"),
    "oversized": ("malformed", lambda _: {"baggage": "a=" + "x" * 50_000}),
    "control-character": ("malformed", _control_character),
    "tampered": ("signature that does not match", _tampered),
    "unsigned": ("no signature", _unsigned),
    "moved-from-another-job": ("signature that does not match", lambda _: _signed("other-job")),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_context_runs_the_job_with_an_empty_one_and_a_log_line(
    worker: ArqWorker, kind: str
) -> None:
    reason, make = BAD[kind]
    job_id = f"bad-{kind}-{uuid.uuid4().hex[:8]}"
    forged = make(job_id)

    def forge(data: dict[str, Any]) -> bytes:
        return pickle.dumps({**data, KEY: forged})

    async def main() -> tuple[Any, Any]:
        bare = await worker.pool(relay=False, job_serializer=forge)
        pool = await worker.pool()
        try:
            got = await result(await bare.enqueue_job("fields", _job_id=job_id))
            with ctxrelay.bind(request_id="r-after-bad"):
                after = await result(await pool.enqueue_job("fields"))
            return got, after
        finally:
            await bare.aclose()
            await pool.aclose()

    got, after = run(main)
    # None of the refused context: a fresh request id, made by the worker.
    assert fresh(got) == {"job_id": job_id}
    assert relayed(after) == {"request_id": "r-after-bad"}  # the worker keeps serving

    def logged() -> bool:
        lines = worker.process.output().splitlines()
        return any(job_id in line and "ctxrelay" in line and reason in line for line in lines)

    wait_until(logged, "the worker's log line about the bad context")
    assert "r-admin" not in worker.process.output()


def test_install_worker_wraps_the_settings_hooks_once_and_resets_by_token() -> None:
    calls: list[tuple[str, str | None]] = []

    async def mine_start(ctx: dict[str, Any]) -> None:
        calls.append(("start", ctxrelay.request_id()))

    async def mine_after(ctx: dict[str, Any]) -> None:
        calls.append(("after", ctxrelay.request_id()))

    settings: dict[str, Any] = {"on_job_start": mine_start, "after_job_end": mine_after}
    assert install_worker(settings) is settings
    first = settings["on_job_start"]
    assert install_worker(settings, secret=SECRET) is settings
    assert settings["on_job_start"] is first  # idempotent

    async def main() -> list[Any]:
        from arq.utils import ms_to_datetime

        with ctxrelay.bind(request_id="r-carried"):
            carrier = capture(binding("fields", "j-1"), Signer(SECRET))
        data = pickle.dumps({"f": "fields", "a": (), "k": {}, "t": 1, "et": 1000, KEY: carrier})
        settings["job_deserializer"](data)  # as arq reads the job in run_job's task
        ctx: dict[str, Any] = {"job_id": "j-1", "enqueue_time": ms_to_datetime(1000)}
        with ctxrelay.bind(request_id="outer"):
            await settings["on_job_start"](ctx)
            inside = dict(ctxrelay.current())
            await settings["after_job_end"](ctx)
            return [inside, dict(ctxrelay.current())]

    inside, after = run(main)
    assert inside == {"request_id": "r-carried", "job_id": "j-1"}
    assert after == {"request_id": "outer"}  # by token: what was there before
    assert calls == [("start", "r-carried"), ("after", "r-carried")]


def test_the_documented_example_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = need_redis(DB)
    page = Path(__file__).resolve().parents[2] / "docs" / "arq-taskiq.md"
    (code,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
        if "ctxrelay.integrations.arq" in block
    ]
    code = code.replace("redis://127.0.0.1:6379/0", url)
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert "o-1 confirmed for ada (r-42)" in finished.stdout
