"""The Celery app of the logging end-to-end test, and its worker's log setup.

The worker runs ``python -m celery -A tests.integrations.logging_celery_app
worker``; the module-level ``app`` is configured from ``CTXRELAY_E2E_*``
environment variables.  Its one task logs one line with each of stdlib
``logging``, structlog and loguru:

* stdlib -- through the handlers Celery sets up, which get ctxrelay's filter
  from the Celery snippet of ``docs/logging.md``, taken from the page and run
  here as written (so the documented setup is what is tested);
* structlog and loguru -- into one file per library and worker process
  (``<library>-<pid>.log`` in ``CTXRELAY_E2E_LOGS``), configured in each
  pool process as the docs show: ``merge_context`` and ``patcher``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import structlog
from celery import Celery, signals  # type: ignore[import-untyped]
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay.integrations.celery import install
from ctxrelay.integrations.loguru import patcher
from ctxrelay.integrations.structlog import merge_context

ROOT = Path(__file__).resolve().parent.parent.parent
TASK = "e2e.log_lines"
#: The worker's stdlib line format: ``%(request_id)s`` needs the filter on
#: every handler that writes it, or the line is lost as a "Logging error".
LOG_FORMAT = "%(levelname)s [rid=%(request_id)s] %(name)s: %(message)s"
#: What a worker's stdlib line of :func:`log_lines` looks like.
STDLIB_LINE = re.compile(r"\[rid=(?P<rid>\S+)\] e2e\.worker: worker expect=(?P<expect>\S+)")


def documented_celery_setup() -> str:
    """The Python block of ``docs/logging.md`` that sets up a Celery worker."""
    page = (ROOT / "docs" / "logging.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    (snippet,) = [code for code in blocks if "after_setup_logger" in code]
    return snippet


def make_app(broker: str, backend: str, queue: str, secret: str) -> Celery:
    """An app routing its task to ``queue``, with ctxrelay installed.

    The test passes the other Celery tests' secret (every app installed in
    one process must share it) and hands it to the worker in its
    environment: importing ``celery_app`` here would connect *its* log
    setup in the worker, and the documented one would go untested.
    """
    app = Celery("ctxrelay_logging_e2e", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_expires=600,
        worker_prefetch_multiplier=1,
        worker_log_format=LOG_FORMAT,
        worker_task_log_format=LOG_FORMAT,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
    )
    install(app, secret=secret)
    app.task(name=TASK)(log_lines)
    return app


def log_lines(expect: str) -> str:
    """Log ``worker expect=<expect>`` with each library; return the id seen.

    ``expect`` is the id the publishing request was sent with, passed as
    data: the test checks that the id the context put on each line is it.
    """
    logging.getLogger("e2e.worker").info("worker expect=%s", expect)
    structlog.get_logger("e2e.worker").info("worker", expect=expect)
    loguru_logger.info("worker expect={}", expect)
    return ctxrelay.request_id() or "-"


def _per_process_logs(**_: Any) -> None:
    """structlog and loguru, set up in each pool process as docs/logging.md shows."""
    logs = Path(os.environ["CTXRELAY_E2E_LOGS"])
    pid = os.getpid()
    structlog.configure(
        processors=[merge_context, structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(
            file=(logs / f"structlog-{pid}.log").open("a", encoding="utf-8")
        ),
        cache_logger_on_first_use=True,
    )
    loguru_logger.remove()  # the default stderr sink: Celery redirects stderr to its log
    loguru_logger.configure(patcher=patcher)
    loguru_logger.add(logs / f"loguru-{pid}.log", format="{extra[request_id]} {message}")


_DOCUMENTED: dict[str, Any] = {}


def _from_environment() -> Celery | None:
    broker = os.environ.get("CTXRELAY_E2E_BROKER")
    if not broker:
        return None
    # The documented snippet, run as written: it connects the signal
    # receivers that put ctxrelay's filter on Celery's log handlers.
    # Kept in _DOCUMENTED: Celery holds its receivers weakly, as a user's
    # module would hold them.
    exec(compile(documented_celery_setup(), "docs/logging.md", "exec"), _DOCUMENTED)
    signals.worker_process_init.connect(_per_process_logs, weak=False)
    return make_app(
        broker, broker, os.environ["CTXRELAY_E2E_QUEUE"], os.environ["CTXRELAY_E2E_SECRET"]
    )


app = _from_environment()
