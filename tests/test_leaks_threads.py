"""Under ``instrument()``, a thread or process that a *library* starts for its
own long-lived work never keeps the request that happened to start it.

Each test starts the library's worker lazily inside request "alice" (as
production code does: first use inside a request), then lets later work
arrive from elsewhere, and checks that the library's work never ran as
alice.  Application code's own hand-offs still relay.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import http.server
import multiprocessing
import multiprocessing.pool
import queue
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import ctxrelay
from tests.brokers import need_redis_server

WAIT = 10.0


@pytest.fixture(autouse=True)
def _instrumented() -> Iterator[None]:
    ctxrelay.instrument()
    try:
        yield
    finally:
        ctxrelay.uninstrument()
        ctxrelay.instrument(library_modules=(), application_modules=())
        ctxrelay.uninstrument()


def _as_alice() -> ctxrelay.Scope:
    return ctxrelay.bind(request_id="req-alice", user="alice", cookie="session=alice")


# -- libraries' service threads ---------------------------------------------------


def test_redis_pubsub_thread_started_in_a_request_handles_later_messages_as_no_one() -> None:
    need_redis_server()
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    channel = f"ctxrelay-test-{uuid.uuid4().hex}"
    seen: queue.Queue[str | None] = queue.Queue()
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(**{channel: lambda message: seen.put(ctxrelay.get("user"))})
    with _as_alice():
        worker = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
    try:
        with ctxrelay.bind(user="bob"):
            client.publish(channel, "hello")
        assert seen.get(timeout=WAIT) is None
    finally:
        worker.stop()
        worker.join(WAIT)
        pubsub.close()
        client.close()


def test_apscheduler_started_in_a_request_runs_later_jobs_as_no_one() -> None:
    from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
        BackgroundScheduler,
    )

    seen: queue.Queue[str | None] = queue.Queue()
    scheduler = BackgroundScheduler()
    with _as_alice():
        scheduler.start()
    try:
        # An interval job: a one-off job races its own removal with shutdown().
        scheduler.add_job(lambda: seen.put(ctxrelay.get("user")), "interval", seconds=0.05)
        assert seen.get(timeout=WAIT) is None
    finally:
        scheduler.shutdown(wait=True)


def test_threading_http_server_serves_later_connections_as_no_one() -> None:
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(ctxrelay.get("user"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with _as_alice(), ctxrelay.detached():
        # The application's own serving thread, started clean on purpose;
        # socketserver starts one thread per connection from it.
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
    try:
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=WAIT):
                pass
        assert seen == [None, None, None]
    finally:
        server.shutdown()
        server.server_close()
        serving.join(WAIT)


def test_threading_http_server_connection_threads_start_empty_even_from_a_relayed_thread() -> None:
    # The serving thread relays alice (application code started it inside
    # her request, without detached()); the per-connection threads that the
    # standard library starts from it must not.
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(ctxrelay.get("user"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with _as_alice():
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=WAIT):
            pass
        assert seen == [None]
    finally:
        server.shutdown()
        server.server_close()
        serving.join(WAIT)


def test_prometheus_metrics_server_started_in_a_request_scrapes_as_no_one() -> None:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    seen: list[str | None] = []

    class Probe(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            seen.append(ctxrelay.get("user"))
            yield GaugeMetricFamily("ctxrelay_probe", "probe", value=1)

    registry = prometheus_client.CollectorRegistry()
    registry.register(Probe())
    with _as_alice():
        server, thread = prometheus_client.start_http_server(0, "127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=WAIT):
            pass
        assert seen == [None]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def test_reactivex_event_loop_thread_started_in_a_request_runs_later_actions_as_no_one() -> None:
    from reactivex.scheduler import EventLoopScheduler

    seen: queue.Queue[str | None] = queue.Queue()
    scheduler = EventLoopScheduler()
    try:
        with _as_alice():
            scheduler.schedule(lambda *_: seen.put(ctxrelay.get("user")))
        seen.get(timeout=WAIT)  # the first action (per-action relay is another matter)
        scheduler.schedule(lambda *_: seen.put(ctxrelay.get("user")))
        assert seen.get(timeout=WAIT) is None
    finally:
        scheduler.dispose()


def test_opentelemetry_batch_span_processor_exports_as_no_one() -> None:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    seen: list[str | None] = []

    class Probe(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            seen.append(ctxrelay.get("user"))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    with _as_alice():
        processor = BatchSpanProcessor(Probe(), schedule_delay_millis=10)
        provider.add_span_processor(processor)
    with ctxrelay.bind(user="bob"):
        span: ReadableSpan = provider.get_tracer("t").start_span("s")  # type: ignore[assignment]
        span.end()  # type: ignore[attr-defined]
    deadline = time.monotonic() + WAIT
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker thread exports on its schedule (force_flush
        # would export on this thread instead, which proves nothing)
    provider.shutdown()
    assert seen
    assert seen[0] is None


# -- the application's own hand-offs still relay ------------------------------------


def test_an_application_fire_and_forget_thread_still_relays() -> None:
    seen: queue.Queue[str | None] = queue.Queue()
    with _as_alice():
        threading.Thread(target=lambda: seen.put(ctxrelay.get("user"))).start()
        threading.Timer(0.01, lambda: seen.put(ctxrelay.get("user"))).start()
    assert [seen.get(timeout=WAIT), seen.get(timeout=WAIT)] == ["alice", "alice"]


def test_detached_starts_a_service_thread_with_nothing_of_the_request() -> None:
    other: contextvars.ContextVar[str] = contextvars.ContextVar("other", default="unset")
    seen: queue.Queue[tuple[str | None, str]] = queue.Queue()
    with _as_alice():
        token = other.set("alice's span")
        with ctxrelay.detached():
            assert ctxrelay.current() == {}
            threading.Thread(target=lambda: seen.put((ctxrelay.get("user"), other.get()))).start()
            ctxrelay.Thread(target=lambda: seen.put((ctxrelay.get("user"), other.get()))).start()
        assert ctxrelay.get("user") == "alice"
        other.reset(token)
    assert [seen.get(timeout=WAIT), seen.get(timeout=WAIT)] == [(None, "unset")] * 2


def test_library_modules_name_more_libraries_and_application_modules_take_one_back() -> None:
    seen: queue.Queue[str | None] = queue.Queue()

    def start_one() -> None:
        threading.Thread(target=lambda: seen.put(ctxrelay.get("user"))).start()

    ctxrelay.instrument(library_modules=[__name__])
    with _as_alice():
        start_one()
    assert seen.get(timeout=WAIT) is None

    from apscheduler.schedulers.background import BackgroundScheduler

    ctxrelay.instrument(library_modules=[], application_modules=["apscheduler"])
    scheduler = BackgroundScheduler()
    with _as_alice():
        scheduler.start()
    try:
        scheduler.add_job(lambda: seen.put(ctxrelay.get("user")), "interval", seconds=0.05)
        assert seen.get(timeout=WAIT) == "alice"  # the user said: apscheduler is ours
    finally:
        scheduler.shutdown(wait=True)


def test_module_names_are_validated() -> None:
    with pytest.raises(ValueError, match="module name"):
        ctxrelay.instrument(library_modules=["not a module"])
    with pytest.raises(ValueError, match="module name"):
        ctxrelay.instrument(application_modules=[""])


def test_many_requests_starting_threads_at_once_each_relay_their_own() -> None:
    seen: dict[int, str | None] = {}
    lock = threading.Lock()

    def request(i: int) -> None:
        def audit() -> None:
            with lock:
                seen[i] = ctxrelay.get("user")

        with ctxrelay.bind(user=f"user-{i}"):
            t = threading.Thread(target=audit)
            t.start()
        t.join(WAIT)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(request, range(200)))
    assert seen == {i: f"user-{i}" for i in range(200)}


# -- process pools created lazily in a request ---------------------------------------


def _user() -> str | None:
    return ctxrelay.get("user")


def _user_of(_: object) -> str | None:
    return ctxrelay.get("user")


def _users_of(_: object, __: object) -> str | None:
    return ctxrelay.get("user")


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_a_process_pool_forked_in_a_request_runs_later_tasks_as_their_own_submitters() -> None:
    fork = multiprocessing.get_context("fork")
    with _as_alice():
        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=fork)
        assert pool.submit(_user).result(WAIT) == "alice"
    try:
        with ctxrelay.bind(user="bob"):
            assert pool.submit(_user).result(WAIT) == "bob"
            assert list(pool.map(_user_of, range(4))) == ["bob"] * 4
        assert pool.submit(_user).result(WAIT) is None
    finally:
        pool.shutdown()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_a_multiprocessing_pool_created_in_a_request_runs_later_tasks_as_their_own() -> None:
    fork = multiprocessing.get_context("fork")
    with _as_alice():
        pool = fork.Pool(2)
    try:
        assert pool.apply_async(_user).get(WAIT) is None
        assert pool.apply(_user) is None
        assert pool.map(_user_of, range(4)) == [None] * 4
        with ctxrelay.bind(user="bob"):
            assert pool.apply_async(_user).get(WAIT) == "bob"
            assert pool.map(_user_of, range(4)) == ["bob"] * 4
            assert pool.map_async(_user_of, range(4)).get(WAIT) == ["bob"] * 4
            assert pool.starmap(_users_of, [(1, 2)] * 3) == ["bob"] * 3
            assert list(pool.imap(_user_of, range(3))) == ["bob"] * 3
            assert sorted(pool.imap_unordered(_user_of, range(3))) == ["bob"] * 3  # type: ignore[type-var]
            called: queue.Queue[str | None] = queue.Queue()
            pool.apply_async(_user, callback=lambda _: called.put(ctxrelay.get("user")))
        assert called.get(timeout=WAIT) == "bob"
    finally:
        pool.terminate()
        pool.join()


def test_a_thread_pool_of_multiprocessing_relays_each_task_not_its_creator() -> None:
    with _as_alice():
        pool = multiprocessing.pool.ThreadPool(2)
    try:
        assert pool.apply_async(_user).get(WAIT) is None
        results = {}
        for user in ("bob", "carol"):
            with ctxrelay.bind(user=user):
                results[user] = pool.map(_user_of, range(8))
        assert results == {"bob": ["bob"] * 8, "carol": ["carol"] * 8}
    finally:
        pool.terminate()
        pool.join()


def test_a_library_started_process_forks_clean_an_application_one_relays() -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    fork = multiprocessing.get_context("fork")
    out: Any = fork.Queue()
    with _as_alice():
        child = fork.Process(target=_put_user, args=(out,))
        child.start()
    assert out.get(timeout=WAIT) == "alice"  # the application's own hand-off
    child.join(WAIT)  # (the library case is the pools above: started by the stdlib)


def _put_user(out: Any) -> None:
    out.put(ctxrelay.get("user"))
