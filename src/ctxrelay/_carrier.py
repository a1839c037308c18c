"""Carrier: the context a message carries, signed with an HMAC when a secret is set.

The one home of a message's context, whatever carries the message: the
Celery, RQ and Dramatiq integrations (and any bus after them) apply one rule:

* **capture** (at publish): the current context minus the worker-local fields
  (:data:`WORKER_FIELDS`: a task's own id is not its child's), written with
  :func:`ctxrelay.inject` for an in-house carrier into a ``str -> str`` dict,
  plus a signature when a :class:`Signer` is configured;
* **restore** (in the worker): the dict is checked -- shape, size, signature,
  and that every entry it holds was read back -- then turned into a
  ``Context`` with :func:`ctxrelay.extract`.  Anything wrong and the task runs
  with an *empty* context, never a partial one, and the reason is logged
  (a warning for malformed or oversized input, an error for a bad signature).
  Nothing here raises into the worker.

The signature binds the carrier to the message id (Celery task id, RQ job id,
Dramatiq message id), so a signed context copied from one message onto
another is rejected too: whoever can write to the broker cannot impersonate a
user without the secret.  Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence

from ._context import EMPTY, MAX_VALUE_BYTES, Context, current, sanitize, use, with_scope
from ._inbound import extract_exactly
from ._outbound import inject
from ._policy import Policy, active

__all__ = [
    "KEY",
    "SIGNATURE",
    "WORKER_FIELDS",
    "Secret",
    "Signer",
    "as_signer",
    "binding",
    "capture",
    "restore",
    "with_local",
]

_log = logging.getLogger("ctxrelay")

#: The message header (Celery), ``job.meta`` key (RQ) or message option
#: (Dramatiq) that holds the carried context.
KEY = "ctxrelay"

#: The carrier entry that holds the signature.
SIGNATURE = "ctxrelay-signature"
_SCHEME = "v1="

#: Fields a worker binds for its own logs and never forwards: the id of the
#: task that runs is not the id of the task it publishes (Celery gives the
#: child its own ``parent_id`` and ``root_id``).
WORKER_FIELDS: frozenset[str] = frozenset(
    {"task_id", "task_parent_id", "task_root_id", "job_id", "message_id"}
)

_MAX_ENTRIES = 64

Secret = str | bytes


def _key(secret: object) -> bytes:
    if isinstance(secret, str):
        key = secret.encode("utf-8")
    elif isinstance(secret, (bytes, bytearray, memoryview)):
        key = bytes(secret)
    else:
        # bytes(48) is 48 zero bytes: an int must never become a key.
        raise TypeError(f"a ctxrelay signing secret is str or bytes, not {type(secret).__name__}")
    if len(key) < 16:
        raise ValueError("a ctxrelay signing secret must be at least 16 bytes long")
    return key


class Signer:
    """Signs carried contexts with HMAC-SHA256 and checks them in the worker.

    Pass one secret, or several to rotate keys: the first signs, any of them
    verifies (deploy the new key second everywhere, then first, then drop the
    old one).  Publishers and workers must share the secret.
    """

    __slots__ = ("_keys",)

    def __init__(self, secret: Secret | Sequence[Secret]) -> None:
        # A bytearray is one secret, not a sequence of ints (each would be
        # turned into that many zero bytes: a key anyone knows).
        secrets: list[object] = (
            [secret] if isinstance(secret, (str, bytes, bytearray, memoryview)) else list(secret)
        )
        if not secrets:
            raise ValueError("Signer needs at least one secret")
        self._keys = tuple(_key(s) for s in secrets)

    def __repr__(self) -> str:
        return f"Signer(<{len(self._keys)} secret(s)>)"

    @staticmethod
    def _message(carrier: Mapping[str, str], binding: str) -> bytes:
        entries = sorted((k, v) for k, v in carrier.items() if k != SIGNATURE)
        body = json.dumps([binding, entries], separators=(",", ":"), ensure_ascii=True)
        return body.encode("ascii")

    def sign(self, carrier: Mapping[str, str], binding: str) -> str:
        """The signature of ``carrier`` for the message whose id is ``binding``."""
        digest = hmac.new(self._keys[0], self._message(carrier, binding), hashlib.sha256)
        return _SCHEME + digest.hexdigest()

    def verify(self, carrier: Mapping[str, str], binding: str) -> bool:
        """True when ``carrier`` holds a valid signature for ``binding``."""
        signature = carrier.get(SIGNATURE)
        if not isinstance(signature, str) or not signature.isascii():
            return False  # compare_digest raises TypeError on non-ASCII str
        if not signature.startswith(_SCHEME):
            return False
        message = self._message(carrier, binding)
        return any(
            hmac.compare_digest(
                _SCHEME + hmac.new(key, message, hashlib.sha256).hexdigest(), signature
            )
            for key in self._keys
        )


def as_signer(secret: Signer | Secret | Sequence[Secret] | None) -> Signer | None:
    """``secret`` as a :class:`Signer` (``None`` stays ``None``)."""
    if secret is None or isinstance(secret, Signer):
        return secret
    return Signer(secret)


def binding(task: object, message_id: object) -> str:
    """What a signature is bound to besides the fields: the task (or actor,
    or job function) and the message id, so a signed context copied onto
    another message -- or onto another task with the same id -- is refused.
    The task's arguments are not covered: see docs/queues.md, "Signing"."""
    return f"{task}\x00{message_id}"


def capture(binding: str, signer: Signer | None) -> dict[str, str]:
    """The carrier for a message published now; ``{}`` when there is no context."""
    ctx = current()
    headers: dict[str, str] = {}
    if WORKER_FIELDS.isdisjoint(ctx):
        inject(headers)
    else:
        with use(ctx.remove(*WORKER_FIELDS)):
            inject(headers)
    if headers and signer is not None:
        headers[SIGNATURE] = signer.sign(headers, binding)
    return headers


def _max_bytes(policy: Policy) -> int:
    # Generous: the baggage, every captured header, request id and trace.
    return policy.max_baggage_bytes + MAX_VALUE_BYTES * (len(policy.capture) + 4) + 1024


def _shape(carrier: object, policy: Policy) -> str | None:
    """Why ``carrier`` is not a well-formed carrier, or ``None`` when it is."""
    if not isinstance(carrier, Mapping):
        return f"not a mapping but {type(carrier).__name__}"
    if len(carrier) > _MAX_ENTRIES:
        return f"{len(carrier)} entries (at most {_MAX_ENTRIES})"
    size = 0
    for name, value in carrier.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return "an entry that is not str -> str"
        size += len(name) + len(value)
    if size > _max_bytes(policy):
        return f"{size} characters (at most {_max_bytes(policy)})"
    return None


def restore(carrier: object, binding: str, signer: Signer | None, *, source: str) -> Context:
    """The context a worker binds for one message.  Never raises.

    ``carrier`` is what :func:`capture` wrote (``None`` when the message has
    none: it was published outside any context).  ``source`` names the
    message in log lines; no value from the message is ever logged.
    """
    if carrier is None:
        return EMPTY
    try:
        return _restore(carrier, binding, signer, source)
    except Exception:
        _log.exception("ctxrelay: could not read the context of %s; it runs without one", source)
        return EMPTY


def _restore(carrier: object, binding: str, signer: Signer | None, source: str) -> Context:
    policy = active()
    problem = _shape(carrier, policy)
    if problem is not None:
        _log.warning("ctxrelay: %s carries a malformed context (%s); ignored", source, problem)
        return EMPTY
    assert isinstance(carrier, Mapping)  # checked by _shape
    if signer is not None and not signer.verify(carrier, binding):
        why = "no signature" if SIGNATURE not in carrier else "a signature that does not match"
        _log.error(
            "ctxrelay: %s carries a context with %s; it runs with an empty context", source, why
        )
        return EMPTY
    headers = {name: value for name, value in carrier.items() if name != SIGNATURE}
    ctx, dropped = extract_exactly(headers, in_house=True)
    if dropped is not None:
        _log.warning(
            "ctxrelay: %s carries a malformed context (its %r entry is unreadable); ignored",
            source,
            dropped,
        )
        return EMPTY
    return ctx


def with_local(ctx: Context, fields: Mapping[str, object]) -> Context:
    """``ctx`` plus the worker-local ``fields`` that are valid (``None``s
    skipped), as the context of one job: with a request scope of its own,
    so that the job's code can ``bind_request()`` as a request's can."""
    present = [(name, value) for name, value in fields.items() if value is not None]
    clean = sanitize(present, source="the worker's task ids")
    return with_scope(ctx.set(clean) if clean else ctx)
