"""The Celery app and worker of the Sentry tests.

The worker runs ``python -m celery -A tests.integrations.sentry_celery_app
worker``; the module-level ``app`` is configured from ``CTXRELAY_SENTRY_*``
environment variables, and the worker initialises Sentry as an application
would -- its default and auto-enabled integrations (Celery's among them)
plus ctxrelay's -- with a :class:`~tests.integrations.sentry_capture.
DirectoryTransport` writing every event into ``CTXRELAY_SENTRY_EVENTS``.
The test publishes; the tasks fail; Sentry's Celery integration reports
them; the test reads the files.
"""

from __future__ import annotations

import os
from typing import Any

import sentry_sdk
from celery import Celery  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations.celery import install
from ctxrelay.integrations.sentry import SentryIntegration
from tests.integrations.sentry_capture import DirectoryTransport

FAIL = "sentry.fail"
PING = "sentry.ping"
#: The policy of the web process and the worker alike: the user header and
#: the cookie become fields (the cookie never goes into a message).
POLICY = ctxrelay.Policy(capture={"x-user", "cookie"})


def make_app(broker: str, queue: str, secret: str) -> Celery:
    """An app routing its tasks to ``queue``, with ctxrelay installed.

    ``secret``: every app installed in one process signs with the same
    secret; the test passes the other Celery tests' one, and hands it to the
    worker in its environment.
    """
    app = Celery("ctxrelay_sentry", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_expires=600,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )
    install(app, secret=secret)
    app.task(name=FAIL)(fail)
    app.task(name=PING)(ping)
    return app


def fail(expect: str) -> None:
    """Fail, naming the request that published it (as data, to check against)."""
    raise ValueError(f"task failed for {expect}")


def ping() -> str | None:
    return ctxrelay.request_id()


def _sentry_in_the_worker(events: str) -> None:
    # Before the pool forks: every child inherits the client, as with a
    # sentry_sdk.init at the top of a Celery app module.
    options: dict[str, Any] = {"traces_sample_rate": 1.0, "enable_backpressure_handling": False}
    sentry_sdk.init(
        transport=DirectoryTransport(events),
        integrations=[SentryIntegration()],
        **options,
    )


def _from_environment() -> Celery | None:
    broker = os.environ.get("CTXRELAY_SENTRY_BROKER")
    if not broker:
        return None
    ctxrelay.configure(POLICY)
    _sentry_in_the_worker(os.environ["CTXRELAY_SENTRY_EVENTS"])
    return make_app(
        broker, os.environ["CTXRELAY_SENTRY_QUEUE"], os.environ["CTXRELAY_SENTRY_SECRET"]
    )


app = _from_environment()
