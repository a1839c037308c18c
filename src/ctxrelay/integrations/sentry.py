"""Sentry: the request's context on every error event and transaction.

A Sentry integration, shaped as the SDK's own are::

    import sentry_sdk
    from ctxrelay.integrations.sentry import SentryIntegration

    sentry_sdk.init(dsn=..., integrations=[SentryIntegration()])

From then on every event the SDK sends -- an exception, a message, a
transaction -- carries the fields of the ctxrelay context current where it
is captured:

* the fields named by ``tags`` (default: ``request_id``) as **tags**, which
  Sentry indexes: search ``request_id:req-5e52...`` to find every error of
  one request;
* every field, in a **context** block named ``ctxrelay`` (shown on the
  event's page, not indexed).

Sensitive fields (``cookie``, ``authorization``, the names of
:class:`ctxrelay.Policy`) are masked by the logs' rule -- their value is
``***`` -- and every value is escaped as on a log line (the one rule of
``ctxrelay._logfields.masked_fields``): no cookie, token or password reaches
Sentry through this integration.  Naming a sensitive field in ``tags`` is
refused.  Fields the policy keeps ``local`` (never sent out of the process)
are not sent to Sentry either.

It reads the one ctxrelay ``ContextVar`` where the event is captured, so it
works in every thread, pool, task-queue worker and process that ctxrelay
relays the context to -- the process needs ``sentry_sdk.init`` with this
integration, as every Sentry integration does.  Fields are prepared once per
context (the logs' per-context memo); an event then costs one ``ContextVar``
read and two dict updates.

A transaction carries the context it finishes in -- or, when another
integration wraps it around the work from outside ctxrelay's binding (Sentry's
Celery integration around a task, its Flask integration around
``Flask.__call__``), the context the work ran in: Celery's and Flask's
signals sent during the work stamp the transaction in progress (see
:meth:`SentryIntegration.stamp`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

try:
    import sentry_sdk
    from sentry_sdk.integrations import Integration
    from sentry_sdk.scope import add_global_event_processor
    from sentry_sdk.tracing import Transaction
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.sentry needs sentry-sdk: pip install 'ctxrelay[sentry]'"
    ) from _exc

from .._context import REQUEST_ID, Context, validate_field
from .._logfields import PerContext, masked_fields
from .._policy import Policy, active

if TYPE_CHECKING:
    from sentry_sdk._types import Event, Hint

__all__ = ["CONTEXT", "MAX_TAG_KEY", "MAX_TAG_VALUE", "SentryIntegration", "stamp"]

#: The name of the event's context block that holds every field.
CONTEXT: Final = "ctxrelay"
#: Sentry's limits on a tag: longer keys are refused here, longer values
#: are left out of the tags (they stay in the context block).
MAX_TAG_KEY: Final = 32
MAX_TAG_VALUE: Final = 200

#: What an event gets from one context: its tags, and its context block.
_Prepared = tuple[tuple[tuple[str, str], ...], dict[str, str]]
_NOTHING: Final[_Prepared] = ((), {})


class SentryIntegration(Integration):
    """Puts the current ctxrelay context on every Sentry event and transaction.

    ``tags``
        Field names sent as tags (indexed, searchable), when the context has
        them; default ``("request_id",)``.  Each must be a valid field name
        of at most 32 characters (Sentry's limit) and not sensitive under
        the active policy.  A value longer than 200 characters (Sentry's
        limit) is left out of the tags.
    ``context``
        Put every field, masked, in the event's ``ctxrelay`` context block
        (default ``True``).

    Tags and context already set on the event or the Sentry scope
    (``sentry_sdk.set_tag(...)``) win.  An event captured outside any
    request gets nothing.
    """

    identifier = "ctxrelay"

    def __init__(self, *, tags: Iterable[str] = (REQUEST_ID,), context: bool = True) -> None:
        if isinstance(tags, str):
            tags = (tags,)
        chosen = tuple(tags)
        policy = active()
        for name in chosen:
            validate_field(name, "")
            if len(name) > MAX_TAG_KEY:
                raise ValueError(
                    f"SentryIntegration(tags=...): {name!r} is longer than Sentry's "
                    f"{MAX_TAG_KEY}-character limit on tag names"
                )
            if policy.is_sensitive(name):
                raise ValueError(
                    f"SentryIntegration(tags=...): {name!r} is sensitive; a tag would "
                    "only ever say ***.  It is in the ctxrelay context block, masked"
                )
        self.tags = chosen
        self.context: bool = bool(context)
        self._prepared: PerContext[_Prepared] = PerContext(self._prepare)

    def _prepare(self, ctx: Context, policy: Policy) -> _Prepared:
        if not ctx:
            return _NOTHING
        fields: dict[str, str] = masked_fields(ctx, policy)
        if policy.local:
            # Sentry is outside the process: a field the policy keeps local
            # (never sent as baggage, header or message) is not sent there.
            fields = {name: value for name, value in fields.items() if name not in policy.local}
        tags = tuple(
            (name, fields[name])
            for name in self.tags
            if name in fields
            # A tag the policy came to call sensitive after construction
            # stays masked in the block, never a tag.
            and not policy.is_sensitive(name)
            and len(fields[name]) <= MAX_TAG_VALUE
        )
        return tags, (dict(fields) if self.context else {})

    @staticmethod
    def setup_once() -> None:
        # Once per process, as every integration's setup_once: the processor
        # then checks, per event, that the active client has this
        # integration (a client closed or re-initialised without it: no-op).
        add_global_event_processor(_process)
        _connect_frameworks()

    def stamp(self) -> None:
        """Put the current context on the Sentry transaction in progress.

        For a transaction that another integration wraps around the work
        from outside ctxrelay's binding, and so finishes after the context
        is gone: Sentry's Celery integration starts and finishes a task's
        transaction around Celery's ``task_prerun``/``task_postrun``, its
        Flask integration around ``Flask.__call__``.  Called from inside the
        work (the frameworks' signals, see :func:`_connect_frameworks`), it
        stamps the fields on the transaction itself -- never on a scope,
        which may outlive the request.
        """
        span = sentry_sdk.get_current_span()
        transaction = getattr(span, "containing_transaction", None)
        if not isinstance(transaction, Transaction):
            return
        tags, block = self._prepared.current()
        for name, value in tags:
            transaction.set_tag(name, value)
        if block:
            transaction.set_context(CONTEXT, dict(block))

    def apply(self, event: Event) -> Event:
        """Add the current context's tags and block to ``event`` (what the
        SDK's event processor calls; the event is returned)."""
        tags, block = self._prepared.current()
        if not tags and not block:
            return event
        if tags:
            present = event.get("tags")
            if present is None:
                event["tags"] = dict(tags)
            elif isinstance(present, dict):  # another processor may have set anything
                for name, value in tags:
                    present.setdefault(name, value)
        if block:
            contexts = event.get("contexts")
            if contexts is None:
                event["contexts"] = {CONTEXT: dict(block)}
            elif isinstance(contexts, dict) and CONTEXT not in contexts:
                # A copy per event: before_send or another processor may edit it.
                contexts[CONTEXT] = dict(block)
        return event


def stamp() -> None:
    """Put the current context on the Sentry transaction in progress, if the
    active client uses :class:`SentryIntegration` (else: nothing).

    For a transaction started and finished outside ctxrelay's binding where
    no Celery or Flask signal does it (Django: Sentry wraps Django's WSGI
    handler, outside the middleware chain): call it once from inside the
    request, e.g. from a middleware placed after ctxrelay's.
    """
    integration: Any = sentry_sdk.get_client().get_integration(SentryIntegration)
    if integration is not None:
        integration.stamp()


def _stamp(*_: object, **__: object) -> None:
    # A framework signal's receiver (any arguments).
    stamp()


def _connect_frameworks() -> None:
    """Stamp transactions from the signals frameworks send inside the work.

    Celery's ``task_success``, ``task_failure`` and ``task_retry`` are sent
    while the task runs, between ``task_prerun`` (where ctxrelay binds the
    message's context) and ``task_postrun`` (where it resets it), whatever
    the order of the receivers; Flask's ``request_finished`` and
    ``got_request_exception`` inside ``Flask.wsgi_app``, inside ctxrelay's
    ``RelayMiddleware``.  Only frameworks that are installed, and so
    imported by Sentry's own auto-enabled integrations anyway.
    """
    if importlib.util.find_spec("celery") is not None:
        try:
            from celery import signals  # type: ignore[import-untyped]
        except Exception:  # a broken install must not break sentry_sdk.init
            pass
        else:
            for signal in (signals.task_success, signals.task_failure, signals.task_retry):
                signal.connect(_stamp, weak=False, dispatch_uid=_UID)
    if importlib.util.find_spec("flask") is not None:
        try:
            import flask
        except Exception:
            pass
        else:
            flask.request_finished.connect(_stamp, weak=False)
            flask.got_request_exception.connect(_stamp, weak=False)


_UID: Final = "ctxrelay.integrations.sentry"


def _process(event: Event, hint: Hint | None) -> Event | None:
    integration: Any = sentry_sdk.get_client().get_integration(SentryIntegration)
    if integration is None:
        return event
    applied: Event = integration.apply(event)
    return applied
