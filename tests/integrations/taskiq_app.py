"""The taskiq broker, tasks and scheduler the taskiq tests run real workers of.

``taskiq worker tests.integrations.taskiq_app:broker`` and ``taskiq
scheduler tests.integrations.taskiq_app:scheduler`` find them here,
configured from ``CTXRELAY_TEST_*`` environment variables; every context is
signed and checked with :data:`SECRET`.  In the worker, ``ctxrelay``'s own log
lines show the request id bound while they are logged (``[rid=...]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from taskiq import SimpleRetryMiddleware, TaskiqEvents, TaskiqScheduler, TaskiqState
from taskiq_redis import ListQueueBroker, ListRedisScheduleSource, RedisAsyncResultBackend

import ctxrelay
from ctxrelay.integrations import logging as relay_logging
from ctxrelay.integrations.taskiq import install

LOG_FORMAT = "%(levelname)s [rid=%(request_id)s] %(name)s: %(message)s"

SECRET = "ctxrelay-taskiq-test-secret-0123456789"
URL = os.environ.get("CTXRELAY_TEST_BROKER", "redis://127.0.0.1:6379/8")
QUEUE = os.environ.get("CTXRELAY_TEST_QUEUE", "ctxrelay-taskiq")

Fields = dict[str, str]

broker = ListQueueBroker(URL, queue_name=QUEUE)
broker.with_result_backend(RedisAsyncResultBackend(URL, result_ex_time=600))
broker.add_middlewares(SimpleRetryMiddleware(default_retry_count=3))
install(broker, secret=SECRET)


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def relay_logs(state: TaskiqState) -> None:
    # In the worker only: ctxrelay's own lines, with the request id bound.
    relay = logging.getLogger("ctxrelay")
    relay_logging.setup(LOG_FORMAT, logger=relay)
    relay.propagate = False  # once, with the request id: not again through root


source = ListRedisScheduleSource(URL, prefix=f"{QUEUE}-schedule")
scheduler = TaskiqScheduler(broker, sources=[source])


@broker.task
async def fields() -> Fields:
    return dict(ctxrelay.current())


@broker.task
async def interleaved(tag: str) -> dict[str, Any]:
    await asyncio.sleep(0.005)  # other tasks run meanwhile
    spawned = await asyncio.create_task(asyncio.sleep(0, ctxrelay.request_id()))
    await asyncio.sleep(0.005)
    return {"tag": tag, "fields": dict(ctxrelay.current()), "task": spawned}


@broker.task
def sync_fields() -> dict[str, Any]:
    # taskiq runs sync tasks in its thread pool, with a copy of the context.
    return {"fields": dict(ctxrelay.current()), "thread": threading.current_thread().name}


@broker.task
async def leaky() -> Fields:
    ctxrelay.bind(user="leaked").__enter__()  # never exited: must not leak
    return dict(ctxrelay.current())


@broker.task
async def fails() -> None:
    raise RuntimeError(f"failed in {ctxrelay.request_id()}")


@broker.task(retry_on_error=True, max_retries=3)
async def flaky(marker: str) -> Fields:
    if not os.path.exists(marker):
        with open(marker, "w") as out:
            out.write("failed once")
        raise RuntimeError("first attempt fails")
    return dict(ctxrelay.current())


@broker.task(timeout=0.3)
async def slow() -> None:
    await asyncio.sleep(60)  # cancelled by the task's timeout


@broker.task
async def parent() -> str:
    with ctxrelay.bind(step="child"):
        task = await fields.kiq()
    return str(task.task_id)


@broker.task
async def mark(path: str) -> str:
    """Leave a file behind: the proof that the task ran."""
    Path(path).write_text(ctxrelay.request_id() or "-")
    return path


@broker.task
def sync_mark(path: str) -> str:
    """The same from a sync task (taskiq's thread pool)."""
    Path(path).write_text(ctxrelay.request_id() or "-")
    return path


@broker.task
async def remaining() -> dict[str, Any]:
    """The time the task has left, and the fields it sees."""
    return {"remaining": ctxrelay.remaining(), "fields": dict(ctxrelay.current())}


@broker.task(timeout=5)
async def remaining_slowly(seconds: float) -> dict[str, Any]:
    """Sleeps: cut at the deadline when that comes before the task's own 5 s."""
    await asyncio.sleep(seconds)
    return {"remaining": ctxrelay.remaining()}
