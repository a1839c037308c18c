"""The Celery app the Celery tests publish to and run workers of.

``make_app()`` builds one app per broker; the worker subprocess runs
``python -m celery -A tests.integrations.celery_app worker``, which finds the
module-level ``app`` configured from ``CTXRELAY_TEST_*`` environment
variables.  Every task reports the context it saw as a plain dict.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations import logging as relay_logging
from ctxrelay.integrations.celery import install

#: Shared by the test process and every worker: signing is always on.
SECRET = "ctxrelay-test-secret-0123456789"

LOG_FORMAT = "%(levelname)s [rid=%(request_id)s] %(name)s: %(message)s"

Fields = dict[str, str]


def seen() -> Fields:
    """What a task reports: the fields of the context bound where it runs."""
    return dict(ctxrelay.current())


def _in_subprocess() -> Fields:
    return dict(ctxrelay.current())


def make_app(broker: str, backend: str, queue: str, *, visibility_timeout: int = 3600) -> Celery:
    """An app routing every task to ``queue``, with ctxrelay installed."""
    app = Celery("ctxrelay_tests", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"visibility_timeout": visibility_timeout},
        result_expires=600,
        worker_prefetch_multiplier=1,
        worker_log_format=LOG_FORMAT,
        worker_task_log_format=LOG_FORMAT,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
    )
    install(app, secret=SECRET)
    _tasks(app)
    return app


def fields(*_: object) -> Fields:
    return seen()


def where() -> dict[str, Any]:
    return {"fields": seen(), "pid": os.getpid(), "thread": threading.get_ident()}


def trail(previous: list[Fields] | None = None) -> list[Fields]:
    return [*(previous or []), seen()]


def gather(results: list[Any]) -> dict[str, Any]:
    return {"header": results, "callback": seen()}


def boom() -> None:
    logging.getLogger("tests.boom").info("about to fail")
    raise ValueError("boom")


def errback_by_id(task_id: str) -> Fields:
    return {**seen(), "failed": task_id}


def retry_explicit(self: Any) -> dict[str, Any]:
    if self.request.retries == 0:
        raise self.retry(countdown=1)
    return {"fields": seen(), "retries": self.request.retries}


def retry_auto(self: Any) -> dict[str, Any]:
    if self.request.retries == 0:
        raise RuntimeError("first attempt fails")
    return {"fields": seen(), "retries": self.request.retries}


def leaky() -> Fields:
    # A task that binds and never unbinds: the worker must not let it leak.
    ctxrelay.bind(user="leaked").__enter__()
    return seen()


def slow_acks_late(marker: str) -> Fields:
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(60)  # killed here by the test
    return seen()


def in_process_pool() -> Fields:
    with ctxrelay.ProcessPoolExecutor(max_workers=1) as pool:
        return pool.submit(_in_subprocess).result(timeout=60)


def sets_user(user: str) -> dict[str, str | None]:
    # Code shared with a web handler: the user for the rest of the task.
    ctxrelay.bind_request(user=user)
    with ctxrelay.ThreadPoolExecutor(1) as pool:
        in_pool = pool.submit(ctxrelay.get, "user").result(timeout=30)
    return {"task": ctxrelay.get("user"), "pool": in_pool}


def _tasks(app: Celery) -> None:
    for fn in (
        fields,
        where,
        trail,
        gather,
        boom,
        errback_by_id,
        leaky,
        in_process_pool,
        sets_user,
    ):
        app.task(name=f"t.{fn.__name__}")(fn)
    app.task(name="t.retry_explicit", bind=True, max_retries=2)(retry_explicit)
    app.task(
        name="t.retry_auto",
        bind=True,
        autoretry_for=(RuntimeError,),
        retry_kwargs={"max_retries": 2, "countdown": 1},
    )(retry_auto)
    app.task(name="t.slow_acks_late", acks_late=True)(slow_acks_late)


def _relay_logs(logger: logging.Logger, **_: Any) -> None:
    # The worker's log lines carry the request id (and "-" outside a task).
    if logger.handlers:
        relay_logging.install(logger=logger)


signals.after_setup_logger.connect(_relay_logs, weak=False)
signals.after_setup_task_logger.connect(_relay_logs, weak=False)


def _from_environment() -> Celery | None:
    broker = os.environ.get("CTXRELAY_TEST_BROKER")
    if not broker:
        return None
    return make_app(
        broker,
        os.environ["CTXRELAY_TEST_BACKEND"],
        os.environ["CTXRELAY_TEST_QUEUE"],
    )


app = _from_environment()
