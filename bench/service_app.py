"""The services ``bench/bench_service.py`` loads: a front service in one of
three stacks, and the downstream service it calls.  Each runs on uvicorn, one
worker, in its own process::

    python bench/service_app.py downstream --port 8101
    python bench/service_app.py front --stack ctxrelay --port 8102 \\
        --downstream-port 8101 --log /tmp/front.log

The front service's one route, ``GET /work``, per request: reads the request
id; fans out two tasks on a thread pool (each logs one line); makes one
outgoing httpx call to the downstream service while they run; logs a third
line; answers, in JSON, the request id as the handler, each task and the
downstream service saw it (``null`` where it did not arrive).  Log lines go
through one ``logging.FileHandler`` to ``--log``, in the same format in
every stack: ``%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s``.

Stacks (``--stack``):

``bare``
    No context at all: the handler reads the header itself, tasks go on a
    plain ``concurrent.futures.ThreadPoolExecutor``, the client has no hook,
    the log format's ``request_id`` is a formatter default (``-``).
``ctxrelay``
    ``RelayMiddleware`` wrapping the app (outermost), ``ctxrelay.ThreadPoolExecutor``,
    ``ctxrelay.integrations.httpx.install(client)``, ``ContextFilter`` on the
    handler.  Strict mode comes from the environment (``CTXRELAY_STRICT``).
``users``
    What users assemble today: asgi-correlation-id's ``CorrelationIdMiddleware``
    and ``CorrelationIdFilter``, starlette-context's ``RawContextMiddleware``
    (with its ``UserAgentPlugin``), OpenTelemetry's threading and httpx
    instrumentations (the API's default tracer provider: no span is
    recorded or exported), a hand-written ``copy_context().run`` at the pool
    and a request hook that sends ``X-Request-ID``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import hashlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request

STACKS = ("bare", "ctxrelay", "users")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
POOL_WORKERS = 4
HEADER = "x-request-id"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

_log = logging.getLogger("service")
_PAYLOAD = b"x" * 1024


# ---------------------------------------------------------------- downstream


async def downstream(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Plain ASGI, the least a server can do: echo the request id it received."""
    if scope["type"] != "http":
        return
    received = b"null"
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            received = b'"' + value + b'"'
            break
    body = b'{"request_id":' + received + b"}"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------- front


def _logging_to(path: str, stack: str) -> None:
    handler = logging.FileHandler(path)
    if stack == "bare":
        handler.setFormatter(logging.Formatter(LOG_FORMAT, defaults={"request_id": "-"}))
    elif stack == "ctxrelay":
        from ctxrelay.integrations.logging import ContextFilter

        handler.setFormatter(logging.Formatter(LOG_FORMAT, defaults={"deadline_ms": "-"}))
        handler.addFilter(ContextFilter())
    else:
        from asgi_correlation_id import CorrelationIdFilter

        # asgi-correlation-id names the attribute correlation_id; the same
        # format as the other stacks, with its name.
        fmt = LOG_FORMAT.replace("request_id", "correlation_id")
        handler.setFormatter(logging.Formatter(fmt))
        handler.addFilter(CorrelationIdFilter(default_value="-"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # httpx logs every call at INFO: the three lines are the service's own.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _task(number: int, read_id: Callable[[], str | None]) -> str | None:
    """A pooled task: a little work, one log line, and the id it saw."""
    hashlib.sha256(_PAYLOAD).hexdigest()
    _log.info("task %d done", number)
    return read_id()


def front(stack: str, downstream_url: str, log_path: str) -> ASGIApp:
    """The front service's ASGI app for ``stack``."""
    _logging_to(log_path, stack)
    state: dict[str, httpx.AsyncClient] = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    read_id: Callable[[], str | None]
    submit: Callable[[asyncio.AbstractEventLoop, int], Awaitable[str | None]]
    make_client: Callable[[], httpx.AsyncClient]

    if stack == "bare":
        bare_pool = concurrent.futures.ThreadPoolExecutor(POOL_WORKERS)

        def read_id() -> str | None:
            return None

        def submit(loop: asyncio.AbstractEventLoop, n: int) -> Awaitable[str | None]:
            return loop.run_in_executor(bare_pool, _task, n, read_id)

        def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(limits=limits)

    elif stack == "ctxrelay":
        import ctxrelay
        from ctxrelay.integrations.httpx import install

        relay_pool = ctxrelay.ThreadPoolExecutor(POOL_WORKERS)
        read_id = ctxrelay.request_id

        def submit(loop: asyncio.AbstractEventLoop, n: int) -> Awaitable[str | None]:
            return loop.run_in_executor(relay_pool, _task, n, read_id)

        def make_client() -> httpx.AsyncClient:
            return install(httpx.AsyncClient(limits=limits))

    elif stack == "users":
        from asgi_correlation_id import correlation_id
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        ThreadingInstrumentor().instrument()
        HTTPXClientInstrumentor().instrument()
        users_pool = concurrent.futures.ThreadPoolExecutor(POOL_WORKERS)
        read_id = correlation_id.get

        def submit(loop: asyncio.AbstractEventLoop, n: int) -> Awaitable[str | None]:
            run = contextvars.copy_context().run
            return loop.run_in_executor(users_pool, run, _task, n, read_id)

        async def send_id(request: httpx.Request) -> None:
            value = correlation_id.get()
            if value:
                request.headers["X-Request-ID"] = value

        def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(limits=limits, event_hooks={"request": [send_id]})

    else:
        raise ValueError(f"unknown stack {stack!r}: one of {', '.join(STACKS)}")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["client"] = make_client()
        yield
        await state["client"].aclose()

    api = FastAPI(lifespan=lifespan)

    @api.get("/work")
    async def work(request: Request) -> dict[str, Any]:
        # bare reads the header itself; the others ask their context.
        seen = request.headers.get(HEADER) if stack == "bare" else read_id()
        loop = asyncio.get_running_loop()
        first = submit(loop, 1)
        second = submit(loop, 2)
        answer = await state["client"].get(downstream_url)
        tasks = [await first, await second]
        _log.info("downstream answered %d", answer.status_code)
        return {"request_id": seen, "tasks": tasks, "downstream": answer.json()["request_id"]}

    if stack == "ctxrelay":
        from ctxrelay.integrations.asgi import RelayMiddleware

        return RelayMiddleware(api)  # outermost, as docs/web.md advises
    if stack == "users":
        from asgi_correlation_id import CorrelationIdMiddleware
        from starlette_context import plugins
        from starlette_context.middleware import RawContextMiddleware

        api.add_middleware(RawContextMiddleware, plugins=(plugins.UserAgentPlugin(),))
        api.add_middleware(CorrelationIdMiddleware)  # the last added runs first
    return api


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A service for bench/bench_service.py.")
    parser.add_argument("role", choices=("front", "downstream"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stack", choices=STACKS, default="bare")
    parser.add_argument("--downstream-port", type=int)
    parser.add_argument("--log", help="the front service's log file")
    args = parser.parse_args(argv)
    if args.role == "front":
        if args.downstream_port is None or args.log is None:
            parser.error("front needs --downstream-port and --log")
        url = f"http://127.0.0.1:{args.downstream_port}/"
        app: ASGIApp = front(args.stack, url, args.log)
        lifespan: Literal["on", "off"] = "on"
    else:
        app = downstream
        lifespan = "off"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="asyncio",
        http="h11",
        lifespan=lifespan,
        access_log=False,
        log_level="warning",
        backlog=256,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
