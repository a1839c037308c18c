"""The door: turn one inbound request into the ``Context`` bound for it.

Shared by the ASGI, WSGI and Django middleware, so the three apply one rule:

* the snapshot is a value copy of the request (seed 002: work that outlives
  the response reads this copy, never the live request);
* the relayed fields come from :func:`ctxrelay._wire.extract`, which applies
  the policy (what is captured, which peers are trusted for baggage);
* the request id is the inbound one when it is valid, else a new one.

Inbound data is hostile: :meth:`Door.open` never raises.  If anything in the
request trips the snapshot or the extraction, the request still gets a
context with a fresh request id, and the failure is logged.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .._context import REQUEST_ID, Context, validate_field
from .._policy import Policy, active
from .._request import RequestSnapshot
from .._wire import extract

__all__ = ["Door", "RequestIdValidator", "valid_request_id"]

_log = logging.getLogger("ctxrelay")

#: Decides whether an inbound request id is kept.
RequestIdValidator = Callable[[str], bool]

# Not only UUIDs: proxies and peers bring their own formats (AWS ALB's
# "Root=1-...", Heroku's, Envoy's).  The alphabet keeps ids safe in a log
# line, a header and a baggage value alike.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def valid_request_id(value: str) -> bool:
    """The default validator: 1-128 characters of ``A-Z a-z 0-9 . _ : -``."""
    return _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex digits (a UUID4)."""
    return uuid.uuid4().hex


def _shown(value: str) -> str:
    # For debug logs: never echo a hostile value whole or raw (log injection).
    return repr(value[:64] + ("..." if len(value) > 64 else ""))


class Door:
    """The request-id rule and the snapshot-to-``Context`` step, configured once.

    ``header_name``
        The request-id header; ``None`` follows the active policy's
        ``request_id_header`` (``x-request-id``), read per request so that
        ``ctxrelay.configure()`` after start-up still takes effect.
    ``validator``
        Decides whether an inbound id is kept; the default accepts 1-128
        characters of ``A-Z a-z 0-9 . _ : -``.  Whatever it accepts must still
        be a valid context field (no control character, at most 4096 bytes).
    """

    __slots__ = ("_custom", "_fixed", "_name", "_policy", "validator")

    def __init__(
        self, header_name: str | None = None, validator: RequestIdValidator | None = None
    ) -> None:
        if header_name is not None and (not isinstance(header_name, str) or not header_name):
            raise TypeError("header_name must be a non-empty str (or None for the policy's)")
        if validator is not None and not callable(validator):
            raise TypeError("validator must be a callable taking the inbound id")
        self._fixed = header_name.lower() if header_name else None
        self._policy: Policy | None = None
        self._name = self._fixed or active().request_id_header
        self.validator = validator or valid_request_id
        self._custom = validator is not None

    @property
    def header_name(self) -> str:
        """The lowercase request-id header name in force now."""
        if self._fixed is None:
            policy = active()
            if policy is not self._policy:
                self._policy, self._name = policy, policy.request_id_header
        return self._name

    def open(self, snapshot: RequestSnapshot, raw_id: str | None, peer: str | None) -> Context:
        """The context for one request.

        ``raw_id`` is the inbound request-id header exactly as received
        (before the snapshot's cleaning), so a control-character id is seen,
        logged and replaced.  ``peer`` (``host:port``) decides whether baggage
        is trusted (an edge service trusts no one; see ``Policy``).
        """
        try:
            fields = dict(extract(snapshot.headers, peer=peer))
        except Exception:  # a bug of ours must not fail the request
            _log.exception("ctxrelay: could not extract inbound fields; continuing without them")
            fields = {}
        fields[REQUEST_ID] = self.request_id(raw_id)
        return Context._make(fields, snapshot)

    def fallback(self, raw_id: object) -> Context:
        """The context when no snapshot could be taken: a request id only."""
        return Context._make(
            {REQUEST_ID: self.request_id(raw_id if isinstance(raw_id, str) else None)}, None
        )

    def request_id(self, raw: str | None) -> str:
        """The inbound id when it is valid, else a new one (debug-logged)."""
        if raw is not None and self._accepts(raw):
            return raw
        generated = new_request_id()
        if raw is not None:
            _log.debug(
                "ctxrelay: replaced an invalid inbound %s %s with %s",
                self.header_name,
                _shown(raw),
                generated,
            )
        return generated

    def _accepts(self, raw: str) -> bool:
        if not self._custom:
            return _REQUEST_ID.fullmatch(raw) is not None
        try:
            if not self.validator(raw):
                return False
            validate_field(REQUEST_ID, raw)
        except Exception as exc:  # a validator's bug, or an id no header may carry
            _log.debug("ctxrelay: inbound request id refused: %s", exc)
            return False
        return True


def header_from_asgi(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The first value of header ``name`` in an ASGI scope, raw, or ``None``.

    ASGI servers send lowercase names (the spec requires it); a malformed
    entry is skipped.
    """
    for pair in scope.get("headers") or ():
        try:
            key, value = pair
            if key == name:
                return bytes(value).decode("latin-1")
        except (TypeError, ValueError):
            continue
    return None


def header_from_wsgi(environ: Mapping[str, Any], name: str) -> str | None:
    """The value of header ``name`` in a WSGI environ, raw, or ``None``."""
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value if isinstance(value, str) else None


def _peer(host: object, port: object) -> str | None:
    if not isinstance(host, str) or not host:
        return None
    if ":" in host:  # IPv6: bracket it, so the port cannot be mistaken for a group
        host = f"[{host}]"
    return f"{host}:{port}" if isinstance(port, (int, str)) and port != "" else host


def open_asgi(door: Door, scope: Mapping[str, Any]) -> Context:
    """The context for an ASGI ``http``/``websocket`` scope; never raises."""
    raw: str | None = None
    try:
        raw = header_from_asgi(scope, door.header_name.encode("latin-1"))
        client = scope.get("client") or (None, None)
        peer = _peer(client[0], client[1])
        return door.open(RequestSnapshot.from_asgi(scope), raw, peer)
    except Exception:
        _log.warning("ctxrelay: could not snapshot an ASGI request", exc_info=True)
        return door.fallback(raw)


def open_wsgi(door: Door, environ: Mapping[str, Any]) -> Context:
    """The context for a WSGI environ; never raises."""
    raw: str | None = None
    try:
        raw = header_from_wsgi(environ, door.header_name)
        peer = _peer(environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))
        return door.open(RequestSnapshot.from_wsgi(environ), raw, peer)
    except Exception:
        _log.warning("ctxrelay: could not snapshot a WSGI request", exc_info=True)
        return door.fallback(raw)
