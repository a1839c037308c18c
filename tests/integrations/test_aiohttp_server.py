"""The aiohttp web door: a real ``aiohttp.web`` server on 127.0.0.1, real
clients (aiohttp's, and raw sockets for what no client library would send).

Every place aiohttp runs user code for a request sees that request's context
-- the handler, the other middlewares, a streamed body, a websocket loop,
tasks and pool work it starts -- and nothing of it is left once the handler
call ends, whatever the outcome.  An outer probe middleware, installed
outside ctxrelay's, records what is bound after ctxrelay's reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import ctxrelay
from ctxrelay import Policy
from ctxrelay._request import MAX_HEADER_BYTES
from ctxrelay.integrations.aiohttp import trace_config
from ctxrelay.integrations.aiohttp_server import RelayMiddleware, setup

from .outgoing import assert_got_everything, assert_got_nothing_sensitive, two_servers

N_CONCURRENT = 200
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def seen() -> dict[str, Any]:
    """What user code sees of the current request, as plain data."""
    req = ctxrelay.request()
    return {
        "rid": ctxrelay.request_id(),
        "fields": dict(ctxrelay.current()),
        "tenant": req.headers.get("x-tenant") if req else None,
        "cookie": req.cookies.get("session") if req else None,
        "path": req.path if req else None,
        "query": req.query if req else None,
        "client": req.client if req else None,
        "scheme": req.scheme if req else None,
    }


class Outside:
    """A middleware outside ctxrelay's: what is bound once its call is over."""

    __middleware_version__ = 1

    def __init__(self) -> None:
        self.after: list[ctxrelay.Context] = []
        self.outcomes: list[str] = []

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        outcome = "returned"
        try:
            return await handler(request)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except web.HTTPException:
            outcome = "http-exception"
            raise
        except Exception:
            outcome = "raised"
            raise
        finally:
            self.after.append(ctxrelay.current())
            self.outcomes.append(outcome)


class Gates:
    """Handler-side events the tests wait on, with bounded waits."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.last: dict[str, Any] = {}


def make_app(gates: Gates, outside: Outside | None = None, **options: Any) -> web.Application:
    app = web.Application()
    relay = setup(app, **options)
    if outside is not None:
        app.middlewares.insert(0, outside)  # outermost: outside ctxrelay's

    async def plain(request: web.Request) -> web.Response:
        return web.json_response(seen())

    async def work(request: web.Request) -> web.Response:
        await asyncio.sleep(0.002)  # let the other requests interleave
        in_task = await asyncio.create_task(asyncio.sleep(0, ctxrelay.request_id()))
        loop = asyncio.get_running_loop()
        with ctxrelay.ThreadPoolExecutor(2) as pool:
            in_pool = await loop.run_in_executor(pool, ctxrelay.request_id)
        await asyncio.sleep(0.002)
        return web.json_response({**seen(), "task": in_task, "pool": in_pool})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(3):
            await asyncio.sleep(0)
            await response.write(f"{i} {ctxrelay.request_id()}\n".encode())
        await response.write_eof()
        return response

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        gates.started.set()
        try:
            for _ in range(2000):  # the client goes away meanwhile
                await response.write(b"x" * 65536)
                await asyncio.sleep(0.01)
        finally:
            gates.last = {"rid": ctxrelay.request_id()}
            gates.finished.set()
        return response

    async def hang(request: web.Request) -> web.Response:
        gates.started.set()
        try:
            await asyncio.sleep(60)  # cancelled when the client disconnects
        finally:
            gates.last = {"rid": ctxrelay.request_id()}
            gates.finished.set()
        return web.Response()

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError(f"boom in {ctxrelay.request_id()}")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text=str(ctxrelay.request_id()))

    async def own_id(request: web.Request) -> web.Response:
        return web.Response(headers={"X-Request-Id": "from-app"})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_json({**seen(), "said": message.data})
        return ws

    async def call_out(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trace_configs=[trace_config()]) as http:
            for url in request.query.getall("url"):
                async with http.get(url) as response:
                    await response.read()
        return web.Response(text="called")

    app.router.add_get("/plain", plain)
    app.router.add_get("/work", work)
    app.router.add_get("/stream", stream)
    app.router.add_get("/slow-stream", slow_stream)
    app.router.add_get("/hang", hang)
    app.router.add_get("/boom", boom)
    app.router.add_get("/missing", missing)
    app.router.add_get("/own-id", own_id)
    app.router.add_get("/ws", socket)
    app.router.add_get("/call-out", call_out)
    sub = web.Application()
    sub.router.add_get("/plain", plain)
    app.add_subapp("/sub", sub)
    assert setup(app) is relay  # idempotent
    return app


@asynccontextmanager
async def serve(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port>; yield the base URL; stop it after."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main`` on a fresh event loop; the test thread stays empty."""
    result = asyncio.run(asyncio.wait_for(main(), 90))
    assert ctxrelay.current() == ctxrelay.Context()
    return result


async def get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any, str]:
    """(status, response headers, body) of one GET."""
    async with http.get(url, **kwargs) as response:
        return response.status, response.headers, await response.text()


async def raw(base: str, head: bytes) -> bytes:
    """Send ``head`` (request line and headers, no CRLF CRLF) on a raw socket."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def new_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# -- the door's rule ---------------------------------------------------------------
def test_handler_sees_inbound_id_fields_and_snapshot_and_the_id_is_echoed() -> None:
    ctxrelay.configure(Policy(capture={"x-tenant"}))

    async def main() -> tuple[int, Any, Any]:
        outside = Outside()
        async with serve(make_app(Gates(), outside)) as base, aiohttp.ClientSession() as http:
            headers = {"X-Request-Id": "r-aio-1", "X-Tenant": "acme", "Cookie": "session=s1"}
            status, sent, body = await get(http, f"{base}/plain?a=1&b=%20", headers=headers)
            return status, sent, (body, outside.after, outside.outcomes)

    status, sent, (body, after, outcomes) = run(main)

    got = json.loads(body)
    assert status == 200
    assert sent["X-Request-Id"] == "r-aio-1"
    assert got["rid"] == "r-aio-1"
    assert got["fields"] == {"request_id": "r-aio-1", "x-tenant": "acme"}
    assert (got["tenant"], got["cookie"], got["path"]) == ("acme", "s1", "/plain")
    assert got["query"] == "a=1&b=%20"
    assert got["scheme"] == "http"
    assert got["client"].startswith("127.0.0.1:")
    assert after == [ctxrelay.Context()]
    assert outcomes == ["returned"]


def test_a_missing_or_invalid_id_is_replaced_by_a_generated_one_and_echoed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[tuple[str, str]]:
        async with serve(make_app(Gates())) as base:
            pairs = []
            for head in (
                b"GET /plain HTTP/1.1\r\nHost: x",
                b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Request-Id: has space",
                b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + b"a" * 200,
                b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Request-Id: caf\xc3\xa9",
            ):
                answer = await raw(base, head)
                head_part, _, body = answer.partition(b"\r\n\r\n")
                echoed = [
                    line.split(b":", 1)[1].strip().decode()
                    for line in head_part.split(b"\r\n")
                    if line.lower().startswith(b"x-request-id:")
                ]

                pairs.append((echoed[0], json.loads(body)["rid"]))
            return pairs

    with caplog.at_level(logging.DEBUG, logger="ctxrelay"):
        pairs = run(main)
    for echoed, rid in pairs:
        assert echoed == rid
        assert len(rid) == 32
        int(rid, 16)
    assert len({rid for _, rid in pairs}) == 4
    assert sum("replaced an invalid inbound x-request-id" in m for m in caplog.messages) >= 2
    assert not any("\r" in m or "\n" in m for m in caplog.messages)


def test_hostile_header_values_are_never_stored_and_baggage_needs_a_trusted_peer() -> None:
    ctxrelay.configure(Policy(capture={"x-tenant"}))

    async def main() -> tuple[list[bytes], list[dict[str, Any]], list[ctxrelay.Context]]:
        outside = Outside()
        # aiohttp refuses fields over 8190 bytes by default: let the door see one.
        async with serve(make_app(Gates(), outside), max_field_size=4 * MAX_HEADER_BYTES) as base:
            # Control characters: aiohttp's parser answers 400 itself, before
            # any middleware runs -- nothing is bound, nothing is read.
            refused = []
            for value in (b"ev\x01il", b"a\x00b", b"a\x7fb", b"a\x1bb"):
                answer = await raw(base, b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Tenant: " + value)
                refused.append(answer.split(b"\r\n", 1)[0])
            out = []
            for head in (
                # over the snapshot's per-value cap: dropped whole
                b"GET /plain HTTP/1.1\r\nHost: x\r\nX-Tenant: " + b"t" * (MAX_HEADER_BYTES + 1),
                # malformed trace headers and an untrusted peer's baggage
                b"GET /plain HTTP/1.1\r\nHost: x\r\ntraceparent: 00-zz-zz-01\r\n"
                b"baggage: user=root,role=admin",
            ):
                answer = await raw(base, head)
                out.append(json.loads(answer.partition(b"\r\n\r\n")[2]))
            return refused, out, outside.after

    logging.getLogger("aiohttp.server").disabled = True  # its 400 tracebacks
    try:
        refused, (huge, untrusted), after = run(main)
    finally:
        logging.getLogger("aiohttp.server").disabled = False
    assert all(line.endswith(b" 400 Bad Request") for line in refused), refused
    assert len(after) == 2  # only the two requests aiohttp let through reached the door
    assert huge["tenant"] is None
    assert "x-tenant" not in huge["fields"]
    assert set(untrusted["fields"]) == {"request_id"}


def test_baggage_from_a_trusted_peer_becomes_fields() -> None:
    ctxrelay.configure(Policy(trusted_peers=("127.0.0.1",)))

    async def main() -> dict[str, Any]:
        async with serve(make_app(Gates())) as base, aiohttp.ClientSession() as http:
            headers = {"baggage": "tenant=acme,user=ada", "X-Request-Id": "r-trusted"}
            return dict(json.loads((await get(http, f"{base}/plain", headers=headers))[2]))

    got = run(main)
    assert got["fields"] == {"request_id": "r-trusted", "tenant": "acme", "user": "ada"}


# -- every outcome ---------------------------------------------------------------
def test_streamed_body_carries_the_id_and_the_prepared_response_echoes_it() -> None:
    async def main() -> tuple[Any, str]:
        async with serve(make_app(Gates())) as base, aiohttp.ClientSession() as http:
            _, sent, body = await get(http, f"{base}/stream", headers={"X-Request-Id": "r-s"})
            return sent, body

    sent, body = run(main)
    assert sent["X-Request-Id"] == "r-s"
    assert body.splitlines() == ["0 r-s", "1 r-s", "2 r-s"]


def test_websocket_handler_sees_its_id_and_the_101_echoes_it() -> None:
    async def main() -> list[tuple[str | None, dict[str, Any]]]:
        async with serve(make_app(Gates())) as base, aiohttp.ClientSession() as http:
            out = []
            for rid in ("r-ws-1", None):
                headers = {"X-Request-Id": rid} if rid else {}
                async with http.ws_connect(f"{base}/ws", headers=headers) as ws:
                    echoed = ws._response.headers.get("X-Request-Id")
                    await ws.send_str("hi")
                    out.append((echoed, await ws.receive_json()))
            return out

    (echoed, got), (echoed2, got2) = run(main)
    assert echoed == got["rid"] == "r-ws-1"
    assert got["scheme"] == "ws"
    assert got["said"] == "hi"
    assert echoed2 == got2["rid"]
    assert len(got2["rid"]) == 32


def test_unhandled_error_gives_a_500_with_the_id_and_a_log_line_that_carries_it() -> None:
    records: list[tuple[str, str | None]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append((record.getMessage(), ctxrelay.request_id()))

    handler = Keep()
    logging.getLogger("ctxrelay.aiohttp").addHandler(handler)
    aiohttp_log = logging.getLogger("aiohttp.server")
    saved = aiohttp_log.propagate
    aiohttp_log.propagate = False  # its own traceback line: not this test's output
    try:

        async def main() -> tuple[int, Any, list[ctxrelay.Context], list[str]]:
            outside = Outside()
            async with serve(make_app(Gates(), outside)) as base, aiohttp.ClientSession() as http:
                status, sent, _ = await get(http, f"{base}/boom", headers={"X-Request-Id": "r-b"})
                return status, sent, outside.after, outside.outcomes

        status, sent, after, outcomes = run(main)
    finally:
        logging.getLogger("ctxrelay.aiohttp").removeHandler(handler)
        aiohttp_log.propagate = saved
    assert status == 500
    assert sent["X-Request-Id"] == "r-b"
    assert records == [("unhandled exception in GET /boom", "r-b")]
    assert after == [ctxrelay.Context()]
    assert outcomes == ["raised"]


def test_an_http_exception_is_an_answer_that_echoes_the_id_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[int, Any, str, list[ctxrelay.Context]]:
        outside = Outside()
        async with serve(make_app(Gates(), outside)) as base, aiohttp.ClientSession() as http:
            status, sent, body = await get(http, f"{base}/missing", headers={"X-Request-Id": "r-4"})
            return status, sent, body, outside.after

    with caplog.at_level(logging.DEBUG, logger="ctxrelay"):
        status, sent, body, after = run(main)
    assert (status, sent["X-Request-Id"], body) == (404, "r-4", "r-4")
    assert after == [ctxrelay.Context()]
    assert not [r for r in caplog.records if r.name == "ctxrelay.aiohttp"]


def test_a_client_that_goes_away_mid_stream_leaves_nothing_bound() -> None:
    async def main() -> tuple[dict[str, Any], list[ctxrelay.Context], Any]:
        gates, outside = Gates(), Outside()
        async with serve(make_app(gates, outside)) as base:
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /slow-stream HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-gone\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(gates.started.wait(), 30)
            await reader.read(1024)
            writer.transport.abort()  # the client disappears
            await asyncio.wait_for(gates.finished.wait(), 60)
            async with aiohttp.ClientSession() as http:
                after_next = await get(http, f"{base}/plain")
            return gates.last, outside.after, after_next

    last, after, (status, sent, _) = run(main)
    assert last == {"rid": "r-gone"}
    assert after[0] == ctxrelay.Context()
    assert status == 200
    assert sent["X-Request-Id"] != "r-gone"


def test_handler_cancellation_on_disconnect_resets_the_context() -> None:
    async def main() -> tuple[dict[str, Any], list[ctxrelay.Context], list[str]]:
        gates, outside = Gates(), Outside()
        async with serve(make_app(gates, outside), handler_cancellation=True) as base:
            host, port = base.removeprefix("http://").split(":")
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-cancel\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(gates.started.wait(), 30)
            writer.close()
            await writer.wait_closed()
            await asyncio.wait_for(gates.finished.wait(), 30)
            for _ in range(200):  # the outer middleware's finally runs right after
                if outside.after:
                    break
                await asyncio.sleep(0.01)
            return gates.last, outside.after, outside.outcomes

    last, after, outcomes = run(main)
    assert last == {"rid": "r-cancel"}
    assert after == [ctxrelay.Context()]
    assert outcomes == ["cancelled"]


# -- many at once ----------------------------------------------------------------
def test_200_concurrent_requests_each_see_only_their_own_context_everywhere() -> None:
    ctxrelay.configure(Policy(capture={"x-tenant"}))

    async def main() -> tuple[list[tuple[str, str, dict[str, Any], Any]], list[ctxrelay.Context]]:
        outside = Outside()
        connector = aiohttp.TCPConnector(limit=64)
        async with (
            serve(make_app(Gates(), outside)) as base,
            aiohttp.ClientSession(connector=connector) as http,
        ):

            async def one(i: int) -> tuple[str, str, dict[str, Any], Any]:
                rid, tenant = new_id(), f"t{i}"
                headers = {"X-Request-Id": rid, "X-Tenant": tenant, "Cookie": f"session=c{i}"}
                async with http.get(f"{base}/work", headers=headers) as response:
                    return rid, tenant, await response.json(), response.headers["X-Request-Id"]

            results = await asyncio.gather(*(one(i) for i in range(N_CONCURRENT)))
            return results, outside.after

    results, after = run(main)
    assert len(results) == N_CONCURRENT
    for rid, tenant, got, echoed in results:
        assert got["rid"] == got["task"] == got["pool"] == echoed == rid
        assert got["fields"] == {"request_id": rid, "x-tenant": tenant}
        assert got["cookie"] == f"c{tenant[1:]}"
    assert len(after) == N_CONCURRENT
    assert all(ctx == ctxrelay.Context() for ctx in after)


# -- the policy --------------------------------------------------------------------
def test_credentials_reach_only_the_destination_the_policy_names() -> None:
    with two_servers() as (internal, foreign):

        async def main() -> None:
            async with serve(make_app(Gates())) as base, aiohttp.ClientSession() as http:
                headers = {
                    "X-Request-Id": "req-1",
                    "Cookie": "session=abc123",
                    "X-Gray": "canary",
                    # fields from a trusted peer travel in-house as baggage
                    "baggage": "tenant=acme,user=J%C3%B6rg%20M%C3%BCller",
                }
                params = [("url", internal.url("/a")), ("url", foreign.url("/a"))]
                status, _, _ = await get(http, f"{base}/call-out", headers=headers, params=params)
                assert status == 200

        policy = ctxrelay.active_policy()

        ctxrelay.configure(dataclasses.replace(policy, trusted_peers=("127.0.0.1",)))
        run(main)
    assert_got_everything(internal.last("/a"))
    assert_got_nothing_sensitive(foreign.last("/a"))


# -- configuration -----------------------------------------------------------------
def test_header_name_echo_off_sub_apps_and_the_middleware_alone() -> None:
    async def main() -> list[tuple[int, Any, str]]:
        out = []
        async with serve(make_app(Gates(), header_name="X-Trace-Id")) as base:
            async with aiohttp.ClientSession() as http:
                out.append(await get(http, f"{base}/plain", headers={"X-Trace-Id": "t-1"}))
                out.append(await get(http, f"{base}/sub/plain", headers={"X-Trace-Id": "t-2"}))
                out.append(await get(http, f"{base}/own-id"))
        async with serve(make_app(Gates(), echo=False)) as base:
            async with aiohttp.ClientSession() as http:
                out.append(await get(http, f"{base}/plain", headers={"X-Request-Id": "r-q"}))
        alone = web.Application(middlewares=[RelayMiddleware()])

        async def plain(request: web.Request) -> web.Response:
            return web.Response(text=str(ctxrelay.request_id()))

        alone.router.add_get("/plain", plain)
        async with serve(alone) as base, aiohttp.ClientSession() as http:
            out.append(await get(http, f"{base}/plain", headers={"X-Request-Id": "r-alone"}))
        return out

    trace, sub, own, quiet, alone = run(main)

    assert trace[1]["X-Trace-Id"] == json.loads(trace[2])["rid"] == "t-1"
    assert sub[1]["X-Trace-Id"] == json.loads(sub[2])["rid"] == "t-2"
    assert own[1].getall("X-Request-Id") == ["from-app"]
    assert "X-Request-Id" not in quiet[1]
    assert json.loads(quiet[2])["rid"] == "r-q"
    assert alone[1]["X-Request-Id"] == alone[2] == "r-alone"


def test_a_policy_configured_after_start_up_is_followed() -> None:
    async def main() -> tuple[Any, str]:
        async with serve(make_app(Gates())) as base, aiohttp.ClientSession() as http:
            ctxrelay.configure(Policy(request_id_header="x-correlation-id"))
            _, sent, body = await get(http, f"{base}/plain", headers={"X-Correlation-Id": "c-9"})
            return sent, body

    sent, body = run(main)

    assert sent["X-Correlation-Id"] == json.loads(body)["rid"] == "c-9"
