"""A client that cancels a gRPC call cancels the handler's request.

Real grpcio servers and clients on 127.0.0.1, sync and ``grpc.aio``, relayed
both ways (``relay_server`` and the interceptors).  A handler that checks
``ctxrelay.checkpoint()`` in a loop stops with ``RequestCancelled`` when its
client cancels; a pool task it submits after that is refused; among many
concurrent calls only the cancelled ones see it; and grpc's termination
callback, which fires for every call, changes nothing for a call whose
handler already returned.  Every wait is bounded; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import grpc.aio
import pytest

import ctxrelay
from ctxrelay import RequestCancelled
from ctxrelay.integrations.grpc import (
    AioServerInterceptor,
    ServerInterceptor,
    relay_channel,
    relay_server,
)

from ..servers import WAIT, Mailbox

SERVICE = "ctxrelay.test.Cancel"
#: How long a loop handler may run before it gives up (a test failed).
LOOP_LIMIT = 20.0

BOX = Mailbox()
POOL = ctxrelay.ThreadPoolExecutor(48)


def _loop(key: str) -> str:
    """A handler's work: check the request in a loop until cancelled or released."""
    BOX.post(key + "-started", ctxrelay.request_id())
    release = BOX.gate(key)
    end = time.monotonic() + LOOP_LIMIT
    try:
        while time.monotonic() < end:
            ctxrelay.checkpoint()
            if release.wait(0.01):
                BOX.post(key + "-end", ("finished", ctxrelay.cancelled()))
                return "finished"
        BOX.post(key + "-end", ("gave up", ctxrelay.cancelled()))
        return "gave up"
    except RequestCancelled:
        # A pool task submitted now, after the cancel, is refused.
        late = POOL.submit(ctxrelay.request_id)
        try:
            late.result(WAIT)
            refused = "ran"
        except RequestCancelled:
            refused = "refused"
        BOX.post(key + "-end", ("cancelled", refused, ctxrelay.request_id()))
        raise


def _sync_loop(request: bytes, context: Any) -> bytes:
    return _loop(request.decode()).encode()


def _sync_quick(request: bytes, context: Any) -> bytes:
    """Returns at once, leaving a pool task that starts after the response."""
    key = request.decode()
    gate = BOX.gate(key)

    def later() -> None:
        gate.wait(WAIT)
        BOX.post(key + "-later", (ctxrelay.request_id(), ctxrelay.cancelled()))

    POOL.submit(later)
    return b"done"


async def _aio_loop(request: bytes, context: Any) -> bytes:
    key = request.decode()
    # Sync work off the loop, on a ctxrelay pool: it sees the cancel too.
    loop = asyncio.get_running_loop()
    try:
        return (await loop.run_in_executor(POOL, _loop, key)).encode()
    except asyncio.CancelledError:
        BOX.post(key + "-task", "cancelled")
        raise


def _handlers() -> dict[str, Any]:
    return {
        "Loop": grpc.unary_unary_rpc_method_handler(_sync_loop),
        "Quick": grpc.unary_unary_rpc_method_handler(_sync_quick),
        "AioLoop": grpc.unary_unary_rpc_method_handler(_aio_loop),
    }


def _generic() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, _handlers())


@contextmanager
def _sync_server(how: str) -> Iterator[str]:
    pool = futures.ThreadPoolExecutor(40)
    if how == "interceptor":
        server = grpc.server(pool, interceptors=[ServerInterceptor()])
    else:
        server = relay_server(grpc.server(pool))
    if how == "registered":
        server.add_registered_method_handlers(SERVICE, _handlers())
    else:
        server.add_generic_rpc_handlers((_generic(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(WAIT)
        pool.shutdown(wait=False)


@asynccontextmanager
async def _aio_server(how: str) -> AsyncIterator[str]:
    executor = futures.ThreadPoolExecutor(40)
    if how == "interceptor":
        server = grpc.aio.server(executor, interceptors=[AioServerInterceptor()])
    else:
        server = relay_server(grpc.aio.server(executor))
    if how == "registered":
        server.add_registered_method_handlers(SERVICE, _handlers())
    else:
        server.add_generic_rpc_handlers((_generic(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        executor.shutdown(wait=False)


HOWS = ["relay_server", "registered", "interceptor"]


def _keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}-{time.monotonic_ns()}" for i in range(count)]


@pytest.mark.parametrize("how", HOWS)
def test_a_sync_client_cancel_stops_only_the_cancelled_sync_handlers(how: str) -> None:
    keys = _keys(f"sync-{how}", 12)
    with _sync_server(how) as target, grpc.insecure_channel(target) as plain:
        channel = relay_channel(plain, target)
        call: Any = channel.unary_unary(f"/{SERVICE}/Loop")
        calls = []
        for i, key in enumerate(keys):
            with ctxrelay.bind(request_id=f"rid-{i}"):
                calls.append(call.future(key.encode()))
        BOX.wait([k + "-started" for k in keys])
        cancelled, kept = keys[::2], keys[1::2]
        for i in range(0, len(keys), 2):
            calls[i].cancel()
        ended = BOX.wait([k + "-end" for k in cancelled])
        for key in kept:
            BOX.gate(key).set()
        replies = [calls[i].result(WAIT) for i in range(1, len(keys), 2)]
        rest = BOX.wait([k + "-end" for k in kept])
    for i, key in enumerate(keys):
        if key in cancelled:
            assert ended[key + "-end"] == ("cancelled", "refused", f"rid-{i}")
        else:
            assert rest[key + "-end"] == ("finished", False)
    assert replies == [b"finished"] * len(kept)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("method", ["Loop", "AioLoop"], ids=["sync-handler", "async-handler"])
def test_an_aio_client_cancel_stops_only_the_cancelled_handlers(how: str, method: str) -> None:
    keys = _keys(f"aio-{how}-{method}", 12)

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[bytes]]:
        async with _aio_server(how) as target:
            async with grpc.aio.insecure_channel(target) as plain:
                channel = relay_channel(plain, target)
                call: Any = channel.unary_unary(f"/{SERVICE}/{method}")
                calls = []
                for i, key in enumerate(keys):
                    with ctxrelay.bind(request_id=f"rid-{i}"):
                        calls.append(call(key.encode()))
                await asyncio.to_thread(BOX.wait, [k + "-started" for k in keys])
                for i in range(0, len(keys), 2):
                    calls[i].cancel()
                ended = await asyncio.to_thread(BOX.wait, [k + "-end" for k in keys[::2]])
                for key in keys[1::2]:
                    BOX.gate(key).set()
                replies = [await calls[i] for i in range(1, len(keys), 2)]
                rest = await asyncio.to_thread(BOX.wait, [k + "-end" for k in keys[1::2]])
        return ended, rest, replies

    ended, rest, replies = asyncio.run(main())
    for i, key in enumerate(keys):
        if i % 2 == 0:
            assert ended[key + "-end"] == ("cancelled", "refused", f"rid-{i}")
        else:
            assert rest[key + "-end"] == ("finished", False)
    assert replies == [b"finished"] * (len(keys) // 2)


@pytest.mark.parametrize("how", HOWS)
def test_the_end_of_a_finished_call_cancels_nothing(how: str) -> None:
    # grpc's termination callback fires for every call, after the status
    # went out: work the handler left behind still runs, uncancelled, and
    # sees its own call's id (not another's).
    keys = _keys(f"quick-{how}", 20)
    with _sync_server(how) as target, grpc.insecure_channel(target) as plain:
        call: Any = relay_channel(plain, target).unary_unary(f"/{SERVICE}/Quick")
        for i, key in enumerate(keys):
            with ctxrelay.bind(request_id=f"q-{i}"):
                assert call(key.encode(), timeout=WAIT) == b"done"
        for key in keys:
            BOX.gate(key).set()
        later = BOX.wait([k + "-later" for k in keys])
    assert [later[k + "-later"] for k in keys] == [(f"q-{i}", False) for i in range(len(keys))]
