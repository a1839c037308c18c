"""What "correct" means for a walk, and the report: a table for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctxrelay import Policy

from .hops import AUDIT, CART_HOP, CELERY, HANDLER, HANDLER_HOP, HOPS, HTTP, Hop
from .shop import BUDGET, CANARY, DEADLINE_HEADER, RENDER_RESERVE, SLOW_CART, USER

__all__ = ["INTRO", "CartWork", "Problem", "Result", "Walk", "as_json", "as_text", "problems"]

#: What is wrong, and where: ``("cart items", "canary tag lost")``.
Problem = tuple[str, str]


@dataclass(frozen=True)
class CartWork:
    """How long the slow cart worked on a walk's call, in its own account."""

    #: Seconds it worked on the call; of those, how many after the user had
    #: the answer.
    seconds: float
    after_answer: float
    #: It worked its full ``SLOW_CART`` seconds; ``False``: it stopped when
    #: its caller hung up.
    finished: bool
    #: When the call arrived at the cart and when the cart stopped working on
    #: it, in seconds since the demo started walking.
    began: float
    ended: float


@dataclass(frozen=True)
class Walk:
    """One request through the shop, with the relay off or on."""

    relay: bool
    request_id: str
    #: The order page's status and the request id it echoed.
    status: int
    echoed_request_id: str | None
    hops: Mapping[str, Hop]
    seconds: float
    #: ``(hop, what is wrong)`` pairs; none when the walk is fully relayed.
    problems: tuple[Problem, ...] = field(default=())
    #: What strict mode said during the walk with the relay off (observe-only
    #: ``instrument(relay=False)``): the hand-off each lost hop must change.
    strict: tuple[dict[str, Any], ...] = field(default=())
    #: What the user saw, in a few words, and after how many seconds.
    page: str = ""
    answered_in: float = 0.0
    #: How long the slow cart worked on this walk's call.
    cart: CartWork | None = None
    #: When the walk began and when all of its work had ended, in seconds
    #: since the demo started walking: a walk's work never overlaps the next.
    began: float = 0.0
    ended: float = 0.0

    @property
    def correct(self) -> bool:
        """Every hop saw the whole request, and nothing more; the slow cart
        was cut at the deadline and stopped, and the page answered in time."""
        return not self.problems


@dataclass(frozen=True)
class Result:
    """Both walks, and where they ran."""

    pid: int
    broker: str
    worker: str
    walks: tuple[Walk, ...]

    @property
    def ok(self) -> bool:
        """The demo's verdict: the relayed walk is fully correct."""
        return all(walk.correct for walk in self.walks if walk.relay)


def problems(
    request_id: str,
    status: int,
    echoed: str | None,
    hops: Mapping[str, Hop],
    cart: CartWork | None = None,
) -> tuple[Problem, ...]:
    """Everything that differs from a fully relayed request -- which, with
    the deliberately slow cart, includes its call cut at the deadline and
    the cart then stopping (``cart``: its account, when known)."""
    found: list[Problem] = []
    if status != 200:
        found.append(("order page", f"answered {status}"))
    if echoed != request_id:
        found.append(("order page", f"echoed request id {echoed!r}"))
    home = hops.get(HANDLER_HOP)
    for name in HOPS:
        hop = hops.get(name)
        if hop is None:
            found.append((name, "never reported"))
            continue
        found.extend((name, what) for what in _hop_problems(hop, request_id, home))
    if cart is not None and cart.finished:
        found.append((CART_HOP, f"the cart worked {cart.after_answer:.1f} s past the answer"))
    return tuple(found)


def _hop_problems(hop: Hop, request_id: str, home: Hop | None) -> list[str]:
    found = []
    if hop.request_id != request_id:
        # A job that arrives without a context runs with a fresh id of its
        # own (the worker's); it is still not this request's.
        found.append("request id lost" if hop.request_id is None else "not this request's id")
    if hop.user != USER:
        found.append("user lost" if hop.user is None else f"wrong user {hop.user!r}")
    if hop.kind == CELERY and hop.cookie:
        found.append("session cookie written into the broker")
    elif hop.kind != CELERY and not hop.cookie:
        found.append("session cookie lost")
    if hop.canary != CANARY:
        found.append("canary tag lost")
    if hop.kind in (HANDLER, HTTP):
        found.extend(_call_problems(hop, request_id))
    if hop.kind == HTTP and hop.deadline_ms is None:
        found.append("no deadline where it ran")
    if hop.kind in (AUDIT, CELERY) and hop.deadline_ms is not None:
        # It must outlive the request: started under without_deadline().
        found.append("holds the request's deadline")
    if hop.kind == AUDIT and not hop.after_response:
        found.append("did not run after the response")
    if f"[{request_id} {USER}]" not in hop.log_line:
        found.append("log line without the request id and user")
    if (
        hop.kind != HANDLER
        and home is not None
        and (hop.pid, hop.thread) == (home.pid, home.thread)
    ):
        found.append("never left the request thread")
    return found


def _call_problems(hop: Hop, request_id: str) -> list[str]:
    """A call: the other service answered 200 -- the slow cart: the call was
    cut at the deadline -- and the request id and the time left reached it."""
    found = []
    if hop.name == CART_HOP and not hop.cut:
        found.append("ran past the deadline")
    elif hop.name != CART_HOP and hop.cut:
        found.append("cut at the deadline")
    if not hop.cut and hop.status != 200:
        found.append(f"answered {hop.status}")
    if hop.arrived_deadline_ms is None:
        found.append("deadline did not arrive")
    # The id in the calling thread's context proves nothing about the wire:
    # the other service must say it received it.
    if hop.arrived_request_id != request_id:
        arrived = hop.arrived_request_id
        found.append("request id did not arrive" if arrived is None else "wrong request id arrived")
    return found


# -- JSON --------------------------------------------------------------------


def _walk_dict(walk: Walk) -> dict[str, Any]:
    return {
        "relay": walk.relay,
        "request_id": walk.request_id,
        "status": walk.status,
        "echoed_request_id": walk.echoed_request_id,
        "seconds": round(walk.seconds, 3),
        "page": walk.page,
        "answered_in": round(walk.answered_in, 3),
        "cart": None if walk.cart is None else _cart_dict(walk.cart),
        "began": round(walk.began, 3),
        "ended": round(walk.ended, 3),
        "correct": walk.correct,
        "problems": [{"hop": hop, "problem": what} for hop, what in walk.problems],
        "strict_mode": list(walk.strict),
        "hops": [walk.hops[name].to_dict() for name in HOPS if name in walk.hops],
    }


def _cart_dict(cart: CartWork) -> dict[str, Any]:
    return {
        "seconds": round(cart.seconds, 3),
        "after_answer": round(cart.after_answer, 3),
        "finished": cart.finished,
        "began": round(cart.began, 3),
        "ended": round(cart.ended, 3),
    }


def as_json(result: Result) -> str:
    """The result for machines: ``ok``, where things ran, and both walks hop by hop."""
    document = {
        "ok": result.ok,
        "pid": result.pid,
        "broker": result.broker,
        "worker": result.worker,
        # What the browser sent (besides each walk's request id); the cookie masked.
        "sent": {"user": USER, "cookie": f"session={Policy.MASK}", "x-gray": CANARY},
        # Seconds: the order page's default timeout, and the slow cart's work.
        "budget": BUDGET,
        "slow_cart": SLOW_CART,
        "walks": [_walk_dict(walk) for walk in result.walks],
    }
    return json.dumps(document, indent=2)


# -- text --------------------------------------------------------------------

_COLUMNS = (
    ("hop", 20),
    ("walk", 5),
    ("runs on", 22),
    ("request id", 12),
    ("arrived", 12),
    ("user", 6),
)
_MORE = (("cookie", 9), ("canary", 7), ("result", 0))

INTRO = f"""\
ctxrelay demo: the order-confirmation page, walked twice.

The browser sends one request: GET /order/confirm with its session cookie,
a request id and the canary tag x-gray: canary.  The order service (FastAPI)
asks the member service who is logged in, on the request thread; fans out to
member (addresses) and cart (items) on a thread pool and waits for both;
starts an audit thread that reads the request after the response; publishes
a Celery task that mails the confirmation.  Member and cart answer 401
without the cookie; cart has a canary assortment.

The order page has a default timeout of {BUDGET:g} s, RelayMiddleware(app,
timeout={BUDGET:g}); the lookups get it less {RENDER_RESERVE:g} s kept to answer.  The cart
is deliberately slow: it works {SLOW_CART:g} s on a call, unless the caller hangs up.

Both walks: ctxrelay's RelayMiddleware at the door, its httpx hook on the
outgoing calls, its ContextFilter on the log handler -- the request thread
has the context either way, as Spring's RequestContextHolder did.
  relay off: concurrent.futures.ThreadPoolExecutor, threading.Thread, Celery as is
  relay on:  ctxrelay.ThreadPoolExecutor, ctxrelay.Thread,
             ctxrelay.integrations.celery.install(app)"""


_LEGEND = """\
Each hop is what the code saw where it ran.  LOST: it did not get it; a value
ending in "!" belongs to another request.  arrived: for a call, the request id
the other service received (n/a: not a call).  cookie: did the user's session
cookie reach it (for a call: arrive at the other service); the mail task must
not get it -- the policy keeps credentials out of the broker.  result: for a
call, also how long it took.  Under each hop, the line it logged, as the log
file has it."""


def _label(walk: Walk) -> str:
    return "on" if walk.relay else "off"


def _cell(value: str | None, width: int) -> str:
    text = "LOST" if value is None else value
    return text if width == 0 else f"{text[: width - 1]:<{width}}"


def _seen(value: str | None, want: str) -> str | None:
    return value if value is None or value == want else f"{value}!"


def _cookie(hop: Hop) -> str:
    if hop.kind == CELERY:
        return "LEAKED" if hop.cookie else "not sent"
    return "yes" if hop.cookie else "LOST"


def _arrived(hop: Hop, walk: Walk) -> str | None:
    if hop.kind not in (HANDLER, HTTP):
        return "n/a"
    return _seen(hop.arrived_request_id, walk.request_id)


def _row(hop: Hop, walk: Walk, pid: int) -> str:
    where = hop.thread if hop.pid == pid else f"pid {hop.pid} {hop.thread}"
    cells = (
        (hop.name, 20),
        (_label(walk), 5),
        (where, 22),
        (_seen(hop.request_id, walk.request_id), 12),
        (_arrived(hop, walk), 12),
        (_seen(hop.user, USER), 6),
        (_cookie(hop), 9),
        (_seen(hop.canary, CANARY), 7),
        (hop.result, 0),
    )
    return "".join(_cell(value, width) for value, width in cells)


def _hop_lines(name: str, walks: Sequence[Walk], pid: int) -> list[str]:
    rows: list[str] = []
    logs: list[str] = []
    for walk in walks:
        hop = walk.hops.get(name)
        label = _label(walk)
        if hop is None:
            rows.append(f"{name if not rows else '':<20}{label:<5}never reported")
            continue
        row = _row(hop, walk, pid)
        rows.append(row if not rows else " " * 20 + row[20:])
        logs.append(f"    log {label + ':':<4} {hop.log_line or '(no line)'}")
    return rows + logs


def _deadline_lines(result: Result) -> list[str]:
    """What the user saw, and how long the slow cart kept working, per walk."""
    lines = [
        f"The deadline: the order page has {BUDGET:g} s, the cart works {SLOW_CART:g} s on a call.",
    ]
    for walk in result.walks:
        label = f"relay {_label(walk)}:"
        lines.append(f"  {label:<11}after {walk.answered_in:.2f} s the user saw: {walk.page}")
        lines.append(f"  {'':<11}{_cart_line(walk)}")
    return lines


def _cart_line(walk: Walk) -> str:
    cart = walk.cart
    if cart is None:
        return "the cart did not report its work"
    worked = f"the cart worked {cart.seconds:.2f} s on the call"
    if cart.finished:
        return f"{worked}, its full time: {cart.after_answer:.2f} s after the user had the answer"
    hop = walk.hops.get(CART_HOP)
    arrived = None if hop is None else hop.arrived_deadline_ms
    header = "" if arrived is None else f" ({DEADLINE_HEADER}: {arrived} had arrived)"
    return f"{worked}, then stopped: its caller hung up at the deadline{header}"


def _verdict(walk: Walk) -> list[str]:
    if walk.correct:
        return [
            f"relay on: every hop saw the whole request, and the slow cart was cut at"
            f" the deadline ({walk.seconds:.1f} s)."
        ]
    title = "relay on" if walk.relay else "relay off -- the context lost"
    lines = [f"{title}: {len(walk.problems)} problems ({walk.seconds:.1f} s):"]
    grouped: dict[str, list[str]] = {}
    for hop, what in walk.problems:
        grouped.setdefault(hop, []).append(what)
    lines.extend(f"  {hop}: {', '.join(whats)}" for hop, whats in grouped.items())
    if walk.strict:
        lines.append("  strict mode names the hand-offs to fix (ctxrelay.strict(), observe only):")
        seen: set[str] = set()
        for report in walk.strict:  # one line per hand-off: the place to change
            handoff = f"{_short(report['handoff_file'])}:{report['handoff_line']}"
            if handoff in seen:
                continue
            seen.add(handoff)
            used = f"{_short(report['used_file'])}:{report['used_line']}"
            lines.append(
                f"    {report['kind']}: handed off at {handoff} (in "
                f"{report['handoff_function']}); the work ran with no context (at {used})"
            )
    return lines


def _short(path: str) -> str:
    # ".../ctxrelay/demo/services.py" -> "demo/services.py": the reader's view.
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def as_text(result: Result) -> str:
    """The report for people (after :data:`INTRO`): both walks hop by hop, side
    by side, then the verdict."""
    ids = ", ".join(f"relay {_label(walk)} {walk.request_id}" for walk in result.walks)
    lines = [
        "",
        f"Request ids: {ids}.",
        f"Celery: {result.worker}.",
        f"Everything else runs in this process, pid {result.pid}.",
        "",
        _LEGEND,
        "",
    ]
    header = "".join(f"{title:<{width}}" if width else title for title, width in _COLUMNS + _MORE)
    lines += [header, "-" * len(header)]
    for name in HOPS:
        lines += _hop_lines(name, result.walks, result.pid)
    lines.append("")
    lines += _deadline_lines(result)
    lines.append("")
    for walk in result.walks:
        lines += _verdict(walk)
    lines.append("")
    if result.ok:
        lines.append(
            "OK: with ctxrelay every hop saw its request, and its deadline (exit status 0)."
        )
    else:
        lines.append("FAILED: the relayed walk is not fully correct (exit status 1).")
    return "\n".join(lines)
