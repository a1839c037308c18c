"""Job functions and the signed job class the RQ tests run in ``rq worker``."""

from __future__ import annotations

import os

from rq import Queue, get_current_job

import ctxrelay
from ctxrelay._signing import Signer
from ctxrelay.integrations.rq import RelayJob

SECRET = "ctxrelay-rq-test-secret-0123456789"


class SignedJob(RelayJob):
    """What the tests enqueue and the workers run: contexts are signed."""

    signer = Signer(SECRET)


def fields() -> dict[str, str]:
    return dict(ctxrelay.current())


def where() -> dict[str, object]:
    return {"fields": fields(), "pid": os.getpid()}


def sets_user(user: str) -> dict[str, str | None]:
    """Code shared with a web handler: sets the user for the rest of its
    unit of work, then hands work to a pool and reads it back."""
    ctxrelay.bind_request(user=user)
    with ctxrelay.ThreadPoolExecutor(1) as pool:
        in_pool = pool.submit(ctxrelay.get, "user").result(timeout=30)
    return {"job": ctxrelay.get("user"), "pool": in_pool}


def leaky() -> dict[str, str]:
    # Binds and never unbinds: the worker must not let it leak.
    ctxrelay.bind(user="leaked").__enter__()
    return fields()


def fails_first(marker: str) -> dict[str, str]:
    if not os.path.exists(marker):
        with open(marker, "w") as out:
            out.write("failed once")
        raise RuntimeError("first attempt fails")
    return fields()


def enqueue_child() -> str:
    job = get_current_job()
    assert job is not None
    child = Queue(job.origin, connection=job.connection, job_class=SignedJob).enqueue(fields)
    return child.id
