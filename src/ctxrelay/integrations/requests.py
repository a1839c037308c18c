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

The module-level ``requests.get()`` builds a plain session per call: use a
relaying session instead.
"""

from __future__ import annotations

from typing import Any

try:
    import requests
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ctxrelay.integrations.requests needs requests: pip install 'ctxrelay[requests]'"
    ) from exc

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
        return super().send(request, **kwargs)

    def rebuild_auth(
        self, prepared_request: requests.PreparedRequest, response: requests.Response
    ) -> None:
        _redirect_hop(prepared_request, response)
        super().rebuild_auth(prepared_request, response)


def install(session: requests.Session) -> requests.Session:
    """Make an existing ``session`` relay like :class:`Session`; returns it.

    Idempotent: installing twice changes nothing.
    """
    if isinstance(session, Session) or getattr(session, "_ctxrelay_installed", False):
        return session
    send, rebuild_auth = session.send, session.rebuild_auth

    def relaying_send(request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        _first_hop(request)
        return send(request, **kwargs)

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
