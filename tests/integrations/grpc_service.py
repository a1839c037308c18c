"""A tiny gRPC service for the gRPC integration's tests, and its servers.

No protobuf: every method takes and returns ``bytes`` (grpcio's generic
handlers with no serializers), replies are JSON.  Each handler reports what
it saw of ctxrelay's context -- in its own code, at every streamed step and
in a task it hands to a ``ctxrelay.ThreadPoolExecutor`` -- so a test can
tell whose context reached it.

The same methods exist sync (``grpc.server``, and a ``grpc.aio`` server's
sync handlers: grpc #37881's case, run in an executor thread) and async
(``grpc.aio``: coroutines and async generators).  A :class:`Probe`
interceptor, put outside ctxrelay's, records what was bound just before
and just after ctxrelay's wrapper ran: nothing, every time, is the "nothing
left bound" check.

:func:`raw_call` speaks HTTP/2 itself (``h2``): grpcio's client refuses to
send hostile metadata, a raw client can, and grpc-core passes it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

import ctxrelay
from ctxrelay.integrations.grpc import relay_server

SERVICE = "ctxrelay.test.Probe"

#: How long a handler waits on a gate before giving up (a test failed).
GATE_TIMEOUT = 20.0
#: A message big enough that a few of them fill HTTP/2's flow-control window.
BIG = b"z" * (256 * 1024)


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


# A channel's callables for one method (sync or aio), typed loosely: the
# service speaks bytes, grpc's stubs cannot know.
def unary_unary(channel: Any, method: str) -> Any:
    return channel.unary_unary(path(method))


def unary_stream(channel: Any, method: str) -> Any:
    return channel.unary_stream(path(method))


def stream_unary(channel: Any, method: str) -> Any:
    return channel.stream_unary(path(method))


def stream_stream(channel: Any, method: str) -> Any:
    return channel.stream_stream(path(method))


@dataclass
class Record:
    """What the handlers and the probe saw, across threads and tasks."""

    #: (where, ctxrelay.current() as a dict) from the probe: "before"/"after".
    probe: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    #: request ids seen by handlers' cleanup (finally) code.
    cleanup: list[str | None] = field(default_factory=list)
    #: set when a handler's cleanup ran.
    cleaned: threading.Event = field(default_factory=threading.Event)
    #: released by the test to let a held handler go on.
    gate: threading.Event = field(default_factory=threading.Event)
    #: set by a held handler once it holds.
    holding: threading.Event = field(default_factory=threading.Event)
    #: probe "after" entries, counted as they come.
    finished: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def wait_cleaned(self) -> None:
        """Until a handler's cleanup ran.  A stream grpc dropped is closed when
        it is collected: by reference counting at once, by the cycle
        collector if something held it in a cycle -- so collect meanwhile."""
        for _ in range(int(GATE_TIMEOUT / 0.05)):
            if self.cleaned.wait(0.05):
                return
            gc.collect()
        raise AssertionError("the handler's cleanup did not run")

    def wait_finished(self, count: int = 1, timeout: float = GATE_TIMEOUT) -> None:
        for _ in range(count):
            assert self.finished.acquire(timeout=timeout), "a call did not finish in time"

    def leaks(self) -> list[tuple[str, dict[str, str]]]:
        return [entry for entry in self.probe if entry[1]]


def seen(pool: futures.Executor | None = None) -> dict[str, Any]:
    """What the calling code sees of ctxrelay's context."""
    request = ctxrelay.request()
    out: dict[str, Any] = {
        "request_id": ctxrelay.request_id(),
        "fields": dict(ctxrelay.current()),
        "client": request.client if request else None,
        "path": request.path if request else None,
        "method": request.method if request else None,
        "scheme": request.scheme if request else None,
        "headers": request.headers.multi_items() if request else None,
    }
    if pool is not None:
        out["pool"] = pool.submit(ctxrelay.request_id).result(timeout=GATE_TIMEOUT)
    return out


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def load(data: bytes) -> Any:
    return json.loads(data)


def text_metadata(context: Any) -> list[list[str]]:
    return [[k, v] for k, v in context.invocation_metadata() or () if isinstance(v, str)]


# -- sync handlers ---------------------------------------------------------------
def sync_handlers(record: Record, pool: futures.Executor) -> grpc.GenericRpcHandler:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return dump({**seen(pool), "metadata": text_metadata(context)})

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(int(request or b"3")):
            yield dump(seen(pool))

    def collect(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        ids = [ctxrelay.request_id() for _ in requests]
        return dump({**seen(pool), "during": ids})

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield dump(seen(pool))

    def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such order")

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise ValueError(f"boom in {ctxrelay.request_id()}")

    def fail_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield dump(seen())
        raise ValueError(f"boom in {ctxrelay.request_id()}")

    def abort_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield dump(seen())
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    def own_metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
        own = (("x-own", "1"),) + ((("x-request-id", "handler-id"),) if request else ())
        context.send_initial_metadata(own)
        return dump(seen())

    def scoped(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        # A scope held across yields: the generator keeps its own context.
        with ctxrelay.bind(step="inner"):
            yield dump(seen())
            yield dump(seen())
        yield dump(seen())

    def hold(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            yield dump(seen())
            record.holding.set()
            record.gate.wait(GATE_TIMEOUT)
            yield dump(seen())
            yield dump(seen())
        finally:
            record.cleanup.append(ctxrelay.request_id())
            record.cleaned.set()

    def hold_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            record.holding.set()
            record.gate.wait(GATE_TIMEOUT)
            return dump(seen())
        finally:
            record.cleanup.append(ctxrelay.request_id())
            record.cleaned.set()

    return _generic(
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Abort": grpc.unary_unary_rpc_method_handler(abort),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "FailStream": grpc.unary_stream_rpc_method_handler(fail_stream),
            "AbortStream": grpc.unary_stream_rpc_method_handler(abort_stream),
            "OwnMetadata": grpc.unary_unary_rpc_method_handler(own_metadata),
            "Scoped": grpc.unary_stream_rpc_method_handler(scoped),
            "Hold": grpc.unary_stream_rpc_method_handler(hold),
            "HoldUnary": grpc.unary_unary_rpc_method_handler(hold_unary),
        }
    )


def _generic(handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


# -- async handlers ----------------------------------------------------------------
def aio_handlers(record: Record, pool: futures.Executor) -> dict[str, Any]:
    gate = asyncio.Event()

    async def off_loop() -> dict[str, Any]:
        # Hand-offs from async code: run_in_executor on a ctxrelay pool.
        loop = asyncio.get_running_loop()
        out = seen()
        out["pool"] = await loop.run_in_executor(pool, ctxrelay.request_id)
        return out

    async def who(request: bytes, context: Any) -> bytes:
        return dump({**(await off_loop()), "metadata": text_metadata(context)})

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(int(request or b"3")):
            await asyncio.sleep(0)
            yield dump(await off_loop())

    async def writer(request: bytes, context: Any) -> None:
        # The other streaming style: a coroutine that writes.
        for _ in range(int(request or b"3")):
            await context.write(dump(await off_loop()))

    async def collect(requests: Any, context: Any) -> bytes:
        ids = [ctxrelay.request_id() async for _ in requests]
        return dump({**(await off_loop()), "during": ids})

    async def chat(requests: Any, context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield dump(await off_loop())

    async def abort(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such order")
        raise AssertionError("unreachable")

    async def fail(request: bytes, context: Any) -> bytes:
        raise ValueError(f"boom in {ctxrelay.request_id()}")

    async def fail_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield dump(seen())
        raise ValueError(f"boom in {ctxrelay.request_id()}")

    async def abort_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield dump(seen())
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    async def own_metadata(request: bytes, context: Any) -> bytes:
        own = (("x-own", "1"),) + ((("x-request-id", "handler-id"),) if request else ())
        await context.send_initial_metadata(own)
        return dump(seen())

    async def scoped(request: bytes, context: Any) -> AsyncIterator[bytes]:
        with ctxrelay.bind(step="inner"):
            yield dump(seen())
            await asyncio.sleep(0)
            yield dump(seen())
        yield dump(seen())

    async def hold(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield dump(seen())
            record.holding.set()
            await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)
            yield dump(seen())
        finally:
            record.cleanup.append(ctxrelay.request_id())
            record.cleaned.set()

    async def hold_unary(request: bytes, context: Any) -> bytes:
        try:
            record.holding.set()
            await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)
            return dump(seen())
        finally:
            record.cleanup.append(ctxrelay.request_id())
            record.cleaned.set()

    async def flood(request: bytes, context: Any) -> AsyncIterator[bytes]:
        # Big messages the client does not read: grpc.aio ends up waiting in
        # its own write, with this generator suspended at a yield.
        try:
            record.holding.set()
            for _ in range(1000):
                yield BIG
        finally:
            record.cleanup.append(ctxrelay.request_id())
            record.cleaned.set()

    sync = sync_handlers(record, pool)
    handlers: dict[str, Any] = {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Writer": grpc.unary_stream_rpc_method_handler(writer),
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Abort": grpc.unary_unary_rpc_method_handler(abort),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "FailStream": grpc.unary_stream_rpc_method_handler(fail_stream),
        "AbortStream": grpc.unary_stream_rpc_method_handler(abort_stream),
        "OwnMetadata": grpc.unary_unary_rpc_method_handler(own_metadata),
        "Scoped": grpc.unary_stream_rpc_method_handler(scoped),
        "Hold": grpc.unary_stream_rpc_method_handler(hold),
        "HoldUnary": grpc.unary_unary_rpc_method_handler(hold_unary),
        "Flood": grpc.unary_stream_rpc_method_handler(flood),
    }
    # The sync handlers too, under "Sync...": on an aio server they run in an
    # executor thread that copies no context (grpc #37881).
    for name in ("Who", "Stream", "Collect", "Chat", "Abort", "Fail", "Scoped", "OwnMetadata"):
        handlers[f"Sync{name}"] = sync.service(_Details(path(name)))
    return {"handlers": handlers, "gate": gate}


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[Any, ...] = ()


# -- the probe: what is bound around ctxrelay's wrapper ------------------------------
def _probe_behavior(record: Record, behavior: Callable[..., Any], streaming: bool) -> Any:
    def note(where: str) -> None:
        record.probe.append((where, dict(ctxrelay.current())))
        if where == "after":
            record.finished.release()

    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: Any) -> AsyncIterator[Any]:
            note("before")
            inner = behavior(request, context)
            try:
                async for item in inner:
                    yield item
            finally:
                await inner.aclose()
                note("after")

        return agen
    if inspect.iscoroutinefunction(behavior):

        async def coro(request: Any, context: Any) -> Any:
            note("before")
            try:
                return await behavior(request, context)
            finally:
                note("after")

        return coro
    if streaming:

        def gen(request: Any, context: Any) -> Iterator[Any]:
            note("before")
            try:
                yield from behavior(request, context)
            finally:
                note("after")

        return gen

    def plain(request: Any, context: Any) -> Any:
        note("before")
        try:
            return behavior(request, context)
        finally:
            note("after")

    return plain


def _probed(record: Record, handler: Any) -> Any:
    if handler is None:
        return None
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(
                _probe_behavior(record, behavior, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class Probe(grpc.ServerInterceptor):
    """Records ``ctxrelay.current()`` around the handlers it wraps (outermost)."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return _probed(self.record, continuation(handler_call_details))


class AioProbe(grpc.aio.ServerInterceptor):
    def __init__(self, record: Record) -> None:
        self.record = record

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return _probed(self.record, await continuation(handler_call_details))


# -- servers ---------------------------------------------------------------------------
#: Lets the hostile-metadata tests send values over grpc's 8 KiB default.
BIG_METADATA = (("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20))


@dataclass
class Served:
    """A running server: where it is and what its handlers saw."""

    target: str
    port: int
    record: Record
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def sync_server(
    *interceptors: Any,
    options: tuple[tuple[str, Any], ...] = (),
    probe: bool = True,
    relayed: dict[str, Any] | None = None,
) -> Iterator[Served]:
    """A sync server; ``relayed``: wrapped by ``relay_server(server, **relayed)``."""
    record = Record()
    handler_pool = ctxrelay.ThreadPoolExecutor(4)
    server_pool = futures.ThreadPoolExecutor(16, thread_name_prefix="grpc-test-server")
    chain = [*([Probe(record)] if probe else []), *interceptors]
    server = grpc.server(server_pool, interceptors=chain, options=options)
    if relayed is not None:
        server = relay_server(server, **relayed)
    server.add_generic_rpc_handlers((sync_handlers(record, handler_pool),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(f"127.0.0.1:{port}", port, record, {"server_pool": server_pool})
    finally:
        record.gate.set()
        server.stop(None).wait(GATE_TIMEOUT)
        server_pool.shutdown(wait=True)
        handler_pool.shutdown(wait=True)


@contextlib.asynccontextmanager
async def aio_server(
    *interceptors: Any,
    options: tuple[tuple[str, Any], ...] = (),
    probe: bool = True,
    relayed: dict[str, Any] | None = None,
) -> AsyncIterator[Served]:
    """A ``grpc.aio`` server; ``relayed`` as for :func:`sync_server`."""
    record = Record()
    handler_pool = ctxrelay.ThreadPoolExecutor(4)
    executor = futures.ThreadPoolExecutor(8, thread_name_prefix="grpc-test-aio")
    made = aio_handlers(record, handler_pool)
    chain = [*([AioProbe(record)] if probe else []), *interceptors]
    server = grpc.aio.server(executor, interceptors=chain, options=options)
    if relayed is not None:
        server = relay_server(server, **relayed)
    server.add_generic_rpc_handlers((_generic(made["handlers"]),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Served(f"127.0.0.1:{port}", port, record, {"gate": made["gate"]})
    finally:
        record.gate.set()
        made["gate"].set()
        await server.stop(None)
        executor.shutdown(wait=True)
        handler_pool.shutdown(wait=True)


# -- a raw HTTP/2 client ------------------------------------------------------------------
@dataclass
class RawReply:
    """What a raw call got back: headers, trailers and the messages."""

    headers: dict[str, str]
    trailers: dict[str, str]
    messages: list[bytes]

    @property
    def status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))


def raw_call(
    port: int, method: str, metadata: list[tuple[bytes, bytes]], body: bytes = b""
) -> RawReply:
    """One unary call over plain HTTP/2 with ``metadata`` sent as it is."""
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    with socket.create_connection(("127.0.0.1", port), timeout=GATE_TIMEOUT) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path(method).encode()),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
        conn.send_headers(stream, headers)
        conn.send_data(stream, b"\x00" + struct.pack(">I", len(body)) + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        reply = RawReply({}, {}, [])
        data = b""
        done = False
        while not done:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    reply.headers.update(_decoded(event.headers))
                elif isinstance(event, h2.events.TrailersReceived):
                    reply.trailers.update(_decoded(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(
                    event,
                    (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated),
                ):
                    done = True
            sock.sendall(conn.data_to_send())
    while len(data) >= 5:
        size = struct.unpack(">I", data[1:5])[0]
        reply.messages.append(data[5 : 5 + size])
        data = data[5 + size :]
    return reply


def _decoded(headers: Any) -> dict[str, str]:
    out = {}
    for name, value in headers:
        key = name.decode() if isinstance(name, bytes) else name
        out[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return out
