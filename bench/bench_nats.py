"""What carrying the context through NATS costs, side by side with bare nats-py.

On the nats-server at 127.0.0.1:4222, two measurements, each printed as a
Markdown table of medians:

1. **The relay's own work per message**, no server: building the outgoing
   headers at publish, and reading them back in the handler.
2. **Round trip** -- ``request()`` to a subscriber that handles the message
   and ``respond()``\\ s, one at a time: a bare pair of connections against
   relayed pairs (``install(nc)`` on both sides) with an empty context, with
   a three-field context, and with that context signed.  The relayed handler
   binds the message's context, the reply carries it back.  One more bare
   pair sends the headers the relay writes for three fields, by hand: what
   headers cost nats-py itself (``respond()`` echoes them back).

Variants run interleaved, in an order rotated every repetition, so drift on
a shared machine hits all of them alike; ratios are medians of
per-repetition ratios.

Run: ``python bench/bench_nats.py`` (about half a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

import ctxrelay
from ctxrelay.integrations import nats as relay_nats
from harness import markdown_table, rotations

URL = "nats://127.0.0.1:4222"
SECRET = "ctxrelay-bench-secret-0123456789"
THREE = {"request_id": uuid.uuid4().hex, "tenant": "acme", "user": "ada"}


def _table(title: str, samples: dict[str, list[float]], baseline: str) -> str:
    base = samples[baseline]
    rows = []
    for name, values in samples.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        rows.append([name, f"{statistics.median(values) * 1e6:.1f} µs", f"{ratio:.2f}x"])
    return f"### {title}\n\n" + markdown_table(["variant", "median per call", "vs bare"], rows)


# -- the relay's own work ----------------------------------------------------------
def bench_own_work(number: int) -> str:
    """Publish-side and handle-side work per message, no server."""
    from ctxrelay._carrier import Signer

    outgoing: Any = vars(relay_nats)["_outgoing"]  # the module's own steps, timed alone
    context: Any = vars(relay_nats)["_context"]
    signer = Signer(SECRET)
    payload = b"o-1001"
    subject = "orders.new"

    class Message:  # what the handler side reads of a nats-py Msg
        def __init__(self, headers: Any) -> None:
            self.subject, self.data, self.headers = subject, payload, headers

    with ctxrelay.bind(**THREE):
        plain = Message(outgoing(subject, payload, None, None))
        signed = Message(outgoing(subject, payload, None, signer))
    bare = Message(None)
    outside: dict[str, Callable[[], Any]] = {
        "publish, empty context": lambda: outgoing(subject, payload, None, None),
        "handle, no carrier": lambda: context(bare, None),
        "handle, 3 fields": lambda: context(plain, None),
        "handle, 3 fields, verified": lambda: context(signed, signer),
    }
    inside: dict[str, Callable[[], Any]] = {
        "publish, 3 fields": lambda: outgoing(subject, payload, None, None),
        "publish, 3 fields, signed": lambda: outgoing(subject, payload, None, signer),
    }
    timed = {name: min(_timed(step, number) for _ in range(5)) for name, step in outside.items()}
    with ctxrelay.bind(**THREE):
        for name, step in inside.items():
            timed[name] = min(_timed(step, number) for _ in range(5))
    rows = [[name, f"{seconds * 1e6:.2f} µs"] for name, seconds in timed.items()]
    return "### The relay's own work per message (no server, best of 5)\n\n" + markdown_table(
        ["step", "per call"], rows
    )


def _timed(step: Callable[[], Any], number: int) -> float:
    start = perf_counter()
    for _ in range(number):
        step()
    return (perf_counter() - start) / number


# -- round trip --------------------------------------------------------------------
async def _pair(relay: bool, secret: str | None) -> tuple[Client, Client, str]:
    """(requester, responder, subject) with a responder subscribed."""
    requester = await nats.connect(URL)
    responder = await nats.connect(URL)
    if relay:
        relay_nats.install(requester, secret=secret)
        relay_nats.install(responder, secret=secret)
    subject = f"ctxrelay.bench.{uuid.uuid4().hex[:10]}"

    async def respond(msg: Msg) -> None:
        await msg.respond(msg.data)

    await responder.subscribe(subject, cb=respond)
    await responder.flush()
    return requester, responder, subject


async def bench_round_trip(calls: int, repetitions: int) -> str:
    """``request()`` -> handler -> ``respond()``, bare against relayed."""
    variants: dict[str, tuple[bool, str | None, dict[str, str]]] = {
        "bare nats-py": (False, None, {}),
        "bare, the same headers by hand": (False, None, {}),
        "relay, empty context": (True, None, {}),
        "relay, 3 fields": (True, None, THREE),
        "relay, 3 fields, signed": (True, SECRET, THREE),
    }
    pairs = {name: await _pair(relay, secret) for name, (relay, secret, _) in variants.items()}
    try:
        outgoing: Any = vars(relay_nats)["_outgoing"]
        with ctxrelay.bind(**THREE):  # what the relay writes for 3 fields, written by hand
            by_hand = outgoing("x", b"o-1001", None, None)

        def sample(name: str) -> Callable[[], Awaitable[float]]:
            requester, _, subject = pairs[name]
            fields = variants[name][2]
            headers = by_hand if name == "bare, the same headers by hand" else None

            async def go() -> float:
                with ctxrelay.bind(**fields):
                    start = perf_counter()
                    for _ in range(calls):
                        await requester.request(subject, b"o-1001", timeout=10, headers=headers)
                    return (perf_counter() - start) / calls

            return go

        for name in variants:  # warm up every pair once
            await sample(name)()
        runs = {name: sample(name) for name in variants}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for order in rotations(list(variants), repetitions):
            for name in order:
                samples[name].append(await runs[name]())
    finally:
        for requester, responder, _ in pairs.values():
            await requester.close()
            await responder.close()
    return _table(
        f"Round trip (request -> handler -> respond, {calls} per sample)", samples, "bare nats-py"
    )


def _reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1.0):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Print both tables; ``--quick`` for a short run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    options = parser.parse_args(argv)
    if not _reachable():
        print("bench_nats: NATS is not running on 127.0.0.1:4222 (make services); skipped")
        return
    started = time.monotonic()
    print(bench_own_work(2000 if options.quick else 20000))
    print()
    reps = 5 if options.quick else 25
    print(asyncio.run(bench_round_trip(50 if options.quick else 200, reps)))
    print(f"\n({time.monotonic() - started:.0f} s; Python {sys.version.split()[0]}, ", end="")
    print(f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
