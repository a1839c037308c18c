"""OpenTelemetry: every span carries its own request's chosen fields, never a cookie.

The real SDK with ctxrelay's ``ContextSpanProcessor`` and an
``InMemorySpanExporter``, where an application's spans start:

* in a real ASGI app served by uvicorn, behind ctxrelay's ``RelayMiddleware``
  and OpenTelemetry's own ``OpenTelemetryMiddleware`` (its server span and
  the handler's own span);
* in a ``ctxrelay.ThreadPoolExecutor`` task the handler hands work to;
* in a real Celery worker process (prefork) running the task the handler
  publishes, OpenTelemetry set up there as an application does (spans
  exported to files the test reads).

Every request sends its own id, a user header and a session cookie, and the
policy captures both headers as fields: each span must carry its own
request's id and user, and no request's cookie anywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.celery import uninstall
from ctxrelay.integrations.opentelemetry import (
    DEFAULT_FIELDS,
    PREFIX,
    ContextSpanProcessor,
)
from tests.brokers import REDIS_DATABASES, WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.celery_app import SECRET
from tests.integrations.opentelemetry_celery_app import (
    FIELDS,
    PING,
    POLICY,
    TRACED,
    make_app,
    read_spans,
)
from tests.servers import CONNECTIONS, serve_asgi

#: This module's Redis database: the one tests/brokers.py lists for it, or,
#: until one is, test_logging_end_to_end.py's (14), claimed and emptied
#: through the same mechanism (the owner key: a database another live run
#: holds makes this test skip), with queues of its own.
DB = next((db for db, user in REDIS_DATABASES.items() if "test_opentelemetry_spans.py" in user), 14)
RUN = uuid.uuid4().hex[:8]
REQUESTS = 60
TIMEOUT = 60.0
EVERY_COOKIE = re.compile(r"session-secret-")
RID = f"{PREFIX}request_id"
USER = f"{PREFIX}x-user"


def user_of(rid: str) -> str:
    return f"user-of-{rid}"


def cookie_of(rid: str) -> str:
    return f"session=session-secret-{rid}"


class Traces:
    """A tracer provider with ctxrelay's processor and an in-memory exporter."""

    def __init__(self, processor: ContextSpanProcessor) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(processor)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.provider.shutdown()


@pytest.fixture
def traces() -> Iterator[Traces]:
    made = Traces(ContextSpanProcessor(FIELDS))
    try:
        yield made
    finally:
        made.close()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- the web app ----------------------------------------------------------------------
def make_web(traces: Traces, pool: concurrent.futures.Executor, celery: Celery | None) -> Any:
    def in_pool(rid: str) -> None:
        with traces.tracer.start_as_current_span(f"pool task {rid}"):
            pass

    async def order(request: Request) -> Response:
        rid = request.headers["x-request-id"]  # the id sent, as data
        with traces.tracer.start_as_current_span(f"handler {rid}"):
            await asyncio.wrap_future(pool.submit(in_pool, rid))
            if celery is not None:
                celery.signature(TRACED, (rid,)).delay()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/order", order)])
    # ctxrelay's door outermost: OpenTelemetry's server span starts inside
    # the request's context.
    return RelayMiddleware(OpenTelemetryMiddleware(app, tracer_provider=traces.provider))


def send(url: str, rids: list[str]) -> list[int]:
    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one(rid: str) -> int:
                headers = {"x-request-id": rid, "x-user": user_of(rid), "cookie": cookie_of(rid)}
                return (await client.get("/order", headers=headers)).status_code

            return await asyncio.gather(*(one(rid) for rid in rids))

    return asyncio.run(main())


# -- a Celery worker with OpenTelemetry set up --------------------------------------------
class Worker:
    def __init__(self, app: Celery, spans: Path) -> None:
        self.app = app
        self.spans = spans


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    broker = need_redis(DB)
    tmp = tmp_path_factory.mktemp("otel-celery")
    spans = tmp / "spans"
    spans.mkdir()
    queue = f"ctxrelay-otel-{RUN}"
    app = make_app(broker, queue, SECRET)
    args = ["celery", "-A", "tests.integrations.opentelemetry_celery_app", "worker"]
    args += ["-P", "prefork", "-c", "2", "-Q", queue, "-n", f"otel-{RUN}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_OTEL_BROKER": broker, "CTXRELAY_OTEL_QUEUE": queue}
    env |= {"CTXRELAY_OTEL_SPANS": str(spans), "CTXRELAY_OTEL_SECRET": SECRET}
    process = WorkerProcess(args, tmp / "worker.log", env).start()
    try:
        # Ready; published without a context, the job runs with a fresh id.
        assert isinstance(app.signature(PING).delay().get(timeout=TIMEOUT), str)
        yield Worker(app, spans)
    finally:
        process.stop()
        uninstall(app)
        flush_redis(DB)


# -- handler, pool thread and Celery worker, 60 requests at once ------------------------
@pytest.mark.broker
def test_handler_pool_and_worker_spans_carry_their_own_request_never_a_cookie(
    traces: Traces, worker: Worker
) -> None:
    ctxrelay.configure(POLICY)
    rids = [f"req-{uuid.uuid4().hex[:16]}" for _ in range(REQUESTS)]
    with (
        ctxrelay.ThreadPoolExecutor(8) as pool,
        serve_asgi(make_web(traces, pool, worker.app)) as url,
    ):
        assert send(url, rids) == [200] * REQUESTS

        def worker_exported() -> bool:
            names = {span["name"] for span in read_spans(worker.spans)}
            return all(f"task step {rid}" in names for rid in rids)

        wait_until(worker_exported, "the worker's spans", TIMEOUT)
    here = [(span.name, attributes(span)) for span in traces.spans()]
    there = [(span["name"], span["attributes"]) for span in read_spans(worker.spans)]
    everything = json.dumps([here, there])
    assert not EVERY_COOKIE.search(everything)
    assert "cookie" not in everything

    # Spans named after their request: handler, pool task, task, task step.
    named = re.compile(r"(handler|pool task|task|task step) (req-\w+)")
    places: dict[str, list[str]] = {}
    for name, attrs in here + there:
        found = named.fullmatch(name)
        if found is None:
            continue
        place, rid = found[1], found[2]
        assert attrs == {RID: rid, USER: user_of(rid)}, (name, attrs)
        places.setdefault(place, []).append(rid)
    assert {place: sorted(found) for place, found in places.items()} == {
        place: sorted(rids) for place in ("handler", "pool task", "task", "task step")
    }
    # OpenTelemetry's own spans (the server span, its send/receive spans):
    # each carries one request's id and that request's user.
    servers = [(name, attrs) for name, attrs in here if named.fullmatch(name) is None]
    assert sorted(a[RID] for n, a in servers if n == "GET /order") == sorted(rids)
    assert all(attrs[USER] == user_of(attrs[RID]) for _, attrs in servers)


# -- what a span gets -------------------------------------------------------------------
def test_by_default_only_the_request_id_as_ctxrelay_request_id() -> None:
    assert DEFAULT_FIELDS == ("request_id",)
    made = Traces(ContextSpanProcessor())
    try:
        with ctxrelay.bind(request_id="req-1", user="alice", tenant="acme"):
            with made.tracer.start_as_current_span("one"):
                pass
    finally:
        made.close()
    (span,) = made.spans()
    assert attributes(span) == {"ctxrelay.request_id": "req-1"}


def test_outside_any_request_a_span_gets_nothing(traces: Traces) -> None:
    with traces.tracer.start_as_current_span("outside"):
        pass
    (span,) = traces.spans()
    assert attributes(span) == {}


def test_attribute_names_of_ones_choice_and_missing_fields_left_out() -> None:
    made = Traces(ContextSpanProcessor({"enduser.id": "user", "app.tenant": "tenant"}))
    try:
        with ctxrelay.bind(request_id="req-2", user="bob"):
            with made.tracer.start_as_current_span("mapped"):
                pass
    finally:
        made.close()
    (span,) = made.spans()
    assert attributes(span) == {"enduser.id": "bob"}


def test_the_spans_other_attributes_are_kept_and_code_may_set_them_again(
    traces: Traces,
) -> None:
    with ctxrelay.bind(request_id="req-3", **{"x-user": "carol"}):
        with traces.tracer.start_as_current_span("own", attributes={"http.route": "/x"}) as span:
            span.set_attribute(USER, "set-later")  # after on_start: the app's call
    (own,) = traces.spans()
    assert attributes(own) == {"http.route": "/x", RID: "req-3", USER: "set-later"}


def test_each_thread_and_task_its_own_request(traces: Traces) -> None:
    # Spans started at the same time in many threads (a barrier), each under
    # its own request: every span carries its own.
    rids = [f"req-thread-{n}" for n in range(16)]
    start = threading.Barrier(len(rids))

    def one(rid: str) -> None:
        with ctxrelay.bind(request_id=rid, **{"x-user": user_of(rid)}):
            start.wait(TIMEOUT)
            for _ in range(20):
                with traces.tracer.start_as_current_span(rid):
                    pass

    with concurrent.futures.ThreadPoolExecutor(len(rids)) as pool:
        list(pool.map(one, rids))
    spans = traces.spans()
    assert len(spans) == 20 * len(rids)
    assert all(attributes(s) == {RID: s.name, USER: user_of(s.name)} for s in spans)


def test_a_policy_configured_later_masks_at_once_and_local_fields_never_go(
    traces: Traces,
) -> None:
    with ctxrelay.bind(request_id="req-4", **{"x-user": "dave"}):
        with traces.tracer.start_as_current_span("before"):
            pass
        ctxrelay.configure(ctxrelay.Policy(sensitive=frozenset({"x-user"})))
        with traces.tracer.start_as_current_span("masked"):
            pass
        ctxrelay.configure(ctxrelay.Policy(local=frozenset({"x-user"})))
        with traces.tracer.start_as_current_span("local"):
            pass
    before, masked, local = traces.spans()
    assert attributes(before) == {RID: "req-4", USER: "dave"}
    assert attributes(masked) == {RID: "req-4", USER: "***"}
    assert attributes(local) == {RID: "req-4"}


def test_values_are_escaped_as_on_a_log_line(traces: Traces) -> None:
    with ctxrelay.bind(request_id="req\u2028forged\x85"):
        with traces.tracer.start_as_current_span("escaped"):
            pass
    (span,) = traces.spans()
    assert attributes(span)[RID] == "req\\u2028forged\\x85"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (["cookie"], "sensitive"),
        (["authorization"], "sensitive"),
        ({"user.password": "db_password"}, "sensitive"),
        (["bad name"], "invalid context field name"),
        ({"": "request_id"}, "not an attribute name"),
    ],
)
def test_fields_that_must_not_be_exported_are_refused(fields: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContextSpanProcessor(fields)


def test_a_span_started_under_a_context_from_elsewhere_reads_the_ctxrelay_context_here(
    traces: Traces,
) -> None:
    # The processor reads ctxrelay's context where the span starts, whatever
    # OpenTelemetry parent it is given: a span started in request B with
    # request A's span as explicit parent is B's.
    with ctxrelay.bind(request_id="req-a"):
        with traces.tracer.start_as_current_span("a") as parent:
            parent_context = trace.set_span_in_context(parent)
    with ctxrelay.bind(request_id="req-b"):
        with traces.tracer.start_as_current_span("b", context=parent_context):
            pass
    a, b = sorted(traces.spans(), key=lambda s: s.name)
    assert attributes(a)[RID] == "req-a"
    assert attributes(b)[RID] == "req-b"


def test_the_processor_is_a_good_citizen(traces: Traces) -> None:
    processor = ContextSpanProcessor()
    assert processor.force_flush() is True
    processor.shutdown()
    assert repr(processor) == "ContextSpanProcessor({'ctxrelay.request_id': 'request_id'})"
