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
* Sync tasks run in taskiq's thread pool with a copy of the task's context
  (taskiq copies it): they see it too.  A process-pool executor
  (``--use-process-pool``) calls them without any context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import Any, TypeVar

try:
    from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware, TaskiqResult
    from taskiq.kicker import AsyncKicker
except ImportError as exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.taskiq needs taskiq: pip install 'ctxrelay[taskiq]'"
    ) from exc

from .._carrier import KEY, Secret, Signer, as_signer, binding, capture, restore, with_local
from .._context import Context, current, enter, leave

__all__ = ["KEY", "TASK_ID", "ContextMiddleware", "Signer", "carry", "install", "uninstall"]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running task's id.
TASK_ID = "task_id"

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


class ContextMiddleware(TaskiqMiddleware):
    """Carries the context from ``kiq`` to the task; see the module docs.

    Prefer :func:`install`, which puts it first in the broker's list.
    """

    def __init__(self, *, secret: Signer | Secret | Sequence[Secret] | None = None) -> None:
        super().__init__()
        self.signer = as_signer(secret)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Write the current context into ``message.labels["ctxrelay"]``."""
        try:
            if not current():
                return message  # nothing to say; a carried one (a schedule's) stays
            carrier = capture(binding(message.task_name, message.task_id), self.signer)
            if carrier:
                message.labels[KEY] = _label(carrier)
            else:
                message.labels.pop(KEY, None)
        except Exception:
            _log.exception("ctxrelay: could not put the context on a taskiq message")
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        """Bind the message's context (plus ``task_id``) for its task."""
        try:
            task_id = message.task_id
            label = message.labels.pop(KEY, None)  # results store the labels: not this
            source = f"taskiq task {str(message.task_name)[:100]!r} id {str(task_id)[:100]!r}"
            carrier = None if label is None else _carried(label)
            restored = restore(
                carrier, binding(message.task_name, task_id), self.signer, source=source
            )
            token = enter(with_local(restored, {TASK_ID: task_id}))
            _bound.set((*_bound.get(), (task_id, token)))
        except Exception:
            _log.exception("ctxrelay: could not bind the context of a taskiq task")
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
    broker: AsyncBroker, *, secret: Signer | Secret | Sequence[Secret] | None = None
) -> ContextMiddleware:
    """Put a :class:`ContextMiddleware` first in ``broker``'s middlewares.

    Idempotent: an installed one is kept, with ``secret`` as its new secret.
    """
    for existing in broker.middlewares:
        if isinstance(existing, ContextMiddleware):
            existing.signer = as_signer(secret)
            return existing
    middleware = ContextMiddleware(secret=secret)
    middleware.set_broker(broker)
    broker.middlewares.insert(0, middleware)
    return middleware


def uninstall(broker: AsyncBroker) -> None:
    """Remove every :class:`ContextMiddleware` from ``broker``.  Idempotent."""
    broker.middlewares[:] = [m for m in broker.middlewares if not isinstance(m, ContextMiddleware)]


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
    return kicker
