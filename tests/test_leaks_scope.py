"""A ``bind()``/``use()`` scope exited anywhere but where it was entered
never writes into the context it is exited in.

The old rule ("restore the saved value wherever the exit happens") handed one
request's whole context to another request's code: a generator holding
``with bind(...)`` closed by another request, or finalized by the garbage
collector while a later request runs, installed the first request's fields
into the second.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import socket
import time
from collections.abc import Generator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import ctxrelay
from ctxrelay import Context, bind, current, use
from ctxrelay.integrations.asgi import RelayMiddleware
from tests.servers import serve_asgi

# These tests provoke strict-mode reports on purpose.
pytestmark = pytest.mark.ctxrelay_expect_reports


def _stream(user: str) -> Generator[str | None, None, None]:
    with bind(user=user, session="cookie-of-" + user):
        while True:
            yield ctxrelay.get("user")


def _close_then_read(gen: Generator[Any, None, None]) -> Context:
    gen.close()
    return current()


def _in_request(request_id: str, fn: Any, /, *args: Any) -> Any:
    """Run ``fn`` as request ``request_id`` would: in its own context."""

    def run() -> Any:
        with bind(request_id=request_id):
            return fn(*args)

    return contextvars.Context().run(run)


def _started_in_request_a() -> Generator[str | None, None, None]:
    def start() -> Generator[str | None, None, None]:
        stream = _stream("alice")
        assert next(stream) == "alice"
        return stream

    stream: Generator[str | None, None, None] = _in_request("req-a", start)
    return stream


def test_a_generator_closed_during_another_request_leaves_that_request_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = _started_in_request_a()

    def request_b() -> Context:
        with bind(user="bob"):
            stream.close()  # e.g. evicted from a cache
            return current()

    seen = _in_request("req-b", request_b)
    assert seen == {"request_id": "req-b", "user": "bob"}
    assert "exited in another context" in caplog.text


def test_a_generator_finalized_by_the_gc_during_another_request_leaves_it_alone() -> None:
    gc.collect()
    gc.disable()  # the collection must happen inside request B, as in production
    try:
        stream = _started_in_request_a()
        holder: dict[str, Any] = {"stream": stream}
        holder["self"] = holder  # a reference cycle: only the cyclic GC frees it
        del stream, holder

        def request_b() -> tuple[Context, Context]:
            with bind(user="bob"):
                before = current()
                gc.collect()  # finalizes the generator: GeneratorExit at its yield
                return before, current()

        before, after = _in_request("req-b", request_b)
    finally:
        gc.enable()
    assert after is before
    assert after == {"request_id": "req-b", "user": "bob"}


def test_a_foreign_exit_is_reported_once_per_place_with_where_it_was_entered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ctxrelay")

    def reported_stream() -> Generator[None, None, None]:
        with bind(user="alice", session="cookie-of-alice"):
            yield

    streams = [reported_stream() for _ in range(3)]
    for stream in streams:
        _in_request("req-a", next, stream)
        _in_request("req-b", stream.close)
    reports = [
        r for r in caplog.records if getattr(r, "ctxrelay_report", {}).get("kind") == "foreign-exit"
    ]
    assert len(reports) == 1
    report = reports[0].__dict__["ctxrelay_report"]
    assert report["kind"] == "foreign-exit"
    assert report["file"] == __file__
    # The line of the ``with bind(...)`` statement in _stream.
    with open(__file__, encoding="utf-8") as source:
        assert 'with bind(user="alice"' in source.readlines()[report["line"] - 1]
    assert "cookie-of-alice" not in caplog.text  # the report never shows values


def test_a_foreign_exit_never_raises_even_when_logging_fails() -> None:
    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler bug")

        def handleError(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler bug")

    logger = logging.getLogger("ctxrelay")
    handler = Broken()
    logger.addHandler(handler)
    try:
        stream = _started_in_request_a()
        seen = _in_request("req-b", _close_then_read, stream)
    finally:
        logger.removeHandler(handler)
    assert seen == {"request_id": "req-b"}


def test_scopes_exited_out_of_order_in_one_context_leave_nothing_bound() -> None:
    # Two generators in one request, closed in the order they were opened.
    def request() -> list[Context]:
        seen = []
        first, second = _stream("alice"), _stream("bob")
        next(first)
        next(second)  # bound on top of first's scope
        first.close()
        seen.append(current())
        second.close()
        seen.append(current())
        return seen

    after_first, after_both = _in_request("req-a", request)
    assert after_first == {"request_id": "req-a"}
    assert after_both == {"request_id": "req-a"}


def test_use_exited_in_another_context_leaves_it_alone() -> None:
    message = Context(request_id="from-message", user="carol")

    def worker_gen() -> Generator[None, None, None]:
        with use(message):
            yield

    gen = worker_gen()
    contextvars.Context().run(next, gen)
    seen = _in_request("req-b", _close_then_read, gen)
    assert seen == {"request_id": "req-b"}


# -- through a real server -------------------------------------------------------


def _app() -> Any:
    def body(user: str) -> Iterator[bytes]:
        # A sync generator: Starlette iterates it on worker threads, each step
        # in a copy of the request's context.
        with bind(user=user, session="cookie-of-" + user):
            while True:
                yield b"x" * 65536
                time.sleep(0.001)

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(body(request.query_params["user"]))

    async def probe(request: Request) -> JSONResponse:
        gc.collect()  # whatever the GC finalizes now runs in this request
        return JSONResponse(dict(current()))

    return RelayMiddleware(Starlette(routes=[Route("/stream", stream), Route("/probe", probe)]))


def _read_then_drop(base: str, user: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /stream?user={user} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = 0
        while got < 200_000:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_a_dropped_streaming_response_never_reaches_a_later_request() -> None:
    # No user mistake: the client goes away, Starlette stops iterating, and
    # the suspended generator waits in a reference cycle for the GC.  The GC
    # is held off so that it runs where production would meet it: in a later
    # request.
    gc.collect()
    gc.disable()
    try:
        with serve_asgi(_app()) as base:
            for i in range(5):
                _read_then_drop(base, f"alice{i}")
            time.sleep(0.3)  # let the server notice the disconnects
            with httpx.Client(base_url=base, timeout=10) as client:
                seen = [
                    client.get("/probe", headers={"x-request-id": f"req-probe-{i}"}).json()
                    for i in range(5)
                ]
    finally:
        gc.enable()
    assert seen == [{"request_id": f"req-probe-{i}"} for i in range(5)]


def test_a_wsgi_body_dropped_unclosed_and_collected_in_a_later_request_on_that_thread() -> None:
    # A threaded WSGI server runs every request of a worker thread in that
    # thread's own context: the dropped body's scope is exited (by the GC) in
    # the very context it was entered in, while another request is bound.
    from ctxrelay.integrations.wsgi import RelayMiddleware

    seen: list[Context] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        if environ["PATH_INFO"] == "/probe":
            gc.collect()
            seen.append(current())
            return [b"ok"]

        def body() -> Iterator[bytes]:
            with bind(user="alice", session="cookie-of-alice"):
                while True:
                    yield b"x"

        return body()

    door = RelayMiddleware(app)

    def start_response(*args: Any) -> Any:
        return None

    def environ(path: str, rid: str) -> dict[str, Any]:
        return {"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_X_REQUEST_ID": rid}

    gc.collect()
    gc.disable()
    try:
        body = door(environ("/stream", "req-a"), start_response)
        next(iter(body))
        holder: dict[str, Any] = {"body": body}
        holder["self"] = holder  # dropped without close(), in a cycle
        del body, holder
        list(door(environ("/probe", "req-b"), start_response))
    finally:
        gc.enable()
    assert seen == [{"request_id": "req-b"}]
    assert current() == Context()
