"""Websockets through a real server: FastAPI behind ``RelayMiddleware``, served
by uvicorn on 127.0.0.1 with its ``websockets`` implementation, driven by the
``websockets`` client.

Each handshake carries its own request id, an ``x-gray`` header the policy
captures and a session cookie; every message the handler answers must carry
that connection's values -- from the handler itself, from a
``ctxrelay.ThreadPoolExecutor`` whose one worker serves every connection in
turn, and from a ``ctxrelay.Thread`` -- and none of another connection's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
from collections.abc import Iterator, MutableMapping
from typing import Any, TypeGuard
from urllib.parse import parse_qs

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

import ctxrelay
from ctxrelay.integrations.asgi import ASGIApp, Receive, RelayMiddleware, Send
from tests.servers import WAIT, Mailbox, new_id, recording, serve_asgi

#: Connections in the concurrency test, and how many are open at once.
N_SOCKETS = 128
AT_ONCE = 32
#: What each connection sends: the handler answers from itself, from a pool
#: worker and from a new thread.
MESSAGES = ("hello", "pool", "thread", "bye")

GENERATED = re.compile(r"[0-9a-f]{32}")


def is_generated(value: str | None) -> TypeGuard[str]:
    """An id the middleware made up: 32 hex digits."""
    return value is not None and GENERATED.fullmatch(value) is not None


Scope = MutableMapping[str, Any]


class Boom(Exception):
    pass


def seen(message: str) -> dict[str, Any]:
    """What code serving a websocket message sees of its connection."""
    req = ctxrelay.request()
    return {
        "message": message,
        "rid": ctxrelay.request_id(),
        "gray": ctxrelay.get("x-gray"),
        "path": req.path if req else None,
        "cookie": req.cookies.get("session") if req else None,
    }


async def seen_in_thread(message: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[dict[str, Any]] = loop.create_future()

    def work() -> None:
        loop.call_soon_threadsafe(done.set_result, seen(message))

    ctxrelay.Thread(target=work, name="ws-thread").start()
    return await asyncio.wait_for(done, WAIT)


def make_app(pool: concurrent.futures.Executor) -> FastAPI:
    api = FastAPI()

    @api.websocket("/ws/{room}")
    async def chat(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        while True:
            try:
                message = await websocket.receive_text()
            except WebSocketDisconnect:
                return
            if message == "boom":
                raise Boom(f"boom in {ctxrelay.request_id()}")
            if message == "pool":
                reply = await asyncio.wrap_future(pool.submit(seen, message))
            elif message == "thread":
                reply = await seen_in_thread(message)
            else:
                reply = seen(message)
            await websocket.send_json(reply)

    return api


class AfterCall:
    """The outermost layer: posts what the server's own task holds once the
    middleware has returned (or raised), under the ``probe`` query key."""

    def __init__(self, app: ASGIApp, box: Mailbox) -> None:
        self.app = app
        self.box = box

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            key = parse_qs(scope.get("query_string", b"").decode()).get("probe")
            if key:
                self.box.post(key[0], (dict(ctxrelay.current()), ctxrelay.request()))


@pytest.fixture(scope="module")
def box() -> Mailbox:
    return Mailbox()


@pytest.fixture(scope="module")
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    # One worker: every connection's pool work runs on the same reused thread.
    with ctxrelay.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ws-pool") as executor:
        yield executor


@pytest.fixture(scope="module", params=["wrapped", "add_middleware"])
def ws_url(
    request: pytest.FixtureRequest, box: Mailbox, pool: concurrent.futures.ThreadPoolExecutor
) -> Iterator[str]:
    api = make_app(pool)
    if request.param == "wrapped":
        app = AfterCall(RelayMiddleware(api), box)
    else:
        api.add_middleware(RelayMiddleware)
        app = AfterCall(api, box)
    # "websockets-sansio" is what ws="auto" picks when websockets is installed;
    # named here so the test fails instead of falling back to another library.
    with serve_asgi(app, ws="websockets-sansio") as url:
        yield "ws" + url.removeprefix("http")


@pytest.fixture(autouse=True)
def gray_policy() -> Iterator[None]:
    """Capture ``x-gray`` from the handshake as a context field."""
    previous = ctxrelay.configure(ctxrelay.Policy(capture={"x-gray"}))
    try:
        yield
    finally:
        ctxrelay.configure(previous)


def handshake(
    rid: str | None, gray: str | None = None, session: str | None = None
) -> dict[str, str]:
    headers = {}
    if rid is not None:
        headers["x-request-id"] = rid
    if gray is not None:
        headers["x-gray"] = gray
    if session is not None:
        headers["cookie"] = f"session={session}; theme=dark"
    return headers


def open_socket(url: str, path: str, headers: dict[str, str]) -> connect:
    return connect(url + path, additional_headers=headers, open_timeout=WAIT, close_timeout=WAIT)


async def exchange(ws: ClientConnection, message: str) -> dict[str, Any]:
    await ws.send(message)
    reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    return reply


def echoed(ws: ClientConnection) -> str | None:
    """The request id on the handshake response."""
    assert ws.response is not None
    return ws.response.headers.get("x-request-id")


def talk(url: str, path: str, headers: dict[str, str]) -> tuple[str | None, list[dict[str, Any]]]:
    """One connection: every message of :data:`MESSAGES`, then a client close."""

    async def main() -> tuple[str | None, list[dict[str, Any]]]:
        async with open_socket(url, path, headers) as ws:
            return echoed(ws), [await exchange(ws, m) for m in MESSAGES]

    return asyncio.run(main())


def expected(
    message: str, rid: str, gray: str | None, path: str, session: str | None
) -> dict[str, Any]:
    """The reply a message gets when the handler sees exactly this connection."""
    return {"message": message, "rid": rid, "gray": gray, "path": path, "cookie": session}


# -- the handshake -----------------------------------------------------------
def test_handshake_id_is_used_by_handler_pool_and_thread_and_echoed_on_the_response(
    ws_url: str,
) -> None:
    rid = new_id()
    echo, replies = talk(ws_url, "/ws/lobby", handshake(rid, "g-1", "s3cr3t"))
    assert echo == rid
    assert replies == [expected(m, rid, "g-1", "/ws/lobby", "s3cr3t") for m in MESSAGES]


@pytest.mark.parametrize(
    "bad", ["has space", "x" * 129, "semi;colon", "slash/ed"], ids=["space", "129", ";", "/"]
)
def test_invalid_handshake_id_is_replaced_by_a_generated_one_everywhere(
    ws_url: str, bad: str
) -> None:
    echo, replies = talk(ws_url, "/ws/lobby", handshake(bad, "g-2"))
    assert is_generated(echo)
    assert replies == [expected(m, echo, "g-2", "/ws/lobby", None) for m in MESSAGES]


def test_missing_handshake_id_is_generated_and_differs_per_connection(ws_url: str) -> None:
    first, replies_1 = talk(ws_url, "/ws/a", handshake(None))
    second, replies_2 = talk(ws_url, "/ws/b", handshake(None))
    assert is_generated(first)
    assert is_generated(second)
    assert first != second
    assert {r["rid"] for r in replies_1} == {first}
    assert {r["rid"] for r in replies_2} == {second}


# -- concurrency ---------------------------------------------------------------
Result = tuple[str, str | None, list[dict[str, Any]]]


async def one_wave(url: str, ids: list[str]) -> list[Result]:
    """Open one socket per id; only once *all* of them are open and have
    answered a first message does any go on, so the wave is truly concurrent."""
    opened = 0
    all_open = asyncio.Event()

    async def one(rid: str) -> Result:
        nonlocal opened
        headers = handshake(rid, "g-" + rid, "s-" + rid)
        async with open_socket(url, f"/ws/{rid}", headers) as ws:
            first = await exchange(ws, MESSAGES[0])
            opened += 1
            if opened == len(ids):
                all_open.set()
            await asyncio.wait_for(all_open.wait(), WAIT)
            rest = [await exchange(ws, m) for m in MESSAGES[1:]]
            return rid, echoed(ws), [first, *rest]

    return await asyncio.gather(*(one(rid) for rid in ids))


def test_many_concurrent_websockets_each_see_only_their_own_connection(ws_url: str) -> None:
    ids = [new_id("ws") for _ in range(N_SOCKETS)]

    async def main() -> list[Result]:
        results: list[Result] = []
        for start in range(0, N_SOCKETS, AT_ONCE):
            results += await one_wave(ws_url, ids[start : start + AT_ONCE])
        return results

    results = asyncio.run(main())
    assert len(set(ids)) == len(results) == N_SOCKETS
    for rid, echo, replies in results:
        assert echo == rid
        assert replies == [expected(m, rid, "g-" + rid, f"/ws/{rid}", "s-" + rid) for m in MESSAGES]
    assert {r["rid"] for _, _, replies in results for r in replies} == set(ids)


# -- after the socket closes ---------------------------------------------------
async def close_by(mode: str, ws: ClientConnection) -> None:
    if mode == "client-close":
        await ws.close()
    elif mode == "client-drops":  # no close frame: the TCP connection just goes
        assert ws.transport is not None
        ws.transport.abort()
    else:  # the handler raises: uvicorn logs it and drops the connection
        await ws.send("boom")
        with pytest.raises(ConnectionClosedError):  # not a clean close
            await asyncio.wait_for(ws.recv(), WAIT)
    await asyncio.wait_for(ws.wait_closed(), WAIT)


@pytest.mark.parametrize("mode", ["client-close", "client-drops", "server-raises"])
def test_after_a_socket_closes_the_server_holds_no_context_and_the_next_is_fresh(
    ws_url: str, box: Mailbox, pool: concurrent.futures.ThreadPoolExecutor, mode: str
) -> None:
    stale, key = new_id("stale"), new_id("probe")

    async def stale_connection() -> list[dict[str, Any]]:
        path = f"/ws/old?probe={key}"
        async with open_socket(ws_url, path, handshake(stale, "g-old", "s-old")) as ws:
            replies = [await exchange(ws, m) for m in ("hello", "pool", "thread")]
            await close_by(mode, ws)
            return replies

    with recording("ctxrelay.asgi", level=logging.ERROR) as logs:
        replies = asyncio.run(stale_connection())
        fields, snapshot = box.wait([key])[key]
    assert {r["rid"] for r in replies} == {stale}
    # The server's task, once the middleware returned: nothing bound.
    assert (fields, snapshot) == ({}, None)
    # The pool's one worker, asked directly (the standard submit, no relay).
    own = concurrent.futures.ThreadPoolExecutor.submit(pool, ctxrelay.current)
    assert own.result(timeout=WAIT) == ctxrelay.Context()
    if mode == "server-raises":
        # Logged by the middleware while the connection's context was bound.
        assert logs.lines == [("unhandled exception in WEBSOCKET /ws/old", stale)]
    else:
        assert logs.lines == []

    echo, fresh = talk(ws_url, "/ws/new", handshake(None))
    assert is_generated(echo)
    assert echo != stale
    assert fresh == [expected(m, echo, None, "/ws/new", None) for m in MESSAGES]
