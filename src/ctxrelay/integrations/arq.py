"""arq: the context is stored with the job and bound by the worker for that job.

arq has no signals (arq #277); its seams are the pool's ``enqueue_job`` and
``job_serializer``, and the worker's settings: ``job_deserializer`` and the
``on_startup`` / ``on_job_start`` / ``after_job_end`` hooks.  So::

    from arq import create_pool
    from arq.connections import RedisSettings
    import ctxrelay
    from ctxrelay.integrations.arq import install, install_worker

    async def confirm(ctx, order: str) -> str:
        return f"{order} for {ctxrelay.get('user')} ({ctxrelay.request_id()})"

    @install_worker                     # or install_worker(WorkerSettings, secret=...)
    class WorkerSettings:               # run with: arq shop.WorkerSettings
        functions = [confirm]

    redis = install(await create_pool(RedisSettings()))
    with ctxrelay.bind(request_id="r-42", user="ada"):
        job = await redis.enqueue_job("confirm", "o-1")

What each piece does:

* :func:`install` (the pool): ``enqueue_job`` captures the current context
  -- the in-house carrier of ``ctxrelay._carrier``, signed with the secret,
  the signature bound to the function name and the job id (generated here
  when none is given, as arq would) -- and the pool's serializer stores it in
  the job under ``"ctxrelay"``, beside arq's own keys.  A worker without
  ctxrelay ignores it; a job without it runs with no context.
* :func:`install_worker` (the worker settings): the job's carrier is read
  when arq deserializes the job, checked (shape, size, signature: all or
  nothing, as for Celery) and bound in ``on_job_start`` -- before arq's
  "→ job started" line, so arq's lines about the job, the function, its
  timeout and failure lines carry it -- plus ``job_id`` (worker-local, never
  forwarded); ``after_job_end``, after arq stored the result, resets it by
  token.  Your own hooks run inside.  The worker's pool (``ctx["redis"]``)
  is installed too, so a job that enqueues a job passes its context on.
* arq runs every job in its own task (``run_job``), and the function in a
  task of its own, copied from it: the binding cannot outlive its job even
  when ``after_job_end`` is never reached (a hook that raised, a worker
  killed mid-job); what a job binds and never unbinds dies with its task.
* A retried job (``Retry``, a job cancelled by shutdown and run again) and a
  deferred one (``_defer_by``, ``_defer_until``) are the same stored job:
  the same context.
* A job that arrives without a request id -- enqueued without
  :func:`install`, by a cron job, or whose context was refused -- runs with
  a fresh one, made as the web door makes one (``generator=``, else
  ``settings.CTXRELAY["generator"]`` under Django, else a random id), so its
  log lines still belong together.  arq stores the job once: each try of
  such a job gets its own id.  ``generate_id=False`` turns this off.

Deadlines (``ctxrelay.deadline``, a door's ``timeout=``): a job enqueued
while a deadline is bound

* **expires**: ``enqueue_job`` passes arq's ``_expires`` (how long the stored
  job lives) as the time left plus ``EXPIRY_GRACE`` (10 s), never longer than an
  ``_expires`` the caller gave -- so Redis drops a job nobody ran in time
  even without ctxrelay in the worker.  The grace keeps the job readable for
  a while after its deadline, so a worker that reaches it late can say whose
  it was (a job key already gone only gets arq's own "job ... expired" line);
* **runs with the time it has left**: the worker binds the carried time
  narrowed by the time since the job was enqueued (arq's enqueue time, wall
  clock);
* **is not run once its deadline passed before it started**: every function
  of the settings is wrapped so that, with the job's context bound, it
  raises :class:`ctxrelay.DeadlineExceeded` instead of running, after a
  warning with the request id (``ctxrelay: arq job '...' not run: its
  deadline passed before it started``).  arq stores that as the job's
  failed result (``job.result()`` raises it) and does not retry it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pickle
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from datetime import timedelta
from typing import Any, TypeVar
from uuid import uuid4

try:
    from arq.connections import ArqRedis
    from arq.constants import job_key_prefix
    from arq.utils import ms_to_datetime
    from arq.worker import Function, func
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError("ctxrelay.integrations.arq needs arq: pip install 'ctxrelay[arq]'") from _exc

from .._carrier import KEY, Secret, Signer, as_signer, binding, capture, restore, with_local
from .._context import Context, current, enter, leave, narrowed, read_current
from .._deadline import deadline_of, expired, remaining_ms
from .._inbound import RequestIdGenerator
from ._worker_id import FreshIds

__all__ = ["JOB_ID", "KEY", "Signer", "install", "install_worker"]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running job's id.
JOB_ID = "job_id"

#: Seconds a job enqueued under a deadline stays stored after its deadline
#: (``_expires`` is the time left plus this): long enough for a late worker
#: to read it and log whose it was, short enough that Redis soon drops it.
EXPIRY_GRACE = 10.0

#: Where the token of a job's binding waits for ``after_job_end``: the job's
#: own ``ctx`` dict, which arq builds afresh for every run of a job.
_TOKEN = "_ctxrelay_token"

Hook = Callable[[dict[Any, Any]], Awaitable[Any]]
Serializer = Callable[[dict[str, Any]], bytes]
Deserializer = Callable[[bytes], dict[str, Any]]
SettingsT = TypeVar("SettingsT")

# enqueue_job -> the pool's serializer, in the enqueuing task: (function
# name, carrier) of the job being serialized.  Set and reset around one
# enqueue_job call, so nothing else (results) is ever touched.
_pending: ContextVar[tuple[str, dict[str, str]] | None] = ContextVar(
    "ctxrelay.arq.pending", default=None
)

# the worker's deserializer -> on_job_start, in run_job's own task: (function
# name, enqueue time in ms, carrier) of the job just read.
_read: ContextVar[tuple[object, object, object] | None] = ContextVar(
    "ctxrelay.arq.read", default=None
)


# -- enqueue -------------------------------------------------------------------
def _carrying(base: Serializer) -> Serializer:
    def serialize(data: dict[str, Any]) -> bytes:
        pending = _pending.get()
        # Only the job enqueue_job is writing: never a result, never another job.
        if pending is not None and type(data) is dict and data.get("f") == pending[0]:
            data = {**data, KEY: pending[1]}
        return base(data)

    serialize.__wrapped__ = base  # type: ignore[attr-defined]
    return serialize


class _Installed:
    __slots__ = ("signer",)

    def __init__(self, signer: Signer | None) -> None:
        self.signer = signer


def install(
    redis: ArqRedis, *, secret: Signer | Secret | Sequence[Secret] | None = None
) -> ArqRedis:
    """Make ``redis.enqueue_job`` carry the current context; returns ``redis``.

    Idempotent (installing again only changes the secret).  ``secret`` (one,
    or several to rotate; at least 16 bytes) signs it: use the same one in
    :func:`install_worker`.  Raises ``TypeError`` when ``redis`` is not an
    ``ArqRedis`` (what ``arq.create_pool`` returns).
    """
    if not isinstance(redis, ArqRedis):
        raise TypeError(
            "ctxrelay.integrations.arq.install() takes the pool arq.create_pool() returns "
            f"(arq.connections.ArqRedis), not {type(redis).__name__}"
        )
    state = vars(redis).get("_ctxrelay")
    if isinstance(state, _Installed):
        state.signer = as_signer(secret)
        return redis
    state = _Installed(as_signer(secret))
    original = redis.enqueue_job

    async def enqueue_job(
        function: str,
        *args: Any,
        _job_id: str | None = None,
        _expires: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any:
        # The id the signature is bound to, chosen now as arq would (uuid4().hex).
        job_id = _job_id or uuid4().hex
        mark = None
        try:
            carrier = capture(binding(function, job_id), state.signer)
            if carrier:
                mark = _pending.set((function, carrier))
            _expires = _expiry(_expires)
        except Exception:  # never fail the enqueue for the context
            _log.exception("ctxrelay: could not put the context on an arq job")
        try:
            return await original(function, *args, _job_id=job_id, _expires=_expires, **kwargs)
        finally:
            if mark is not None:
                _pending.reset(mark)

    redis._ctxrelay = state  # type: ignore[attr-defined]
    redis.enqueue_job = enqueue_job  # type: ignore[method-assign]
    redis.job_serializer = _carrying(redis.job_serializer or pickle.dumps)
    return redis


def _expiry(given: float | timedelta | None) -> float | timedelta | None:
    """``_expires`` for a job enqueued now: the time left plus the grace,
    never longer than the caller's own (``given``); ``given`` without a
    deadline."""
    left = remaining_ms(current())
    if left is None:
        return given
    mine = left / 1000 + EXPIRY_GRACE
    if given is None:
        return mine
    own = given.total_seconds() if isinstance(given, timedelta) else float(given)
    # arq reads a falsy _expires as "none given" (its one-day default).
    return given if 0 < own <= mine else mine


# -- the worker ------------------------------------------------------------------
def _queued_time_out(ctx: Context, enqueued_ms: object) -> Context:
    """``ctx`` with its deadline narrowed by the time since the job was
    enqueued: the carried remaining time is re-read at receipt, so without
    this a job that waited 4 s of its 5 would still get 5 s.  Only a context
    that carried a deadline is narrowed, and only ever narrowed."""
    at = deadline_of(ctx)
    if at is None or isinstance(enqueued_ms, bool) or not isinstance(enqueued_ms, (int, float)):
        return ctx
    waited = max(0.0, time.time() - enqueued_ms / 1000)
    return narrowed(ctx, at - waited)


def _guarded(coroutine: Any) -> Any:
    """``coroutine`` refusing to run a job whose deadline passed before it
    started (in the job's context, which arq copies into the function's task)."""
    if getattr(coroutine, "_ctxrelay_guard", False):
        return coroutine

    @functools.wraps(coroutine)
    async def guarded(ctx: dict[Any, Any], *args: Any, **kwargs: Any) -> Any:
        error = expired(read_current())
        if error is not None:
            # Bound already: the line carries the request id.
            job_id = ctx.get("job_id") if isinstance(ctx, dict) else None
            _log.warning(
                "ctxrelay: arq job %r not run: its deadline passed before it started",
                str(job_id)[:100],
            )
            raise error
        return await coroutine(ctx, *args, **kwargs)

    guarded._ctxrelay_guard = True  # type: ignore[attr-defined]
    return guarded


def _guard_functions(functions: Sequence[Any]) -> list[Function]:
    guarded = []
    for function in functions:
        declared = func(function)
        guarded.append(dataclasses.replace(declared, coroutine=_guarded(declared.coroutine)))
    return guarded


def _reading(base: Deserializer) -> Deserializer:
    def deserialize(raw: bytes) -> dict[str, Any]:
        data = base(raw)
        if type(data) is dict and "f" in data:
            # arq reads a job in run_job's own task, then calls on_job_start
            # there: hand the carrier over (a Job.info() elsewhere leaves a
            # value nobody reads, in its own context).
            _read.set((data.get("f"), data.get("et"), data.get(KEY)))
        return data

    deserialize.__wrapped__ = base  # type: ignore[attr-defined]
    return deserialize


async def _carried(ctx: dict[Any, Any], base: Deserializer) -> tuple[object, object, object]:
    """(function name, enqueue time in ms, carrier) of the job ``ctx`` describes."""
    read = _read.get()
    _read.set(None)
    if read is not None and read[1] is not None:
        try:
            if ms_to_datetime(read[1]) == ctx.get("enqueue_time"):  # type: ignore[arg-type]
                return read
        except Exception:
            pass
    # Not handed over (an arq that reads jobs elsewhere): read the job again.
    raw = await ctx["redis"].get(job_key_prefix + str(ctx["job_id"]))
    data = base(raw) if raw else {}
    return data.get("f"), data.get("et"), data.get(KEY)


def _get(settings: Any, name: str) -> Any:
    return settings.get(name) if isinstance(settings, dict) else getattr(settings, name, None)


def _set(settings: Any, name: str, value: Any) -> None:
    if isinstance(settings, dict):
        settings[name] = value
    else:
        setattr(settings, name, value)


def install_worker(
    settings: SettingsT | None = None,
    *,
    secret: Signer | Secret | Sequence[Secret] | None = None,
    generate_id: bool = True,
    generator: RequestIdGenerator | None = None,
) -> Any:
    """Relay the context into the jobs of a worker configured by ``settings``.

    ``settings`` is a ``WorkerSettings`` class (``arq module.WorkerSettings``)
    or the keyword dict of ``Worker(**settings)``; it is changed in place and
    returned.  Usable as a class decorator, bare or as
    ``@install_worker(secret=...)``.  Idempotent.  Hooks already set
    (``on_startup``, ``on_job_start``, ``after_job_end``) and a custom
    ``job_deserializer`` keep working: ctxrelay's wrap them.  Each of
    ``functions`` is wrapped so that a job whose deadline passed before it
    started is not run (see the module docs).

    ``generate_id``: a job that arrives without a request id runs with a
    fresh one (``False``: with none).  ``generator``: what makes it (called
    with no argument, returns a ``str``); by default the one of
    ``settings.CTXRELAY`` under Django, else a random id.  Raises
    ``TypeError`` when ``settings`` is neither a class nor a dict, or an
    option has the wrong type.
    """
    ids = FreshIds(generate_id, generator, owner="ctxrelay.integrations.arq.install_worker()")
    if settings is None:
        return lambda later: install_worker(
            later, secret=secret, generate_id=generate_id, generator=generator
        )
    if not isinstance(settings, (type, dict)):
        raise TypeError(
            "ctxrelay.integrations.arq.install_worker() takes a WorkerSettings class or the "
            f"keyword dict of Worker(**settings), not {type(settings).__name__}"
        )
    signer = as_signer(secret)
    on_job_start = _get(settings, "on_job_start")
    if getattr(on_job_start, "_ctxrelay", False):
        on_job_start._ctxrelay_signer[0] = signer  # installed already: new options
        on_job_start._ctxrelay_ids[0] = ids
        return settings
    signers: list[Signer | None] = [signer]
    fresh: list[FreshIds] = [ids]
    base: Deserializer = _get(settings, "job_deserializer") or pickle.loads
    user_startup: Hook | None = _get(settings, "on_startup")
    user_start: Hook | None = on_job_start
    user_after: Hook | None = _get(settings, "after_job_end")

    async def startup(ctx: dict[Any, Any]) -> None:
        # The worker's own pool: jobs enqueued by jobs carry their context.
        pool = ctx.get("redis")
        if isinstance(pool, ArqRedis):
            install(pool, secret=signers[0])
        if user_startup is not None:
            await user_startup(ctx)

    async def job_start(ctx: dict[Any, Any]) -> None:
        job_id = ctx.get("job_id")
        try:
            function, enqueued, carrier = await _carried(ctx, base)
            source = f"arq job {str(job_id)[:100]!r}"
            restored = restore(carrier, binding(function, job_id), signers[0], source=source)
            # Enqueued without ctxrelay, by cron, or refused: a fresh id.
            restored = fresh[0].completed(_queued_time_out(restored, enqueued))
            ctx[_TOKEN] = enter(with_local(restored, {JOB_ID: job_id}))
        except Exception:
            _log.exception("ctxrelay: could not bind the context of arq job %r", job_id)
        if user_start is not None:
            await user_start(ctx)

    async def job_after(ctx: dict[Any, Any]) -> None:
        try:
            if user_after is not None:
                await user_after(ctx)
        finally:
            token = ctx.pop(_TOKEN, None)
            if token is not None:
                leave(token)

    job_start._ctxrelay = True  # type: ignore[attr-defined]
    job_start._ctxrelay_signer = signers  # type: ignore[attr-defined]
    job_start._ctxrelay_ids = fresh  # type: ignore[attr-defined]
    _set(settings, "functions", _guard_functions(_get(settings, "functions") or ()))
    _set(settings, "job_deserializer", _reading(base))
    _set(settings, "on_startup", startup)
    _set(settings, "on_job_start", job_start)
    _set(settings, "after_job_end", job_after)
    return settings
