"""Sentry: every event and transaction carries its own request's fields, never a cookie.

The real SDK, with events captured through an in-process transport (as the
SDK's own tests do), from where an application's errors happen:

* a handler of a real ASGI app served by uvicorn, behind ctxrelay's
  ``RelayMiddleware`` and Sentry's ``SentryAsgiMiddleware`` (an unhandled
  exception, and the request's transaction);
* a ``ctxrelay.ThreadPoolExecutor`` task the handler hands work to;
* a real Celery worker process (prefork) running the task the handler
  publishes, with Sentry set up there as an application does (its default
  and auto-enabled integrations, Celery's among them);
* the child of a ``ctxrelay.ProcessPoolExecutor``.

Every request sends its own id, a user header and a session cookie, and the
policy captures both headers as fields, so the cookie is in every context:
each event must carry its own request's id and user, the cookie only as
``***``, and no request's cookie value anywhere in what the SDK would send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentry_sdk
from celery import Celery  # type: ignore[import-untyped]
from sentry_sdk.integrations.asgi import SentryAsgiMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.celery import uninstall
from ctxrelay.integrations.sentry import CONTEXT, SentryIntegration, stamp
from tests.brokers import REDIS_DATABASES, WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.celery_app import SECRET
from tests.integrations.sentry_capture import (
    CollectingTransport,
    DirectoryTransport,
    init_in_child,
    read_events,
    reset,
    sentry,
)
from tests.integrations.sentry_celery_app import FAIL, PING, POLICY, make_app
from tests.servers import CONNECTIONS, serve_asgi

#: This module's Redis database: the one tests/brokers.py lists for it, or,
#: until one is, test_logging_end_to_end.py's (14), claimed and emptied
#: through the same mechanism (the owner key: a database another live run
#: holds makes this test skip), with queues of its own.
DB = next((db for db, user in REDIS_DATABASES.items() if "test_sentry.py" in user), 14)
ROOT = Path(__file__).resolve().parent.parent.parent
RUN = uuid.uuid4().hex[:8]
REQUESTS = 60
TIMEOUT = 60.0
EVERY_COOKIE = re.compile(r"session-secret-")

Event = dict[str, Any]


def user_of(rid: str) -> str:
    return f"user-of-{rid}"


def cookie_of(rid: str) -> str:
    return f"session=session-secret-{rid}"


def failed_for(event: Event) -> str | None:
    """The request id an error event's exception names (put there as data)."""
    for value in (event.get("exception") or {}).get("values") or []:
        found = re.search(r"failed for (\S+)", value.get("value") or "")
        if found:
            return found[1]
    return None


def block(event: Event) -> dict[str, str]:
    return dict((event.get("contexts") or {}).get(CONTEXT) or {})


def tag(event: Event) -> str | None:
    tags = event.get("tags") or {}
    if isinstance(tags, list):  # the serializer may send tags as pairs
        tags = dict(tags)
    found: str | None = tags.get("request_id")
    return found


def no_cookie_anywhere(events: list[Event]) -> list[str]:
    """Events whose serialized form holds any request's cookie value."""
    return [json.dumps(e)[:300] for e in events if EVERY_COOKIE.search(json.dumps(e))]


# -- the web app ----------------------------------------------------------------------
def fail_in_pool(rid: str) -> None:
    try:
        raise ValueError(f"pool task failed for {rid}")
    except ValueError:
        sentry_sdk.capture_exception()


def make_web(pool: concurrent.futures.Executor, celery: Celery | None) -> Any:
    async def order(request: Request) -> Response:
        rid = request.headers["x-request-id"]  # the id sent, as data
        await asyncio.wrap_future(pool.submit(fail_in_pool, rid))
        if celery is not None:
            celery.signature(FAIL, (rid,)).delay()
        raise ValueError(f"handler failed for {rid}")

    app = Starlette(routes=[Route("/order", order)])
    # ctxrelay's door outermost: Sentry's middleware -- its transaction and
    # its capture of what escapes the handler -- runs inside the context.
    return RelayMiddleware(SentryAsgiMiddleware(app), log_errors=False)


def send(url: str, rids: list[str]) -> list[int]:
    """One request per id, all at once; each with its user and its cookie."""

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one(rid: str) -> int:
                headers = {"x-request-id": rid, "x-user": user_of(rid), "cookie": cookie_of(rid)}
                # A connection of its own: the server closes it after the app's exception.
                headers["connection"] = "close"
                return (await client.get("/order", headers=headers)).status_code

            return await asyncio.gather(*(one(rid) for rid in rids))

    return asyncio.run(main())


# -- a Celery worker with Sentry set up ---------------------------------------------------
class Worker:
    def __init__(self, app: Celery, process: WorkerProcess, events: Path) -> None:
        self.app = app
        self.process = process
        self.events = events


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    broker = need_redis(DB)
    tmp = tmp_path_factory.mktemp("sentry-celery")
    events = tmp / "events"
    events.mkdir()
    queue = f"ctxrelay-sentry-{RUN}"
    app = make_app(broker, queue, SECRET)
    args = ["celery", "-A", "tests.integrations.sentry_celery_app", "worker", "-P", "prefork"]
    args += ["-c", "2", "-Q", queue, "-n", f"sentry-{RUN}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_SENTRY_BROKER": broker, "CTXRELAY_SENTRY_QUEUE": queue}
    env |= {"CTXRELAY_SENTRY_EVENTS": str(events), "CTXRELAY_SENTRY_SECRET": SECRET}
    process = WorkerProcess(args, tmp / "worker.log", env).start()
    try:
        # Ready; published without a context, the job runs with a fresh id.
        assert isinstance(app.signature(PING).delay().get(timeout=TIMEOUT), str)
        yield Worker(app, process, events)
    finally:
        process.stop()
        uninstall(app)
        flush_redis(DB)


# -- handler, pool thread and Celery worker, 60 requests at once ------------------------
@pytest.mark.broker
def test_handler_pool_and_worker_events_carry_their_own_request_never_a_cookie(
    worker: Worker,
) -> None:
    ctxrelay.configure(POLICY)
    rids = [f"req-{uuid.uuid4().hex[:16]}" for _ in range(REQUESTS)]
    transport = CollectingTransport()
    with (
        sentry(transport),
        ctxrelay.ThreadPoolExecutor(8) as pool,
        serve_asgi(make_web(pool, worker.app)) as url,
    ):
        assert send(url, rids) == [500] * REQUESTS

        def worker_reported() -> bool:
            return len({failed_for(e) for e in read_events(worker.events)} - {None}) == REQUESTS

        wait_until(worker_reported, "the worker's error events", TIMEOUT)
    here = transport.events
    there = read_events(worker.events)
    assert no_cookie_anywhere(here + there) == []

    # Errors: the handler's and the pool task's here, the task's in the worker.
    errors = [e for e in here if e.get("type", "error") == "error"]
    by_place: dict[str, list[Event]] = {"handler": [], "pool task": [], "task": []}
    for event in errors + [e for e in there if e.get("type", "error") == "error"]:
        found = re.search(r"(handler|pool task|task) failed for", json.dumps(event))
        assert found is not None, json.dumps(event)[:500]
        by_place[found[1]].append(event)
    for place, events in by_place.items():
        assert sorted({failed_for(e) or "" for e in events}) == sorted(rids), place
        for event in events:
            rid = failed_for(event)
            assert rid is not None
            assert tag(event) == rid, place
            fields = block(event)
            assert fields.get("request_id") == rid, (place, fields)
            assert fields.get("x-user") == user_of(rid), (place, fields)
            if place != "task":  # the broker never carries the cookie (in-house route)
                assert fields["cookie"] == "***", place
            else:
                assert "cookie" not in fields

    # Transactions: one per request here (Sentry's ASGI middleware), one per
    # task there (Sentry's Celery integration); each request's own.
    for where, events in (("web", here), ("worker", there)):
        transactions = [e for e in events if e.get("type") == "transaction"]
        if where == "worker":
            transactions = [t for t in transactions if t.get("transaction") == FAIL]
        assert sorted(tag(t) or "" for t in transactions) == sorted(rids), where
        for transaction in transactions:
            rid = tag(transaction)
            assert rid is not None
            assert block(transaction)["x-user"] == user_of(rid), where


# -- the other places ------------------------------------------------------------------
def test_with_sentrys_default_integrations_fastapi_and_flask_errors_and_transactions(
    tmp_path: Path,
) -> None:
    # Sentry set up as its documentation says (its FastAPI, Starlette and
    # Flask integrations auto-enabled, patching the frameworks), ctxrelay's
    # doors as ctxrelay's says: a process of its own, since those patches
    # last for the process's life.  Flask's transaction is Sentry's
    # middleware around Flask.__call__, outside ctxrelay's door: the Flask
    # signals stamp it from inside.
    count = 10
    done = subprocess.run(
        [sys.executable, "-m", "tests.integrations.sentry_defaults_app", str(tmp_path), str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_events(tmp_path)
    assert no_cookie_anywhere(events) == []
    for framework in ("fastapi", "flask"):
        rids = [f"req-{framework}-{n}" for n in range(count)]
        mine = [e for e in events if (tag(e) or "").startswith(f"req-{framework}-")]
        errors = [e for e in mine if e.get("type", "error") == "error"]
        transactions = [e for e in mine if e.get("type") == "transaction"]
        assert sorted(failed_for(e) or "" for e in errors) == sorted(rids), framework
        assert sorted(tag(e) or "" for e in transactions) == sorted(rids), framework
        for event in mine:
            rid = tag(event)
            assert rid is not None
            assert block(event) == {"request_id": rid, "x-user": user_of(rid), "cookie": "***"}
    # Anything else is the servers' own, outside any request (waitress may
    # log a connection the client closed): no request's fields.
    others = [e for e in events if not (tag(e) or "").startswith(("req-fastapi-", "req-flask-"))]
    assert all(CONTEXT not in (e.get("contexts") or {}) for e in others)


def test_a_process_pool_child_reports_with_its_submitters_fields(tmp_path: Path) -> None:
    # A child process needs sentry_sdk.init too (as for every integration):
    # here the pool's initializer does it, with a transport writing files.
    rids = [f"req-process-{n}" for n in range(8)]
    with ctxrelay.ProcessPoolExecutor(
        2,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_in_child,
        initargs=(str(tmp_path),),
    ) as pool:
        futures = []
        for rid in rids:
            with ctxrelay.bind(request_id=rid, user=user_of(rid), cookie=cookie_of(rid)):
                futures.append(pool.submit(fail_in_pool, rid))
        for future in futures:
            future.result(timeout=TIMEOUT)
    events = read_events(tmp_path)
    assert no_cookie_anywhere(events) == []
    assert sorted(failed_for(e) or "" for e in events) == rids
    for event in events:
        found = failed_for(event)
        assert found is not None
        assert tag(event) == found
        assert block(event) == {"request_id": found, "user": user_of(found), "cookie": "***"}


def test_threads_under_instrument_report_with_the_context_they_were_started_in() -> None:
    import threading

    transport = CollectingTransport()
    ctxrelay.instrument()
    with sentry(transport):
        threads = []
        for n in range(10):
            with ctxrelay.bind(request_id=f"req-thread-{n}"):
                thread = threading.Thread(target=fail_in_pool, args=(f"req-thread-{n}",))
                thread.start()
                threads.append(thread)
        for thread in threads:
            thread.join(TIMEOUT)
    assert sorted(tag(e) or "" for e in transport.events) == sorted(
        f"req-thread-{n}" for n in range(10)
    )
    assert all(tag(e) == failed_for(e) for e in transport.events)


# -- what an event gets --------------------------------------------------------------------
def capture(transport: CollectingTransport, message: str = "x") -> Event:
    sentry_sdk.capture_message(message)
    return transport.events[-1]


def test_the_request_id_is_a_tag_and_every_field_is_in_the_block_masked() -> None:
    transport = CollectingTransport()
    with sentry(transport):
        with ctxrelay.bind(
            {
                "request_id": "req-1",
                "user": "alice",
                "cookie": "session=cookie-value-s3cr3t",
                "x-gray": "canary",
            },
            db_password="password-value-s3cr3t",
        ):
            event = capture(transport)
    assert event["tags"] == {"request_id": "req-1"}
    assert block(event) == {
        "request_id": "req-1",
        "user": "alice",
        "cookie": "***",
        "x-gray": "canary",
        "db_password": "***",
    }
    assert "s3cr3t" not in json.dumps(event)


def test_outside_any_request_an_event_gets_nothing() -> None:
    transport = CollectingTransport()
    with sentry(transport):
        event = capture(transport)
    assert "request_id" not in (event.get("tags") or {})
    assert CONTEXT not in (event.get("contexts") or {})


def test_a_transaction_started_in_a_request_carries_it() -> None:
    transport = CollectingTransport()
    with sentry(transport):
        with ctxrelay.bind(request_id="req-t", user="bob"):
            with sentry_sdk.start_transaction(name="checkout"):
                with sentry_sdk.start_span(op="charge"):
                    pass
    (transaction,) = transport.of_type("transaction")
    assert transaction["tags"] == {"request_id": "req-t"}
    assert block(transaction) == {"request_id": "req-t", "user": "bob"}


def test_stamp_puts_the_context_on_a_transaction_that_finishes_outside_it() -> None:
    # A framework integration's transaction wraps the work from outside the
    # binding (Sentry's Celery and Flask ones do): stamped from inside, it
    # keeps the work's context; without, it would have none.
    transport = CollectingTransport()
    with sentry(transport):
        with sentry_sdk.start_transaction(name="stamped"):
            with ctxrelay.bind(request_id="req-inside", cookie="session=abc"):
                stamp()
        with sentry_sdk.start_transaction(name="not stamped"):
            with ctxrelay.bind(request_id="req-unstamped"):
                pass
        stamp()  # no transaction in progress: nothing to do
    stamped, unstamped = transport.of_type("transaction")
    assert stamped["tags"] == {"request_id": "req-inside"}
    assert block(stamped) == {"request_id": "req-inside", "cookie": "***"}
    assert "request_id" not in (unstamped.get("tags") or {})
    assert CONTEXT not in unstamped["contexts"]


def test_chosen_tags_and_no_block() -> None:
    transport = CollectingTransport()
    integration = SentryIntegration(tags=["request_id", "tenant", "absent"], context=False)
    with sentry(transport, integration=integration), ctxrelay.bind(request_id="r", tenant="t"):
        event = capture(transport)
    assert event["tags"] == {"request_id": "r", "tenant": "t"}
    assert CONTEXT not in (event.get("contexts") or {})


def test_tags_set_on_the_scope_win() -> None:
    transport = CollectingTransport()
    with sentry(transport), ctxrelay.bind(request_id="from-context", user="u"):
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("request_id", "set-by-the-app")
            event = capture(transport)
    assert event["tags"] == {"request_id": "set-by-the-app"}
    assert block(event)["request_id"] == "from-context"


def test_a_long_value_stays_out_of_the_tags_and_values_are_escaped() -> None:
    transport = CollectingTransport()
    long_id = "r" * 201
    with sentry(transport), ctxrelay.bind(request_id=long_id, note="line\u2028forged\x85"):
        event = capture(transport)
    assert "request_id" not in (event.get("tags") or {})
    assert block(event) == {"request_id": long_id, "note": "line\\u2028forged\\x85"}


def test_a_policy_configured_later_applies_at_once() -> None:
    transport = CollectingTransport()
    with sentry(transport), ctxrelay.bind(request_id="req-p", tenant="acme"):
        before = capture(transport)
        ctxrelay.configure(ctxrelay.Policy(sensitive=frozenset({"tenant"})))
        after = capture(transport)
    assert block(before)["tenant"] == "acme"
    assert block(after)["tenant"] == "***"


def test_fields_the_policy_keeps_local_are_not_sent() -> None:
    ctxrelay.configure(ctxrelay.Policy(local=frozenset({"db_shard"})))
    transport = CollectingTransport()
    integration = SentryIntegration(tags=["request_id", "db_shard"])
    with sentry(transport, integration=integration), ctxrelay.bind(request_id="r", db_shard="7"):
        event = capture(transport)
    assert event["tags"] == {"request_id": "r"}
    assert block(event) == {"request_id": "r"}


def test_a_client_without_the_integration_gets_nothing() -> None:
    # setup_once ran in an earlier test: the processor stays registered for
    # the process, and must do nothing for a client that does not use it.
    transport = CollectingTransport()
    sentry_sdk.init(
        transport=transport, default_integrations=False, enable_backpressure_handling=False
    )
    try:
        with ctxrelay.bind(request_id="req-none"):
            event = capture(transport)
    finally:
        reset()
    assert CONTEXT not in (event.get("contexts") or {})
    assert "request_id" not in (event.get("tags") or {})


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["cookie"], "sensitive"),
        (["session_token"], "sensitive"),
        (["a" * 33], "32-character"),
        (["bad name"], "invalid context field name"),
    ],
)
def test_tags_that_cannot_be_tags_are_refused(tags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SentryIntegration(tags=tags)


def test_the_transports_here_capture_what_the_sdk_sends(tmp_path: Path) -> None:
    transport = DirectoryTransport(tmp_path)
    with sentry(transport), ctxrelay.bind(request_id="req-dir"):
        sentry_sdk.capture_message("to a file")
    (event,) = read_events(tmp_path)
    assert event["message"] == "to a file"
    assert tag(event) == "req-dir"
