"""Strict mode: each report kind, naming the right places, through real code.

Every test turns strict mode on for itself and off again; reports are read
through the public ``ctxrelay.strict_reports()`` and as records on the
``ctxrelay.strict`` logger.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest

import ctxrelay
from ctxrelay import _strict
from ctxrelay.integrations.wsgi import RelayMiddleware

# These tests provoke strict-mode reports on purpose.
pytestmark = pytest.mark.ctxrelay_expect_reports

HERE = __file__
WAIT = 10.0


@pytest.fixture(autouse=True)
def _strict_mode() -> Iterator[None]:
    ctxrelay.strict_reports(clear=True)
    ctxrelay.strict()
    try:
        yield
    finally:
        ctxrelay.strict(False, sample=1.0, thread_age=10.0)
        ctxrelay.strict_reports(clear=True)
        ctxrelay.uninstrument()


def _line_of(text: str) -> int:
    with open(HERE, encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            if text in line and "_line_of" not in line:
                return number
    raise AssertionError(f"{text!r} not in {HERE}")


def _no_start(*args: Any) -> Any:
    return None


def _only(kind: str) -> dict[str, Any]:
    found = [r for r in ctxrelay.strict_reports() if r["kind"] == kind]
    assert len(found) == 1, ctxrelay.strict_reports()
    return found[0]


def _wait_for(kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = [r for r in ctxrelay.strict_reports() if r["kind"] == kind]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {kind} report: {ctxrelay.strict_reports()}")


# -- off by default, and free -------------------------------------------------------


def test_off_by_default_and_off_again_leaves_nothing_switched() -> None:
    from ctxrelay import _context

    assert _context._BIND is _context._StrictBind
    ctxrelay.strict(False)
    assert _context._BIND is _context._Bind
    assert logging.getLogRecordFactory() is logging.LogRecord
    code = "import ctxrelay, ctxrelay._context as c; assert not ctxrelay._strict.enabled()"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXRELAY_STRICT")}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_the_environment_turns_it_on_with_a_sample_rate() -> None:
    code = (
        "import ctxrelay\n"
        "assert ctxrelay._strict.enabled()\n"
        "assert ctxrelay._strict.STATE.rate == 0.25\n"
    )
    env = {**os.environ, "CTXRELAY_STRICT": "1", "CTXRELAY_STRICT_SAMPLE": "0.25"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_a_bad_sample_rate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rate"):
        ctxrelay.strict(sample=0)
    with pytest.raises(ValueError, match="rate"):
        ctxrelay.strict(sample=1.5)


# -- foreign and out-of-order exits ----------------------------------------------------


def _stream() -> Generator[None, None, None]:
    with ctxrelay.bind(user="alice"):  # entered here
        while True:
            yield


def test_a_scope_exited_in_another_request_names_where_it_was_entered_and_exited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ctxrelay.strict")
    stream = _stream()
    contextvars.Context().run(next, stream)

    def request_b() -> None:
        with ctxrelay.bind(request_id="req-b"):
            stream.close()  # exited here

    contextvars.Context().run(request_b)
    report = _only("foreign-exit")
    assert (report["entered_file"], report["entered_line"]) == (HERE, _line_of("# entered here"))
    assert (report["exited_file"], report["exited_line"]) == (HERE, _line_of("# exited here"))
    records = [r for r in caplog.records if r.name == "ctxrelay.strict"]
    assert records
    assert records[0].__dict__["ctxrelay_report"] is not None


def test_scopes_exited_out_of_order_are_reported() -> None:
    def request() -> None:
        first, second = _stream(), _stream()
        next(first)
        next(second)
        first.close()
        second.close()

    contextvars.Context().run(request)
    assert _only("out-of-order")["entered_line"] == _line_of("# entered here")


# -- a unit of work that starts dirty ------------------------------------------------------


def test_a_request_that_starts_with_a_leaked_context_names_where_it_was_bound() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    door = RelayMiddleware(app)

    def leaky_request() -> None:
        ctxrelay.bind(user="alice").__enter__()  # leaked: never exited
        list(door({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _no_start))

    contextvars.Context().run(leaky_request)
    report = _only("dirty-start")
    assert report["bound_line"] == _line_of("# leaked: never exited")
    assert report["started_file"].endswith("wsgi.py")


# -- a thread that outlives its request with its context -------------------------------


def test_a_thread_that_runs_long_after_its_request_is_reported() -> None:
    ctxrelay.strict(thread_age=0.1)
    ctxrelay.instrument()
    stop = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        threading.Thread(target=stop.wait, args=(WAIT,), daemon=True).start()  # service
        return [b"ok"]

    door = RelayMiddleware(app)
    contextvars.Context().run(
        lambda: list(door({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _no_start))
    )
    try:
        report = _wait_for("stale-thread")
    finally:
        stop.set()
    assert report["started_line"] == _line_of("# service")
    assert "detached()" in report["message"]


def test_a_thread_that_ends_with_its_request_is_not_reported() -> None:
    ctxrelay.strict(thread_age=0.1)
    ctxrelay.instrument()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        audit = threading.Thread(target=lambda: None)
        audit.start()
        audit.join()
        return [b"ok"]

    door = RelayMiddleware(app)
    contextvars.Context().run(
        lambda: list(door({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _no_start))
    )
    time.sleep(0.4)
    _strict.check_threads()
    assert not [r for r in ctxrelay.strict_reports() if r["kind"] == "stale-thread"]


# -- lost context: observe-only instrument() ----------------------------------------------


def test_observe_only_names_the_hand_off_whose_work_logs_without_context() -> None:
    ctxrelay.instrument(relay=False)
    log = logging.getLogger("tests.strict.lost")
    seen: queue.Queue[str | None] = queue.Queue()

    def task() -> None:
        seen.put(ctxrelay.get("user"))
        log.warning("charging the card")  # logs here

    with ctxrelay.bind(request_id="req-1", user="alice"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(task).result(WAIT)  # handed off here
    assert seen.get_nowait() is None  # observe only: nothing relayed
    report = _only("lost-context")
    assert report["handoff_line"] == _line_of("# handed off here")
    assert report["used_line"] == _line_of("# logs here")


def test_observe_only_sees_threads_and_stays_quiet_outside_requests() -> None:
    ctxrelay.instrument(relay=False)
    log = logging.getLogger("tests.strict.lost")

    def task() -> None:
        log.warning("audit")

    outside = threading.Thread(target=task)
    outside.start()
    outside.join()
    assert not ctxrelay.strict_reports()
    with ctxrelay.bind(user="alice"):
        t = threading.Thread(target=task)
        t.start()  # thread started here
    t.join()
    assert _only("lost-context")["handoff_line"] == _line_of("# thread started here")


def test_relay_mode_loses_nothing_and_reports_nothing() -> None:
    ctxrelay.instrument()
    log = logging.getLogger("tests.strict.lost")
    with ctxrelay.bind(user="alice"), concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(log.warning, "relayed").result(WAIT)
    assert not ctxrelay.strict_reports()


def test_sampling_captures_only_a_share_of_scope_entries() -> None:
    ctxrelay.strict(sample=0.01)
    from ctxrelay import _context

    captured = 0
    for _ in range(2000):
        scope = ctxrelay.bind(user="u")
        with scope:
            pass
        captured += getattr(scope, "_site", None) is not None
    assert isinstance(scope, _context._StrictBind)
    assert captured < 200  # about 20 expected; never all 2000


# -- through real servers ---------------------------------------------------------------


def test_through_waitress_a_leaked_scope_is_named_by_the_next_request_on_its_thread() -> None:
    import httpx

    from tests.servers import serve_wsgi

    # Inside a request the door's reset undoes a leaked scope; outside it
    # (a WSGI middleware wrapped around the door, a server hook) nothing does.
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    door = RelayMiddleware(app)

    def outer(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/leak":
            ctxrelay.bind(user="alice").__enter__()  # a scope never exited
        return door(environ, start_response)

    with serve_wsgi(outer, threads=1) as base, httpx.Client(base_url=base) as c:
        c.get("/leak")
        c.get("/next")
        ctxrelay.strict(False)  # (the leak stays on waitress's thread until it stops)
    report = _only("dirty-start")
    assert report["bound_line"] == _line_of("# a scope never exited")


def test_through_uvicorn_run_in_executor_without_relay_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from ctxrelay.integrations.asgi import RelayMiddleware as AsgiDoor
    from tests.servers import serve_asgi

    log = logging.getLogger("tests.strict.uvicorn")
    pool = concurrent.futures.ThreadPoolExecutor(2)

    def lookup() -> str:
        log.warning("looking up the cart")  # the lost work logs
        return "cart"

    async def endpoint(request: Request) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        return PlainTextResponse(await loop.run_in_executor(pool, lookup))  # lost here

    ctxrelay.instrument(relay=False)
    try:
        with serve_asgi(AsgiDoor(Starlette(routes=[Route("/", endpoint)]))) as base:
            assert httpx.get(base + "/", timeout=WAIT).text == "cart"
    finally:
        pool.shutdown()
    report = _only("lost-context")
    assert report["handoff_line"] == _line_of("# lost here")
    assert report["used_line"] == _line_of("# the lost work logs")
