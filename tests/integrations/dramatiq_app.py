"""The Dramatiq broker and actors the Dramatiq tests send to and run workers of.

``python -m dramatiq tests.integrations.dramatiq_app:broker`` finds the
module-level ``broker``, configured from ``CTXRELAY_TEST_*`` environment
variables; the test process builds its own with :func:`make_broker`.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

import ctxrelay
from ctxrelay.integrations.dramatiq import install

SECRET = "ctxrelay-dramatiq-test-secret-0123"

Fields = dict[str, str]


def fields() -> Fields:
    return dict(ctxrelay.current())


def where() -> dict[str, Any]:
    return {"fields": fields(), "pid": os.getpid()}


def leaky() -> Fields:
    # Binds and never unbinds: the worker must not let it leak.
    ctxrelay.bind(user="leaked").__enter__()
    return fields()


def fails_first(marker: str) -> Fields:
    if not os.path.exists(marker):
        with open(marker, "w") as out:
            out.write("failed once")
        raise RuntimeError("first attempt fails")
    return fields()


def trail(previous: list[Fields] | None = None) -> list[Fields]:
    return [*(previous or []), fields()]


def make_broker(url: str, queue: str) -> tuple[Any, Any, dict[str, Any]]:
    """A Redis broker with results, ctxrelay installed; its backend; the test actors."""
    untyped: Any = RedisBroker, Results, RedisBackend  # dramatiq's constructors are untyped
    broker_class, results_class, backend_class = untyped
    broker = broker_class(url=url)
    backend = backend_class(url=url)
    broker.add_middleware(results_class(backend=backend, store_results=True))
    install(broker, secret=SECRET)
    options: dict[str, Any] = {"max_retries": 1, "min_backoff": 100, "max_backoff": 200}
    functions: list[Any] = [fields, where, leaky, fails_first, trail]
    actors = {
        fn.__name__: dramatiq.actor(broker=broker, queue_name=queue, **options)(fn)
        for fn in functions
    }
    return broker, backend, actors


broker: Any = None
if os.environ.get("CTXRELAY_TEST_BROKER"):
    broker, _, _ = make_broker(
        os.environ["CTXRELAY_TEST_BROKER"], os.environ["CTXRELAY_TEST_QUEUE"]
    )
