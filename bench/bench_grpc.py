"""What ctxrelay's gRPC interceptors cost on a loopback unary call.

One tiny service (bytes in, bytes out, no protobuf) served on 127.0.0.1 by a
real grpcio server and called through a real channel, once per variant,
all in this process:

* **bare**: no interceptor;
* **no-op interceptors**: a client and a server interceptor that pass the
  call on untouched -- what grpcio's interceptor machinery costs by itself,
  the floor for any interceptor;
* **ctxrelay interceptors**: ``ClientInterceptor`` + ``ServerInterceptor``
  (the client adds the request id and a baggage field the policy routes to
  127.0.0.1; the server reads them, takes a snapshot, binds and resets the
  context, watches for the client's cancel, and echoes the request id in
  the initial metadata);
* **ctxrelay relay_server/relay_channel**: the same work with no
  interceptor: the server's handlers wrapped once at registration, the
  channel's callables wrapped once when made;
* each of the two with ``echo=False``: without the echo, which costs
  grpcio one more send per call (initial metadata on its own, before the
  response);
* **OpenTelemetry**: ``opentelemetry-instrumentation-grpc``'s client and
  server interceptors, spans recorded by the SDK's ``TracerProvider`` (no
  exporter), when it is installed.

The caller runs bound to a context (request id, tenant) for every variant.
The same for ``grpc.aio`` (a second table): an aio server and channel on
one event loop, async handler.

Variants are interleaved: each repetition times a batch of sequential calls
per variant, the order rotated by one place per repetition.  Two figures per
call: wall time (the latency a caller sees) and the process's CPU time
(``time.process_time``: client, server and grpcio's own threads -- the
steadier figure on a shared machine).  Reported: medians over repetitions,
and the overhead, the median of (variant - bare) within a repetition.

Run: ``python bench/bench_grpc.py`` (about a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

import ctxrelay
from ctxrelay.integrations.grpc import (
    AioServerInterceptor,
    ClientInterceptor,
    ServerInterceptor,
    aio_client_interceptors,
    relay_channel,
    relay_server,
)
from harness import markdown_table, rotations

# OpenTelemetry's gRPC instrumentation (untyped), when installed.
otel_grpc: Any
otel_tracer_provider: Any
try:
    otel_grpc = importlib.import_module("opentelemetry.instrumentation.grpc")
    importlib.import_module("opentelemetry.instrumentation.grpc.grpcext")
    otel_tracer_provider = importlib.import_module("opentelemetry.sdk.trace").TracerProvider
except ImportError:  # the OpenTelemetry variants are left out
    otel_grpc = otel_tracer_provider = None

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Call"
PAYLOAD = b"x" * 32


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run, or a smoke run for ``--quick``."""

    reps: int
    batch: int


FULL = Settings(reps=21, batch=200)
QUICK = Settings(reps=3, batch=20)


def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


async def aio_handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


class NoopServer(grpc.ServerInterceptor):
    """Passes the call on: grpcio's interceptor machinery alone."""

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return continuation(handler_call_details)


class NoopClient(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


class AioNoopServer(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return await continuation(handler_call_details)


class AioNoopClient(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def generic(behavior: Callable[..., Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(behavior)}
    )


@dataclass
class Variant:
    """One server and the channel that calls it."""

    name: str
    server: Any
    channel: Any
    call: Any


def tracer() -> Any:
    return None if otel_tracer_provider is None else otel_tracer_provider()


def intercepted(*interceptors: Any) -> Callable[[str], grpc.Channel]:
    def channel(target: str) -> grpc.Channel:
        return grpc.intercept_channel(grpc.insecure_channel(target), *interceptors)

    return channel


def ctxrelay_channel(target: str) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(target), ClientInterceptor(target))


def relayed_channel(target: str) -> grpc.Channel:
    return relay_channel(grpc.insecure_channel(target), target)


#: How a variant wraps its server: not at all, or ``relay_server(server, echo=...)``.
Relay = bool | None


def sync_variants() -> list[Variant]:
    provider = tracer()
    setups: list[tuple[str, list[Any], Callable[[str], grpc.Channel], Relay]] = [
        ("bare", [], intercepted(), None),
        ("no-op interceptors", [NoopServer()], intercepted(NoopClient()), None),
        ("ctxrelay interceptors", [ServerInterceptor()], ctxrelay_channel, None),
        (
            "ctxrelay interceptors, echo=False",
            [ServerInterceptor(echo=False)],
            ctxrelay_channel,
            None,
        ),
        ("ctxrelay relay_server/relay_channel", [], relayed_channel, True),
        ("ctxrelay relay_server/relay_channel, echo=False", [], relayed_channel, False),
    ]
    if otel_grpc is not None:
        interceptor = otel_grpc.client_interceptor(tracer_provider=provider)
        setups.append(
            (
                "OpenTelemetry",
                [otel_grpc.server_interceptor(tracer_provider=provider)],
                # OpenTelemetry's sync client interceptor is its own kind.
                lambda target: otel_grpc.grpcext.intercept_channel(
                    grpc.insecure_channel(target), interceptor
                ),
                None,
            )
        )
    variants = []
    for name, server_side, make_channel, relay in setups:
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=server_side)
        if relay is not None:
            server = relay_server(server, echo=relay)
        server.add_generic_rpc_handlers((generic(handler),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = make_channel(f"127.0.0.1:{port}")
        variants.append(Variant(name, server, channel, channel.unary_unary(METHOD)))
    return variants


def sync_batch(call: Callable[[bytes], bytes], count: int) -> tuple[float, float]:
    """(wall µs, process CPU µs) per call over ``count`` sequential calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        call(PAYLOAD)
    return (
        (time.perf_counter() - wall) / count * 1e6,
        (time.process_time() - cpu) / count * 1e6,
    )


async def aio_batch(call: Callable[[bytes], Any], count: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        await call(PAYLOAD)
    return (
        (time.perf_counter() - wall) / count * 1e6,
        (time.process_time() - cpu) / count * 1e6,
    )


Samples = dict[str, list[tuple[float, float]]]


def rows(samples: Samples) -> list[list[str]]:
    """Median wall and CPU per call, and each one's overhead over bare."""
    names = list(samples)
    bare = samples["bare"]
    out = []
    for name in names:
        mine = samples[name]
        cells = [name]
        for i in (0, 1):
            median = statistics.median(s[i] for s in mine)
            cells.append(f"{median:.0f}")
            if name == "bare":
                cells.append("-")
                continue
            overhead = statistics.median(m[i] - b[i] for m, b in zip(mine, bare, strict=True))
            base = statistics.median(s[i] for s in bare)
            cells.append(f"{overhead:+.1f} ({overhead / base:+.1%})")
        out.append(cells)
    return out


HEADER = ["variant", "wall µs/call", "wall overhead", "CPU µs/call", "CPU overhead"]


def run_sync(settings: Settings) -> list[list[str]]:
    variants = sync_variants()
    try:
        with ctxrelay.bind(request_id="req-bench-1", tenant="acme"):
            for variant in variants:  # warm up: connections, caches, imports
                sync_batch(variant.call, max(20, settings.batch // 4))
            samples: Samples = {v.name: [] for v in variants}
            for order in rotations(variants, settings.reps):
                gc.collect()
                for variant in order:
                    samples[variant.name].append(sync_batch(variant.call, settings.batch))
        return rows(samples)
    finally:
        for variant in variants:
            variant.channel.close()
            variant.server.stop(None)


async def aio_variants() -> list[Variant]:
    provider = tracer()

    def none(target: str) -> list[Any]:
        return []

    setups: list[tuple[str, list[Any], Callable[[str], list[Any]], Relay]] = [
        ("bare", [], none, None),
        ("no-op interceptors", [AioNoopServer()], lambda target: [AioNoopClient()], None),
        ("ctxrelay interceptors", [AioServerInterceptor()], aio_client_interceptors, None),
        (
            "ctxrelay interceptors, echo=False",
            [AioServerInterceptor(echo=False)],
            aio_client_interceptors,
            None,
        ),
        ("ctxrelay relay_server/relay_channel", [], none, True),
        ("ctxrelay relay_server/relay_channel, echo=False", [], none, False),
    ]
    if otel_grpc is not None:
        setups.append(
            (
                "OpenTelemetry",
                [otel_grpc.aio_server_interceptor(tracer_provider=provider)],
                lambda target: list(otel_grpc.aio_client_interceptors(tracer_provider=provider)),
                None,
            )
        )
    variants = []
    for name, server_side, client_side, relay in setups:
        server = grpc.aio.server(interceptors=server_side)
        if relay is not None:
            server = relay_server(server, echo=relay)
        server.add_generic_rpc_handlers((generic(aio_handler),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(target, interceptors=client_side(target) or None)
        if relay is not None:
            channel = relay_channel(channel, target)
        variants.append(Variant(name, server, channel, channel.unary_unary(METHOD)))
    return variants


async def run_aio(settings: Settings) -> list[list[str]]:
    variants = await aio_variants()
    try:
        with ctxrelay.bind(request_id="req-bench-1", tenant="acme"):
            for variant in variants:
                await aio_batch(variant.call, max(20, settings.batch // 4))
            samples: Samples = {v.name: [] for v in variants}
            for order in rotations(variants, settings.reps):
                gc.collect()
                for variant in order:
                    samples[variant.name].append(await aio_batch(variant.call, settings.batch))
        return rows(samples)
    finally:
        for variant in variants:
            await variant.channel.close()
            await variant.server.stop(None)


def run(settings: Settings) -> None:
    # The policy routes 127.0.0.1 over grpc://: the tenant travels as baggage.
    ctxrelay.configure(
        ctxrelay.Policy(routes=(ctxrelay.Policy.Route(hosts=("127.0.0.1",), schemes={"grpc"}),))
    )
    print("## gRPC: a loopback unary call, bare and with interceptors\n")
    print(
        f"grpcio {grpc.__version__}; {settings.reps} interleaved repetitions of "
        f"{settings.batch} sequential calls per variant; medians.  Overhead: the "
        "median of (variant - bare) within a repetition"
        + ("" if otel_grpc is not None else "; OpenTelemetry's gRPC instrumentation not installed")
        + ".\n"
    )
    print("### Sync: `grpc.server` (thread pool of 4) and `grpc.intercept_channel`\n")
    print(markdown_table(HEADER, run_sync(settings)))
    print()
    print("### `grpc.aio`: server and channel on one event loop, async handler\n")
    print(markdown_table(HEADER, asyncio.run(run_aio(settings))))
    print()
    print("### ctxrelay's own code per call, in process\n")
    print(
        "CPU time of this thread (`time.thread_time`), no network: the client "
        "interceptor turning a call's details into details with the context's "
        "metadata, and the server's wrapped behaviour (door, snapshot, bind, "
        "handler, reset) around a handler that returns at once, given a stand-in "
        "servicer context that answers with the metadata and peer a real call "
        "brings.  Medians of the repetitions.\n"
    )
    print(markdown_table(["step", "µs/call"], own_code_rows(settings)))
    print()


class StandInContext:
    """What the server's wrapper asks of a servicer context, answered at once."""

    metadata = (
        ("user-agent", "grpc-python/1.85 grpc-c/58.0.0 (linux; chttp2)"),
        ("x-request-id", "req-bench-1"),
        ("baggage", "tenant=acme"),
    )

    def invocation_metadata(self) -> Any:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def send_initial_metadata(self, metadata: Any) -> None:
        return None

    def time_remaining(self) -> float:
        return 9.2e18  # sync grpcio's answer for a call without a deadline

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True


@dataclass(frozen=True)
class StandInDetails:
    method: str = METHOD
    invocation_metadata: tuple[Any, ...] = ()
    timeout: float | None = None
    metadata: Any = None
    credentials: Any = None
    wait_for_ready: bool | None = None
    compression: Any = None


def own_code_rows(settings: Settings) -> list[list[str]]:
    count = settings.batch * 10
    client = ClientInterceptor("127.0.0.1:50000")
    details: Any = StandInDetails()
    context = StandInContext()

    def continuation(call_details: Any, request: Any) -> Any:
        return call_details

    def client_call() -> object:
        return client.intercept_unary_unary(continuation, details, PAYLOAD)

    class StandInChannel(grpc.Channel):
        """Hands out a callable that returns the metadata it was given."""

        def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
            def call(request: Any, timeout: Any, metadata: Any, *more: Any) -> Any:
                return metadata

            return call

        unary_stream = stream_unary = stream_stream = unary_unary

        def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
            return None

        def unsubscribe(self, callback: Any) -> None:
            return None

        def close(self) -> None:
            return None

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc_info: Any) -> None:
            return None

    relayed = relay_channel(StandInChannel(), "127.0.0.1:50000")
    relayed_call: Any = relayed.unary_unary(METHOD)

    def channel_call() -> object:
        return relayed_call(PAYLOAD)

    def served(echo: bool) -> Callable[[], object]:
        # The wrapped behaviour is the same for ServerInterceptor and
        # relay_server (wrapped once; here through the interceptor's hook).
        wrapped = ServerInterceptor(echo=echo).intercept_service(
            lambda call_details: grpc.unary_unary_rpc_method_handler(handler), details
        )
        behavior = wrapped.unary_unary

        def call() -> object:
            return behavior(PAYLOAD, context)

        return call

    steps: list[tuple[str, Callable[[], object]]] = [
        ("client: `ClientInterceptor`, request id + 1 baggage field", client_call),
        ("client: `relay_channel`'s callable, the same metadata", channel_call),
        ("server: wrapped behaviour, echo=False", served(False)),
        ("server: wrapped behaviour, echo on (the send itself not counted)", served(True)),
    ]
    rows = []
    with ctxrelay.bind(request_id="req-bench-1", tenant="acme"):
        for label, step in steps:
            samples = []
            for _ in range(settings.reps):
                start = time.thread_time()
                for _ in range(count):
                    step()
                samples.append((time.thread_time() - start) / count * 1e6)
            rows.append([label, f"{statistics.median(samples):.2f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python bench/bench_grpc.py [--quick] [--reps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reps", type=int, help="repetitions per variant")
    parser.add_argument("--batch", type=int, help="calls per variant per repetition")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.reps:
        settings = dataclasses.replace(settings, reps=args.reps)
    if args.batch:
        settings = dataclasses.replace(settings, batch=args.batch)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
