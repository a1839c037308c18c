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
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar
from uuid import uuid4

try:
    from arq.connections import ArqRedis
    from arq.constants import job_key_prefix
    from arq.utils import ms_to_datetime
except ImportError as exc:  # without the extra installed (make dist checks it)
    raise ImportError("ctxrelay.integrations.arq needs arq: pip install 'ctxrelay[arq]'") from exc

from .._carrier import KEY, Secret, Signer, as_signer, binding, capture, restore, with_local
from .._context import enter, leave

__all__ = ["JOB_ID", "KEY", "Signer", "install", "install_worker"]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running job's id.
JOB_ID = "job_id"

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
    :func:`install_worker`.
    """
    state = vars(redis).get("_ctxrelay")
    if isinstance(state, _Installed):
        state.signer = as_signer(secret)
        return redis
    state = _Installed(as_signer(secret))
    original = redis.enqueue_job

    async def enqueue_job(
        function: str, *args: Any, _job_id: str | None = None, **kwargs: Any
    ) -> Any:
        # The id the signature is bound to, chosen now as arq would (uuid4().hex).
        job_id = _job_id or uuid4().hex
        mark = None
        try:
            carrier = capture(binding(function, job_id), state.signer)
            if carrier:
                mark = _pending.set((function, carrier))
        except Exception:  # never fail the enqueue for the context
            _log.exception("ctxrelay: could not put the context on an arq job")
        try:
            return await original(function, *args, _job_id=job_id, **kwargs)
        finally:
            if mark is not None:
                _pending.reset(mark)

    redis._ctxrelay = state  # type: ignore[attr-defined]
    redis.enqueue_job = enqueue_job  # type: ignore[method-assign]
    redis.job_serializer = _carrying(redis.job_serializer or pickle.dumps)
    return redis


# -- the worker ------------------------------------------------------------------
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


async def _carried(ctx: dict[Any, Any], base: Deserializer) -> tuple[object, object]:
    """(function name, carrier) of the job ``ctx`` describes."""
    read = _read.get()
    _read.set(None)
    if read is not None and read[1] is not None:
        try:
            if ms_to_datetime(read[1]) == ctx.get("enqueue_time"):  # type: ignore[arg-type]
                return read[0], read[2]
        except Exception:
            pass
    # Not handed over (an arq that reads jobs elsewhere): read the job again.
    raw = await ctx["redis"].get(job_key_prefix + str(ctx["job_id"]))
    data = base(raw) if raw else {}
    return data.get("f"), data.get(KEY)


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
) -> Any:
    """Relay the context into the jobs of a worker configured by ``settings``.

    ``settings`` is a ``WorkerSettings`` class (``arq module.WorkerSettings``)
    or the keyword dict of ``Worker(**settings)``; it is changed in place and
    returned.  Usable as a class decorator, bare or as
    ``@install_worker(secret=...)``.  Idempotent.  Hooks already set
    (``on_startup``, ``on_job_start``, ``after_job_end``) and a custom
    ``job_deserializer`` keep working: ctxrelay's wrap them.
    """
    if settings is None:
        return lambda later: install_worker(later, secret=secret)
    signer = as_signer(secret)
    on_job_start = _get(settings, "on_job_start")
    if getattr(on_job_start, "_ctxrelay", False):
        on_job_start._ctxrelay_signer[0] = signer  # installed already: a new secret
        return settings
    signers: list[Signer | None] = [signer]
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
            function, carrier = await _carried(ctx, base)
            source = f"arq job {str(job_id)[:100]!r}"
            restored = restore(carrier, binding(function, job_id), signers[0], source=source)
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
    _set(settings, "job_deserializer", _reading(base))
    _set(settings, "on_startup", startup)
    _set(settings, "on_job_start", job_start)
    _set(settings, "after_job_end", job_after)
    return settings
