"""The demo itself: start the shop, walk the request twice, report.

Imported by :mod:`ctxrelay.demo` only when the demo runs, since it needs the
``demo`` extra's packages (FastAPI, uvicorn, httpx, Celery).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ctxrelay
from ctxrelay.integrations import celery as celery_relay

from .hops import CART_HOP, Hop, logging_to_recorder
from .report import INTRO, CartWork, Result, Walk, as_json, as_text, problems
from .services import (
    WAIT,
    CartCall,
    CartLedger,
    OrderService,
    browse,
    cart_app,
    member_app,
    serve,
)
from .shop import new_request_id, policy
from .tasks import (
    TASK,
    BrokerUnreachable,
    UnsupportedBroker,
    Worker,
    backend_for,
    collect,
    embedded_worker,
    make_app,
    shown,
    worker_process,
)

__all__ = ["main", "run", "running"]


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print the report; 0 only if the relayed walk is fully
    correct, 1 if it is not, 2 if ``--broker`` cannot be reached.

    ``argv`` defaults to ``sys.argv[1:]``: call ``main([])`` from Python."""
    args = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        backend_for(args.broker)  # an unsupported broker is said before anything starts
    except UnsupportedBroker as exc:
        print(f"ctxrelay demo: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(INTRO, flush=True)  # something to read while the services start
    try:
        with running(broker=args.broker) as result:
            # Printed before the teardown: stopping the embedded worker takes seconds.
            print(as_json(result) if args.json else as_text(result), flush=True)
    except (BrokerUnreachable, UnsupportedBroker) as exc:
        print(f"ctxrelay demo: {exc}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctxrelay.demo",
        description="The order-confirmation page, walked without and with the relay.",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="a real Celery broker, redis://... or amqp://..., served by a worker process; "
        "default: Celery's in-memory broker and a worker thread in this process",
    )
    return parser.parse_args(argv)


def run(broker: str | None = None) -> Result:
    """Start everything, walk the request without and with the relay, stop everything."""
    with running(broker) as result:
        return result


@contextmanager
def running(broker: str | None = None) -> Iterator[Result]:
    """Start everything, walk the request without and with the relay, yield the
    result; everything is stopped when the block ends."""
    queue = f"ctxrelay-demo-{uuid.uuid4().hex[:8]}"
    app = make_app(broker, queue)
    ledger = CartLedger()
    previous = ctxrelay.configure(policy())
    try:
        with (
            logging_to_recorder(),
            _worker(app, broker, queue) as worker,
            serve(member_app(), "member") as member,
            serve(cart_app(ledger), "cart") as cart,
        ):
            shop = _Shop(member, cart, ledger, app, worker, time.monotonic())
            walks = tuple(_walk(relay, shop) for relay in (False, True))
            yield Result(os.getpid(), shown(app), worker.description, walks)
    finally:
        ctxrelay.configure(previous)


def _worker(app: Any, broker: str | None, queue: str) -> Any:
    return embedded_worker(app) if broker is None else worker_process(app, queue)


@contextmanager
def _celery_relay(app: Any, relay: bool) -> Iterator[None]:
    """The Celery switch.  With the embedded worker, the signals it connects
    serve the worker thread too; a worker process has its own (always on)."""
    if not relay:
        yield
        return
    celery_relay.install(app)
    try:
        yield
    finally:
        celery_relay.uninstall(app)


@dataclasses.dataclass(frozen=True)
class _Shop:
    """What every walk uses: the member and cart services (and the cart's
    account of its calls), the Celery app and its worker, and when the demo
    started walking."""

    member: str
    cart: str
    ledger: CartLedger
    app: Any
    worker: Worker
    origin: float


def _walk(relay: bool, shop: _Shop) -> Walk:
    """One request through the shop: the browser's call, then every hop's report.

    Nothing of a walk outlives it: before it returns, the handler has ended
    (without the relay it runs on after the door's 504, waiting for the slow
    cart), the audit thread has been joined, the cart has stopped working on
    the walk's call, the mail task has reported and its result is gone, and
    the order service is stopped.  So the next walk starts on a quiet shop."""
    request_id = new_request_id()
    service = OrderService(
        relay=relay, member=shop.member, cart=shop.cart, confirmation=shop.app.tasks[TASK]
    )
    began = time.monotonic()
    reports: tuple[dict[str, Any], ...] = ()
    try:
        with (
            _celery_relay(shop.app, relay),
            _strict_audit(not relay),
            serve(service.app(), "order") as order,
        ):
            sent = time.monotonic()
            response = browse(order, request_id)
            answered = time.monotonic()
            service.response_sent.set()  # the audit thread reads the request after this
            hops = service.hops()  # the handler has ended, the audit thread is joined
            shop.ledger.wait_idle(WAIT)  # the cart works on nothing of this walk
            mail = _mail_hop(service.published, shop.worker)
            if not relay:
                reports = tuple(r for r in ctxrelay.strict_reports() if r["kind"] == "lost-context")
    finally:
        service.close()
    ended = time.monotonic()
    if mail is not None:
        hops[mail.name] = mail
    cart = None
    calls = shop.ledger.since(began)
    if len(calls) == 1 and calls[0].ended is not None:
        cart = _cart_work(calls[0], answered, shop.origin)
        hops = _cart_arrivals(hops, calls[0])
    status, echoed = response.status_code, response.headers.get("x-request-id")
    return Walk(
        relay=relay,
        request_id=request_id,
        status=status,
        echoed_request_id=echoed,
        hops=hops,
        seconds=ended - began,
        problems=problems(request_id, status, echoed, hops, cart),
        strict=reports,
        page=_page(response),
        answered_in=answered - sent,
        cart=cart,
        began=began - shop.origin,
        ended=ended - shop.origin,
    )


def _cart_work(call: CartCall, answered: float, origin: float) -> CartWork:
    ended = call.ended if call.ended is not None else call.started
    return CartWork(
        seconds=ended - call.started,
        after_answer=max(0.0, ended - answered),
        finished=call.finished,
        began=call.started - origin,
        ended=ended - origin,
    )


def _cart_arrivals(hops: dict[str, Hop], call: CartCall) -> dict[str, Hop]:
    """A cart call cut at the deadline heard nothing back: what arrived at
    the cart comes from the cart's own account."""
    hop = hops.get(CART_HOP)
    if hop is None or not hop.cut:
        return hops
    arrived = call.arrived
    return {
        **hops,
        CART_HOP: dataclasses.replace(
            hop,
            cookie=arrived.get("cookie") is True,
            canary=arrived.get("canary"),
            arrived_request_id=arrived.get("request_id"),
            arrived_deadline_ms=arrived.get("deadline_ms"),
        ),
    }


def _page(response: Any) -> str:
    """What the user saw, in a few words."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if status == 200 and isinstance(body, dict):
        parts = [str(status)]
        for name in ("addresses", "items"):
            found = body.get(name)
            parts.append(f"{name}: {len(found)}" if isinstance(found, list) else f"{name}: {found}")
        return ", ".join(parts)
    return f"{status} {' '.join(response.text.split())[:120]}"


@contextmanager
def _strict_audit(on: bool) -> Iterator[None]:
    """With the relay off, strict mode watches (``instrument(relay=False)``:
    observe only) and names each hand-off whose work then logs without the
    request's context -- the line a team must change."""
    if not on:
        yield
        return
    ctxrelay.strict_reports(clear=True)
    ctxrelay.strict()
    ctxrelay.instrument(relay=False)
    try:
        yield
    finally:
        ctxrelay.uninstrument()
        ctxrelay.strict(False)


def _mail_hop(published: Any, worker: Worker) -> Hop | None:
    """The hop the Celery task reported through the result backend."""
    if published is None:
        return None
    try:
        return Hop.from_dict(collect(published, WAIT))
    except Exception as exc:  # the report says "never reported"; say why here
        print(f"ctxrelay demo: the Celery task did not report: {exc!r}", file=sys.stderr)
        output = worker.output()
        if output:
            print(f"worker output:\n{output[-4000:]}", file=sys.stderr)
        return None
