"""The demo itself: start the shop, walk the request twice, report.

Imported by :mod:`ctxrelay.demo` only when the demo runs, since it needs the
``demo`` extra's packages (FastAPI, uvicorn, httpx, Celery).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ctxrelay
from ctxrelay.integrations import celery as celery_relay

from .hops import Hop, logging_to_recorder
from .report import INTRO, Result, Walk, as_json, as_text, problems
from .services import WAIT, OrderService, browse, cart_app, member_app, serve
from .shop import new_request_id, policy
from .tasks import (
    TASK,
    BrokerUnreachable,
    UnsupportedBroker,
    Worker,
    backend_for,
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
    previous = ctxrelay.configure(policy())
    try:
        with (
            logging_to_recorder(),
            _worker(app, broker, queue) as worker,
            serve(member_app(), "member") as member,
            serve(cart_app(), "cart") as cart,
        ):
            walks = tuple(_walk(relay, member, cart, app, worker) for relay in (False, True))
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


def _walk(relay: bool, member: str, cart: str, app: Any, worker: Worker) -> Walk:
    """One request through the shop: the browser's call, then every hop's report."""
    request_id = new_request_id()
    service = OrderService(relay=relay, member=member, cart=cart, confirmation=app.tasks[TASK])
    started = time.monotonic()
    reports: tuple[dict[str, Any], ...] = ()
    try:
        with (
            _celery_relay(app, relay),
            _strict_audit(not relay),
            serve(service.app(), "order") as order,
        ):
            response = browse(order, request_id)
            service.response_sent.set()  # the audit thread reads the request after this
            hops = service.hops()
            mail = _mail_hop(service.published, worker)
            if not relay:
                reports = tuple(r for r in ctxrelay.strict_reports() if r["kind"] == "lost-context")
    finally:
        service.close()
    if mail is not None:
        hops[mail.name] = mail
    status, echoed = response.status_code, response.headers.get("x-request-id")
    return Walk(
        relay=relay,
        request_id=request_id,
        status=status,
        echoed_request_id=echoed,
        hops=hops,
        seconds=time.monotonic() - started,
        problems=problems(request_id, status, echoed, hops),
        strict=reports,
    )


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
        reported = published.get(timeout=WAIT, interval=0.02)
        # A real result backend keeps it otherwise.  RPC results are consumed
        # by get(); Celery before 5.4 raises NotImplementedError for them.
        with contextlib.suppress(NotImplementedError):
            published.forget()
        return Hop.from_dict(reported)
    except Exception as exc:  # the report says "never reported"; say why here
        print(f"ctxrelay demo: the Celery task did not report: {exc!r}", file=sys.stderr)
        output = worker.output()
        if output:
            print(f"worker output:\n{output[-4000:]}", file=sys.stderr)
        return None
