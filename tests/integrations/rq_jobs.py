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
