"""The seed-000 walk-through: an order page fans out to a thread pool.

Run it with ``make demo`` or ``python -m ctxrelay.demo``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass

import ctxrelay

__all__ = ["Hop", "confirm_order", "main"]


@dataclass(frozen=True)
class Hop:
    """What one piece of work saw of the request."""

    task: str
    thread: str
    request_id: str | None
    user: str | None
    canary: str | None

    @property
    def complete(self) -> bool:
        return None not in (self.request_id, self.user, self.canary)


def _lookup(task: str) -> Hop:
    # A "remote call" needs the user and the canary tag of the request it
    # serves -- seed 000's Feign call needed the user's cookie.
    return Hop(
        task=task,
        thread=threading.current_thread().name,
        request_id=ctxrelay.request_id(),
        user=ctxrelay.get("user"),
        canary=ctxrelay.get("x-gray"),
    )


def confirm_order(
    pool: concurrent.futures.Executor, thread_cls: type[threading.Thread] = threading.Thread
) -> list[Hop]:
    """Seed 000's ``confirmOrder``: two lookups in parallel, then wait for both."""
    addresses = pool.submit(_lookup, "address lookup")
    cart = pool.submit(_lookup, "cart lookup")
    audit: list[Hop] = []
    # Seed 002: an audit that runs on its own thread.
    thread = thread_cls(target=lambda: audit.append(_lookup("audit thread")))
    thread.start()
    thread.join()
    return [addresses.result(), cart.result(), *audit]


def _run(
    title: str,
    make_pool: Callable[[], concurrent.futures.Executor],
    thread_cls: type[threading.Thread] = threading.Thread,
) -> list[Hop]:
    fields = {"request_id": "req-7f3a", "user": "alice", "x-gray": "canary"}
    with make_pool() as pool, ctxrelay.bind(fields):
        hops = [_lookup("request handler"), *confirm_order(pool, thread_cls)]
    print(f"\n{title}")
    print(f"  {'task':<16} {'thread':<26} {'request_id':<11} {'user':<6} {'canary':<7}")
    for hop in hops:
        mark = "ok" if hop.complete else "LOST"
        print(
            f"  {hop.task:<16} {hop.thread:<26} {hop.request_id or '-':<11} "
            f"{hop.user or '-':<6} {hop.canary or '-':<7} {mark}"
        )
    return hops


def main() -> int:
    """Run the demo; exit status 0 only if every relayed hop saw its request."""
    print("ctxrelay demo: seed 000's order page fans out two lookups on a thread pool,")
    print("plus an audit thread; request req-7f3a, user alice, canary tag x-gray=canary.")
    _run(
        "1. without ctxrelay: plain ThreadPoolExecutor and Thread",
        lambda: concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="plain"),
    )
    ctxrelay.instrument()
    try:
        relayed = _run(
            "2. the same unchanged code, after ctxrelay.instrument()",
            lambda: concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="instrumented"),
        )
    finally:
        ctxrelay.uninstrument()
    explicit = _run(
        "3. explicit drop-ins: ctxrelay.ThreadPoolExecutor and ctxrelay.Thread",
        lambda: ctxrelay.ThreadPoolExecutor(2, thread_name_prefix="ctxrelay"),
        ctxrelay.Thread,
    )
    ok = all(hop.complete for hop in [*relayed, *explicit])
    print(
        "\nrelayed: every hop saw its request" if ok else "\nFAILED: a relayed hop lost the request"
    )
    return 0 if ok else 1
