"""The ASGI door: FastAPI and Starlette served by uvicorn on 127.0.0.1, driven
by httpx, plus raw in-process ASGI calls for hostile input and fuzzing.

Every place a framework runs user code for a request must see that request's
context: async endpoints, sync endpoints and dependencies in the thread pool
(fastapi #953), BackgroundTasks after the response, streamed and SSE chunks,
exception handlers and the error log line (asgi-correlation-id #55/#104),
websocket handlers -- and work that outlives the response (seed 002).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

import ctxrelay
from ctxrelay import _policy
from ctxrelay._request import MAX_HEADER_BYTES, MAX_HEADERS
from ctxrelay.integrations.asgi import RelayMiddleware, valid_request_id
from tests.servers import WAIT, Mailbox, call, fire, new_id, recording, serve_asgi

log = logging.getLogger("tests.web.asgi")

N_CONCURRENT = 500

Scope = MutableMapping[str, Any]


def seen() -> dict[str, Any]:
    """What user code sees of the current request, as plain data."""
    req = ctxrelay.request()
    return {
        "rid": ctxrelay.request_id(),
        "header": req.headers.get("x-request-id") if req else None,
        "tenant": req.headers.get("x-tenant") if req else None,
        "cookie": req.cookies.get("session") if req else None,
        "path": req.path if req else None,
    }


# -- the FastAPI app ------------------------------------------------------------
class Handled(Exception):
    pass


def make_fastapi(box: Mailbox) -> FastAPI:
    api = FastAPI()

    def sync_dependency() -> str | None:  # FastAPI runs it in the thread pool
        return ctxrelay.request_id()

    def record_later(key: str) -> None:  # a BackgroundTask: runs after the response
        box.post(key, seen())

    def late_reader(key: str) -> None:  # seed 002: waits past the response
        box.gate(key).wait(WAIT)
        box.post(key, seen())

    @api.get("/async")
    async def async_endpoint() -> dict[str, Any]:
        return seen()

    @api.get("/sync")
    def sync_endpoint(dep: str | None = Depends(sync_dependency)) -> dict[str, Any]:
        return {**seen(), "dep": dep}

    @api.get("/work")
    async def work(
        key: str, tasks: BackgroundTasks, dep: str | None = Depends(sync_dependency)
    ) -> dict[str, Any]:
        await asyncio.sleep(0.005)  # let the other requests interleave
        log.info("handled %s", key)
        tasks.add_task(record_later, key)
        return {**seen(), "dep": dep}

    @api.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            for i in range(3):
                await asyncio.sleep(0)
                yield f"{i} {ctxrelay.request_id()}\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.get("/stream-sync")
    def stream_sync() -> StreamingResponse:
        def chunks() -> Iterator[str]:  # Starlette iterates it in the thread pool
            for i in range(3):
                yield f"{i} {ctxrelay.request_id()}\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.get("/sse")
    async def sse() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(3):
                await asyncio.sleep(0)
                yield f"id: {i}\ndata: {ctxrelay.request_id()}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"boom in {ctxrelay.request_id()}")

    @api.get("/boom-sync")
    def boom_sync() -> None:
        raise RuntimeError(f"boom in {ctxrelay.request_id()}")

    @api.get("/handled")
    async def handled() -> None:
        raise Handled

    @api.exception_handler(Handled)
    async def on_handled(request: Request, exc: Handled) -> JSONResponse:
        return JSONResponse({"handler_rid": ctxrelay.request_id()}, status_code=418)

    @api.exception_handler(500)
    async def on_500(request: Request, exc: Exception) -> JSONResponse:
        log.error("500 handler for %s", request.url.path)
        return JSONResponse({"handler_rid": ctxrelay.request_id()}, status_code=500)

    @api.get("/late/{mode}")
    async def late(mode: str, key: str, tasks: BackgroundTasks) -> dict[str, str]:
        if mode == "thread":
            ctxrelay.Thread(target=late_reader, args=(key,)).start()
        elif mode == "wrap":
            threading.Thread(target=ctxrelay.wrap(late_reader), args=(key,)).start()
        elif mode == "run_async":
            ctxrelay.run_async(late_reader)(key)
        elif mode == "background":
            tasks.add_task(late_reader, key)
        elif mode == "asyncio":

            async def later() -> None:
                while not box.gate(key).is_set():
                    await asyncio.sleep(0.01)
                box.post(key, seen())

            background.add(asyncio.get_running_loop().create_task(later()))
        return {"started": mode}

    background: set[asyncio.Task[None]] = set()

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(seen())
        await websocket.close()

    return api


@pytest.fixture(scope="module")
def box() -> Mailbox:
    return Mailbox()


@pytest.fixture(scope="module", params=["wrapped", "add_middleware"])
def fastapi_url(request: pytest.FixtureRequest, box: Mailbox) -> Iterator[str]:
    api = make_fastapi(box)
    app: Any = api
    if request.param == "wrapped":
        app = RelayMiddleware(api)
    else:
        api.add_middleware(RelayMiddleware)
    with serve_asgi(app) as url:
        yield url


@pytest.fixture(scope="module")
def wrapped_url(box: Mailbox) -> Iterator[str]:
    """FastAPI wrapped outermost: the 500 machinery runs inside the binding."""
    with serve_asgi(RelayMiddleware(make_fastapi(box))) as url:
        yield url


HEADERS = {"x-tenant": "acme", "cookie": "session=s3cr3t; theme=dark"}


def get(url: str, path: str, rid: str | None = None, **kw: Any) -> httpx.Response:
    headers = dict(HEADERS)
    if rid is not None:
        headers["x-request-id"] = rid
    return httpx.get(url + path, headers=headers, timeout=WAIT, **kw)


# -- visibility, one request at a time ---------------------------------------
def test_async_endpoint_sees_inbound_id_headers_and_cookies(fastapi_url: str) -> None:
    rid = new_id()
    response = get(fastapi_url, "/async", rid)
    assert response.json() == {
        "rid": rid,
        "header": rid,
        "tenant": "acme",
        "cookie": "s3cr3t",
        "path": "/async",
    }
    assert response.headers["x-request-id"] == rid


def test_missing_id_is_generated_and_echoed(fastapi_url: str) -> None:
    response = get(fastapi_url, "/async")
    rid = response.json()["rid"]
    assert len(rid) == 32
    int(rid, 16)
    assert response.headers["x-request-id"] == rid


def test_sync_endpoint_and_dependency_in_thread_pool_see_the_request(fastapi_url: str) -> None:
    rid = new_id()
    body = get(fastapi_url, "/sync", rid).json()
    assert body["rid"] == body["dep"] == rid
    assert body["cookie"] == "s3cr3t"


@pytest.mark.parametrize("path", ["/stream", "/stream-sync", "/sse"])
def test_every_streamed_chunk_carries_the_request_id(fastapi_url: str, path: str) -> None:
    rid = new_id()
    response = get(fastapi_url, path, rid)
    assert response.headers["x-request-id"] == rid
    body = response.text
    if path == "/sse":
        assert [line[6:] for line in body.splitlines() if line.startswith("data: ")] == [rid] * 3
    else:
        assert body.splitlines() == [f"{i} {rid}" for i in range(3)]


def test_handled_exception_handler_sees_the_request_id(fastapi_url: str) -> None:
    rid = new_id()
    response = get(fastapi_url, "/handled", rid)
    assert response.status_code == 418
    assert response.json() == {"handler_rid": rid}
    assert response.headers["x-request-id"] == rid


@pytest.mark.parametrize("path", ["/boom", "/boom-sync"])
def test_unhandled_error_500_and_its_log_lines_carry_the_request_id(
    wrapped_url: str, path: str
) -> None:
    # asgi-correlation-id #55/#104: wrapped outermost, Starlette's
    # ServerErrorMiddleware and the exception_handler(500) run inside the binding.
    rid = new_id()
    with recording("ctxrelay.asgi", "tests.web.asgi", level=logging.ERROR) as logs:
        response = get(wrapped_url, path, rid)
        # The 500 goes out before the exception reaches the middleware's log call.
        logs.wait_for(lambda message: message.startswith("unhandled exception"))
    assert response.status_code == 500
    assert response.json() == {"handler_rid": rid}
    assert response.headers["x-request-id"] == rid
    assert (f"500 handler for {path}", rid) in logs.lines
    errors = [(msg, bound) for msg, bound in logs.lines if msg.startswith("unhandled exception")]
    assert errors == [(f"unhandled exception in GET {path}", rid)]
    record = next(r for r in logs.records if r.name == "ctxrelay.asgi")
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == f"boom in {rid}"


def websocket_session(app: Any, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Drive one websocket session in process, the way a server does: connect,
    then collect what the app sends until it closes; return those messages."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50001),
        "server": ("127.0.0.1", 8000),
        "subprotocols": [],
    }

    async def receive() -> dict[str, Any]:
        return await incoming.get()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})

    async def main() -> None:
        incoming.put_nowait({"type": "websocket.connect"})
        await asyncio.wait_for(app(scope, receive, send), WAIT)

    asyncio.run(main())
    return sent


def test_websocket_handler_sees_the_request_and_accept_echoes_the_id(box: Mailbox) -> None:
    # Driven in process over the ASGI websocket protocol a server speaks;
    # test_asgi_websocket.py does it through uvicorn with a real client.
    rid = new_id()
    app = RelayMiddleware(make_fastapi(box))
    sent = websocket_session(app, "/ws", {**HEADERS, "x-request-id": rid})
    accept, text = sent[0], sent[1]
    assert accept["type"] == "websocket.accept"
    assert (b"x-request-id", rid.encode()) in accept["headers"]
    assert json.loads(text["text"]) == {
        "rid": rid,
        "header": rid,
        "tenant": "acme",
        "cookie": "s3cr3t",
        "path": "/ws",
    }


# -- seed 002: work that outlives the response --------------------------------
@pytest.mark.parametrize("mode", ["thread", "wrap", "run_async", "background", "asyncio"])
def test_fire_and_forget_work_reads_headers_and_cookies_after_the_response(
    fastapi_url: str, box: Mailbox, mode: str
) -> None:
    rid, key = new_id(), new_id("key")
    gate = box.gate(key)
    response = get(fastapi_url, f"/late/{mode}", rid, params={"key": key})
    assert response.json() == {"started": mode}
    assert key not in box.items  # still waiting: the response came first
    gate.set()  # only now, after the whole response arrived, does the task read
    assert box.wait([key])[key] == {
        "rid": rid,
        "header": rid,
        "tenant": "acme",
        "cookie": "s3cr3t",
        "path": f"/late/{mode}",
    }


# -- concurrency -----------------------------------------------------------------
def test_500_concurrent_requests_each_see_only_their_own_id_everywhere(
    wrapped_url: str, box: Mailbox
) -> None:
    with recording("tests.web.asgi") as logs:
        results = fire(wrapped_url, "/work", N_CONCURRENT, params=lambda rid: {"key": "bg-" + rid})
    ids = [rid for rid, _ in results]
    assert len(set(ids)) == N_CONCURRENT
    for rid, response in results:
        assert response.headers["x-request-id"] == rid
        body = response.json()
        assert body["rid"] == body["dep"] == body["header"] == rid
    background = box.wait(["bg-" + rid for rid in ids])
    assert all(background["bg-" + rid]["rid"] == rid for rid in ids)
    handled = {msg[len("handled bg-") :]: bound for msg, bound in logs.lines}
    assert handled == {rid: rid for rid in ids}


def test_500_concurrent_streams_each_chunk_carries_its_own_id(wrapped_url: str) -> None:
    results = fire(wrapped_url, "/stream", N_CONCURRENT)
    for rid, response in results:
        assert response.text.splitlines() == [f"{i} {rid}" for i in range(3)]


# -- Starlette, configured the Starlette way ----------------------------------
def make_starlette(box: Mailbox) -> Starlette:
    async def async_endpoint(request: Request) -> PlainTextResponse:
        await asyncio.sleep(0.002)
        key = request.query_params["key"]
        task = BackgroundTask(lambda: box.post(key, seen()))
        return PlainTextResponse(str(ctxrelay.request_id()), background=task)

    def sync_endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(ctxrelay.request_id()))

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(str(ctxrelay.request_id()))
        await websocket.close()

    return Starlette(
        routes=[
            Route("/async", async_endpoint),
            Route("/sync", sync_endpoint),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[Middleware(RelayMiddleware, header_name="X-Correlation-ID")],
    )


def test_starlette_honours_a_configured_header_name(box: Mailbox) -> None:
    with serve_asgi(make_starlette(box)) as url:
        response = httpx.get(url + "/sync", headers={"x-correlation-id": "abc:123"})
        assert response.text == "abc:123"
        assert response.headers["x-correlation-id"] == "abc:123"
        assert "x-request-id" not in response.headers


def test_starlette_500_concurrent_requests_and_background_tasks_see_their_own_id(
    box: Mailbox,
) -> None:
    with serve_asgi(make_starlette(box)) as url:
        results = fire(
            url, "/async", N_CONCURRENT, lambda rid: {"key": "s-" + rid}, "x-correlation-id"
        )
    for rid, response in results:
        assert response.text == rid
        assert response.headers["x-correlation-id"] == rid
    background = box.wait(["s-" + rid for rid, _ in results])
    assert all(background["s-" + rid]["rid"] == rid for rid, _ in results)


def test_starlette_websocket_sees_its_id(box: Mailbox) -> None:
    sent = websocket_session(make_starlette(box), "/ws", {"x-correlation-id": "ws-1"})
    assert [m.get("text") for m in sent if m["type"] == "websocket.send"] == ["ws-1"]


# -- raw ASGI, in process: lifespan, policy, hostile input ----------------------


class Probe:
    """A raw ASGI app that records the context it ran in and answers 200."""

    def __init__(self) -> None:
        self.contexts: list[ctxrelay.Context] = []
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.contexts.append(ctxrelay.current())
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


def http_scope(*headers: tuple[bytes, bytes], **extra: Any) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/probe",
        "query_string": b"a=1",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        **extra,
    }


def echoed(sent: list[dict[str, Any]]) -> str:
    start = next(m for m in sent if m["type"] == "http.response.start")
    values: list[str] = [v.decode() for k, v in start["headers"] if k == b"x-request-id"]
    assert len(values) == 1
    return values[0]


def test_lifespan_passes_through_untouched() -> None:
    probe = Probe()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    assert call(RelayMiddleware(probe), scope) == []
    assert probe.scopes == [scope]
    assert probe.contexts == [ctxrelay.Context()]


def test_context_is_reset_after_the_call_on_success_and_on_error() -> None:
    probe = Probe()
    call(RelayMiddleware(probe), http_scope())
    assert ctxrelay.current() == ctxrelay.Context()

    async def failing(scope: Scope, receive: Any, send: Any) -> None:
        raise ValueError("app failed")

    with pytest.raises(ValueError, match="app failed"):
        call(RelayMiddleware(failing, log_errors=False), http_scope())
    assert ctxrelay.current() == ctxrelay.Context()


def test_context_is_reset_when_the_client_disconnects_mid_response() -> None:
    started = asyncio.Event()

    async def slow(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await asyncio.sleep(60)  # the disconnect cancels this

    async def main() -> tuple[ctxrelay.Context, ctxrelay.Context]:
        async def send(message: Scope) -> None:
            pass

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        outer = ctxrelay.current()
        task = asyncio.create_task(RelayMiddleware(slow)(http_scope(), receive, send))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return outer, ctxrelay.current()

    outer, after = asyncio.run(main())
    assert outer == after == ctxrelay.Context()


def test_an_id_the_app_set_itself_is_not_duplicated() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        headers = [(b"x-request-id", b"from-app")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    assert echoed(call(RelayMiddleware(app), http_scope((b"x-request-id", b"in")))) == "from-app"


def test_echo_can_be_turned_off() -> None:
    sent = call(RelayMiddleware(Probe(), echo=False), http_scope())
    assert sent[0]["headers"] == []


def test_policy_request_id_header_is_followed_at_request_time() -> None:
    probe = Probe()
    app = RelayMiddleware(probe)  # built before configure(): still follows it
    _policy.configure(_policy.Policy(request_id_header="X-Trace-Id"))
    sent = call(app, http_scope((b"x-trace-id", b"t-1"), (b"x-request-id", b"r-1")))
    assert probe.contexts[0].get("request_id") == "t-1"
    start = sent[0]
    assert (b"x-trace-id", b"t-1") in start["headers"]


def test_captured_headers_become_fields_and_baggage_needs_a_trusted_peer() -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant"}, trusted_peers=("10.0.0.7",)))
    baggage = (b"baggage", b"user=alice")
    probe = Probe()
    app = RelayMiddleware(probe)
    call(app, http_scope((b"x-tenant", b"acme"), baggage, client=("203.0.113.9", 4000)))
    call(app, http_scope((b"x-tenant", b"acme"), baggage, client=("10.0.0.7", 4000)))
    internet, peer = probe.contexts
    assert internet.get("x-tenant") == peer.get("x-tenant") == "acme"
    assert "user" not in internet
    assert peer.get("user") == "alice"


def test_a_custom_validator_decides_and_cannot_admit_a_control_character() -> None:
    def only_uuids(value: str) -> bool:
        try:
            uuid.UUID(value)
        except ValueError:
            return False
        return True

    probe = Probe()
    app = RelayMiddleware(probe, validator=only_uuids)
    good = str(uuid.uuid4())
    call(app, http_scope((b"x-request-id", good.encode())))
    call(app, http_scope((b"x-request-id", b"not-a-uuid")))
    lax = RelayMiddleware(probe, validator=lambda value: True)
    call(lax, http_scope((b"x-request-id", b"bad\r\nSet-Cookie: x=1")))
    ids = [ctx["request_id"] for ctx in probe.contexts]
    assert ids[0] == good
    assert ids[1] != "not-a-uuid"
    assert "\r" not in ids[2]
    assert len(ids[2]) == 32


def test_a_validator_that_raises_just_refuses_the_id() -> None:
    def broken(value: str) -> bool:
        raise RuntimeError("validator bug")

    probe = Probe()
    call(RelayMiddleware(probe, validator=broken), http_scope((b"x-request-id", b"abc")))
    assert probe.contexts[0]["request_id"] != "abc"


@pytest.mark.parametrize(
    "good", ["a", "A" * 128, "Root=1-abc".replace("=", ":"), "req.1_2-3:4", str(uuid.uuid4())]
)
def test_valid_ids_of_many_formats_are_kept(good: str) -> None:
    probe = Probe()
    sent = call(RelayMiddleware(probe), http_scope((b"x-request-id", good.encode())))
    assert probe.contexts[0]["request_id"] == echoed(sent) == good


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"A" * 129,
        b"x" * 10_000,
        b"has space",
        b"semi;colon",
        b"nul\x00byte",
        b"cr\rlf\ninjection",
        b"tab\there",
        b"\xff\xfe latin-1",
        "caf\u00e9".encode(),
    ],
)
def test_invalid_ids_are_replaced_by_a_generated_one_with_a_debug_log(
    bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    probe = Probe()
    with caplog.at_level(logging.DEBUG, logger="ctxrelay"):
        sent = call(RelayMiddleware(probe), http_scope((b"x-request-id", bad)))
    rid = probe.contexts[0]["request_id"]
    assert rid == echoed(sent)
    assert len(rid) == 32
    int(rid, 16)
    assert any("replaced an invalid inbound x-request-id" in m for m in caplog.messages)
    assert not any("\r" in m or "\n" in m or "\x00" in m for m in caplog.messages)


def test_header_values_with_cr_lf_nul_are_never_stored_in_the_snapshot() -> None:
    probe = Probe()
    call(
        RelayMiddleware(probe, update_request_header=False),
        http_scope(
            (b"x-ok", b"fine"),
            (b"x-cr", b"a\rb"),
            (b"x-lf", b"a\nSet-Cookie: evil=1"),
            (b"x-nul", b"a\x00b"),
            (b"cookie", b"session=1\r\nx: y"),
        ),
    )
    req = probe.contexts[0].request
    assert req is not None
    assert dict(req.headers) == {"x-ok": "fine"}
    assert dict(req.cookies) == {}


def test_oversized_headers_are_capped() -> None:
    probe = Probe()
    many = [(f"x-h{i}".encode(), b"v") for i in range(MAX_HEADERS + 50)]
    huge = (b"x-huge", b"h" * (MAX_HEADER_BYTES + 1))
    call(RelayMiddleware(probe), http_scope(huge, *many))
    req = probe.contexts[0].request
    assert req is not None
    assert "x-huge" not in req.headers
    assert len(req.headers.multi_items()) <= MAX_HEADERS


# Anything a broken server or a hostile client could put in a scope.
junk = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.binary(max_size=5), max_size=3),
    st.tuples(st.integers(), st.integers()),
)
header_entries = st.one_of(
    st.tuples(st.binary(max_size=30), st.binary(max_size=200)),
    st.tuples(st.just(b"x-request-id"), st.binary(max_size=200)),
    st.tuples(st.just(b"cookie"), st.binary(max_size=200)),
    st.tuples(st.just(b"baggage"), st.binary(max_size=200)),
    junk,
)
scopes = st.fixed_dictionaries(
    {"type": st.sampled_from(["http", "websocket"])},
    optional={
        "method": junk,
        "path": st.one_of(st.text(max_size=40), junk),
        "query_string": junk,
        "scheme": junk,
        "client": st.one_of(st.tuples(st.text(max_size=20), st.integers()), junk),
        "server": junk,
        "headers": st.one_of(st.lists(header_entries, max_size=12), junk),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes)
def test_no_scope_makes_the_middleware_raise_and_every_request_gets_a_valid_id(
    scope: Scope,
) -> None:
    _policy.configure(_policy.Policy(capture={"x-tenant", "cookie"}, trusted_peers=("*",)))
    try:
        probe = Probe()
        sent = call(RelayMiddleware(probe), scope)
        assert len(probe.contexts) == 1
        rid = probe.contexts[0]["request_id"]
        assert valid_request_id(rid)
        if scope["type"] == "http":
            assert echoed(sent) == rid
        assert ctxrelay.current() == ctxrelay.Context()
    finally:
        _policy.configure(_policy.Policy())
