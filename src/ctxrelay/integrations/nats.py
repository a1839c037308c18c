"""NATS (``nats-py``, core and JetStream): the context travels in message headers.

:func:`install` relays through one connection::

    import nats
    import ctxrelay
    from ctxrelay.integrations.nats import bound, install

    nc = install(await nats.connect("nats://127.0.0.1:4222"))

    async def handle(msg):                  # runs bound to msg's context
        print(ctxrelay.request_id())        # "r-42"
        await msg.respond(b"done")          # the reply carries it back

    await nc.subscribe("orders", cb=handle)
    with ctxrelay.bind(request_id="r-42"):
        reply = await nc.request("orders", b"o-1")

What it does, on that connection only:

* **publish** -- ``publish``, ``request``, ``msg.respond``, JetStream's
  ``publish``/``publish_async`` (they all go through ``publish``): the
  current context is written with :func:`ctxrelay.inject` for an in-house
  carrier (``Policy.in_house`` decides: by default fields, request id,
  trace, captured headers that are not credentials) as plain message
  headers -- ``x-request-id``, ``traceparent``, ``baggage`` ..., readable by
  any W3C-propagating consumer -- plus a ``ctxrelay`` header naming them and,
  with a secret, ``ctxrelay-signature``.  A carrier already in the headers
  (``msg.respond`` echoes the request's headers; code forwarding another
  message's headers) is never forwarded: it is replaced by the current
  context's.  A header the caller set under a carried name wins and is what
  the message carries.  Subjects starting with ``$`` (JetStream acks and
  API, KV) are the server's: nothing is added there.
* **handle** -- every callback given to ``subscribe(cb=...)`` (and so
  JetStream push consumers, ``nats.micro`` endpoints) runs bound to *its
  message's* context, replacing whatever the subscription's task held, and
  is reset by token after, on return, exception and cancellation.
  Per message, never per subscription or per poll: a subscription's task
  is created once, by whoever subscribed, and handles every message after
  (opentelemetry-python-contrib #1674, #3026, #3465 bound a consumer's
  context per poll, or left consumers orphaned).
* **iterators and pull consumers** (``sub.messages``, ``next_msg()``,
  JetStream ``fetch()``) hand messages to your own loop: bind each with
  ``with bound(msg): ...``; :func:`context_of` reads one without binding (a
  request's reply).

The carrier is read as a queue message's is (``ctxrelay._carrier``): all or
nothing -- a malformed, oversized or unreadable entry, or a listed entry that
is missing, and the handler runs with an *empty* context and a warning;
with a secret, an unsigned or tampered carrier runs empty with an error.  The
signature binds the subject and the payload (SHA-256): a signed context
cannot be moved onto another message's body or subject.  No value from a
message is ever logged.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

try:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.client import JetStreamContext
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.nats needs nats-py: pip install 'ctxrelay[nats]'"
    ) from _exc

from .._carrier import KEY, SIGNATURE, Secret, Signer, as_signer, binding, capture, restore
from .._context import EMPTY, Context, current, enter, leave, use

__all__ = ["KEY", "Signer", "bound", "context_of", "install", "uninstall"]

_log = logging.getLogger("ctxrelay")
_errors = logging.getLogger("ctxrelay.nats")

Callback = Callable[[Msg], Awaitable[None]]

#: At most this many entries in one carrier (as ``_carrier`` allows).
_MAX_LISTED = 64

# nats-py's own callbacks: the request mux and JetStream's async-publish
# replies only resolve a future.  Binding around them is harmless but costs.
_INTERNAL = {
    getattr(Client, "_request_sub_callback", None),
    getattr(JetStreamContext, "_handle_async_reply", None),
} - {None}


class _Relay:
    __slots__ = ("log_errors", "signer")

    def __init__(self, signer: Signer | None, log_errors: bool) -> None:
        self.signer = signer
        self.log_errors = log_errors


_installed: weakref.WeakKeyDictionary[Client, _Relay] = weakref.WeakKeyDictionary()


def _digest(payload: object) -> str:
    try:
        return hashlib.sha256(payload).hexdigest()  # type: ignore[arg-type]  # bytes-like
    except TypeError:
        return ""


def _binding(subject: object, payload: object) -> str:
    return binding(subject, _digest(payload))


# -- publish -------------------------------------------------------------------
def _stale(headers: Mapping[str, Any]) -> list[str]:
    """The entries of a carrier already in ``headers`` (another message's)."""
    listed = headers.get(KEY)
    names = listed.split(",")[:_MAX_LISTED] if isinstance(listed, str) else []
    return [KEY, SIGNATURE, *names]


def _outgoing(
    subject: str, payload: object, headers: Mapping[str, Any] | None, signer: Signer | None
) -> Mapping[str, Any] | None:
    """The headers a message on ``subject`` goes out with: the caller's
    (never changed: a copy is made) plus the current context's carrier."""
    ctx = current()
    if headers is None:
        if not ctx:
            return None  # the common case of a bare publish: nothing to do
        out: dict[str, Any] = {}
    else:
        if not ctx and KEY not in headers:
            return headers
        out = dict(headers)
        for name in _stale(out):  # another message's carrier is never forwarded
            out.pop(name, None)
        if not ctx:
            return out
    bound_to = _binding(subject, payload) if signer is not None else ""
    carried = capture(bound_to, None)  # signed below, once the caller's headers are in
    if not carried:
        return out if headers is not None else None
    spelled = {name.lower(): name for name in out if isinstance(name, str)}
    carrier: dict[str, str] = {}
    for name, value in carried.items():
        mine = spelled.get(name)
        if mine is not None and isinstance(out[mine], str):
            name, value = mine, out[mine]  # the caller's header wins, and is what is carried
        # nats-py strips values on the wire: carry (and sign) what arrives.
        carrier[name] = out[name] = value.strip()
    out[KEY] = ",".join(carrier)
    if signer is not None:
        out[SIGNATURE] = signer.sign(carrier, bound_to)
    return out


def _publisher(original: Callable[..., Awaitable[None]], nc: Client) -> Callable[..., Any]:
    async def publish(
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, Any] | None = None,
    ) -> None:
        relay = _installed.get(nc)
        if relay is not None and not subject.startswith("$"):
            try:
                headers = _outgoing(subject, payload, headers, relay.signer)  # type: ignore[assignment]
            except Exception:  # never fail the publish for the context
                _log.exception("ctxrelay: could not put the context on a NATS message")
        await original(subject, payload, reply=reply, headers=headers)

    publish.__wrapped__ = original  # type: ignore[attr-defined]  # what uninstall restores
    return publish


# -- handle --------------------------------------------------------------------
def _carried(headers: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the carrier the headers hold, or None; why it is malformed, or None)."""
    listed = headers.get(KEY)
    if listed is None:
        return None, None
    if not isinstance(listed, str) or not listed:
        return None, "its ctxrelay header is empty"
    names = listed.split(",")
    if len(names) > _MAX_LISTED:
        return None, f"{len(names)} entries (at most {_MAX_LISTED})"
    carrier: dict[str, Any] = {}
    for name in names:
        value = headers.get(name)
        if value is None:
            return None, "an entry it lists is missing"
        carrier[name] = value
    if SIGNATURE in headers:
        carrier[SIGNATURE] = headers[SIGNATURE]
    return carrier, None


def _context(msg: Msg, signer: Signer | None) -> Context:
    headers = msg.headers
    if not headers or KEY not in headers:
        return EMPTY  # published without a context, or by a producer without ctxrelay
    try:
        source = f"NATS message on {str(msg.subject)[:100]!r}"
        carrier, problem = _carried(headers)
        if problem is not None:
            _log.warning("ctxrelay: %s carries a malformed context (%s); ignored", source, problem)
            return EMPTY
        bound_to = _binding(msg.subject, msg.data) if signer is not None else ""
        return restore(carrier, bound_to, signer, source=source)
    except Exception:
        _log.exception("ctxrelay: could not read the context of a NATS message")
        return EMPTY


def context_of(msg: Msg) -> Context:
    """The context ``msg`` carries, checked (with the secret of the connection
    it arrived on, if installed with one); empty when it carries none or a bad
    one.  Never raises."""
    relay = _installed.get(getattr(msg, "_client", None))  # type: ignore[arg-type]
    return _context(msg, relay.signer if relay is not None else None)


def bound(msg: Msg) -> AbstractContextManager[Context]:
    """``with bound(msg):`` -- ``msg``'s context bound for the block, reset by
    token on exit.  For messages your own loop takes: ``sub.messages``,
    ``next_msg()``, JetStream ``fetch()``."""
    return use(context_of(msg))


def _handler(cb: Callback, nc: Client) -> Callback:
    async def relayed(msg: Msg) -> None:
        relay = _installed.get(nc)
        token = enter(_context(msg, relay.signer if relay is not None else None))
        try:
            await cb(msg)
        except Exception:
            if relay is None or relay.log_errors:
                # While bound: this line carries the message's request id;
                # nats-py's error_cb runs after the reset.
                _errors.error("NATS handler for %r raised", str(msg.subject)[:100], exc_info=True)
            raise
        finally:
            leave(token)  # return, exception, cancellation: reset by token

    relayed.__wrapped__ = cb  # type: ignore[attr-defined]
    return relayed


def _subscriber(original: Callable[..., Awaitable[Subscription]], nc: Client) -> Callable[..., Any]:
    async def subscribe(
        subject: str, queue: str = "", cb: Callback | None = None, **options: Any
    ) -> Subscription:
        if cb is not None and getattr(cb, "__func__", None) not in _INTERNAL:
            cb = _handler(cb, nc)
        return await original(subject, queue, cb, **options)

    subscribe.__wrapped__ = original  # type: ignore[attr-defined]
    return subscribe


# -- install -------------------------------------------------------------------
def install(
    nc: Client,
    *,
    secret: Signer | Secret | Sequence[Secret] | None = None,
    log_errors: bool = True,
) -> Client:
    """Relay the context through connection ``nc`` (see the module docs);
    returns it.  Call it before subscribing: subscriptions made earlier are
    not relayed.  Idempotent: installing again only changes the secret.

    ``secret`` (one, or several to rotate; at least 16 bytes) signs what is
    published and refuses unsigned or tampered contexts in handlers.
    ``log_errors``: log an exception escaping a handler on logger
    ``ctxrelay.nats`` while its context is still bound.
    """
    signer = as_signer(secret)
    relay = _installed.get(nc)
    if relay is not None:
        relay.signer = signer
        relay.log_errors = log_errors
        return nc
    _installed[nc] = _Relay(signer, log_errors)
    # Instance attributes shadow the class's methods for this connection only;
    # request() and JetStream call self.publish/self._nc.subscribe, so they
    # go through these too.
    nc.publish = _publisher(nc.publish, nc)  # type: ignore[method-assign]
    nc.subscribe = _subscriber(nc.subscribe, nc)  # type: ignore[method-assign]
    return nc


def uninstall(nc: Client) -> None:
    """Stop relaying through ``nc``: publishes carry nothing more; handlers
    subscribed before run with an empty context.  Idempotent."""
    _installed.pop(nc, None)
    for name in ("publish", "subscribe"):
        if name in vars(nc):
            delattr(nc, name)
