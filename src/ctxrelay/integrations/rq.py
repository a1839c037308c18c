"""RQ: the context is stored with the job and restored by the worker.

RQ has no publish signal; its extension points are the job, queue and worker
classes, so this module offers those:

* :class:`RelayJob` captures the current context into ``job.meta["ctxrelay"]``
  when the job is created -- ``enqueue``, ``enqueue_in``/``enqueue_at``,
  ``enqueue_many``, dependents (created, and so captured, by the caller;
  enqueued later by the worker) -- and, run by any worker, binds it around
  the job function;
* :class:`RelayWorker` / :class:`RelaySimpleWorker` bind it around the whole
  job -- function, success and failure callbacks, and the worker's own log
  lines about the job -- and reset it by token after, so nothing leaks into
  the next job of a ``SimpleWorker`` (which runs every job in one process).

The worker also binds ``job_id`` (worker-local: never forwarded to jobs the
job enqueues).  A retried job (``Retry(max=...)``) is the same job, meta and
all: it keeps its context.  Example::

    from redis import Redis
    from rq import Queue
    import ctxrelay
    from ctxrelay.integrations.rq import RelayJob

    queue = Queue("orders", connection=Redis(), job_class=RelayJob)
    with ctxrelay.bind(request_id="r-42"):
        queue.enqueue("shop.jobs.confirm", "o-1")

    # the worker:  rq worker orders --worker-class ctxrelay.integrations.rq.RelayWorker

Signing: subclass :class:`RelayJob` with ``signer = Signer(secret)`` and use
it on both sides (``job_class=`` and ``--job-class``); the worker then runs a
job whose context is unsigned or tampered with an empty context and logs an
error.  Malformed or oversized contexts run with an empty one and a warning.

A job that arrives without a request id -- enqueued without ``RelayJob``,
by a scheduler, or whose context was refused -- runs with a fresh one, made
as the web door makes one (``RelayJob.generator``, else
``settings.CTXRELAY["generator"]`` under Django, else a random id), so its
log lines still belong together.  The worker writes it into ``job.meta``,
signed, so a retry runs with the same id.  ``generate_id = False`` on a
``RelayJob`` subclass turns this off.

Deadlines: a job created while a deadline is bound gets RQ's ``ttl`` (the
time it may wait in the queue) set to the seconds left, rounded up, never
longer than the ``ttl`` the caller gave -- so Redis drops a job nobody ran in
time even without these classes in the worker.  The worker binds the carried
time narrowed by the time since the job was created (``created_at``, wall
clock), and a job whose deadline passed before it started is not run: it
fails with :class:`ctxrelay.DeadlineExceeded` (``FAILED``, in the failed job
registry, the exception in ``job.latest_result()``), after a warning with
the request id.
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from datetime import datetime, timezone
from importlib import metadata as _metadata
from typing import Any, ClassVar

try:
    from rq.job import Job
    from rq.queue import Queue
    from rq.worker import SimpleWorker, Worker
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.rq needs RQ (1.16 to 3.x): pip install 'ctxrelay[rq]'"
    ) from _exc

from .._carrier import KEY, Signer, binding, capture, restore, with_local
from .._context import Context, begin, current, leave, narrowed, read_current, use
from .._deadline import deadline_of, expired, remaining_ms
from .._inbound import RequestIdGenerator
from ._worker_id import FreshIds

#: The RQ releases this module works with (each tested by ``make test-matrix``).
SUPPORTED = "rq 1.16 to 3.x"


def _release(version: str) -> tuple[int, int]:
    major, _, rest = version.partition(".")
    minor = "".join(c for c in rest.partition(".")[0] if c.isdigit())
    return int(major or 0), int(minor or 0)


if _release(_metadata.version("rq")) < (1, 16):  # without the extra installed (make dist checks it)
    raise ImportError(
        f"ctxrelay.integrations.rq supports {SUPPORTED}, not rq {_metadata.version('rq')}: "
        "pip install 'ctxrelay[rq]'"
    )

__all__ = [
    "JOB_ID",
    "SUPPORTED",
    "RelayJob",
    "RelaySimpleWorker",
    "RelayWorker",
    "RelayWorkerMixin",
    "Signer",
]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running job's id.
JOB_ID = "job_id"

# The id of the job whose context a RelayWorker already bound in this
# context, so RelayJob.perform does not read (and log about) it twice.
_bound_job: ContextVar[str | None] = ContextVar("ctxrelay.rq.job", default=None)


class RelayJob(Job):
    """A ``Job`` that carries the context of the code that created it.

    Set these in a subclass (they are checked when it is defined: a wrong
    type raises ``TypeError`` there):

    ``signer``
        ``Signer(secret)`` signs the carried context and refuses unsigned or
        tampered ones.
    ``generate_id``
        A job that arrives without a request id (enqueued without
        ``RelayJob``, by a scheduler, or whose context was refused) runs
        with a fresh one; ``False``: with none.
    ``generator``
        What makes that id (called with no argument, returns a ``str``); by
        default the one of ``settings.CTXRELAY`` under Django, else a
        random id.  Write ``generator = staticmethod(new_id)``, or a plain
        function (it is read from the class, never bound to the job).
    """

    signer: ClassVar[Signer | None] = None
    generate_id: ClassVar[bool] = True
    generator: ClassVar[RequestIdGenerator | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.signer is not None and not isinstance(cls.signer, Signer):
            raise TypeError(
                f"{cls.__qualname__}.signer must be a ctxrelay Signer (Signer(secret)) "
                f"or None, not {type(cls.signer).__name__}"
            )
        _fresh_ids(cls)  # checks generate_id and generator now, at definition

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> Job:
        """``Job.create``, plus the current context in ``job.meta``."""
        job = super().create(*args, **kwargs)
        carrier = capture(binding(job.func_name, job.id), cls.signer)
        if carrier:
            job.meta[KEY] = carrier
        left = remaining_ms(current())
        if left is not None:
            # ttl is whole seconds (at least 1: 0 would mean "no ttl" to some
            # RQ paths); never longer than the caller's own ttl.
            seconds = max(1, math.ceil(left / 1000))
            job.ttl = seconds if job.ttl is None else min(job.ttl, seconds)
        return job

    def relayed_context(self) -> Context:
        """The context to run this job in: its carried one (with a fresh
        request id if it has none), plus ``job_id``."""
        source = f"RQ job {str(self.id)[:100]!r}"
        carried = self.meta.get(KEY) if isinstance(self.meta, dict) else None
        bound_to = binding(self.func_name, self.id)
        restored = self._queued_time_out(restore(carried, bound_to, self.signer, source=source))
        ctx = _fresh_ids(type(self)).completed(restored)
        if ctx is not restored:
            self._keep_for_retries(ctx, bound_to)
        return with_local(ctx, {JOB_ID: self.id})

    def _keep_for_retries(self, ctx: Context, bound_to: str) -> None:
        # A retry (Retry(max=...)) is this job saved and enqueued again, meta
        # and all: the id made now goes into its meta, signed, so the retry
        # runs with it.  Not under a deadline: re-read against created_at,
        # the time already spent would count twice.
        if deadline_of(ctx) is not None or not isinstance(self.meta, dict):
            return
        try:
            with use(ctx):
                carrier = capture(bound_to, self.signer)
            if carrier:
                self.meta[KEY] = carrier
        except Exception:
            _log.exception("ctxrelay: could not record the request id of RQ job %r", self.id)

    def _queued_time_out(self, ctx: Context) -> Context:
        # The carried remaining time is re-read at receipt: without this a
        # job that waited 4 s of its 5 would still get 5 s.  Only narrows.
        at = deadline_of(ctx)
        created = self.created_at
        if at is None or not isinstance(created, datetime):
            return ctx
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)  # RQ stores UTC
        waited = max(0.0, (datetime.now(timezone.utc) - created).total_seconds())
        return narrowed(ctx, at - waited)

    def perform(self) -> Any:
        """Run the job function in the job's context (once, if a worker bound
        it); a job whose deadline passed before it started fails with
        ``DeadlineExceeded`` instead of running."""
        if _bound_job.get() == self.id:
            self._unless_expired()
            return super().perform()
        with use(self.relayed_context()):
            self._unless_expired()
            return super().perform()

    def _unless_expired(self) -> None:
        error = expired(read_current())
        if error is not None:
            # Bound already: the line carries the request id.
            _log.warning(
                "ctxrelay: RQ job %r not run: its deadline passed before it started",
                str(self.id)[:100],
            )
            raise error


def _fresh_ids(cls: type[RelayJob]) -> FreshIds:
    """How jobs of ``cls`` get an id they lack, made once per configuration."""
    config = (cls.generate_id, cls.generator)
    known = cls.__dict__.get("_ctxrelay_ids")
    if isinstance(known, FreshIds) and known.config == config:
        return known
    made = FreshIds(*config, owner=f"ctxrelay.integrations.rq: {cls.__qualname__}")
    cls._ctxrelay_ids = made  # type: ignore[attr-defined]
    return made


def _context_of(job: Job) -> Context:
    if isinstance(job, RelayJob):
        return job.relayed_context()
    # A plain Job (a worker whose job_class is not a RelayJob): no carried
    # context; a fresh id as RelayJob's defaults say.
    return with_local(_fresh_ids(RelayJob).completed(Context()), {JOB_ID: job.id})


class RelayWorkerMixin:
    """Binds each job's context around RQ's whole ``perform_job``; reset by token."""

    job_class: type[Job] = RelayJob

    def perform_job(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> bool:
        # RQ 3 passes the job's Execution as a third argument; 1.16 and 2.x do not.
        token = begin(_context_of(job))
        mark = _bound_job.set(job.id)
        try:
            result: bool = super().perform_job(job, queue, *args, **kwargs)  # type: ignore[misc]
            return result
        finally:
            _bound_job.reset(mark)
            leave(token)


class RelayWorker(RelayWorkerMixin, Worker):
    """RQ's forking ``Worker``, relaying each job's context."""


class RelaySimpleWorker(RelayWorkerMixin, SimpleWorker):
    """RQ's ``SimpleWorker`` (every job in the worker process), relaying each
    job's context and resetting it after, so none leaks into the next job."""
