"""The arq functions and worker settings the arq tests run real workers of.

``python -m arq tests.integrations.arq_app.WorkerSettings`` reads its Redis
URL and queue from ``CTXRELAY_TEST_*`` environment variables; the worker
signs and checks contexts with :data:`SECRET`.  Its ``ctxrelay`` log lines
show the request id bound while they are logged (``[rid=...]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from arq import Retry
from arq.connections import RedisSettings

import ctxrelay
from ctxrelay.integrations import logging as relay_logging
from ctxrelay.integrations.arq import install_worker

LOG_FORMAT = "%(levelname)s [rid=%(request_id)s] %(name)s: %(message)s"

SECRET = "ctxrelay-arq-test-secret-0123456789"

Fields = dict[str, str]


async def fields(ctx: dict[str, Any]) -> Fields:
    return dict(ctxrelay.current())


async def interleaved(ctx: dict[str, Any], tag: str) -> dict[str, Any]:
    await asyncio.sleep(0.005)  # other jobs run meanwhile
    spawned = await asyncio.create_task(asyncio.sleep(0, ctxrelay.request_id()))
    await asyncio.sleep(0.005)
    return {"tag": tag, "fields": dict(ctxrelay.current()), "task": spawned}


async def leaky(ctx: dict[str, Any]) -> Fields:
    ctxrelay.bind(user="leaked").__enter__()  # never exited: must not leak
    return dict(ctxrelay.current())


async def fails(ctx: dict[str, Any]) -> None:
    raise RuntimeError(f"failed in {ctxrelay.request_id()}")


async def retried(ctx: dict[str, Any]) -> dict[str, Any]:
    if ctx["job_try"] == 1:
        raise Retry(defer=0.1)
    return {"try": ctx["job_try"], "fields": dict(ctxrelay.current())}


async def slow(ctx: dict[str, Any]) -> None:
    await asyncio.sleep(60)  # timed out or aborted


async def mark(ctx: dict[str, Any], path: str) -> str:
    """Leave a file behind: the proof that the job ran."""
    Path(path).write_text(ctxrelay.request_id() or "-")
    return path


async def remaining(ctx: dict[str, Any]) -> dict[str, Any]:
    """The time the job has left, and the fields it sees."""
    return {"remaining": ctxrelay.remaining(), "fields": dict(ctxrelay.current())}


async def parent(ctx: dict[str, Any]) -> str:
    with ctxrelay.bind(step="child"):
        job = await ctx["redis"].enqueue_job("fields", _queue_name=ctx["queue"])
    return str(job.job_id)


async def remember_queue(ctx: dict[str, Any]) -> None:
    ctx["queue"] = os.environ.get("CTXRELAY_TEST_QUEUE", "arq:queue")
    # In the worker only: ctxrelay's own lines, with the request id bound.
    relay_logging.setup(LOG_FORMAT, logger=logging.getLogger("ctxrelay"))


async def seen_by_hooks(ctx: dict[str, Any]) -> None:
    # The user's own hook: runs inside the job's context (ctxrelay's wraps it).
    ctx["hook_saw"] = ctxrelay.request_id()


async def hook_saw(ctx: dict[str, Any]) -> Any:
    return ctx.get("hook_saw")


FUNCTIONS = [fields, interleaved, leaky, fails, retried, slow, mark, remaining, parent, hook_saw]


@install_worker(secret=SECRET)
class WorkerSettings:
    functions = FUNCTIONS
    redis_settings = RedisSettings.from_dsn(
        os.environ.get("CTXRELAY_TEST_BROKER", "redis://127.0.0.1:6379/7")
    )
    queue_name = os.environ.get("CTXRELAY_TEST_QUEUE", "arq:queue")
    max_jobs = 50
    job_timeout = 2
    allow_abort_jobs = True
    keep_result = 120
    on_startup = remember_queue
    on_job_start = seen_by_hooks
