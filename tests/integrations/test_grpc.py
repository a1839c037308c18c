"""ctxrelay.integrations.grpc against a real grpcio server and real channels.

Servers listen on 127.0.0.1 (``tests/integrations/grpc_service.py``), sync
(``grpc.server``) and ``grpc.aio``; every arity; handlers report what they
saw of the context, in their own code and in pool tasks they hand off.  A
probe interceptor outside ctxrelay's records what was bound before and after
ctxrelay's wrapper: always nothing.  No mocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import importlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

import ctxrelay
from ctxrelay import Policy
from ctxrelay.integrations import grpc as relay_grpc
from ctxrelay.integrations.grpc import (
    AioServerInterceptor,
    ClientInterceptor,
    ServerInterceptor,
    aio_client_interceptors,
    destination_of,
    relay_channel,
    relay_server,
)

from .grpc_service import (
    BIG_METADATA,
    GATE_TIMEOUT,
    Served,
    aio_server,
    dump,
    load,
    path,
    raw_call,
    stream_stream,
    stream_unary,
    sync_server,
    unary_stream,
    unary_unary,
)

GENERATED = re.compile(r"[0-9a-f]{32}\Z")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def _reported_afresh() -> Iterator[None]:
    # Hostile metadata is reported once per name and kind: each test starts over.
    relay_grpc._reported.clear()
    yield
    relay_grpc._reported.clear()


def sync_channel(target: str, **kwargs: Any) -> grpc.Channel:
    return grpc.intercept_channel(
        grpc.insecure_channel(target), ClientInterceptor(target, **kwargs)
    )


def assert_nothing_left(served: Served, calls: int) -> None:
    served.record.wait_finished(calls)
    assert not served.record.leaks(), served.record.leaks()
    assert len([e for e in served.record.probe if e[0] == "after"]) >= calls


# -- the door: every arity sees its call's context, sync server --------------------------
def test_sync_every_arity_sees_the_callers_request_id_and_resets() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-sync-1"):
            who = load(unary_unary(channel, "Who")(b""))
            streamed = [load(m) for m in unary_stream(channel, "Stream")(b"3")]
            collected = load(stream_unary(channel, "Collect")(iter([b"a", b"b"])))
            chatted = [load(m) for m in stream_stream(channel, "Chat")(iter([b"a", b"b"]))]
        assert (who["request_id"], who["pool"]) == ("req-sync-1", "req-sync-1")
        assert [(m["request_id"], m["pool"]) for m in streamed] == [("req-sync-1",) * 2] * 3
        assert collected["during"] == ["req-sync-1", "req-sync-1"]
        assert (collected["request_id"], collected["pool"]) == ("req-sync-1",) * 2
        assert [(m["request_id"], m["pool"]) for m in chatted] == [("req-sync-1",) * 2] * 2
        assert_nothing_left(served, 4)


def test_the_snapshot_is_the_call_method_path_peer_and_metadata() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        who = load(unary_unary(channel, "Who")(b"", metadata=(("x-tenant", "acme"),)))
    assert (who["method"], who["scheme"], who["path"]) == ("POST", "grpc", path("Who"))
    assert re.fullmatch(r"127\.0\.0\.1:\d+", who["client"])
    assert ["x-tenant", "acme"] in who["headers"]
    assert ["x-request-id", who["request_id"]] not in who["headers"]  # none was sent
    assert GENERATED.match(who["request_id"])


def test_a_generator_handler_keeps_its_own_scope_across_yields() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-scope"):
            steps = [load(m)["fields"] for m in unary_stream(channel, "Scoped")(b"")]
    assert [s.get("step") for s in steps] == ["inner", "inner", None]
    assert {s["request_id"] for s in steps} == {"req-scope"}
    assert_nothing_left(served, 1)


# -- the door on grpc.aio: async handlers, and sync ones in an executor (grpc #37881) ------
@pytest.mark.parametrize("prefix", ["", "Sync"], ids=["async-handlers", "sync-handlers"])
def test_aio_every_arity_sees_the_callers_request_id_and_resets(prefix: str) -> None:
    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            channel = grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            )
            async with channel:
                with ctxrelay.bind(request_id="req-aio-1"):
                    who = load(await unary_unary(channel, f"{prefix}Who")(b""))
                    streamed = [
                        load(m) async for m in unary_stream(channel, f"{prefix}Stream")(b"3")
                    ]
                    collected = load(
                        await stream_unary(channel, f"{prefix}Collect")(iter([b"a", b"b"]))
                    )
                    chatted = [
                        load(m)
                        async for m in stream_stream(channel, f"{prefix}Chat")(iter([b"a", b"b"]))
                    ]
                    written = (
                        [load(m) async for m in unary_stream(channel, "Writer")(b"2")]
                        if not prefix
                        else [{"request_id": "req-aio-1", "pool": "req-aio-1"}]
                    )
            assert (who["request_id"], who["pool"]) == ("req-aio-1", "req-aio-1")
            for message in (*streamed, collected, *chatted, *written):
                assert (message["request_id"], message["pool"]) == ("req-aio-1", "req-aio-1")
            assert collected["during"] == ["req-aio-1", "req-aio-1"]
            assert len(streamed) == 3
            await asyncio.to_thread(assert_nothing_left, served, 5 if not prefix else 4)

    asyncio.run(run())


def test_aio_generator_handler_keeps_its_own_scope_across_yields() -> None:
    async def run() -> list[dict[str, str]]:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                with ctxrelay.bind(request_id="req-scope"):
                    call = unary_stream(channel, "Scoped")(b"")
                    return [load(m)["fields"] async for m in call]

    steps = asyncio.run(run())
    assert [s.get("step") for s in steps] == ["inner", "inner", None]
    assert {s["request_id"] for s in steps} == {"req-scope"}


# -- 200 concurrent calls, each its own --------------------------------------------------
ARITIES = ["Who", "Stream", "Collect", "Chat"]


def _sync_call(channel: grpc.Channel, i: int) -> list[dict[str, Any]]:
    with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
        kind = ARITIES[i % 4]
        if kind == "Who":
            return [load(unary_unary(channel, kind)(b""))]
        if kind == "Stream":
            return [load(m) for m in unary_stream(channel, kind)(b"2")]
        if kind == "Collect":
            return [load(stream_unary(channel, kind)(iter([b"a", b"b"])))]
        return [load(m) for m in stream_stream(channel, kind)(iter([b"a", b"b"]))]


def _trusting_policy() -> None:
    # The server trusts 127.0.0.1's baggage, the client routes it there.
    ctxrelay.configure(
        Policy(
            routes=(Policy.Route(hosts=("127.0.0.1",), schemes={"grpc"}),),
            trusted_peers=("127.0.0.1",),
        )
    )


def test_200_concurrent_sync_calls_each_see_only_their_own_context() -> None:
    _trusting_policy()
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with concurrent.futures.ThreadPoolExecutor(32) as callers:
            replies = list(callers.map(functools.partial(_sync_call, channel), range(200)))
        for i, messages in enumerate(replies):
            assert messages
            for message in messages:
                assert message["request_id"] == f"req-{i}"
                assert message["pool"] == f"req-{i}"
                assert message["fields"]["tenant"] == f"t{i}"
        assert_nothing_left(served, 200)


def test_200_concurrent_aio_calls_each_see_only_their_own_context() -> None:
    _trusting_policy()

    async def one(channel: grpc.aio.Channel, i: int) -> list[dict[str, Any]]:
        with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
            kind = ("Sync" if i % 8 >= 4 else "") + ARITIES[i % 4]
            await asyncio.sleep(0)  # let the other tasks interleave
            if kind.endswith("Who"):
                return [load(await unary_unary(channel, kind)(b""))]
            if kind.endswith("Stream"):
                return [load(m) async for m in unary_stream(channel, kind)(b"2")]
            if kind.endswith("Collect"):
                return [load(await stream_unary(channel, kind)(iter([b"a", b"b"])))]
            chat = stream_stream(channel, kind)(iter([b"a", b"b"]))
            return [load(m) async for m in chat]

    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                replies = await asyncio.gather(*(one(channel, i) for i in range(200)))
            for i, messages in enumerate(replies):
                assert messages
                for message in messages:
                    assert (message["request_id"], message["pool"]) == (f"req-{i}", f"req-{i}")
                    assert message["fields"]["tenant"] == f"t{i}"
            await asyncio.to_thread(assert_nothing_left, served, 200)

    asyncio.run(run())


# -- every outcome resets: abort, exception, cancellation -----------------------------------
@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("Abort", grpc.StatusCode.NOT_FOUND),
        ("Fail", grpc.StatusCode.UNKNOWN),
    ],
)
def test_sync_abort_and_exception_reset_and_echo_the_id(
    method: str, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-err"), pytest.raises(grpc.RpcError) as failed:
            unary_unary(channel, method)(b"")
        assert_nothing_left(served, 1)
    error: Any = failed.value
    assert error.code() == code
    assert ("x-request-id", "req-err") in error.initial_metadata()
    logged = [r for r in caplog.records if r.name == "ctxrelay.grpc" and r.levelno >= logging.ERROR]
    if method == "Fail":  # logged while bound: the line can carry the request id
        assert logged
        assert "unhandled exception in gRPC method" in logged[0].getMessage()
    else:
        assert not logged  # an abort is an answer, not a failure


@pytest.mark.parametrize("method", ["FailStream", "AbortStream"])
def test_sync_stream_that_fails_midway_resets(method: str) -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        messages: list[bytes] = []
        with ctxrelay.bind(request_id="req-midway"):
            call = unary_stream(channel, method)(b"")
            with pytest.raises(grpc.RpcError):
                messages.extend(call)
        assert [load(m)["request_id"] for m in messages] == ["req-midway"]
        assert_nothing_left(served, 1)


def test_sync_client_cancelling_a_stream_leaves_nothing_bound() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-cancel"):
            call = unary_stream(channel, "Hold")(b"")
            assert load(next(call))["request_id"] == "req-cancel"
            assert served.record.holding.wait(GATE_TIMEOUT)
            call.cancel()
        served.record.gate.set()  # the handler goes on; grpc drops the stream
        served.record.wait_cleaned()
        assert_nothing_left(served, 1)
        # The handler's generator was closed in its own context.
        assert served.record.cleanup == ["req-cancel"]
        with ctxrelay.bind(request_id="req-next"):
            assert load(unary_unary(channel, "Who")(b""))["request_id"] == "req-next"


def test_sync_client_cancelling_a_unary_call_leaves_nothing_bound() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-cancel"):
            future = unary_unary(channel, "HoldUnary").future(b"")
            assert served.record.holding.wait(GATE_TIMEOUT)
            future.cancel()
        served.record.gate.set()
        served.record.wait_cleaned()
        assert_nothing_left(served, 1)
        assert served.record.cleanup == ["req-cancel"]


def test_sync_server_threads_keep_nothing_after_calls() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        for i in range(20):
            with ctxrelay.bind(request_id=f"req-{i}"):
                unary_unary(channel, "Who")(b"")
                list(unary_stream(channel, "Stream")(b"2"))
        # Every worker thread of the server's own pool, asked directly.
        pool = served.extra["server_pool"]
        barrier = threading.Barrier(4, timeout=GATE_TIMEOUT)

        def ask() -> dict[str, str]:
            barrier.wait()  # four distinct threads
            return dict(ctxrelay.current())

        assert [f.result() for f in [pool.submit(ask) for _ in range(4)]] == [{}] * 4
        assert_nothing_left(served, 40)


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("Abort", grpc.StatusCode.NOT_FOUND),
        ("Fail", grpc.StatusCode.UNKNOWN),
        ("SyncAbort", grpc.StatusCode.NOT_FOUND),
        ("SyncFail", grpc.StatusCode.UNKNOWN),
    ],
)
def test_aio_abort_and_exception_reset_and_echo_the_id(method: str, code: grpc.StatusCode) -> None:
    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                with ctxrelay.bind(request_id="req-err"):
                    call = unary_unary(channel, method)(b"")
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call
            assert failed.value.code() == code
            assert ("x-request-id", "req-err") in tuple(failed.value.initial_metadata() or ())
            await asyncio.to_thread(assert_nothing_left, served, 1)

    asyncio.run(run())


@pytest.mark.parametrize("method", ["FailStream", "AbortStream"])
def test_aio_stream_that_fails_midway_resets(method: str) -> None:
    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                messages: list[bytes] = []
                with ctxrelay.bind(request_id="req-midway"):
                    call = unary_stream(channel, method)(b"")
                    with pytest.raises(grpc.aio.AioRpcError):
                        await _drain(call, messages)
            assert [load(m)["request_id"] for m in messages] == ["req-midway"]
            await asyncio.to_thread(assert_nothing_left, served, 1)

    asyncio.run(run())


async def _drain(call: Any, into: list[bytes]) -> None:
    async for message in call:
        into.append(message)


@pytest.mark.parametrize("method", ["Hold", "HoldUnary"])
def test_aio_client_cancelling_while_the_handler_waits_leaves_nothing_bound(method: str) -> None:
    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                with ctxrelay.bind(request_id="req-cancel"):
                    if method == "Hold":
                        call: Any = unary_stream(channel, method)(b"")
                        assert load(await call.read())["request_id"] == "req-cancel"
                    else:
                        call = unary_unary(channel, method)(b"")
                    await asyncio.to_thread(served.record.holding.wait, GATE_TIMEOUT)
                    call.cancel()
                await _cleaned(served)
                await asyncio.to_thread(assert_nothing_left, served, 1)
                assert served.record.cleanup == ["req-cancel"]
                with ctxrelay.bind(request_id="req-next"):
                    who = load(await unary_unary(channel, "Who")(b""))
                    assert who["request_id"] == "req-next"

    asyncio.run(run())


def test_aio_client_cancelling_a_stream_grpc_is_writing_leaves_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The handler's async generator is suspended at a yield while grpc.aio
    # waits in its own write (the client reads nothing): the cancellation
    # lands in grpc's code, the generators are dropped, and asyncio's
    # async-generator hook closes them later in a task of its own.
    async def run() -> None:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                with ctxrelay.bind(request_id="req-flood"):
                    call = unary_stream(channel, "Flood")(b"")
                    await asyncio.to_thread(served.record.holding.wait, GATE_TIMEOUT)
                    await asyncio.sleep(0.2)  # let grpc fill the flow-control window
                    call.cancel()
                await _cleaned(served)
                # The handler's cleanup ran with its own request's context.
                assert served.record.cleanup == ["req-flood"]
                # Calls after it see theirs, and new tasks start from nothing.
                with ctxrelay.bind(request_id="req-next"):
                    who = load(await unary_unary(channel, "Who")(b""))
                assert who["request_id"] == "req-next"
                assert await asyncio.get_running_loop().create_task(_current()) == {}

    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        asyncio.run(run())
    # No scope was reported as exited in another context than its own.
    assert not [r for r in caplog.records if "exited" in r.getMessage()]


async def _cleaned(served: Served) -> None:
    # As Record.wait_cleaned, with the loop free to run the finalizer's task.
    for _ in range(int(GATE_TIMEOUT / 0.05)):
        if served.record.cleaned.is_set():
            return
        gc.collect()
        await asyncio.sleep(0.05)
    raise AssertionError("the handler's cleanup did not run")


async def _current() -> dict[str, str]:
    return dict(ctxrelay.current())


# -- the echo ------------------------------------------------------------------------------
def test_the_request_id_is_echoed_in_initial_metadata_before_the_first_message() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-echo"):
            _, call = unary_unary(channel, "Who").with_call(b"")
            assert ("x-request-id", "req-echo") in call.initial_metadata()
            stream = unary_stream(channel, "Stream")(b"2")
            assert ("x-request-id", "req-echo") in stream.initial_metadata()
            assert len(list(stream)) == 2
        _, call = unary_unary(channel, "Who").with_call(b"")  # no context: a new id
        (echoed,) = [v for k, v in call.initial_metadata() if k == "x-request-id"]
        assert GENERATED.match(echoed)


@pytest.mark.parametrize("own_id", [False, True])
def test_a_handler_that_sends_its_own_initial_metadata_still_works(own_id: bool) -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-own"):
            _, call = unary_unary(channel, "OwnMetadata").with_call(b"1" if own_id else b"")
    metadata = list(call.initial_metadata())
    assert ("x-own", "1") in metadata
    # Merged into the handler's own metadata; an id the handler set wins.
    ids = [v for k, v in metadata if k == "x-request-id"]
    assert ids == (["handler-id"] if own_id else ["req-own"])


@pytest.mark.parametrize("method", ["OwnMetadata", "SyncOwnMetadata"])
def test_aio_handler_that_sends_its_own_initial_metadata_still_works(method: str) -> None:
    async def run() -> list[tuple[str, str]]:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                with ctxrelay.bind(request_id="req-own"):
                    call = unary_unary(channel, method)(b"")
                    await call
                    return list(await call.initial_metadata() or ())

    metadata = asyncio.run(run())
    assert ("x-own", "1") in metadata
    assert [v for k, v in metadata if k == "x-request-id"] == ["req-own"]


def test_echo_can_be_turned_off() -> None:
    with sync_server(ServerInterceptor(echo=False)) as served, sync_channel(served.target) as c:
        with ctxrelay.bind(request_id="req-quiet"):
            reply, call = unary_unary(c, "Who").with_call(b"")
    assert load(reply)["request_id"] == "req-quiet"
    assert "x-request-id" not in dict(call.initial_metadata())


def test_aio_echo_on_every_kind_of_stream() -> None:
    async def run() -> dict[str, Any]:
        async with aio_server(AioServerInterceptor()) as served:
            async with grpc.aio.insecure_channel(
                served.target, interceptors=aio_client_interceptors(served.target)
            ) as channel:
                found = {}
                with ctxrelay.bind(request_id="req-echo"):
                    for method in ("Stream", "Writer", "SyncStream", "Who"):
                        if method == "Who":
                            call: Any = unary_unary(channel, method)(b"")
                            await call
                        else:
                            call = unary_stream(channel, method)(b"0")  # an empty stream
                            assert [m async for m in call] == []
                        found[method] = dict(iter(await call.initial_metadata() or ()))
                return found

    for method, metadata in asyncio.run(run()).items():
        assert metadata.get("x-request-id") == "req-echo", method


# -- the policy at the client ------------------------------------------------------------------
CREDENTIALS = {
    "request_id": "req-1",
    "cookie": "session=abc123",
    "authorization": "Bearer t0k3n",
    "x-gray": "canary",
    "tenant": "acme",
}


def _named(port: int, schemes: set[str]) -> None:
    route = Policy.Route(hosts=("127.0.0.1",), ports={port}, schemes=schemes, sensitive={"cookie"})
    ctxrelay.configure(Policy(capture={"cookie", "authorization", "x-gray"}, routes=(route,)))


def _received(channel: grpc.Channel) -> dict[str, str]:
    with ctxrelay.use(ctxrelay.Context(CREDENTIALS)):
        return dict(load(unary_unary(channel, "Who")(b""))["metadata"])


def test_a_target_the_policy_names_gets_what_its_route_grants() -> None:
    with sync_server(ServerInterceptor()) as served:
        _named(served.port, {"grpc"})
        with sync_channel(served.target) as channel:
            metadata = _received(channel)
    assert metadata["x-request-id"] == "req-1"
    assert metadata["cookie"] == "session=abc123"  # named by the route
    assert metadata["x-gray"] == "canary"
    assert metadata["baggage"] == "tenant=acme"
    assert "authorization" not in metadata  # sensitive, not named


@pytest.mark.parametrize(
    "how",
    ["another-port", "tls-only-route", "explicit-destination", "several-addresses"],
)
def test_credentials_stay_away_from_targets_the_policy_does_not_name(how: str) -> None:
    with sync_server(ServerInterceptor()) as served, sync_server(ServerInterceptor()) as other:
        _named(served.port, {"grpcs"} if how == "tls-only-route" else {"grpc"})
        if how == "another-port":
            channel = sync_channel(other.target)
        elif how == "tls-only-route":
            channel = sync_channel(served.target)  # insecure: grpc://, the route is grpcs://
        elif how == "explicit-destination":
            channel = grpc.intercept_channel(
                grpc.insecure_channel(served.target),
                ClientInterceptor(destination="grpc://orders.partner.example:443"),
            )
        else:
            target = f"ipv4:127.0.0.1:{served.port},127.0.0.1:{other.port}"
            channel = grpc.intercept_channel(
                grpc.insecure_channel(target), ClientInterceptor(target)
            )
        with channel:
            metadata = _received(channel)
    assert metadata["x-request-id"] == "req-1"  # the foreign route: id and trace only
    for name in ("cookie", "authorization", "x-gray", "baggage"):
        assert name not in metadata, name


def test_aio_client_follows_the_policy_too() -> None:
    async def run(target_of: Callable[[Served, Served], str]) -> dict[str, str]:
        async with aio_server(AioServerInterceptor()) as served:
            async with aio_server(AioServerInterceptor()) as other:
                _named(served.port, {"grpc"})
                target = target_of(served, other)
                async with grpc.aio.insecure_channel(
                    target, interceptors=aio_client_interceptors(target)
                ) as channel:
                    with ctxrelay.use(ctxrelay.Context(CREDENTIALS)):
                        reply = await unary_unary(channel, "Who")(b"")
                return dict(load(reply)["metadata"])

    named = asyncio.run(run(lambda s, o: s.target))
    assert (named["cookie"], named["baggage"]) == ("session=abc123", "tenant=acme")
    foreign = asyncio.run(run(lambda s, o: o.target))
    assert foreign["x-request-id"] == "req-1"
    assert not {"cookie", "authorization", "x-gray", "baggage"} & set(foreign)


def test_metadata_the_caller_set_wins() -> None:
    with sync_server(ServerInterceptor()) as served:
        _named(served.port, {"grpc"})
        with sync_channel(served.target) as channel, ctxrelay.use(ctxrelay.Context(CREDENTIALS)):
            reply = unary_unary(channel, "Who")(
                b"", metadata=(("x-request-id", "mine"), ("x-gray", "stable"))
            )
    metadata = load(reply)["metadata"]
    assert [v for k, v in metadata if k == "x-request-id"] == ["mine"]
    assert [v for k, v in metadata if k == "x-gray"] == ["stable"]
    assert load(reply)["request_id"] == "mine"


def test_values_grpc_cannot_send_are_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A tab and non-ASCII are valid context values, not valid gRPC metadata:
    # grpcio would fail the whole call on them.
    with sync_server(ServerInterceptor()) as served:
        _named(served.port, {"grpc"})
        with (
            sync_channel(served.target) as channel,
            ctxrelay.use(
                ctxrelay.Context(request_id="req-1", **{"x-gray": "can\tary", "cookie": "s=Jörg"})
            ),
        ):
            with caplog.at_level(logging.WARNING, logger="ctxrelay"):
                reply = load(unary_unary(channel, "Who")(b""))
    metadata = dict(reply["metadata"])
    assert reply["request_id"] == "req-1"
    assert "x-gray" not in metadata
    assert "cookie" not in metadata
    assert any("not valid gRPC ASCII" in r.getMessage() for r in caplog.records)


def test_each_thread_sends_the_context_current_when_the_call_starts() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        who = unary_unary(channel, "Who")

        def call(i: int) -> str:
            with ctxrelay.bind(request_id=f"req-{i}"):
                future = who.future(b"")
            return str(load(future.result())["request_id"])  # resolved outside the scope

        with ctxrelay.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(call, range(40))) == [f"req-{i}" for i in range(40)]


# -- destination_of ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "secure", "expected"),
    [
        ("orders.internal:50051", False, "grpc://orders.internal:50051"),
        ("orders.internal:50051", True, "grpcs://orders.internal:50051"),
        ("orders.internal", True, "grpcs://orders.internal:443"),
        ("dns:///orders.internal:50051", False, "grpc://orders.internal:50051"),
        ("dns://8.8.8.8/orders.internal:50051", False, "grpc://orders.internal:50051"),
        ("dns:orders.internal:7", False, "grpc://orders.internal:7"),
        ("ipv4:10.0.0.1:50051", False, "grpc://10.0.0.1:50051"),
        ("ipv6:[::1]:50051", False, "grpc://[::1]:50051"),
        ("[::1]:50051", False, "grpc://[::1]:50051"),
        ("::1", False, "grpc://[::1]:443"),
        ("xds:///orders", True, "grpcs://orders:443"),
        ("passthrough:///10.0.0.1:80", False, "grpc://10.0.0.1:80"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", False, "grpc:"),
        ("unix:/run/orders.sock", False, "grpc:"),
        ("unix-abstract:orders", False, "grpc:"),
        ("orders.internal:notaport", False, "grpc:"),
        ("orders.internal:0", False, "grpc:"),
        ("evil.example/@orders.internal:1", False, "grpc:"),
    ],
)
def test_destination_of(target: str, secure: bool, expected: str) -> None:
    assert destination_of(target, secure=secure) == expected


def test_a_destination_that_names_no_host_is_foreign() -> None:
    ctxrelay.configure(Policy(routes=(Policy.Route(schemes={"grpc"}, baggage=True),)))
    route, _ = ctxrelay.active_policy().route(destination_of("unix:/run/orders.sock"))
    assert route is ctxrelay.active_policy().foreign


# -- hostile metadata ---------------------------------------------------------------------------
def _raw(served: Served, metadata: list[tuple[bytes, bytes]]) -> tuple[dict[str, Any], str]:
    reply = raw_call(served.port, "Who", metadata)
    assert reply.status == "0", reply
    (message,) = reply.messages
    return json.loads(message), reply.headers.get("x-request-id", "")


@pytest.mark.parametrize(
    "value",
    [b"a\r\nx-forged: 1", b"a\x00b", b"a\x01b", b"req\x7f1", "r\u00e9q".encode()],
    ids=["crlf", "nul", "soh", "del", "utf8"],
)
def test_hostile_request_ids_from_a_raw_http2_client_are_replaced(
    value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("h2")
    with sync_server(ServerInterceptor()) as served:
        with caplog.at_level(logging.WARNING, logger="ctxrelay"):
            seen, echoed = _raw(served, [(b"x-request-id", value)])
    assert GENERATED.match(seen["request_id"]), seen["request_id"]
    assert echoed == seen["request_id"]
    if value.isascii():
        assert any("x-request-id" in r.getMessage() for r in caplog.records)
    # The snapshot never holds a control character.
    assert all(v.isprintable() for _, v in seen["headers"])
    assert_nothing_left(served, 1)


def test_hostile_captured_metadata_and_trace_context_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("h2")
    ctxrelay.configure(Policy(capture={"x-gray"}, trusted_peers=("127.0.0.1",)))
    with sync_server(ServerInterceptor()) as served:
        with caplog.at_level(logging.WARNING, logger="ctxrelay"):
            seen, _ = _raw(
                served,
                [
                    (b"x-request-id", b"req-ok"),
                    (b"x-gray", b"canary\r\nx-admin: 1"),
                    (b"traceparent", TRACEPARENT.encode() + b"\n"),
                    (b"baggage", b"tenant=acme\x00,user=eve"),
                ],
            )
    assert seen["request_id"] == "req-ok"
    assert seen["fields"] == {"request_id": "req-ok"}
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("x-gray", "traceparent", "baggage"):
        assert name in warned


def test_repeated_binary_and_huge_metadata_never_crash(caplog: pytest.LogCaptureFixture) -> None:
    ctxrelay.configure(Policy(capture={"x-gray"}))
    with sync_server(ServerInterceptor(), options=BIG_METADATA) as served:
        channel = grpc.intercept_channel(
            grpc.insecure_channel(served.target, options=BIG_METADATA), ClientInterceptor("x:1")
        )
        who = unary_unary(channel, "Who")
        with channel, caplog.at_level(logging.WARNING, logger="ctxrelay"):
            repeated = load(who(b"", metadata=(("x-request-id", "first"), ("x-request-id", "2nd"))))
            binary = load(
                who(b"", metadata=(("x-request-id-bin", b"\x00\xff"), ("x-gray-bin", b"\x01")))
            )
            huge = load(who(b"", metadata=(("x-request-id", "r" * 20000), ("x-gray", "g" * 20000))))
            many = load(who(b"", metadata=tuple((f"x-k{i}", "v") for i in range(500))))
            invalid = load(who(b"", metadata=(("x-request-id", "not valid!"),)))
    assert repeated["request_id"] == "first"  # the first counts, as at the HTTP door
    assert GENERATED.match(binary["request_id"])
    assert "x-gray" not in binary["fields"]
    assert not [k for k, _ in binary["headers"] if k.endswith("-bin")]
    assert GENERATED.match(huge["request_id"])
    assert "x-gray" not in huge["fields"]
    assert len(many["headers"]) <= 128  # the snapshot's own caps hold
    assert GENERATED.match(invalid["request_id"])
    warned = [r.getMessage() for r in caplog.records if r.name == "ctxrelay.grpc"]
    assert any("repeated" in m for m in warned)
    assert any("binary" in m for m in warned)
    assert any("over 8192 bytes" in m for m in warned)
    assert_nothing_left(served, 5)


def test_hostile_metadata_is_reported_once_per_name_and_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel("x:1") as _:
        channel = grpc.insecure_channel(served.target)
        with channel, caplog.at_level(logging.WARNING, logger="ctxrelay.grpc"):
            for _ in range(20):
                unary_unary(channel, "Who")(
                    b"", metadata=(("x-request-id", "a"), ("x-request-id", "b"))
                )
    assert len([r for r in caplog.records if "repeated" in r.getMessage()]) == 1


def test_an_untrusted_peers_baggage_is_ignored() -> None:
    with sync_server(ServerInterceptor()) as served:
        ctxrelay.configure(Policy(routes=(Policy.Route(hosts=("127.0.0.1",), schemes={"grpc"}),)))
        with sync_channel(served.target) as channel, ctxrelay.bind(tenant="acme"):
            seen = load(unary_unary(channel, "Who")(b""))
        assert ["baggage", "tenant=acme"] in seen["metadata"]  # it was sent...
        assert "tenant" not in seen["fields"]  # ...and not believed: 127.0.0.1 is not trusted
        ctxrelay.configure(
            Policy(
                routes=(Policy.Route(hosts=("127.0.0.1",), schemes={"grpc"}),),
                trusted_peers=("127.0.0.0/8",),
            )
        )
        with sync_channel(served.target) as channel, ctxrelay.bind(tenant="acme"):
            assert load(unary_unary(channel, "Who")(b""))["fields"]["tenant"] == "acme"


def test_an_ipv6_peer_is_read_in_the_one_peer_format() -> None:
    try:
        socket_probe = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
        socket_probe.add_insecure_port("[::1]:0")
    except RuntimeError:
        pytest.skip("no IPv6 loopback on this machine")
    finally:
        socket_probe.stop(None)
    record_pool = ctxrelay.ThreadPoolExecutor(1)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(2), interceptors=[ServerInterceptor()]
    )
    from .grpc_service import Record, sync_handlers

    server.add_generic_rpc_handlers((sync_handlers(Record(), record_pool),))
    port = server.add_insecure_port("[::1]:0")
    server.start()
    try:
        ctxrelay.configure(Policy(trusted_peers=("::1",)))
        with grpc.insecure_channel(f"[::1]:{port}") as channel:
            seen = load(unary_unary(channel, "Who")(b"", metadata=(("baggage", "tenant=acme"),)))
        assert re.fullmatch(r"\[::1\]:\d+", seen["client"])
        assert seen["fields"]["tenant"] == "acme"  # the policy trusts ::1
    finally:
        server.stop(None).wait(GATE_TIMEOUT)
        record_pool.shutdown()


# -- OpenTelemetry's gRPC instrumentation, side by side --------------------------------------------
@dataclass
class Otel:
    provider: Any
    exporter: Any
    grpc: Any  # opentelemetry.instrumentation.grpc: untyped
    grpcext: Any


@pytest.fixture
def otel() -> Otel:
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.grpc")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    grpcext = importlib.import_module("opentelemetry.instrumentation.grpc.grpcext")
    return Otel(provider, exporter, instrumentation, grpcext)


def _server_spans_continue(otel: Otel, caller: Any) -> None:
    from opentelemetry import trace

    spans = otel.exporter.get_finished_spans()
    server = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    client = {s.context.span_id for s in spans if s.kind == trace.SpanKind.CLIENT}
    assert server
    assert {s.context.trace_id for s in server} == {caller.get_span_context().trace_id}
    # Each server span's parent is OpenTelemetry's client span: one trace,
    # one parent, whichever interceptor was outside.
    assert {s.parent.span_id for s in server} <= client


@pytest.mark.parametrize("otel_outside", [True, False], ids=["otel-outer", "otel-inner"])
def test_sync_interop_with_opentelemetry_grpc(otel: Otel, otel_outside: bool) -> None:
    server_side = [otel.grpc.server_interceptor(tracer_provider=otel.provider), ServerInterceptor()]
    with sync_server(*(server_side if otel_outside else server_side[::-1])) as served:
        plain = grpc.insecure_channel(served.target)
        otel_client = otel.grpc.client_interceptor(tracer_provider=otel.provider)
        if otel_outside:
            channel = otel.grpcext.intercept_channel(
                grpc.intercept_channel(plain, ClientInterceptor(served.target)), otel_client
            )
        else:
            channel = grpc.intercept_channel(
                otel.grpcext.intercept_channel(plain, otel_client), ClientInterceptor(served.target)
            )
        tracer = otel.provider.get_tracer("test")
        with channel, tracer.start_as_current_span("caller") as caller:
            with ctxrelay.bind(request_id="req-otel"):
                who = load(unary_unary(channel, "Who")(b""))
                streamed = [load(m) for m in unary_stream(channel, "Stream")(b"2")]
        assert who["request_id"] == "req-otel"
        assert [m["request_id"] for m in streamed] == ["req-otel"] * 2
        assert len([v for k, v in who["metadata"] if k == "traceparent"]) == 1
        _server_spans_continue(otel, caller)
        assert_nothing_left(served, 2)


@pytest.mark.parametrize("otel_outside", [True, False], ids=["otel-outer", "otel-inner"])
def test_aio_interop_with_opentelemetry_grpc(otel: Otel, otel_outside: bool) -> None:
    async def run() -> None:
        server_side = [
            otel.grpc.aio_server_interceptor(tracer_provider=otel.provider),
            AioServerInterceptor(),
        ]
        async with aio_server(*(server_side if otel_outside else server_side[::-1])) as served:
            client_side = [
                list(otel.grpc.aio_client_interceptors(tracer_provider=otel.provider)),
                aio_client_interceptors(served.target),
            ]
            if not otel_outside:
                client_side.reverse()
            async with grpc.aio.insecure_channel(
                served.target, interceptors=[*client_side[0], *client_side[1]]
            ) as channel:
                tracer = otel.provider.get_tracer("test")
                with tracer.start_as_current_span("caller") as caller:
                    with ctxrelay.bind(request_id="req-otel"):
                        who = load(await unary_unary(channel, "Who")(b""))
                        streamed = [load(m) async for m in unary_stream(channel, "Stream")(b"2")]
            assert who["request_id"] == "req-otel"
            assert [m["request_id"] for m in streamed] == ["req-otel"] * 2
            assert len([v for k, v in who["metadata"] if k == "traceparent"]) == 1
            _server_spans_continue(otel, caller)
            await asyncio.to_thread(assert_nothing_left, served, 2)

    asyncio.run(run())


# -- odds and ends --------------------------------------------------------------------------------
def test_a_client_without_a_target_or_destination_is_refused() -> None:
    with pytest.raises(TypeError):
        ClientInterceptor()
    with pytest.raises(TypeError):
        aio_client_interceptors(destination=b"grpc://x")  # type: ignore[arg-type]


def test_an_unknown_method_is_left_to_grpc() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            unary_unary(channel, "Nope")(b"")
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_caller_context_is_untouched_after_calls() -> None:
    with sync_server(ServerInterceptor()) as served, sync_channel(served.target) as channel:
        with ctxrelay.bind(request_id="req-caller") as bound:
            unary_unary(channel, "Who")(dump({}))
            assert ctxrelay.current() is bound
    assert ctxrelay.current() == {}


# -- relay_server / relay_channel: the same, without interceptors -----------------------------
def test_relayed_sync_server_and_channel_every_arity_and_200_concurrent_calls() -> None:
    _trusting_policy()
    with sync_server(relayed={}) as served:
        with relay_channel(grpc.insecure_channel(served.target), served.target) as channel:
            with ctxrelay.bind(request_id="req-relayed"):
                _, call = unary_unary(channel, "Who").with_call(b"")
                assert ("x-request-id", "req-relayed") in call.initial_metadata()
                future = unary_unary(channel, "Who").future(b"")
                assert load(future.result(GATE_TIMEOUT))["request_id"] == "req-relayed"
                collected, _ = stream_unary(channel, "Collect").with_call(iter([b"a"]))
                assert load(collected)["during"] == ["req-relayed"]
            with concurrent.futures.ThreadPoolExecutor(32) as callers:
                replies = list(callers.map(functools.partial(_sync_call, channel), range(200)))
        for i, messages in enumerate(replies):
            assert messages
            for message in messages:
                assert (message["request_id"], message["pool"]) == (f"req-{i}", f"req-{i}")
                assert message["fields"]["tenant"] == f"t{i}"
        assert_nothing_left(served, 203)


def test_relayed_aio_server_and_channel_200_concurrent_calls_each_their_own() -> None:
    _trusting_policy()

    async def one(channel: Any, i: int) -> list[dict[str, Any]]:
        with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
            kind = ("Sync" if i % 8 >= 4 else "") + ARITIES[i % 4]
            await asyncio.sleep(0)
            if kind.endswith("Who"):
                return [load(await unary_unary(channel, kind)(b""))]
            if kind.endswith("Stream"):
                return [load(m) async for m in unary_stream(channel, kind)(b"2")]
            if kind.endswith("Collect"):
                return [load(await stream_unary(channel, kind)(iter([b"a", b"b"])))]
            return [load(m) async for m in stream_stream(channel, kind)(iter([b"a", b"b"]))]

    async def run() -> None:
        async with aio_server(relayed={}) as served:
            plain = grpc.aio.insecure_channel(served.target)
            async with relay_channel(plain, served.target) as channel:
                replies = await asyncio.gather(*(one(channel, i) for i in range(200)))
                with ctxrelay.bind(request_id="req-echo"):
                    call = unary_unary(channel, "Who")(b"")
                    await call
                    assert ("x-request-id", "req-echo") in list(await call.initial_metadata())
            for i, messages in enumerate(replies):
                assert messages
                for message in messages:
                    assert (message["request_id"], message["pool"]) == (f"req-{i}", f"req-{i}")
                    assert message["fields"]["tenant"] == f"t{i}"
            await asyncio.to_thread(assert_nothing_left, served, 201)

    asyncio.run(run())


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "aio"])
def test_relayed_registered_method_handlers_are_relayed(aio: bool) -> None:
    # Generated code (grpcio-tools >= 1.62) registers its methods this way too.
    def who(request: bytes, context: Any) -> bytes:
        return dump(ctxrelay.request_id())

    async def aio_who(request: bytes, context: Any) -> bytes:
        return dump(ctxrelay.request_id())

    handlers: dict[str, Any] = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "AioWho": grpc.unary_unary_rpc_method_handler(aio_who),
    }

    if not aio:
        server = relay_server(grpc.server(concurrent.futures.ThreadPoolExecutor(2)), echo=False)
        server.add_registered_method_handlers("reg.Svc", {"Who": handlers["Who"]})
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            target = f"127.0.0.1:{port}"
            channel: Any = relay_channel(grpc.insecure_channel(target), target)
            with channel, ctxrelay.bind(request_id="req-reg"):
                reply, call = channel.unary_unary(
                    "/reg.Svc/Who", _registered_method=True
                ).with_call(b"")
            assert load(reply) == "req-reg"
            assert "x-request-id" not in dict(call.initial_metadata())  # echo=False
        finally:
            server.stop(None).wait(GATE_TIMEOUT)
        return

    async def run() -> list[Any]:
        server = relay_server(grpc.aio.server(concurrent.futures.ThreadPoolExecutor(2)))
        server.add_registered_method_handlers("reg.Svc", handlers)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            channel: Any = relay_channel(grpc.aio.insecure_channel(target), target)
            async with channel:
                with ctxrelay.bind(request_id="req-reg"):
                    return [
                        load(await channel.unary_unary(f"/reg.Svc/{name}")(b""))
                        for name in ("Who", "AioWho")
                    ]
        finally:
            await server.stop(None)

    assert asyncio.run(run()) == ["req-reg", "req-reg"]


def test_a_relayed_channel_refuses_a_call_after_the_deadline_where_it_is_made() -> None:
    with sync_server(relayed={}) as served:
        with relay_channel(grpc.insecure_channel(served.target), served.target) as channel:
            with ctxrelay.bind(request_id="r-late"), ctxrelay.deadline(0):
                with pytest.raises(ctxrelay.DeadlineExceeded) as caught:
                    unary_unary(channel, "Who")(b"", timeout=30)
            assert isinstance(caught.value, grpc.RpcError)
            with ctxrelay.bind(request_id="r-bounded"), ctxrelay.deadline(30):
                reply = load(unary_unary(channel, "Who")(b""))
        assert reply["request_id"] == "r-bounded"
        served.record.wait_finished(1)

    async def run() -> BaseException:
        async with aio_server(relayed={}) as served:
            plain = grpc.aio.insecure_channel(served.target)
            async with relay_channel(plain, served.target) as channel:
                with ctxrelay.bind(request_id="r-late"), ctxrelay.deadline(0):
                    try:
                        unary_unary(channel, "Who")(b"", timeout=30)
                    except BaseException as exc:  # asserted below
                        return exc
        raise AssertionError("the call went out")

    error = asyncio.run(run())
    assert isinstance(error, ctxrelay.DeadlineExceeded)
    assert isinstance(error, grpc.RpcError)


def test_a_relayed_channel_keeps_the_callers_metadata_object_and_wins_for_it() -> None:
    with sync_server(relayed={}) as served:
        with relay_channel(grpc.insecure_channel(served.target), served.target) as channel:
            mine = (("x-request-id", "explicit"),)
            with ctxrelay.bind(request_id="req-ctx"):
                reply = load(unary_unary(channel, "Who")(b"", metadata=mine))
    assert reply["request_id"] == "explicit"
    assert mine == (("x-request-id", "explicit"),)


def test_relay_server_and_relay_channel_refuse_what_they_cannot_wrap() -> None:
    with pytest.raises(TypeError, match=r"grpc\.Server"):
        relay_server(object())  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"grpc\.Channel"):
        relay_channel(object(), "127.0.0.1:1")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="target"):
        relay_channel(grpc.insecure_channel("127.0.0.1:1"))
