"""OpenTelemetry must not carry into other services what ctxrelay's rules keep out.

Real parts throughout: uvicorn on 127.0.0.1 (and ::1), OpenTelemetry's own
ASGI middleware and SDK, ctxrelay's ``RelayMiddleware`` and requests
``Session``, a recording server downstream (``tests/httpserver.py``).

* Baggage: an internet client's ``baggage`` header is not read by ctxrelay's
  door (the peer is not trusted), but OpenTelemetry's middleware parses it
  into OpenTelemetry's baggage, which ctxrelay merged into outgoing headers
  and queue messages.  Entries the application set itself must still go.
* Trace: a span that was current before ``use(ctx)`` and is in another trace
  (a thread started during request A, taking up message B) spoke for B.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import ctxrelay
from ctxrelay import Context, Policy, RequestSnapshot
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.requests import Session

from .httpserver import RecordingServer, recording_server

T_A = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-aaaaaaaaaaaaaaaa-01"
T_B = "00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-bbbbbbbbbbbbbbbb-01"
WAIT = 10.0


def baggage_of(headers: dict[str, str]) -> dict[str, str]:
    """The baggage in ``headers``, read as a trusted in-house carrier would."""
    return dict(ctxrelay.extract({"baggage": headers.get("baggage", "")}, in_house=True))


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


# -- a real service: OpenTelemetry's middleware and ctxrelay's door -----------
class Service:
    """A raw ASGI app that, for each request, sets an OpenTelemetry baggage
    entry of its own (``app_set=yes``), calls ``downstream`` through a
    relaying requests session and answers with the headers ``inject`` writes
    for a queue message, as JSON."""

    def __init__(self, downstream: str) -> None:
        self.downstream = downstream

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        token = otel_context.attach(otel_baggage.set_baggage("app_set", "yes"))
        try:
            with Session() as http:  # blocking, in the loop: one request at a time
                http.get(self.downstream, timeout=WAIT)
            message: dict[str, str] = {}
            ctxrelay.inject(message)  # destination=None: a task-queue message
        finally:
            otel_context.detach(token)
        body = json.dumps(message).encode()
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send({**start, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def stack(downstream: str, order: str, provider: TracerProvider | None = None) -> Any:
    """The service behind both middlewares, OpenTelemetry's outside or inside."""
    app: Any = Service(downstream)
    provider = provider or TracerProvider()
    if order == "otel-outside":
        relayed = RelayMiddleware(app)
        return OpenTelemetryMiddleware(relayed, tracer_provider=provider)
    traced = OpenTelemetryMiddleware(app, tracer_provider=provider)
    return RelayMiddleware(traced)


@contextmanager
def serve(app: Any, host: str = "127.0.0.1") -> Iterator[int]:
    """uvicorn on ``host``:<free port>, in a thread; yields the port."""
    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        ready = threading.Event()
        for _ in range(int(WAIT / 0.01)):
            if server.started or not thread.is_alive():
                ready.set()
                break
            ready.wait(0.01)
        assert server.started, "uvicorn did not start"
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def raw_get(host: str, port: int, lines: list[bytes]) -> dict[str, str]:
    """GET / with exactly these header lines, from a plain socket (so any
    byte a server accepts can be sent); the service's JSON answer."""
    head = b"GET / HTTP/1.1\r\nhost: service\r\nconnection: close\r\n"
    request = head + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 200 " in status_line, answer[:300]
    result: dict[str, str] = json.loads(rest.partition(b"\r\n\r\n")[2])
    return result


@contextmanager
def service(
    order: str = "otel-outside", host: str = "127.0.0.1"
) -> Iterator[tuple[int, RecordingServer]]:
    """(service port, downstream server) with a policy whose route gives the
    downstream server baggage, trusting no peer."""
    with recording_server() as downstream:
        route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port})
        ctxrelay.configure(Policy(routes=(route,)))
        with serve(stack(downstream.url("/down"), order), host) as port:
            yield port, downstream


# -- 1. baggage an untrusted peer sent never travels on ------------------------------
PEER_BAGGAGE = {
    "plain": [b"baggage: tenant=evil"],
    "header name case": [b"BaGGage: tenant=evil"],
    "member name case": [b"baggage: Tenant=evil"],
    "percent-encoded": [b"baggage: ten%61nt=ev%69l"],
    "properties": [b"baggage: tenant=evil;role=admin"],
    "plus as a space": [b"baggage: tenant=evil+too"],
    "blanks around": [b"baggage:  tenant = evil ,\tregion=eu "],
    "repeated lines": [b"baggage: tenant=evil", b"baggage: region=eu"],
    "the application's name": [b"baggage: app_set=evil,tenant=evil"],
    # The request snapshot drops a line with a control character, and lines
    # past its caps; OpenTelemetry's middleware reads them all the same.
    "control character": [b"baggage: tenant=evil,junk=\x01"],
    "past the snapshot's caps": [b"x-filler-%d: y" % i for i in range(130)]
    + [b"baggage: tenant=evil"],
}


@pytest.mark.parametrize("order", ["otel-outside", "otel-inside"])
@pytest.mark.parametrize("lines", PEER_BAGGAGE.values(), ids=PEER_BAGGAGE.keys())
def test_opentelemetry_baggage_from_an_untrusted_peer_is_not_relayed(
    order: str, lines: list[bytes]
) -> None:
    with service(order) as (port, downstream):
        message = raw_get("127.0.0.1", port, lines)
    # What the application set travels; nothing the internet client sent does,
    # neither to the internal service nor into the queue message.
    assert baggage_of(downstream.last("/down").headers) == {"app_set": "yes"}
    assert baggage_of(message) == {"app_set": "yes"}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.mark.parametrize(
    ("host", "trusted", "relayed"),
    [
        ("127.0.0.1", ("127.0.0.1",), True),
        ("127.0.0.1", ("10.0.0.0/8",), False),
        pytest.param("::1", ("::1",), True, marks=ipv6),
        pytest.param("::1", ("::1/128",), True, marks=ipv6),
        pytest.param("::1", ("10.0.0.0/8",), False, marks=ipv6),
    ],
)
def test_a_trusted_peers_opentelemetry_baggage_is_relayed_ipv6_too(
    host: str, trusted: tuple[str, ...], relayed: bool
) -> None:
    # "reg%69on" is not a name ctxrelay's extract() reads; OpenTelemetry
    # decodes it to "region": the entry reaches the context through
    # OpenTelemetry only, so the trust check on the client is what decides.
    # The snapshot writes an IPv6 client "::1:<port>": the check must read
    # it as the door does, "[::1]:<port>".
    with recording_server() as downstream:
        route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port})
        ctxrelay.configure(Policy(routes=(route,), trusted_peers=trusted))
        with serve(stack(downstream.url("/down"), "otel-outside"), host) as port:
            message = raw_get(host, port, [b"baggage: reg%69on=eu"])
    expected = {"app_set": "yes", "region": "eu"} if relayed else {"app_set": "yes"}
    assert baggage_of(downstream.last("/down").headers) == expected
    assert baggage_of(message) == expected


def test_the_snapshot_client_is_read_as_the_door_writes_peers() -> None:
    from ctxrelay._policy import peer_of_client

    assert peer_of_client("::1:5000") == "[::1]:5000"
    assert peer_of_client("2001:db8::7:443") == "[2001:db8::7]:443"
    assert peer_of_client("::1") == "[::1]"  # no port (a WSGI server without REMOTE_PORT)
    assert peer_of_client("[::1]:5000") == "[::1]:5000"
    assert peer_of_client("10.0.0.1:5000") == "10.0.0.1:5000"
    assert peer_of_client("10.0.0.1") == "10.0.0.1"
    assert peer_of_client("") is None
    assert peer_of_client(None) is None
    policy = Policy(trusted_peers=("::1",))
    assert policy.trusts(peer_of_client("::1:5000"))
    assert not policy.trusts(peer_of_client("::2:5000"))


@pytest.mark.parametrize(
    "line",
    [("uberctx-tenant", "evil"), ("ot-baggage-tenant", "evil"), ("jaeger-baggage", "tenant=evil")],
)
def test_baggage_headers_of_other_propagators_count_as_the_peers_too(
    line: tuple[str, str],
) -> None:
    # OpenTelemetry ships Jaeger and OpenTracing propagators that read these.
    snapshot = RequestSnapshot(client="203.0.113.9:4000", headers=[line])
    ctx = Context({"request_id": "r"}).with_request(snapshot)
    token = otel_context.attach(otel_baggage.set_baggage("tenant", "evil"))
    try:
        with ctxrelay.use(ctx):
            message: dict[str, str] = {}
            ctxrelay.inject(message)
    finally:
        otel_context.detach(token)
    assert message == {"x-request-id": "r"}


def test_outside_a_request_opentelemetry_baggage_still_rides_along() -> None:
    token = otel_context.attach(otel_baggage.set_baggage("region", "eu"))
    try:
        with ctxrelay.bind(request_id="r"):
            message: dict[str, str] = {}
            ctxrelay.inject(message)
    finally:
        otel_context.detach(token)
    assert baggage_of(message) == {"region": "eu"}


# -- 2. a stale span does not speak for a context bound with use() -----------------
@contextmanager
def downstream_policy() -> Iterator[RecordingServer]:
    with recording_server() as downstream:
        route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port})
        ctxrelay.configure(Policy(routes=(route,)))
        yield downstream


def message_b() -> Context:
    """The context of message B, as a worker reads it from the queue."""
    headers = {"x-request-id": "req-B", "traceparent": T_B, "tracestate": "b=1"}
    return ctxrelay.extract(headers, in_house=True)


def in_a_thread_of_request_a(work: Any) -> None:
    """Run ``work`` in a thread started while request A and its span were current."""
    tracer = TracerProvider().get_tracer("request-a")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    a = ctxrelay.extract({"x-request-id": "req-A", "traceparent": T_A}, in_house=True)
    parent = TraceContextTextMapPropagator().extract({"traceparent": T_A})
    with ctxrelay.use(a), tracer.start_as_current_span("request A", context=parent):
        thread = ctxrelay.Thread(target=run)  # it holds A's context and A's span
        thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_a_span_from_before_use_does_not_speak_for_the_bound_context() -> None:
    message: dict[str, str] = {}

    def take_up_message_b() -> None:
        with ctxrelay.use(message_b()), Session() as http:
            http.get(downstream.url("/b"), timeout=WAIT)
            ctxrelay.inject(message)

    with downstream_policy() as downstream:
        in_a_thread_of_request_a(take_up_message_b)
    received = downstream.last("/b").headers
    # B's request id with B's trace, not with request A's.
    assert (received["x-request-id"], received["traceparent"]) == ("req-B", T_B)
    assert received["tracestate"] == "b=1"
    assert (message["x-request-id"], message["traceparent"]) == ("req-B", T_B)


def test_a_span_from_before_use_does_not_speak_for_a_context_without_a_trace() -> None:
    def take_up_message_c() -> None:
        with ctxrelay.use(ctxrelay.Context(request_id="req-C")), Session() as http:
            http.get(downstream.url("/c"), timeout=WAIT)

    with downstream_policy() as downstream:
        in_a_thread_of_request_a(take_up_message_c)
    received = downstream.last("/c").headers
    assert received["x-request-id"] == "req-C"
    assert "traceparent" not in received  # never request A's trace with C's id


def test_a_span_started_under_use_speaks_for_the_bound_context() -> None:
    tracer = TracerProvider().get_tracer("worker")
    spans: list[str] = []

    def take_up_message_b() -> None:
        with (
            ctxrelay.use(message_b()),
            tracer.start_as_current_span("handle B") as span,
            Session() as http,
        ):
            spans.append(f"{span.get_span_context().span_id:016x}")
            http.get(downstream.url("/b"), timeout=WAIT)

    with downstream_policy() as downstream:
        in_a_thread_of_request_a(take_up_message_b)
    traceparent = downstream.last("/b").headers["traceparent"]
    assert traceparent.split("-")[2] == spans[0]  # OpenTelemetry's: started in use()


def test_a_span_in_the_bound_contexts_trace_speaks_for_it() -> None:
    # A consumer span started from the message's traceparent before use()
    # (as OpenTelemetry's queue instrumentations do): same trace, it wins.
    tracer = TracerProvider().get_tracer("worker")
    parent = TraceContextTextMapPropagator().extract({"traceparent": T_B})
    with (
        downstream_policy() as downstream,
        tracer.start_as_current_span("consume B", context=parent) as span,
        ctxrelay.use(message_b()),
        Session() as http,
    ):
        http.get(downstream.url("/b"), timeout=WAIT)
    traceparent = downstream.last("/b").headers["traceparent"]
    assert trace_id(traceparent) == trace_id(T_B)
    assert traceparent.split("-")[2] == f"{span.get_span_context().span_id:016x}"


@pytest.mark.parametrize("order", ["otel-outside", "otel-inside"])
def test_at_the_door_opentelemetrys_server_span_speaks_for_the_request(order: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with recording_server() as downstream:
        route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port})
        ctxrelay.configure(Policy(routes=(route,)))
        with serve(stack(downstream.url("/down"), order, provider)) as port:
            raw_get("127.0.0.1", port, [b"traceparent: " + T_A.encode(), b"x-request-id: req-A"])
    server = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(server) == 1
    received = downstream.last("/down").headers
    assert received["x-request-id"] == "req-A"
    assert trace_id(received["traceparent"]) == trace_id(T_A)
    assert received["traceparent"].split("-")[2] == f"{server[0].context.span_id:016x}"


def test_no_use_no_span_the_relayed_trace_goes_as_before() -> None:
    with downstream_policy() as downstream, ctxrelay.use(message_b()), Session() as http:
        http.get(downstream.url("/b"), timeout=WAIT)
    assert downstream.last("/b").headers["traceparent"] == T_B
