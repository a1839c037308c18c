"""Dramatiq: a middleware carries the context in the message options.

:class:`ContextMiddleware` writes the current context into
``message.options["ctxrelay"]`` when a message is enqueued, binds it in the
worker thread before the actor runs and resets it by token after -- after
success, exception and skip -- so nothing leaks into the thread's next
message.  The worker also binds ``message_id`` (worker-local: never forwarded).

:func:`install` puts the middleware *first* in the broker's list.  Dramatiq
runs ``before_*`` hooks in list order and ``after_*`` hooks in reverse, so
every other middleware runs inside the context: the failure log line,
``Retries`` re-enqueueing, ``Pipelines`` sending the next message, group
callbacks.  A message enqueued again (a retry, a delayed message moving to
its queue) keeps the context it already carries.  Example::

    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    import ctxrelay
    from ctxrelay.integrations.dramatiq import install

    broker = RedisBroker(url="redis://127.0.0.1:6379/0")
    install(broker)                   # in the sender and in the worker
    dramatiq.set_broker(broker)

    @dramatiq.actor
    def confirm(order: str) -> None:
        print(ctxrelay.request_id())  # "r-42", in the worker

    with ctxrelay.bind(request_id="r-42"):
        confirm.send("o-1")

``secret=`` signs the context (an HMAC bound to the message id); a worker
with the secret runs a message whose context is unsigned or tampered with an
empty context and logs an error.  Malformed or oversized contexts run with
an empty one and a warning.

A message that arrives without a request id -- sent without this
middleware, by a script or a scheduler, or whose context was refused -- runs
with a fresh one, made as the web door makes one (``generator=``, else
``settings.CTXRELAY["generator"]`` under Django, else a random id), so its
log lines still belong together.  The worker writes that id into the
message's options, so a retry carries it (a message redelivered after its
worker died was never re-sent: it gets another).  ``generate_id=False``
turns this off.

Deadlines: a message sent while a deadline is bound gets Dramatiq's
``max_age`` option set to the milliseconds left (never longer than the
message's or the actor's own ``max_age``), so even a worker without this
middleware drops it once late (``AgeLimit``).  With the middleware, the
worker binds the carried time narrowed by the time the message waited since
it was sent (``message_timestamp``, wall clock, as ``AgeLimit`` reads it), and
a message whose deadline passed before it started is not run: it is failed
and skipped (``SkipMessage``, Dramatiq's own outcome for a message too old),
with a warning that carries the request id.  ``time_limit`` is left to the
actor: a running actor stops at the deadline by calling
``ctxrelay.checkpoint()``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from contextvars import Token
from typing import Any

try:
    from dramatiq import Broker, Message, Middleware
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware import SkipMessage
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.dramatiq needs Dramatiq: pip install 'ctxrelay[dramatiq]'"
    ) from _exc

from .._carrier import KEY, Secret, Signer, as_signer, binding, capture, restore, with_local
from .._context import REQUEST_ID, Context, begin, current, leave, narrowed
from .._deadline import deadline_of, expired, remaining_ms
from .._inbound import RequestIdGenerator
from ._worker_id import FreshIds

__all__ = ["MESSAGE_ID", "ContextMiddleware", "Signer", "install", "uninstall"]

_log = logging.getLogger("ctxrelay")

#: The worker-local field holding the running message's id.
MESSAGE_ID = "message_id"


class ContextMiddleware(Middleware):
    """Carries the context from ``send`` to the actor; see the module docs.

    Prefer :func:`install`, which puts it first in the broker's list.
    """

    def __init__(
        self,
        *,
        secret: Signer | Secret | Sequence[Secret] | None = None,
        generate_id: bool = True,
        generator: RequestIdGenerator | None = None,
    ) -> None:
        self.signer: Signer | None = as_signer(secret)
        self.ids: FreshIds = FreshIds(
            generate_id, generator, owner="ctxrelay.integrations.dramatiq.ContextMiddleware()"
        )
        # Worker threads process one message at a time: a per-thread stack of
        # (message id, token) is enough, and exact.
        self._local = threading.local()

    def _tokens(self) -> list[tuple[str, Token[Context]]]:
        tokens: list[tuple[str, Token[Context]]] | None = getattr(self._local, "tokens", None)
        if tokens is None:
            tokens = self._local.tokens = []
        return tokens

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int) -> None:
        """Capture the context, unless the message already carries one (a retry)."""
        try:
            if KEY in message.options:
                return
            carrier = capture(binding(message.actor_name, message.message_id), self.signer)
            if carrier:
                message.options[KEY] = carrier
            left = remaining_ms(current())
            if left is not None:
                _age_at_most(broker, message, left)
        except Exception:
            _log.exception("ctxrelay: could not put the context on a Dramatiq message")

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        """Bind the message's context (plus ``message_id``) in this worker thread."""
        try:
            message_id = message.message_id
            source = f"Dramatiq message {str(message_id)[:100]!r}"
            carried = message.options.get(KEY)
            bound_to = binding(message.actor_name, message_id)
            restored = _queued_time_out(
                message, restore(carried, bound_to, self.signer, source=source)
            )
            ctx = with_local(self.ids.completed(restored), {MESSAGE_ID: message_id})
            token = begin(ctx)
            self._tokens().append((message_id, token))
            if REQUEST_ID not in restored and REQUEST_ID in ctx:
                self._keep_for_retries(message, bound_to)
        except Exception:
            _log.exception("ctxrelay: could not bind the context of a Dramatiq message")
            return
        if expired(ctx) is not None:
            # Bound already: the line (and Dramatiq's "was skipped" line)
            # carries the request id; after_skip_message resets it.
            _log.warning("ctxrelay: %s not run: its deadline passed before it started", source)
            message.fail()
            raise SkipMessage("its deadline passed")

    def _keep_for_retries(self, message: MessageProxy, bound_to: str) -> None:
        """The id made for this message goes into its options, signed: a
        retry is this message enqueued again, options and all."""
        if deadline_of(current()) is not None:
            # Re-read later against the first send's timestamp: written now,
            # the time already spent would count twice.  A retry of a
            # message that carried a deadline but no id gets another id.
            return
        try:
            carrier = capture(bound_to, self.signer)
            if carrier:
                message.options[KEY] = carrier
        except Exception:
            _log.exception("ctxrelay: could not record the request id of a Dramatiq message")

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        """Reset the context by token, whatever the outcome."""
        self._reset(message)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        """Reset the context by token when a later middleware skipped the message."""
        self._reset(message)

    def _reset(self, message: MessageProxy) -> None:
        tokens = self._tokens()
        try:
            while tokens:
                message_id, token = tokens.pop()
                leave(token)
                if message_id == message.message_id:
                    break
        except Exception:
            _log.exception("ctxrelay: could not reset the context after a Dramatiq message")


def _age_at_most(broker: Broker, message: Message[Any], left_ms: int) -> None:
    """Set ``max_age`` to ``left_ms`` unless the message's or actor's own
    ``max_age`` is shorter: a message option overrides the actor's, so
    setting it blindly could lengthen the actor's limit."""
    own = message.options.get("max_age")
    if not own:
        try:
            own = broker.get_actor(message.actor_name).options.get("max_age")
        except Exception:  # the sender may not declare the actor
            own = None
    message.options["max_age"] = left_ms if not own else min(int(own), left_ms)


def _queued_time_out(message: MessageProxy, ctx: Context) -> Context:
    """``ctx`` with its deadline narrowed by the time since the message was
    sent: the carried remaining time is re-read at receipt, so without this a
    message that waited 4 s of its 5 would still get 5 s.  Only a context
    that carried a deadline is narrowed, and only ever narrowed."""
    at = deadline_of(ctx)
    sent = getattr(message, "message_timestamp", None)
    if at is None or not isinstance(sent, int):
        return ctx
    waited = max(0.0, time.time() - sent / 1000.0)
    return narrowed(ctx, at - waited)


def install(
    broker: Broker,
    *,
    secret: Signer | Secret | Sequence[Secret] | None = None,
    generate_id: bool = True,
    generator: RequestIdGenerator | None = None,
) -> ContextMiddleware:
    """Put a :class:`ContextMiddleware` first in ``broker``'s middleware.

    Idempotent: an installed one is kept, with the options given as its new
    ones.  ``generate_id`` and ``generator``: a message that arrives without
    a request id runs with a fresh one (see the module docs).  Raises
    ``TypeError`` when ``broker`` is not a Dramatiq broker or an option has
    the wrong type.
    """
    _check_broker(broker, "install")
    ids = FreshIds(generate_id, generator, owner="ctxrelay.integrations.dramatiq.install()")
    signer = as_signer(secret)
    for existing in broker.middleware:
        if isinstance(existing, ContextMiddleware):
            existing.signer = signer
            existing.ids = ids
            return existing
    middleware = ContextMiddleware(secret=signer, generate_id=generate_id, generator=generator)
    if broker.middleware:
        broker.add_middleware(middleware, before=type(broker.middleware[0]))
    else:
        broker.add_middleware(middleware)
    return middleware


def uninstall(broker: Broker) -> None:
    """Remove every :class:`ContextMiddleware` from ``broker``.  Idempotent.

    Raises ``TypeError`` when ``broker`` is not a Dramatiq broker."""
    _check_broker(broker, "uninstall")
    broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, ContextMiddleware)]


def _check_broker(broker: object, what: str) -> None:
    if not isinstance(broker, Broker):
        raise TypeError(
            f"ctxrelay.integrations.dramatiq.{what}() takes a Dramatiq broker "
            f"(dramatiq.Broker), not {type(broker).__name__}"
        )


def __getattr__(name: str) -> object:
    # ``RelayMiddleware`` names the web doors everywhere else in ctxrelay; the
    # broker middleware is ContextMiddleware.  The old name still works.
    if name == "RelayMiddleware":
        warnings.warn(
            "ctxrelay.integrations.dramatiq.RelayMiddleware is now ContextMiddleware "
            "(RelayMiddleware names the web middleware); the old name will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return ContextMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
