"""Fields that a request's own sync code sets reach the rest of the request.

FastAPI runs a sync dependency in a worker thread with a *copy* of the
request's context: what it binds never reached the endpoint (fastapi #953,
structlog #491, starlette-context #146).  Here every way a web app sets a
field for its request -- FastAPI dependencies sync and async, with and
without ``yield``; Starlette middleware; Flask ``before_request``; Django
middleware -- is served by a real server, and the endpoint, a pool task, a
background task, an outgoing call and a log line must each see the field,
and only their own request's, with hundreds of users at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import requests
from fastapi import BackgroundTasks, Depends, FastAPI, Header
from flask import Flask, jsonify
from flask import request as flask_request
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

import ctxrelay
from ctxrelay import Policy
from ctxrelay.integrations import asgi, wsgi
from ctxrelay.integrations.httpx import install as install_httpx
from ctxrelay.integrations.requests import install as install_requests

from ..httpserver import RecordingServer, recording_server
from ..servers import WAIT, Mailbox, new_id, serve_asgi, serve_wsgi

# -- what each step of a request saw ------------------------------------------------


class FieldLog(logging.Handler):
    """Keeps ``request id -> user`` as each log record saw them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: dict[str, str | None] = {}

    def emit(self, record: logging.LogRecord) -> None:
        rid = ctxrelay.request_id()
        if rid is not None:
            self.seen[rid] = ctxrelay.get("user")


@contextmanager
def world() -> Iterator[tuple[RecordingServer, Mailbox, FieldLog, logging.Logger]]:
    """A downstream server that the policy sends baggage to, a mailbox for work
    after the response, and a logger whose handler records the user."""
    log = logging.getLogger("tests.request_scope")
    handler = FieldLog()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with recording_server() as downstream:
            route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port}, baggage=True)
            ctxrelay.configure(Policy(routes=(route,)))
            yield downstream, Mailbox(), handler, log
    finally:
        log.removeHandler(handler)


def baggage_user(downstream: RecordingServer, rid: str) -> str | None:
    baggage = downstream.last(f"/down/{rid}").headers.get("baggage", "")
    return ctxrelay.extract({"baggage": baggage}, in_house=True).get("user")


def steps_saw(
    body: dict[str, Any],
    rid: str,
    downstream: RecordingServer,
    mailbox: Mailbox,
    log: FieldLog,
) -> dict[str, str | None]:
    """Every step's view of the user for request ``rid``."""
    after = mailbox.wait([rid])[rid]
    return {
        **body,
        "background": after,
        "outgoing": baggage_user(downstream, rid),
        "log": log.seen.get(rid),
    }


# -- FastAPI -------------------------------------------------------------------------


def sync_yield(x_user: str = Header()) -> Iterator[str]:
    with ctxrelay.bind(user=x_user):
        yield x_user


async def async_yield(x_user: str = Header()) -> AsyncIterator[str]:
    with ctxrelay.bind(user=x_user):
        yield x_user


def sync_plain(x_user: str = Header()) -> str:
    ctxrelay.bind_request(user=x_user)
    return x_user


async def async_plain(x_user: str = Header()) -> str:
    ctxrelay.bind_request(user=x_user)
    return x_user


DEPENDENCIES: dict[str, Callable[..., Any]] = {
    "sync-yield": sync_yield,
    "async-yield": async_yield,
    "sync-plain": sync_plain,
    "async-plain": async_plain,
}


def fastapi_app(
    downstream: RecordingServer,
    mailbox: Mailbox,
    log: logging.Logger,
    pool: concurrent.futures.Executor,
) -> Any:
    app = FastAPI()
    client = install_httpx(httpx.AsyncClient())

    async def report(background: BackgroundTasks) -> dict[str, str | None]:
        rid = ctxrelay.request_id()
        assert rid is not None
        log.info("endpoint")
        await client.get(downstream.url(f"/down/{rid}"))
        background.add_task(lambda: mailbox.post(rid, ctxrelay.get("user")))
        return {
            "endpoint": ctxrelay.get("user"),
            "pool": pool.submit(ctxrelay.get, "user").result(timeout=WAIT),
        }

    def sync_report(background: BackgroundTasks) -> dict[str, str | None]:
        rid = ctxrelay.request_id()
        assert rid is not None
        log.info("endpoint")
        with install_requests(requests.Session()) as session:
            session.get(downstream.url(f"/down/{rid}"), timeout=WAIT)
        background.add_task(lambda: mailbox.post(rid, ctxrelay.get("user")))
        return {
            "endpoint": ctxrelay.get("user"),
            "pool": pool.submit(ctxrelay.get, "user").result(timeout=WAIT),
        }

    for name, dependency in DEPENDENCIES.items():
        app.get(f"/{name}", dependencies=[Depends(dependency)])(report)
        app.get(f"/{name}/sync", dependencies=[Depends(dependency)])(sync_report)
    return asgi.RelayMiddleware(app)


ENDPOINTS = [f"/{name}{kind}" for name in DEPENDENCIES for kind in ("", "/sync")]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_fastapi_dependency_sets_the_user_for_every_step_of_its_request(path: str) -> None:
    with world() as (downstream, mailbox, log, logger), ctxrelay.ThreadPoolExecutor(4) as pool:
        with serve_asgi(fastapi_app(downstream, mailbox, logger, pool)) as base:
            rid = new_id()
            reply = httpx.get(base + path, headers={"x-request-id": rid, "x-user": "alice"})
            assert reply.status_code == 200, reply.text
            saw = steps_saw(reply.json(), rid, downstream, mailbox, log)
    expected: dict[str, str | None] = dict.fromkeys(
        ["endpoint", "pool", "outgoing", "log"], "alice"
    )
    # FastAPI ends a dependency's yield before background tasks run: the
    # field ends with its block there, exactly as the async form's does.
    yielded = "yield" in path
    expected["background"] = None if yielded and _yield_ends_before_background() else "alice"
    assert saw == expected


_ENDS_FIRST: list[bool] = []


def _yield_ends_before_background() -> bool:
    """What this FastAPI does with an async ``yield`` dependency's plain
    contextvar when background tasks run: the reference for the sync form."""
    if _ENDS_FIRST:
        return _ENDS_FIRST[0]
    import contextvars

    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe", default=None)
    seen: list[str | None] = []

    async def dependency() -> AsyncIterator[None]:
        token = var.set("set")
        try:
            yield
        finally:
            var.reset(token)

    app = FastAPI()

    @app.get("/", dependencies=[Depends(dependency)])
    async def endpoint(background: BackgroundTasks) -> None:
        background.add_task(lambda: seen.append(var.get()))

    with serve_asgi(app) as base:
        assert httpx.get(base + "/").status_code == 200
        deadline = time.monotonic() + WAIT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    _ENDS_FIRST.append(seen == [None])
    return _ENDS_FIRST[0]


def test_500_concurrent_users_each_see_only_their_own() -> None:
    users = {new_id(): f"user-{i}" for i in range(500)}

    async def one(client: httpx.AsyncClient, url: str, rid: str) -> dict[str, Any]:
        reply = await client.get(url, headers={"x-request-id": rid, "x-user": users[rid]})
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    async def run(base: str) -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            paths = [ENDPOINTS[i % len(ENDPOINTS)] for i in range(len(users))]
            return await asyncio.gather(
                *(one(client, base + path, rid) for path, rid in zip(paths, users, strict=True))
            )

    with world() as (downstream, mailbox, log, logger), ctxrelay.ThreadPoolExecutor(16) as pool:
        with serve_asgi(fastapi_app(downstream, mailbox, logger, pool)) as base:
            bodies = asyncio.run(run(base))
            after = mailbox.wait(list(users))
        ends_first = _yield_ends_before_background()
        for i, ((rid, user), body) in enumerate(zip(users.items(), bodies, strict=True)):
            assert body == {"endpoint": user, "pool": user}
            assert log.seen[rid] == user
            assert baggage_user(downstream, rid) == user
            yielded = "yield" in ENDPOINTS[i % len(ENDPOINTS)]
            assert after[rid] == (None if yielded and ends_first else user)


# -- Starlette middleware ---------------------------------------------------------------


class UserFromHeader(BaseHTTPMiddleware):
    """Starlette's function-style middleware: sets the user, then calls on."""

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        ctxrelay.bind_request(user=request.headers["x-user"])
        response: Response = await call_next(request)
        # starlette #1525: what the app sets never flowed back out to here.
        response.headers["x-seen-tenant"] = ctxrelay.get("tenant", "none")
        return response


def test_starlette_middleware_sets_the_user_and_sees_what_the_app_set() -> None:
    with world() as (downstream, mailbox, log, logger), ctxrelay.ThreadPoolExecutor(4) as pool:
        inner: FastAPI = fastapi_app(downstream, mailbox, logger, pool).app
        inner.user_middleware.clear()

        @inner.get("/plain")
        async def plain(background: BackgroundTasks) -> dict[str, str | None]:
            ctxrelay.bind_request(tenant="acme")
            rid = ctxrelay.request_id()
            assert rid is not None
            logger.info("endpoint")
            async with install_httpx(httpx.AsyncClient()) as client:
                await client.get(downstream.url(f"/down/{rid}"))
            background.add_task(lambda: mailbox.post(rid, ctxrelay.get("user")))
            return {
                "endpoint": ctxrelay.get("user"),
                "pool": pool.submit(ctxrelay.get, "user").result(timeout=WAIT),
            }

        inner.add_middleware(UserFromHeader)
        with serve_asgi(asgi.RelayMiddleware(inner)) as base:
            rid = new_id()
            reply = httpx.get(base + "/plain", headers={"x-request-id": rid, "x-user": "bob"})
            assert reply.status_code == 200, reply.text
            saw = steps_saw(reply.json(), rid, downstream, mailbox, log)
    assert saw == dict.fromkeys(["endpoint", "pool", "background", "outgoing", "log"], "bob")
    assert reply.headers["x-seen-tenant"] == "acme"


# -- Flask ---------------------------------------------------------------------------------


def flask_app(downstream: RecordingServer, mailbox: Mailbox, log: logging.Logger) -> Any:
    app = Flask("scope")
    pool = ctxrelay.ThreadPoolExecutor(4)
    session = install_requests(requests.Session())

    @app.before_request
    def who() -> None:
        ctxrelay.bind_request(user=flask_request.headers["x-user"])

    @app.get("/report")
    def report() -> Any:
        rid = ctxrelay.request_id()
        assert rid is not None
        log.info("endpoint")
        session.get(downstream.url(f"/down/{rid}"), timeout=WAIT)
        response = jsonify(
            endpoint=ctxrelay.get("user"),
            pool=pool.submit(ctxrelay.get, "user").result(timeout=WAIT),
        )
        # Work after the response: the WSGI server closes the body.
        response.call_on_close(lambda: mailbox.post(rid, ctxrelay.get("user")))
        return response

    return wsgi.RelayMiddleware(app)


def test_flask_before_request_sets_the_user_for_every_step_of_its_request() -> None:
    with world() as (downstream, mailbox, log, logger):
        with serve_wsgi(flask_app(downstream, mailbox, logger)) as base:
            rids = {new_id(): f"user-{i}" for i in range(100)}

            def one(rid: str) -> dict[str, Any]:
                reply = requests.get(
                    base + "/report", headers={"x-request-id": rid, "x-user": rids[rid]}, timeout=30
                )
                assert reply.status_code == 200, reply.text
                body: dict[str, Any] = reply.json()
                return body

            with concurrent.futures.ThreadPoolExecutor(16) as clients:
                bodies = dict(zip(rids, clients.map(one, rids), strict=True))
            for rid, user in rids.items():
                saw = steps_saw(bodies[rid], rid, downstream, mailbox, log)
                assert saw == dict.fromkeys(
                    ["endpoint", "pool", "background", "outgoing", "log"], user
                )


# -- the request scope itself --------------------------------------------------------------


def _door_context() -> ctxrelay.Context:
    """The context a door opens for one request, through a real door."""
    seen: list[ctxrelay.Context] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(ctxrelay.current())
        start_response("200 OK", [])
        return [b""]

    list(wsgi.RelayMiddleware(app)({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _no_start))
    return seen[0]


def _no_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


def _in_request(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` inside a real WSGI door's request, return what it returned."""
    result: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        result.append(fn())
        start_response("200 OK", [])
        return [b""]

    list(wsgi.RelayMiddleware(app)({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, _no_start))
    return result[0]


def test_work_handed_off_before_the_change_keeps_what_it_captured() -> None:
    def handler() -> dict[str, Any]:
        started = threading.Event()
        go = threading.Event()

        def early() -> str | None:
            started.set()
            go.wait(WAIT)
            return ctxrelay.get("user")

        with ctxrelay.ThreadPoolExecutor(2) as pool:
            before = pool.submit(early)
            started.wait(WAIT)
            ctxrelay.bind_request(user="alice")
            after = pool.submit(ctxrelay.get, "user")
            go.set()
            return {"before": before.result(WAIT), "after": after.result(WAIT)}

    assert _in_request(handler) == {"before": None, "after": "alice"}


def test_a_pool_task_adds_a_field_the_request_then_sees() -> None:
    def handler() -> tuple[str | None, str | None]:
        def task() -> str | None:
            ctxrelay.bind_request(tenant="acme")
            return ctxrelay.get("tenant")  # its own write, at once

        with ctxrelay.ThreadPoolExecutor(1) as pool:
            own = pool.submit(task).result(WAIT)
        return own, ctxrelay.get("tenant")

    assert _in_request(handler) == ("acme", "acme")


def test_a_later_bind_wins_inside_its_block_and_the_request_field_stays() -> None:
    def handler() -> list[str | None]:
        ctxrelay.bind_request(user="alice")
        seen = [ctxrelay.get("user")]
        with ctxrelay.bind(user="impersonated"):
            seen.append(ctxrelay.get("user"))
        seen.append(ctxrelay.get("user"))
        return seen

    assert _in_request(handler) == ["alice", "impersonated", "alice"]


def test_a_sync_generator_dependency_is_withdrawn_when_its_block_exits() -> None:
    def dependency() -> Generator[None, None, None]:
        with ctxrelay.bind(user="alice"):
            yield

    def handler() -> list[str | None]:
        gen = dependency()
        # Entered in one copy of the request's context, exited in another,
        # as FastAPI's worker threads do.
        import contextvars

        contextvars.copy_context().run(next, gen)
        seen = [ctxrelay.get("user")]
        contextvars.copy_context().run(gen.close)
        seen.append(ctxrelay.get("user"))
        return seen

    assert _in_request(handler) == ["alice", None]


def test_no_field_of_one_request_reaches_another() -> None:
    def alice() -> ctxrelay.Context:
        ctxrelay.bind_request(user="alice")
        return ctxrelay.current()

    first = _in_request(alice)
    assert first["user"] == "alice"
    assert _in_request(lambda: ctxrelay.get("user")) is None
    assert ctxrelay.get("user") is None


def test_bind_request_is_validated_like_bind_and_needs_a_request() -> None:
    with pytest.raises(RuntimeError, match=r"with ctxrelay\.bind"):
        ctxrelay.bind_request(user="alice")

    def bad() -> list[str]:
        errors = []
        for fields in ({"bad name": "x"}, {"user": 3}, {"user": "a\r\nb"}):
            try:
                ctxrelay.bind_request(fields)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)
        return errors

    assert _in_request(bad) == ["ValueError", "TypeError", "ValueError"]


def test_a_bare_bind_statement_is_loud_at_once_and_names_the_fix() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctxrelay.bind(user="alice")  # the structlog habit: binds nothing
        ctxrelay.use(ctxrelay.Context(user="bob"))
        gc.collect()
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 2, messages
    assert "never entered" in messages[0]
    assert "bind_request" in messages[0]
    assert caught[0].filename == __file__


def test_bind_used_properly_never_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @ctxrelay.bind(job="nightly")
        def job() -> str | None:
            return ctxrelay.get("job")

        with ctxrelay.bind(user="alice"):
            pass
        scope = ctxrelay.bind(user="bob")
        with scope:
            pass
        assert job() == "nightly"
        del job, scope
        gc.collect()


# -- Django ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["wsgi", "asgi"])
@pytest.mark.parametrize("how", ["block", "view"])
def test_django_middleware_sets_the_user_for_every_step_of_its_request(
    server: str, how: str
) -> None:
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    from .django_app import settings as project_settings

    if not settings.configured:
        settings.configure(**{k: v for k, v in vars(project_settings).items() if k.isupper()})
        django.setup()
    from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
    from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]
    from django.test import override_settings  # type: ignore[import-untyped]

    from . import django_scope_urls as urls

    middleware = [
        "ctxrelay.integrations.django.RelayMiddleware",
        "tests.integrations.django_scope_urls.WithBlockMiddleware",
        "tests.integrations.django_scope_urls.ProcessViewMiddleware",
    ]
    rids = {new_id(): f"user-{i}" for i in range(60)}

    def one(base: str, rid: str) -> dict[str, Any]:
        headers = {"x-request-id": rid, f"x-user-{how}": rids[rid]}
        reply = requests.get(base + "/report", headers=headers, timeout=30)
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    with (
        world() as (downstream, _, log, _logger),
        override_settings(
            ROOT_URLCONF="tests.integrations.django_scope_urls",
            MIDDLEWARE=middleware,
            CTXRELAY={"header_name": "x-request-id"},
        ),
    ):
        urls.DOWNSTREAM[:] = [downstream.origin]
        app = get_wsgi_application() if server == "wsgi" else get_asgi_application()
        serve = serve_wsgi(app, threads=8) if server == "wsgi" else serve_asgi(app)
        with serve as base, concurrent.futures.ThreadPoolExecutor(12) as clients:
            bodies = dict(zip(rids, clients.map(lambda rid: one(base, rid), rids), strict=True))
        for rid, user in rids.items():
            saw = steps_saw(bodies[rid], rid, downstream, urls.MAILBOX, log)
            assert saw == dict.fromkeys(["endpoint", "pool", "background", "outgoing", "log"], user)


def test_nested_sync_generator_binds_restore_the_outer_value_when_the_inner_exits() -> None:
    import contextvars

    def tenant(name: str) -> Generator[None, None, None]:
        with ctxrelay.bind(tenant=name):
            yield

    def handler() -> list[str | None]:
        outer, inner = tenant("outer"), tenant("inner")
        contextvars.copy_context().run(next, outer)
        seen = [ctxrelay.get("tenant")]
        contextvars.copy_context().run(next, inner)
        seen.append(ctxrelay.get("tenant"))
        contextvars.copy_context().run(inner.close)
        seen.append(ctxrelay.get("tenant"))
        contextvars.copy_context().run(outer.close)
        seen.append(ctxrelay.get("tenant"))
        return seen

    assert _in_request(handler) == ["outer", "inner", "outer", None]


def test_a_generator_closed_by_the_gc_in_a_later_request_touches_only_its_own() -> None:
    import contextvars

    kept: list[Generator[None, None, None]] = []

    def dependency() -> Generator[None, None, None]:
        with ctxrelay.bind(user="alice"):
            yield

    def first() -> None:
        gen = dependency()
        contextvars.copy_context().run(next, gen)
        kept.append(gen)  # never closed in its request

    def second() -> list[str | None]:
        ctxrelay.bind_request(user="bob")
        seen = [ctxrelay.get("user")]
        kept.pop()  # alice's generator is finalized here, in bob's request
        gc.collect()
        seen.append(ctxrelay.get("user"))
        return seen

    _in_request(first)
    assert _in_request(second) == ["bob", "bob"]
    assert ctxrelay.get("user") is None


def test_many_writes_in_one_request_do_not_pile_up() -> None:
    def handler() -> tuple[str | None, int, int]:
        for i in range(5000):
            ctxrelay.bind_request(step=str(i))
        shared = ctxrelay.current()._scope
        assert shared is not None
        return ctxrelay.get("step"), len(shared.layers), len(shared.overlay)

    assert _in_request(handler) == ("4999", 0, 1)


# -- aiohttp and gRPC servers ----------------------------------------------------------------


def test_an_aiohttp_middleware_sets_the_user_for_the_handler_and_its_pool() -> None:
    import aiohttp
    from aiohttp import web

    from ctxrelay.integrations.aiohttp_server import setup

    from .test_aiohttp_server import serve

    @web.middleware
    async def who(request: web.Request, handler: Any) -> web.StreamResponse:
        ctxrelay.bind_request(user=request.headers["x-user"])
        response: web.StreamResponse = await handler(request)
        return response

    async def report(request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        with ctxrelay.ThreadPoolExecutor(1) as pool:
            in_pool = await loop.run_in_executor(pool, ctxrelay.get, "user")
        return web.json_response({"endpoint": ctxrelay.get("user"), "pool": in_pool})

    app = web.Application()
    setup(app)
    app.middlewares.append(who)  # inside ctxrelay's
    app.router.add_get("/report", report)
    users = {new_id(): f"user-{i}" for i in range(100)}

    async def main() -> dict[str, Any]:
        async with serve(app) as base, aiohttp.ClientSession() as client:

            async def one(rid: str) -> tuple[str, Any]:
                headers = {"x-request-id": rid, "x-user": users[rid]}
                async with client.get(base + "/report", headers=headers) as reply:
                    return rid, await reply.json()

            return dict(await asyncio.gather(*(one(rid) for rid in users)))

    bodies = asyncio.run(main())
    for rid, user in users.items():
        assert bodies[rid] == {"endpoint": user, "pool": user}


def test_a_grpc_handler_sets_a_field_that_its_pool_and_its_log_see() -> None:
    import grpc

    from ctxrelay.integrations.grpc import relay_channel, relay_server

    pool = ctxrelay.ThreadPoolExecutor(2)

    def who(request: bytes, context: Any) -> bytes:
        ctxrelay.bind_request(user=request.decode())
        in_pool = pool.submit(ctxrelay.get, "user").result(timeout=WAIT)
        return f"{ctxrelay.get('user')}|{in_pool}".encode()

    server = relay_server(grpc.server(concurrent.futures.ThreadPoolExecutor(8)), echo=False)
    handler: Any = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("s.Svc", {"Who": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        with relay_channel(grpc.insecure_channel(target), target) as channel:
            call: Any = channel.unary_unary("/s.Svc/Who")

            def one(i: int) -> bytes:
                with ctxrelay.bind(request_id=f"req-{i}"):
                    reply: bytes = call(f"user-{i}".encode(), timeout=WAIT)
                    return reply

            with concurrent.futures.ThreadPoolExecutor(8) as clients:
                replies = list(clients.map(one, range(60)))
        assert replies == [f"user-{i}|user-{i}".encode() for i in range(60)]
    finally:
        server.stop(None).wait(WAIT)
        pool.shutdown()


def test_the_doors_request_log_line_carries_the_user_the_endpoint_set() -> None:
    async def endpoint(request: Request) -> Response:
        ctxrelay.bind_request(user="alice")
        return Response("ok")

    from starlette.applications import Starlette
    from starlette.routing import Route

    app = asgi.RelayMiddleware(Starlette(routes=[Route("/x", endpoint)]), log_requests=True)
    with serve_asgi(app) as base, _records("ctxrelay.asgi") as records:
        assert httpx.get(base + "/x").status_code == 200
        deadline = time.monotonic() + WAIT
        while not records and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [r.getMessage().endswith("user=alice") for r in records] == [True]


@contextmanager
def _records(name: str) -> Iterator[list[logging.LogRecord]]:
    found: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record)

    logger = logging.getLogger(name)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_reactive_action_scheduled_before_a_change_keeps_what_it_captured() -> None:
    from reactivex.scheduler import EventLoopScheduler

    from ctxrelay.integrations import reactivex as rx_relay

    scheduler = EventLoopScheduler()
    rx_relay.install()
    try:

        def handler() -> tuple[str | None, str | None]:
            seen: dict[str, str | None] = {}
            done = threading.Event()
            gate = threading.Event()

            def early(sched: Any, state: Any) -> None:
                gate.wait(WAIT)
                seen["before"] = ctxrelay.get("user")

            def late(sched: Any, state: Any) -> None:
                seen["after"] = ctxrelay.get("user")
                done.set()

            scheduler.schedule(early)
            ctxrelay.bind_request(user="alice")
            scheduler.schedule(late)
            gate.set()
            done.wait(WAIT)
            return seen.get("before"), seen.get("after")

        assert _in_request(handler) == (None, "alice")
    finally:
        rx_relay.uninstall()
        scheduler.dispose()
