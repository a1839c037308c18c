"""taskiq: a middleware carries the context in the message's labels.

:func:`install` puts :class:`ContextMiddleware` first in the broker's
middlewares, in the sender and in the worker::

    from taskiq_redis import ListQueueBroker
    import ctxrelay
    from ctxrelay.integrations.taskiq import install

    broker = ListQueueBroker("redis://127.0.0.1:6379/0")
    install(broker)

    @broker.task
    async def confirm(order: str) -> str:
        return f"{order} for {ctxrelay.get('user')} ({ctxrelay.request_id()})"

    with ctxrelay.bind(request_id="r-42", user="ada"):
        await confirm.kiq("o-1")       # worker: taskiq worker shop:broker

* ``pre_send`` (every ``kiq``, in the sending task) writes the current
  context -- ``ctxrelay._carrier``'s in-house carrier, signed with the secret,
  the signature bound to the task name and the task id -- into the label
  ``ctxrelay``, as one JSON string (taskiq stringifies labels that are not
  ``str``: a dict would arrive as its ``repr``).  With no context bound it
  leaves the message as it is: a message that already carries one (a
  scheduled task, see :func:`carry`) keeps it.
* ``pre_execute`` (in the worker's task for that message) reads it back --
  shape, size, signature, all or nothing -- takes it off the labels (results
  store the labels), and binds it, plus ``task_id`` (worker-local, never
  forwarded).  Every other middleware's hooks, the task, its error hooks
  and retries run inside it; ``post_execute`` resets it by token, after
  every outcome (taskiq catches everything the task raises).
* A retry (``SimpleRetryMiddleware``, ``SmartRetryMiddleware``) is kicked
  from ``on_error``, inside the failed task's context and with its task id:
  it carries the same context again.  A deferred task
  (``schedule_by_time``) is kicked later, by the scheduler process, outside
  any context: :func:`carry` puts the context on the kicker when you
  schedule it.
* A task that arrives without a request id -- kicked without this
  middleware, by the scheduler, or whose context was refused -- runs with
  a fresh one, made as the web door makes one (``generator=``, else
  ``settings.CTXRELAY["generator"]`` under Django, else a random id), so
  its log lines still belong together; a retry carries it.
  ``generate_id=False`` turns this off.
* Sync tasks run in taskiq's thread pool with a copy of the task's context
  (taskiq copies it): they see it too.  A process-pool executor
  (``--use-process-pool``) calls them without any context.

Deadlines (``ctxrelay.deadline``, a door's ``timeout=``): a task kicked while
a deadline is bound

* **runs with the time it has left**: ``pre_send`` (and :func:`carry`) also
  writes the deadline's wall-clock instant in the label
  ``ctxrelay-deadline``, and ``pre_execute`` narrows the carried time by
  it: a task that waited in the queue (or for the scheduler) has that much
  less.  The label can only narrow a deadline the signed context carried;
* **is cut at the deadline**: ``pre_execute`` sets taskiq's ``timeout``
  label of an async task to the time left, never longer than the task's own;
* **is not run once its deadline passed before it started**: :func:`install`
  makes the broker's ``find_task`` hand the receiver each task's function
  wrapped so that, with the task's context bound, it raises
  :class:`ctxrelay.DeadlineExceeded` instead of running, after a warning
  with the request id (``ctxrelay: taskiq task '...' id '...' not run: its
  deadline passed before it started``).  The result is that error, and the
  retry middlewares are told not to retry it (``retry_on_error``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import Any, TypeVar

try:
    from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware, TaskiqResult
    from taskiq.decor import AsyncTaskiqDecoratedTask
    from taskiq.kicker import AsyncKicker
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.taskiq needs taskiq: pip install 'ctxrelay[taskiq]'"
    ) from _exc

from .._carrier import KEY, Secret, Signer, as_signer, binding, capture, restore, with_local
from .._context import Context, current, enter, leave, narrowed, read_current
from .._deadline import deadline_of, expired, remaining, remaining_ms
from .._inbound import RequestIdGenerator
from ._worker_id import FreshIds

__all__ = ["KEY", "TASK_ID", "ContextMiddleware", "Signer", "carry", "install", "uninstall"]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running task's id.
TASK_ID = "task_id"

#: The label holding the deadline's wall-clock instant (seconds since the
#: epoch), set next to the carried context when a deadline is bound.
DEADLINE_LABEL = "ctxrelay-deadline"

# A JSON label longer than this is not parsed (restore() would refuse it anyway).
_MAX_LABEL = 256 * 1024

KickerT = TypeVar("KickerT", bound=AsyncKicker[Any, Any])

# The bindings pre_execute made in this task, innermost last: (task id,
# token).  taskiq runs pre_execute, the task and post_execute in one task
# per message (the in-memory broker with await_inplace nests them in the
# kicker's own task: hence a stack, matched by task id).
_bound: ContextVar[tuple[tuple[str, Token[Context]], ...]] = ContextVar(
    "ctxrelay.taskiq.bound", default=()
)


def _label(carrier: dict[str, str]) -> str:
    return json.dumps(carrier, separators=(",", ":"), ensure_ascii=False)


def _carried(label: object) -> object:
    """The carrier a label holds: its JSON read, or the label as it is for
    ``restore`` to refuse (a dict, a number, an unreadable string)."""
    if not isinstance(label, str) or len(label) > _MAX_LABEL:
        return label if not isinstance(label, str) else "<oversized label>"
    try:
        return json.loads(label)
    except ValueError:
        return "<a label that is not JSON>"


def _deadline_label() -> str | None:
    """The current deadline as a wall-clock instant, or None without one."""
    left = remaining_ms(current())
    return None if left is None else f"{time.time() + left / 1000:.3f}"


def _queued_time_out(ctx: Context, label: object) -> Context:
    """``ctx`` with its deadline narrowed to the wall-clock instant the label
    carries: the carried remaining time is re-read at receipt, so without
    this a task that waited 4 s of its 5 would still get 5 s.  Only a context
    that carried a deadline (and passed the signature check) is narrowed, and
    only ever narrowed: the label cannot give a task a deadline or more time."""
    at = deadline_of(ctx)
    if at is None or not isinstance(label, (str, int, float)) or isinstance(label, bool):
        return ctx
    try:
        instant = float(label)
    except ValueError:
        return ctx
    if instant != instant:  # NaN
        return ctx
    return narrowed(ctx, time.monotonic() + max(0.0, instant - time.time()))


def _cut_at_deadline(message: TaskiqMessage, broker: AsyncBroker | None) -> None:
    """Set an async task's ``timeout`` label to the time left (never longer
    than its own); a sync task is left alone (taskiq cannot time it out, and
    warns when asked to)."""
    left = remaining()
    if left is None or broker is None:
        return
    task = broker.find_task(message.task_name)
    if task is None or not inspect.iscoroutinefunction(_unguarded(task.original_func)):
        return
    own = message.labels.get("timeout")
    try:
        mine = left if own is None else min(float(own), left)
    except (TypeError, ValueError):
        mine = left
    message.labels["timeout"] = max(mine, 0.001)


def _refuse(task_name: object) -> None:
    """Raise instead of running when the bound context's deadline passed."""
    error = expired(read_current())
    if error is not None:
        # Bound already: the line carries the request id.
        _log.warning(
            "ctxrelay: taskiq task %r id %r not run: its deadline passed before it started",
            str(task_name)[:100],
            str(read_current().get(TASK_ID))[:100],
        )
        raise error


class _SyncGuard:
    """A sync task's function, refusing to run once its deadline passed.  A
    class (not a closure) so a process pool can pickle it: by reference to
    the function, which taskiq makes importable."""

    def __init__(self, fn: Callable[..., Any], task_name: str) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.task_name = task_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _refuse(self.task_name)
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SyncGuard, (self.fn, self.task_name))


def _unguarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    inner = getattr(fn, "_ctxrelay_unguarded", None)
    if inner is not None:
        return inner  # type: ignore[no-any-return]
    return fn.fn if isinstance(fn, _SyncGuard) else fn


def _guard(fn: Callable[..., Any], task_name: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            _refuse(task_name)
            return await fn(*args, **kwargs)

        guarded._ctxrelay_unguarded = fn  # type: ignore[attr-defined]
        return guarded
    return _SyncGuard(fn, task_name)


class _Guarding:
    """``broker.find_task`` handing out each task with its function guarded
    (a copy of the task, made once): the receiver runs what it finds."""

    def __init__(self, find: Callable[[str], Any]) -> None:
        self.find = find
        self.guarded: dict[int, tuple[Any, Any]] = {}

    def __call__(self, task_name: str) -> Any:
        task = self.find(task_name)
        if not isinstance(task, AsyncTaskiqDecoratedTask):
            return task
        known = self.guarded.get(id(task))
        if known is None or known[0] is not task:
            twin = copy.copy(task)
            twin.original_func = _guard(task.original_func, task.task_name)
            known = self.guarded[id(task)] = (task, twin)
        return known[1]


class ContextMiddleware(TaskiqMiddleware):
    """Carries the context from ``kiq`` to the task; see the module docs.

    Prefer :func:`install`, which puts it first in the broker's list.
    """

    def __init__(
        self,
        *,
        secret: Signer | Secret | Sequence[Secret] | None = None,
        generate_id: bool = True,
        generator: RequestIdGenerator | None = None,
    ) -> None:
        super().__init__()
        self.signer: Signer | None = as_signer(secret)
        self.ids: FreshIds = FreshIds(
            generate_id, generator, owner="ctxrelay.integrations.taskiq.ContextMiddleware()"
        )

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Write the current context into ``message.labels["ctxrelay"]``."""
        try:
            ctx = current()
            if not ctx and deadline_of(ctx) is None:
                return message  # nothing to say; a carried one (a schedule's) stays
            carrier = capture(binding(message.task_name, message.task_id), self.signer)
            if carrier:
                message.labels[KEY] = _label(carrier)
            else:
                message.labels.pop(KEY, None)
            instant = _deadline_label()
            if instant is not None:
                message.labels[DEADLINE_LABEL] = instant
            else:
                message.labels.pop(DEADLINE_LABEL, None)
        except Exception:
            _log.exception("ctxrelay: could not put the context on a taskiq message")
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Bind the message's context (plus ``task_id``) for its task."""
        try:
            task_id = message.task_id
            label = message.labels.pop(KEY, None)  # results store the labels: not this
            instant = message.labels.pop(DEADLINE_LABEL, None)
            source = f"taskiq task {str(message.task_name)[:100]!r} id {str(task_id)[:100]!r}"
            carrier = None if label is None else _carried(label)
            restored = restore(
                carrier, binding(message.task_name, task_id), self.signer, source=source
            )
            # Kicked without ctxrelay, by a scheduler, or refused: a fresh id.
            restored = self.ids.completed(_queued_time_out(restored, instant))
            token = enter(with_local(restored, {TASK_ID: task_id}))
            _bound.set((*_bound.get(), (task_id, token)))
        except Exception:
            _log.exception("ctxrelay: could not bind the context of a taskiq task")
            return message
        try:
            if expired(restored) is not None:
                # The guarded function refuses to run (and says so): a retry
                # of it could only be refused again.
                message.labels["retry_on_error"] = "false"
            else:
                _cut_at_deadline(message, getattr(self, "broker", None))
        except Exception:
            _log.exception("ctxrelay: could not apply the deadline of a taskiq task")
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """Reset the context by token, whatever the outcome."""
        stack = list(_bound.get())
        try:
            while stack:
                task_id, token = stack.pop()
                leave(token)
                if task_id == message.task_id:
                    break
        except Exception:
            _log.exception("ctxrelay: could not reset the context after a taskiq task")
        finally:
            _bound.set(tuple(stack))


def install(
    broker: AsyncBroker,
    *,
    secret: Signer | Secret | Sequence[Secret] | None = None,
    generate_id: bool = True,
    generator: RequestIdGenerator | None = None,
) -> ContextMiddleware:
    """Put a :class:`ContextMiddleware` first in ``broker``'s middlewares,
    and make ``broker.find_task`` hand out tasks whose functions refuse to
    run once their deadline passed (see the module docs).

    Idempotent: an installed one is kept, with the options given as its new
    ones.  ``generate_id`` and ``generator``: a task that arrives without a
    request id runs with a fresh one (see the module docs).  Raises
    ``TypeError`` when ``broker`` is not a taskiq broker or an option has
    the wrong type.
    """
    _check_broker(broker, "install")
    ids = FreshIds(generate_id, generator, owner="ctxrelay.integrations.taskiq.install()")
    signer = as_signer(secret)
    if not isinstance(vars(broker).get("find_task"), _Guarding):
        broker.find_task = _Guarding(broker.find_task)  # type: ignore[method-assign]
    for existing in broker.middlewares:
        if isinstance(existing, ContextMiddleware):
            existing.signer = signer
            existing.ids = ids
            return existing
    middleware = ContextMiddleware(secret=signer, generate_id=generate_id, generator=generator)
    middleware.set_broker(broker)
    broker.middlewares.insert(0, middleware)
    return middleware


def uninstall(broker: AsyncBroker) -> None:
    """Remove every :class:`ContextMiddleware` from ``broker``.  Idempotent.

    Raises ``TypeError`` when ``broker`` is not a taskiq broker."""
    _check_broker(broker, "uninstall")
    broker.middlewares[:] = [m for m in broker.middlewares if not isinstance(m, ContextMiddleware)]
    guarding = vars(broker).get("find_task")
    if isinstance(guarding, _Guarding):
        broker.find_task = guarding.find  # type: ignore[method-assign,assignment]


def _check_broker(broker: object, what: str) -> None:
    if not isinstance(broker, AsyncBroker):
        raise TypeError(
            f"ctxrelay.integrations.taskiq.{what}() takes a taskiq broker "
            f"(taskiq.AsyncBroker), not {type(broker).__name__}"
        )


def carry(kicker: KickerT) -> KickerT:
    """``kicker`` carrying the current context, for a message kicked later
    by someone else -- ``schedule_by_time`` (the scheduler process kicks it
    outside any context)::

        await carry(confirm.kicker()).schedule_by_time(source, when, "o-1")

    The task id is fixed now (a given one is kept), so the signature can be
    bound to it: use it for one-shot schedules.  Signed with the secret of
    the :class:`ContextMiddleware` installed on the kicker's broker.
    """
    task_id = kicker.custom_task_id or kicker.broker.id_generator()
    signer = None
    for middleware in kicker.broker.middlewares:
        if isinstance(middleware, ContextMiddleware):
            signer = middleware.signer
    kicker.with_task_id(task_id)  # both change the kicker itself (and return it)
    carrier = capture(binding(kicker.task_name, task_id), signer)
    if carrier:
        kicker.with_labels(**{KEY: _label(carrier)})
    instant = _deadline_label()
    if instant is not None:
        kicker.with_labels(**{DEADLINE_LABEL: instant})
    return kicker
