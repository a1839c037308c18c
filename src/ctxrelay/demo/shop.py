"""The shop of the story: who is logged in, what the browser sends, what may travel.

Every service of the demo (and the Celery worker process, when there is one)
reads these, so both ends of every hop agree on what "correct" means.
"""

from __future__ import annotations

import secrets

import ctxrelay

__all__ = [
    "BUDGET",
    "CANARY",
    "COOKIE",
    "DEADLINE_HEADER",
    "ORDER_ID",
    "RENDER_RESERVE",
    "SESSION",
    "SESSIONS",
    "SLOW_CART",
    "USER",
    "browser_headers",
    "new_request_id",
    "policy",
]

#: The logged-in user, and the session cookie the browser holds for her.
USER = "alice"
SESSION = "alice-7d1e"
COOKIE = f"session={SESSION}"
#: What the member and cart services know: session -> user.
SESSIONS = {SESSION: USER}

#: The canary ("gray" release) tag: the ``x-gray`` header routes a request to
#: the canary version of every service it reaches.
CANARY = "canary"

ORDER_ID = "o-1001"

#: Seconds: the order page's default timeout, given at the door
#: (``RelayMiddleware(app, timeout=BUDGET)``, as Spring's ``setDefaultTimeout``
#: gives async requests one), and the part of it the handler keeps to answer:
#: its lookups get the rest.  Generous enough that a busy machine still
#: answers the relayed page in time; the cart is slower by far.
BUDGET = 1.0
RENDER_RESERVE = 0.4
#: Seconds the deliberately slow cart service works on a call, unless its
#: caller hangs up first.
SLOW_CART = 2.0
#: The header that carries the time left to the services called, in
#: milliseconds (ctxrelay's default ``Policy.deadline_header``).
DEADLINE_HEADER = "x-request-timeout-ms"


def new_request_id() -> str:
    """A fresh request id for one walk, so the two walks cannot be confused."""
    return f"req-{secrets.token_hex(3)}"


def browser_headers(request_id: str) -> dict[str, str]:
    """What the browser sends with ``GET /order/confirm``."""
    return {"cookie": COOKIE, "x-request-id": request_id, "x-gray": CANARY}


def policy() -> ctxrelay.Policy:
    """The shop's relay policy: the one thing a ctxrelay user must decide.

    The order service keeps the inbound ``cookie`` and ``x-gray`` headers as
    context fields.  The cookie is a credential: it is sent only where a route
    names it -- here the member and cart services on 127.0.0.1 -- and never
    written into a broker (the in-house route leaves credentials out), so the
    Celery task gets the request id, the user and the canary tag, not the
    session.
    """
    internal = ctxrelay.Policy.Route(hosts=("127.0.0.1",), sensitive={"cookie"})
    return ctxrelay.Policy(capture={"cookie", "x-gray"}, routes=(internal,))
