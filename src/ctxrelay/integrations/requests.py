"""Outgoing context headers for ``requests``.

Use :class:`Session` instead of ``requests.Session``, or :func:`install` on a
session you already have::

    import ctxrelay
    from ctxrelay.integrations.requests import Session

    http = Session()
    with ctxrelay.bind(tenant="acme"):
        http.get("http://orders.internal.example/api")   # carries the context

Headers are computed when the request is *sent*, from the context current in
the sending thread (a ``ctxrelay.ThreadPoolExecutor`` task sees its
submitter's).  Headers the caller set win.  On every redirect hop the headers
ctxrelay added are taken back and computed again for the new URL; a hop to
another origin (scheme, host or port) loses every sensitive header, the
caller's included -- requests itself only drops ``Authorization`` there --
but ``Proxy-Authorization``, the proxy's.  A header ctxrelay added is taken
back only while it holds what ctxrelay set: requests rebuilds ``Cookie``
from its jar on every hop, and the cookies ctxrelay sent join the jar's.

Deadlines: under a deadline (``ctxrelay.deadline()``, a door's ``timeout=``,
or one that arrived with the request) every send -- each redirect hop too --
first checks the time left.  None left, or the request was cancelled: it
fails at once with ``ctxrelay.DeadlineExceeded`` (or ``RequestCancelled``)
and nothing touches the network.  Otherwise the send's timeout becomes
``min(its own, the time remaining)`` for connect and read alike (never
longer than the caller's), and a timeout that fires once the deadline has
passed is raised as ``DeadlineExceeded`` -- an exception that is also a
``requests.Timeout``, so handlers written for either catch it.  requests'
timeouts bound each socket wait, not the whole call: a server that trickles
bytes can keep one call past the deadline, the next send fails at once.

The module-level ``requests.get()`` builds a plain session per call: use a
relaying session instead.
"""

from __future__ import annotations

import math
from time import monotonic
from typing import Any

try:
    import requests
except ImportError as _exc:  # without the extra installed (make dist checks it)
    raise ImportError(
        "ctxrelay.integrations.requests needs requests: pip install 'ctxrelay[requests]'"
    ) from _exc

from urllib3.exceptions import ReadTimeoutError
from urllib3.util import Timeout

from .._deadline import DeadlineExceeded, call_deadline
from .._outbound import Sent, inject_hop

__all__ = ["Session", "install", "uninstall"]

# The hop state rides on the PreparedRequest: requests copies a prepared
# request per redirect (PreparedRequest.copy), and the copy starts without it.
_SENT = "_ctxrelay_sent"
# Set by rebuild_auth on a redirect hop it just computed, cleared by the send
# that follows: any other send of a request that already went out (a
# PreparedRequest sent again, maybe for another user) computes its headers
# afresh from the context current then.
_PENDING = "_ctxrelay_pending"


def _sent(request: requests.PreparedRequest) -> Sent | None:
    sent = getattr(request, _SENT, None)
    return sent if isinstance(sent, Sent) else None


def _first_hop(request: requests.PreparedRequest) -> None:
    if getattr(request, _PENDING, False):
        setattr(request, _PENDING, False)  # rebuild_auth computed this hop
        return
    # A request sent before: take back what the last send added, as for a hop.
    previous = _sent(request)
    setattr(request, _SENT, inject_hop(request.headers, request.url or "", previous))


class _DeadlineTimeout(DeadlineExceeded, requests.exceptions.Timeout):
    """The deadline passed: a ``ctxrelay.DeadlineExceeded`` that is also the
    ``requests.Timeout`` callers already catch."""


def _deadline_error(
    message: str, request: requests.PreparedRequest, cause: BaseException | None = None
) -> _DeadlineTimeout:
    error = _DeadlineTimeout(message)
    error.request, error.response = request, None  # what a requests error carries
    if cause is not None:
        error.__cause__ = cause
    return error


def _clamp(own: object, left: float) -> float | None:
    """One timeout component no longer than ``left``; ``own`` when shorter."""
    if isinstance(own, (int, float)) and not isinstance(own, bool) and own < left:
        return float(own)
    return left  # None (wait forever) or longer: the time remaining


def _bounded(request: requests.PreparedRequest, kwargs: dict[str, Any]) -> float | None:
    """The deadline (a monotonic instant) this send runs under, or None.

    Raises at once, before any network, when the deadline passed or the
    request was cancelled; otherwise clamps ``kwargs["timeout"]``.
    """
    at = call_deadline(lambda message: _deadline_error(message, request))
    if at is None:
        return None
    # At least a millisecond: a zero timeout would make the socket non-blocking.
    left = max(0.001, at - monotonic())
    own = kwargs.get("timeout")
    if isinstance(own, tuple) and len(own) == 2:
        kwargs["timeout"] = (_clamp(own[0], left), _clamp(own[1], left))
    elif isinstance(own, Timeout):
        # urllib3's own form: its connect and read waits, each clamped.
        kwargs["timeout"] = (
            _clamp(_number(own.connect_timeout), left),
            _clamp(_number(own.read_timeout), left),
        )
    else:
        kwargs["timeout"] = _clamp(own, left)
    return at


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.Timeout):
        return True
    # Reading the body after the headers: requests reports urllib3's read
    # timeout as a ConnectionError.
    return isinstance(exc, requests.exceptions.ConnectionError) and any(
        isinstance(arg, ReadTimeoutError) for arg in exc.args
    )


def _send(
    send: Any, request: requests.PreparedRequest, kwargs: dict[str, Any]
) -> requests.Response:
    at = _bounded(request, kwargs)
    if at is None:
        return send(request, **kwargs)  # type: ignore[no-any-return]
    try:
        return send(request, **kwargs)  # type: ignore[no-any-return]
    except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
        if monotonic() >= at and _is_timeout(exc):
            # The clamped timeout fired because the deadline passed: say so.
            raise _deadline_error("the deadline passed during the call", request, exc) from exc
        raise


def _redirect_hop(prepared: requests.PreparedRequest, response: requests.Response) -> None:
    previous = _sent(response.request)
    setattr(prepared, _SENT, inject_hop(prepared.headers, prepared.url or "", previous))
    setattr(prepared, _PENDING, True)


class Session(requests.Session):
    """A ``requests.Session`` that relays the current context on every request.

    ``send`` injects on the first hop; ``rebuild_auth``, the hook requests
    calls for each redirect hop, takes back and re-computes ours first, so
    ``.netrc`` credentials requests adds for the new host stay its decision.
    """

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        _first_hop(request)
        return _send(super().send, request, kwargs)

    def rebuild_auth(
        self, prepared_request: requests.PreparedRequest, response: requests.Response
    ) -> None:
        _redirect_hop(prepared_request, response)
        super().rebuild_auth(prepared_request, response)


def install(session: requests.Session) -> requests.Session:
    """Make an existing ``session`` relay like :class:`Session`; returns it.

    Idempotent: installing twice changes nothing.
    """
    if not isinstance(session, requests.Session):
        raise TypeError(f"install() takes a requests.Session, not {type(session).__name__}")
    if isinstance(session, Session) or getattr(session, "_ctxrelay_installed", False):
        return session
    send, rebuild_auth = session.send, session.rebuild_auth

    def relaying_send(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        _first_hop(request)
        return _send(send, request, kwargs)

    def relaying_rebuild_auth(
        prepared_request: requests.PreparedRequest, response: requests.Response
    ) -> None:
        _redirect_hop(prepared_request, response)
        rebuild_auth(prepared_request, response)

    session.send = relaying_send  # type: ignore[method-assign]
    session.rebuild_auth = relaying_rebuild_auth  # type: ignore[method-assign]
    session._ctxrelay_installed = True  # type: ignore[attr-defined]
    return session


def uninstall(session: requests.Session) -> requests.Session:
    """Undo :func:`install` on ``session`` exactly; returns it.  Idempotent.

    A :class:`Session` relays by its class, not by installation: use a plain
    ``requests.Session`` where nothing should be relayed.
    """
    if not getattr(session, "_ctxrelay_installed", False):
        return session
    for name in ("send", "rebuild_auth", "_ctxrelay_installed"):
        session.__dict__.pop(name, None)  # the class's own methods show through again
    return session
