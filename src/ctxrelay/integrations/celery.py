"""Celery: the context travels with every task message and lives only as long
as the task runs in the worker.

:func:`install` connects three Celery signals (as OpenTelemetry's Celery
instrumentor does -- no monkeypatching):

* ``before_task_publish`` writes the publisher's current context into the
  message's headers, under one key (``ctxrelay``).  Every way of sending goes
  through it: ``delay``, ``apply_async``, ``send_task``, signatures, and the
  canvas messages a *worker* publishes (the next link of a chain, callbacks,
  errbacks, a chord's callback, a retry) -- those are published while the
  parent task's context is bound, so they carry it on.
* ``task_prerun`` reads it back from ``task.request`` (wherever this Celery
  version and message protocol put it: celery #4875), checks it (shape,
  size, signature) and binds it, plus the worker-local fields
  ``task_id``, ``task_parent_id`` and ``task_root_id`` for the logs.
* ``task_postrun`` resets it *by token*.

Example::

    from celery import Celery
    import ctxrelay
    from ctxrelay.integrations.celery import install

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    install(app)                      # in the publisher and in the worker

    @app.task
    def confirm(order: str) -> None:
        print(ctxrelay.request_id())  # "r-42", in the worker

    with ctxrelay.bind(request_id="r-42"):
        confirm.delay("o-1")

Decisions, and the holes they close:

* The reset is in ``task_postrun`` only.  Celery sends it from a ``finally``
  after every outcome -- success, exception, retry, reject, ignore -- so no
  context outlives its task.  ``task_failure`` and ``task_retry`` fire
  *before* Celery logs "raised unexpected" / "retry in 1s": resetting there
  would strip the request id from exactly the lines one searches for (the
  symptom of asgi-correlation-id #100, which also reset with ``set(None)``
  instead of a token).  ``task_revoked`` needs nothing: a task revoked before
  it runs never binds anything; ``revoke(terminate=True)`` either kills the
  pool process or, with a catchable signal (SIGUSR1 raises
  ``SoftTimeLimitExceeded``), fails the task, and ``task_postrun`` resets as
  after any failure (tests/integrations/test_celery_revoke.py).
* The binding replaces, never merges: the task sees exactly its message's
  context, whatever the worker thread held before.
* A retry is published from inside the task, so it carries the bound context
  again whether or not Celery copies custom headers (celery #7523).
* Eager mode (``task_always_eager``, ``task.apply()``) publishes nothing: the
  task runs in the caller's thread and keeps the caller's context (celery
  #1874), with the worker-local fields of the eager task on top.
* The worker-local fields are never forwarded (see
  :data:`ctxrelay._signing.WORKER_FIELDS`): a child task gets its own
  ``task_id``, and Celery itself sets its ``parent_id`` and ``root_id``.
* ``secret=``: the context is signed with an HMAC bound to the task id; a
  worker with the secret runs an unsigned or tampered context's task with an
  empty context and logs an error.  Malformed or oversized input likewise
  runs with an empty context, with a warning.  The worker keeps serving.

Deadlines (``ctxrelay.deadline``, a door's ``timeout=``): a task published
while a deadline is bound

* **expires at the deadline**: ``before_task_publish`` sets the message's
  ``expires`` to now plus the time remaining, or keeps the caller's own
  ``expires`` when that is earlier (never lengthened).  The time remaining
  travels in the carrier too, re-read against the worker's own clock.
* **is not run once the deadline passed** -- whether it arrived expired, sat
  in the queue past it, or was delayed past it (``countdown``/``eta``):
  Celery's own expiry check discards it, so the result is Celery's
  ``REVOKED`` state (``AsyncResult.get()`` raises ``TaskRevokedError``; the
  reason stored is ``expired``), and ``task_revoked`` makes this module log
  a warning *with the request's context bound* -- the request id on the
  line: ``ctxrelay: task 't.x' id '...' not run: its deadline passed before
  it started``.  We chose Celery's state over a ``DeadlineExceeded`` failure
  because Celery already checks ``expires`` at receipt and again right
  before the pool runs the task, and monitoring (Flower, events) shows it.
* **runs with the time it has left**: the worker binds the carried deadline
  narrowed by the time the message spent in the broker (the deadline's
  wall-clock instant travels in the ``ctxrelay-deadline`` header, next to
  Celery's ``expires``, which is wall-clock too).  ``ctxrelay.remaining()``
  in the task is smaller than what the publisher had; ``checkpoint()`` stops
  a task whose deadline passes while it runs.

A task that arrives without a request id -- from celery beat, a script or a
producer without ctxrelay, or whose context was refused (a bad signature, a
malformed carrier) -- runs with a fresh one, made as the web door makes one
(``generator=``, else ``settings.CTXRELAY["generator"]`` under Django, else
a random id; see :mod:`ctxrelay.integrations._worker_id`), so its log lines
still belong together.  A retry is published from inside the task: it
carries that id.  ``generate_id=False`` turns this off.  An eager task keeps
its caller's context as it is.

The publish signal does not say which app publishes, so one process has one
configuration: every installed app must use the same secret.  The worker
knows which app runs a task: ``generate_id`` and ``generator`` are per app.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from time import monotonic
from typing import Any

try:
    from celery import Celery, signals  # type: ignore[import-untyped]
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.celery needs Celery: pip install 'ctxrelay[celery]'"
    ) from _exc

from .._carrier import (
    KEY,
    WORKER_FIELDS,
    Secret,
    Signer,
    as_signer,
    binding,
    capture,
    restore,
    with_local,
)
from .._context import Context, begin, current, enter, leave, narrowed, use
from .._deadline import deadline_of, remaining_ms
from .._inbound import RequestIdGenerator
from ._worker_id import FreshIds

__all__ = ["KEY", "TASK_ID", "TASK_PARENT_ID", "TASK_ROOT_ID", "Signer", "install", "uninstall"]

#: The message header holding the deadline's wall-clock instant (ISO 8601,
#: UTC), set next to ``expires`` when a deadline is bound at publish.
_DEADLINE_KEY = "ctxrelay-deadline"

_log = logging.getLogger("ctxrelay")

#: The worker-local fields bound while a task runs (never forwarded).
TASK_ID = "task_id"
TASK_PARENT_ID = "task_parent_id"
TASK_ROOT_ID = "task_root_id"

# Where prerun leaves the token for postrun: on the task's own request object,
# which Celery pushes for exactly one execution (nested eager calls and a
# redelivered duplicate each get their own).
_TOKEN = "_ctxrelay_token"
_UID = "ctxrelay"


class _Installed:
    __slots__ = ("apps", "signer")

    def __init__(self, signer: Signer | None) -> None:
        #: Every installed app, and how its tasks get an id they lack.
        self.apps: weakref.WeakKeyDictionary[Any, FreshIds] = weakref.WeakKeyDictionary()
        self.signer = signer


_state: _Installed | None = None
_lock = threading.Lock()


def install(
    app: Celery,
    *,
    secret: Signer | Secret | Sequence[Secret] | None = None,
    generate_id: bool = True,
    generator: RequestIdGenerator | None = None,
) -> None:
    """Relay the context through ``app``'s task messages.  Idempotent
    (installing again changes the options).

    Call it where the app is defined, so that publishers and workers both run
    it.  ``secret`` (one, or several to rotate; at least 16 bytes) signs the
    carried context; workers then refuse contexts without a valid signature.
    Raises ``ValueError`` if another installed app uses a different secret.

    ``generate_id``: a task that arrives without a request id runs with a
    fresh one (``False``: with none).  ``generator``: what makes it (called
    with no argument, returns a ``str``); by default the one of
    ``settings.CTXRELAY`` under Django, else a random id.  A generator that
    fails or returns an invalid id is replaced by a random id, with a warning.

    Raises ``TypeError`` when ``app`` is not a Celery app or an option has
    the wrong type.
    """
    global _state
    _check_app(app, "install")
    ids = FreshIds(generate_id, generator, owner="ctxrelay.integrations.celery.install()")
    signer = as_signer(secret)
    with _lock:
        if _state is not None and _keys(_state.signer) != _keys(signer):
            if set(_state.apps) - {app}:
                raise ValueError(
                    "ctxrelay.integrations.celery: every installed app must use the same secret"
                )
            _state.signer = signer
        if _state is None:
            _state = _Installed(signer)
            _connect()
        _state.apps[app] = ids


def uninstall(app: Celery) -> None:
    """Stop relaying through ``app``; publishing and binding stop when no app
    is left (the reset after a task stays, for tasks bound before).  Idempotent.

    Raises ``TypeError`` when ``app`` is not a Celery app."""
    global _state
    _check_app(app, "uninstall")
    with _lock:
        if _state is None:
            return
        _state.apps.pop(app, None)
        if not _state.apps:
            _state = None
            _disconnect()


def _check_app(app: object, what: str) -> None:
    # Checked first: None once said "every installed app must use the same
    # secret", a str "cannot create weak reference to 'str' object".
    if not isinstance(app, Celery):
        raise TypeError(
            f"ctxrelay.integrations.celery.{what}() takes a Celery app (celery.Celery), "
            f"not {type(app).__name__}"
        )


def _keys(signer: Signer | None) -> tuple[bytes, ...]:
    return () if signer is None else signer._keys


def _connect() -> None:
    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid=_UID)
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid=_UID)
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid=_UID)
    signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid=_UID)


def _disconnect() -> None:
    signals.before_task_publish.disconnect(_on_publish, dispatch_uid=_UID)
    signals.task_prerun.disconnect(_on_prerun, dispatch_uid=_UID)
    signals.task_revoked.disconnect(_on_revoked, dispatch_uid=_UID)
    # task_postrun stays connected: a task bound before uninstall() must still
    # have its token reset when it ends, or its context stays on the worker
    # thread.  With nothing bound the handler finds no token and does nothing.


def _on_publish(
    sender: object = None, body: object = None, headers: object = None, **_: Any
) -> None:
    state = _state
    if state is None or not isinstance(headers, dict):
        return
    try:
        # Protocol 2 keeps the task id in the headers, protocol 1 in the body.
        fields = body if isinstance(body, Mapping) else {}
        task_id = headers.get("id") or fields.get("id")
        task_name = headers.get("task") or fields.get("task")
        carrier = capture(binding(task_name or "", task_id or ""), state.signer)
        if carrier:
            headers[KEY] = carrier
        else:
            # A retry copies its request's headers: what counts is the
            # context at publish time, which here is none.
            headers.pop(KEY, None)
        _expire_at_deadline(headers, body)
    except Exception:
        _log.exception("ctxrelay: could not put the context on task %r", sender)


def _wall_instant(value: object) -> datetime | None:
    """An ``expires``/deadline header as an aware datetime, or None."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    # Celery's worker reads a naive instant as local time: so do we.
    return when if when.tzinfo is not None else when.astimezone()


def _expire_at_deadline(headers: dict[Any, Any], body: object) -> None:
    """Make the message expire at the publisher's deadline (never later than
    an ``expires`` the caller set) and record the deadline's instant."""
    left = remaining_ms(current())
    if left is None:
        # A retry copies its request's headers: no deadline now, none sent.
        headers.pop(_DEADLINE_KEY, None)
        return
    at = datetime.now(timezone.utc) + timedelta(milliseconds=left)
    # Protocol 2 has ``expires`` in the headers, protocol 1 in the body.
    fields: dict[Any, Any] = headers if "task" in headers or not isinstance(body, dict) else body
    own = fields.get("expires")
    if own is not None:
        theirs = _wall_instant(own)
        if theirs is None:
            # Unreadable: Celery's worker refuses it anyway; ours is not
            # substituted for what the caller wrote.
            headers[_DEADLINE_KEY] = at.isoformat()
            return
        at = min(at, theirs)  # never lengthen the caller's expires
    fields["expires"] = at.isoformat()
    headers[_DEADLINE_KEY] = at.isoformat()


def _carried(request: Any, key: str = KEY) -> object:
    """The carrier (or another header of ours) wherever the message put it
    (celery #4875).

    Protocol 2 turns every message header into a ``request`` attribute;
    Celery 5 also collects custom headers in ``request.headers``; protocol 1
    puts the message headers there, and some versions nest them once more
    under ``headers``.
    """
    found = request.__dict__.get(key)
    if found is not None:
        return found
    headers = getattr(request, "headers", None)
    if isinstance(headers, Mapping):
        found = headers.get(key)
        nested = headers.get("headers")
        if found is None and isinstance(nested, Mapping):
            found = nested.get(key)
    return found


def _queued_time_out(request: Any, ctx: Context) -> Context:
    """``ctx`` with its deadline narrowed by the time the message spent in the
    broker.  The carried remaining time is re-read at receipt, so without this
    a task that waited 4 s of its 5 would still get 5 s.  Only a context that
    carried a deadline (and passed the signature check) is narrowed, and only
    ever narrowed: the header cannot give a task a deadline or more time."""
    if deadline_of(ctx) is None:
        return ctx
    at = _wall_instant(_carried(request, _DEADLINE_KEY))
    if at is None:
        return ctx
    left = max(0.0, (at - datetime.now(timezone.utc)).total_seconds())
    return narrowed(ctx, monotonic() + left)


def _context_for(task: Any, state: _Installed, ids: FreshIds) -> Context:
    request = task.request
    if request.is_eager:
        # celery #1874: no message was published; the caller's context is
        # the task's (without an enclosing eager task's own ids).
        base = current().remove(*WORKER_FIELDS)
    else:
        source = f"task {str(task.name)[:100]!r} id {str(request.id)[:100]!r}"
        bound_to = binding(task.name or "", request.id or "")
        restored = restore(_carried(request), bound_to, state.signer, source=source)
        # A task from beat, a script, a producer without ctxrelay, or whose
        # context was refused: a fresh id, so its lines still correlate.
        base = ids.completed(_queued_time_out(request, restored))
    return with_local(
        base,
        {TASK_ID: request.id, TASK_PARENT_ID: request.parent_id, TASK_ROOT_ID: request.root_id},
    )


def _on_prerun(sender: object = None, task: Any = None, **_: Any) -> None:
    state = _state
    if state is None or task is None:
        return
    try:
        ids = state.apps.get(task.app)
        if ids is None:
            return
        request = task.request
        ctx = _context_for(task, state, ids)
        # An eager task runs inside its caller's context on purpose: only a
        # worker's task is a unit of work that must start clean.
        start = enter if getattr(request, "is_eager", False) else begin
        setattr(request, _TOKEN, start(ctx))
    except Exception:
        _log.exception("ctxrelay: could not bind the context of task %r", sender)


def _on_postrun(sender: object = None, task: Any = None, **_: Any) -> None:
    if task is None:
        return
    try:
        token = task.request.__dict__.pop(_TOKEN, None)
        if token is not None:
            leave(token)
    except Exception:
        _log.exception("ctxrelay: could not reset the context after task %r", sender)


def _on_revoked(
    sender: object = None, request: Any = None, expired: object = False, **_: Any
) -> None:
    """Log a task Celery discarded because its deadline passed, with the
    request's context bound, so the line carries the request id (Celery's own
    "Discarding revoked task" line is logged outside any task context)."""
    state = _state
    if state is None or not expired or request is None:
        return
    try:
        name = getattr(sender, "name", None) or getattr(request, "task", None) or ""
        task_id = getattr(request, "id", None) or ""
        source = f"task {str(name)[:100]!r} id {str(task_id)[:100]!r}"
        ctx = restore(_carried(request), binding(name, task_id), state.signer, source=source)
        if deadline_of(ctx) is None:
            return  # expired by the caller's own ``expires``, not a deadline
        with use(with_local(ctx, {TASK_ID: task_id})):
            _log.warning("ctxrelay: %s not run: its deadline passed before it started", source)
    except Exception:
        _log.exception("ctxrelay: could not log the expiry of task %r", sender)
