"""The Celery app the revocation tests run workers of.

It is ``celery_app.make_app`` (same tasks, secret and log format) plus two
tasks that report where they ran and what the worker thread *held* when they
arrived.  The worker subprocess runs ``python -m celery -A
tests.integrations.celery_revoke_app worker``, which finds the module-level
``app`` configured from ``CTXRELAY_REVOKE_*`` environment variables.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals  # type: ignore[import-untyped]

import ctxrelay
from tests.integrations.celery_app import make_app, seen

#: The Redis list every ``r.where`` run appends its task id to.
RAN = "ctxrelay-revoke-ran"

# Where the recorder leaves, on the task's request, what the thread held.
_HELD = "ctxrelay_test_held"

Report = dict[str, Any]


def make_revoke_app(broker: str, queue: str, visibility_timeout: int) -> Celery:
    """``make_app`` on ``broker`` (also the result backend), with the ``r.*``
    tasks; Redis hands a message unacknowledged for ``visibility_timeout``
    seconds to another consumer."""
    app = make_app(broker, broker, queue, visibility_timeout=visibility_timeout)
    app.conf.broker_transport_options = {
        "visibility_timeout": visibility_timeout,
        # Sweep for expired unacknowledged messages every second (kombu's
        # default is every 100 s), and never let a killed worker's sweep lock
        # hold the next worker off for long.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 5,
    }
    app.task(name="r.where", bind=True)(where)
    app.task(name="r.block", bind=True)(block)
    return app


def held_on_arrival(task: Any = None, **_: Any) -> None:
    """``task_prerun`` receiver connected *before* ctxrelay's: it records the
    context the worker thread held when the task arrived -- whatever the
    previous task on this thread left behind."""
    if task is not None:
        setattr(task.request, _HELD, dict(ctxrelay.current()))


def where(self: Any) -> Report:
    """Record that this task ran; report its context, what the thread held
    before it, and which process and thread ran it."""
    with redis.Redis.from_url(self.app.conf.broker_url) as client:
        client.rpush(RAN, str(self.request.id))
    return {
        "fields": seen(),
        "held": getattr(self.request, _HELD, None),
        "pid": os.getpid(),
        "thread": threading.get_ident(),
    }


def block(self: Any, marker: str) -> Report:
    """Say "running" (``marker`` holds the pid), then wait to be terminated."""
    part = Path(f"{marker}.part")
    part.write_text(str(os.getpid()))
    part.replace(marker)
    for _ in range(600):  # ended by revoke(terminate=True) long before this
        time.sleep(0.1)
    return where(self)


def _from_environment() -> Celery | None:
    broker = os.environ.get("CTXRELAY_REVOKE_BROKER")
    if not broker:
        return None
    # Connected before make_app() installs ctxrelay: Celery calls the
    # receivers of a signal in the order they were connected.
    signals.task_prerun.connect(held_on_arrival, weak=False, dispatch_uid="held_on_arrival")
    return make_revoke_app(
        broker,
        os.environ["CTXRELAY_REVOKE_QUEUE"],
        int(os.environ["CTXRELAY_REVOKE_VISIBILITY"]),
    )


app = _from_environment()
