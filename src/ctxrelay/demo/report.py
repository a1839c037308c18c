"""What "correct" means for a walk, and the report: a table for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctxrelay import Policy

from .hops import AUDIT, CELERY, HANDLER, HANDLER_HOP, HOPS, HTTP, Hop
from .shop import CANARY, USER

__all__ = ["INTRO", "Problem", "Result", "Walk", "as_json", "as_text", "problems"]

#: What is wrong, and where: ``("cart items", "canary tag lost")``.
Problem = tuple[str, str]


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

    @property
    def correct(self) -> bool:
        """Every hop saw the whole request, and nothing more."""
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
    request_id: str, status: int, echoed: str | None, hops: Mapping[str, Hop]
) -> tuple[Problem, ...]:
    """Everything that differs from a fully relayed request."""
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
    return tuple(found)


def _hop_problems(hop: Hop, request_id: str, home: Hop | None) -> list[str]:
    found = []
    if hop.request_id != request_id:
        found.append("request id lost" if hop.request_id is None else "another request's id")
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
    """A call: the other service answered 200, and the request id reached it."""
    found = []
    if hop.status != 200:
        found.append(f"answered {hop.status}")
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
        "correct": walk.correct,
        "problems": [{"hop": hop, "problem": what} for hop, what in walk.problems],
        "strict_mode": list(walk.strict),
        "hops": [walk.hops[name].to_dict() for name in HOPS if name in walk.hops],
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

INTRO = """\
ctxrelay demo: the order-confirmation page, walked twice.

The browser sends one request: GET /order/confirm with its session cookie,
a request id and the canary tag x-gray: canary.  The order service (FastAPI)
asks the member service who is logged in, on the request thread; fans out to
member (addresses) and cart (items) on a thread pool and waits for both;
starts an audit thread that reads the request after the response; publishes
a Celery task that mails the confirmation.  Member and cart answer 401
without the cookie; cart has a canary assortment.

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
not get it -- the policy keeps credentials out of the broker.  Under each hop,
the line it logged, as the log file has it."""


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


def _verdict(walk: Walk) -> list[str]:
    if walk.correct:
        return [f"relay on: every hop saw the whole request ({walk.seconds:.1f} s)."]
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
    for walk in result.walks:
        lines += _verdict(walk)
    lines.append("")
    if result.ok:
        lines.append("OK: with ctxrelay every hop saw its request (exit status 0).")
    else:
        lines.append("FAILED: the relayed walk is not fully correct (exit status 1).")
    return "\n".join(lines)
