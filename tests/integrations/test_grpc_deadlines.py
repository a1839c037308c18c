"""Deadlines across gRPC, against real grpcio servers (sync and ``grpc.aio``).

The server binds the call's own gRPC deadline (``context.time_remaining()``;
sync grpcio says ~9.2e18 s when there is none); the client passes
``min(its own timeout, the time remaining)`` and refuses a call once the
deadline passed, without touching the network.  Assertions are on what the
caller and the handler see, never on elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import grpc.aio
import pytest

import ctxrelay
from ctxrelay import DeadlineExceeded, RequestCancelled
from ctxrelay.integrations.grpc import (
    AioServerInterceptor,
    ClientInterceptor,
    ServerInterceptor,
    aio_client_interceptors,
)

from ..servers import WAIT, Mailbox, new_id

SERVICE = "ctxrelay.test.Deadlines"
SLOW = 30.0
#: gRPC's own wire form of the deadline (``grpc-timeout``) is rounded up to
#: its unit, and the receiver starts it afresh on arrival: the server's
#: deadline may come out a few milliseconds later than the caller's.  (With
#: ctxrelay's own header allowed through and its peer trusted, the exact
#: milliseconds narrow it back: see the chain test.)
GRPC_ROUNDING = 0.05

BOX = Mailbox()


class Server:
    """What one server saw: how many calls reached a handler."""

    def __init__(self) -> None:
        self.target = ""
        self.calls = 0
        self.lock = threading.Lock()
        self.downstream = ""  # where Relay calls on

    def arrived(self) -> None:
        with self.lock:
            self.calls += 1


def _left(server: Server) -> bytes:
    server.arrived()
    return json.dumps({"left": ctxrelay.remaining(), "rid": ctxrelay.request_id()}).encode()


def _sync_handlers(server: Server) -> grpc.GenericRpcHandler:
    def left(request: bytes, context: grpc.ServicerContext) -> bytes:
        return _left(server)

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        server.arrived()
        key = request.decode()
        BOX.post(key, ctxrelay.remaining())
        for _ in range(int(SLOW / 0.02)):
            if not context.is_active():
                BOX.post(key + "-end", "the call ended")
                return b""
            time.sleep(0.02)
        BOX.post(key + "-end", "waited the full delay")
        return b"late"

    def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
        mine = json.loads(_left(server))
        with _sync_channel(server.downstream) as channel:
            theirs = json.loads(_stub(channel, "Left")(b"", timeout=SLOW))
        return json.dumps([mine, theirs]).encode()

    methods: dict[str, Any] = {
        "Left": grpc.unary_unary_rpc_method_handler(left),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Relay": grpc.unary_unary_rpc_method_handler(relay),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


@contextmanager
def sync_server() -> Iterator[Server]:
    state = Server()
    pool = futures.ThreadPoolExecutor(8)
    server = grpc.server(pool, interceptors=[ServerInterceptor()])
    server.add_generic_rpc_handlers((_sync_handlers(state),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    state.target = f"127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.stop(None).wait(WAIT)
        pool.shutdown()


@asynccontextmanager
async def aio_server() -> AsyncIterator[Server]:
    state = Server()

    async def left(request: bytes, context: Any) -> bytes:
        return _left(state)

    def sync_left(request: bytes, context: Any) -> bytes:  # run in an executor thread
        return _left(state)

    methods: dict[str, Any] = {
        "Left": grpc.unary_unary_rpc_method_handler(left),
        "SyncLeft": grpc.unary_unary_rpc_method_handler(sync_left),
    }
    server = grpc.aio.server(futures.ThreadPoolExecutor(4), interceptors=[AioServerInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.target = f"127.0.0.1:{port}"
    try:
        yield state
    finally:
        await server.stop(None)


def _sync_channel(target: str) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(target), ClientInterceptor(target))


def _stub(channel: Any, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def _call(channel: grpc.Channel, method: str, request: bytes = b"", **kwargs: Any) -> Any:
    return json.loads(_stub(channel, method)(request, **kwargs))


# -- the server binds the call's deadline ----------------------------------------------------


def test_a_sync_handler_runs_under_the_calls_own_deadline() -> None:
    with sync_server() as server, _sync_channel(server.target) as channel:
        with ctxrelay.bind(request_id="r-own"):
            bounded = _call(channel, "Left", timeout=5)
            free = _call(channel, "Left")
    assert 0 < bounded["left"] <= 5 + GRPC_ROUNDING
    assert bounded["rid"] == "r-own"
    assert free["left"] is None  # sync grpcio's ~9.2e18 s is "no deadline"


@pytest.mark.parametrize("method", ["Left", "SyncLeft"], ids=["async-handler", "sync-handler"])
def test_an_aio_handler_runs_under_the_calls_own_deadline(method: str) -> None:
    async def main() -> tuple[Any, Any]:
        async with aio_server() as server:
            async with grpc.aio.insecure_channel(
                server.target, interceptors=aio_client_interceptors(server.target)
            ) as channel:
                call = _stub(channel, method)
                with ctxrelay.bind(request_id="r-aio"):
                    bounded = json.loads(await call(b"", timeout=5))
                    free = json.loads(await call(b""))
        return bounded, free

    bounded, free = asyncio.run(main())
    assert 0 < bounded["left"] <= 5 + GRPC_ROUNDING
    assert free["left"] is None


# -- the client passes min(own, remaining) -------------------------------------------------


def test_a_slow_call_is_cut_at_the_deadline_not_at_its_own_timeout() -> None:
    key = new_id("grpc-slow")
    with sync_server() as server, _sync_channel(server.target) as channel:
        with ctxrelay.bind(request_id=key), ctxrelay.deadline(0.3):
            with pytest.raises(grpc.RpcError) as caught:
                _stub(channel, "Slow")(key.encode(), timeout=SLOW)
        seen = BOX.wait([key, key + "-end"])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < seen[key] <= 0.3 + GRPC_ROUNDING  # what was left of the 0.3 s
    assert seen[key + "-end"] == "the call ended"  # not its full 30 s (bounded wait)


def test_the_callers_own_shorter_timeout_is_never_lengthened() -> None:
    with sync_server() as server, _sync_channel(server.target) as channel:
        with ctxrelay.bind(request_id="r-short"), ctxrelay.deadline(SLOW):
            got = _call(channel, "Left", timeout=0.5)
    assert 0 < got["left"] <= 0.5 + GRPC_ROUNDING


def test_the_time_left_only_shrinks_along_a_chain_of_calls() -> None:
    # In house: ctxrelay's own header (exact milliseconds) goes out to
    # grpc://127.0.0.1 and is honoured from it, narrowing gRPC's rounded one.
    route = ctxrelay.Policy.Route(hosts=("127.0.0.1",), schemes={"grpc"})
    ctxrelay.configure(ctxrelay.Policy(routes=(route,), trusted_peers=("127.0.0.1",)))
    with sync_server() as back, sync_server() as front, _sync_channel(front.target) as channel:
        front.downstream = back.target
        with ctxrelay.bind(request_id="r-chain"), ctxrelay.deadline(5):
            mine = ctxrelay.remaining()
            first, second = _call(channel, "Relay", timeout=SLOW)
    assert mine is not None
    assert 0 < second["left"] < first["left"] < mine <= 5
    assert first["rid"] == second["rid"] == "r-chain"


# -- once the deadline passed, no call starts --------------------------------------------------


def test_a_sync_call_after_the_deadline_fails_at_once_and_reaches_no_server() -> None:
    with sync_server() as server, _sync_channel(server.target) as channel:
        with ctxrelay.bind(request_id="r-late"), ctxrelay.deadline(0):
            with pytest.raises(DeadlineExceeded) as caught:
                _call(channel, "Left", timeout=SLOW)
        assert isinstance(caught.value, grpc.RpcError)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        from ctxrelay._deadline import for_request

        ctx, cancel = for_request(ctxrelay.Context(request_id="r-gone"), SLOW)
        cancel.cancel("the client disconnected")
        with ctxrelay.use(ctx), pytest.raises(RequestCancelled) as gone:
            _call(channel, "Left")
        assert isinstance(gone.value, grpc.RpcError)
        assert gone.value.code() == grpc.StatusCode.CANCELLED
        assert server.calls == 0


def test_an_aio_call_after_the_deadline_fails_at_once_and_reaches_no_server() -> None:
    async def main() -> tuple[BaseException, int]:
        async with aio_server() as server:
            async with grpc.aio.insecure_channel(
                server.target, interceptors=aio_client_interceptors(server.target)
            ) as channel:
                with ctxrelay.bind(request_id="r-late"), ctxrelay.deadline(0):
                    try:
                        await _stub(channel, "Left")(b"", timeout=SLOW)
                    except BaseException as exc:  # asserted below
                        return exc, server.calls
        raise AssertionError("the call went through")

    error, calls = asyncio.run(main())
    assert isinstance(error, DeadlineExceeded)
    assert isinstance(error, grpc.RpcError)
    assert calls == 0
