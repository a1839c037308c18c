"""OpenTelemetry's global propagator decides the trace formats that go out.

With B3, X-Ray or Jaeger configured (``set_global_textmap`` or
``OTEL_PROPAGATORS``), requests, httpx, aiohttp and gRPC send the trace in
those formats -- the active span's, else the relayed ``traceparent``
converted -- to real servers on 127.0.0.1, under the same policy as
before: a destination without trace gets none of them, propagators never
write baggage, an untrusted peer's baggage never travels on, a propagator
that raises or writes garbage never breaks or pollutes the call.  With the
default propagator the headers are exactly what they were.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context as OtelContext
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import ctxrelay
from ctxrelay import Context, Policy
from ctxrelay.integrations import aiohttp as relay_aiohttp
from ctxrelay.integrations import httpx as relay_httpx
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.grpc import ClientInterceptor
from ctxrelay.integrations.requests import Session

from ..httpserver import RecordingServer, recording_server
from ..servers import serve_asgi
from .grpc_service import load, sync_server, unary_unary

# The propagators' packages come from the Makefile's test install, not from
# an extra: an environment built from the extras alone skips this module.
AwsXRayPropagator = pytest.importorskip("opentelemetry.propagators.aws").AwsXRayPropagator
_b3 = pytest.importorskip("opentelemetry.propagators.b3")
B3MultiFormat, B3SingleFormat = _b3.B3MultiFormat, _b3.B3SingleFormat
JaegerPropagator = pytest.importorskip("opentelemetry.propagators.jaeger").JaegerPropagator

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
FIELDS = {
    "request_id": "req-1",
    "traceparent": TRACEPARENT,
    "tracestate": TRACESTATE,
    "tenant": "acme",
}

#: What each propagator writes for the relayed trace above, as a mesh reads it.
RELAYED = {
    "b3multi": {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
    "b3": {"b3": f"{TRACE_ID}-{PARENT_ID}-1"},
    "xray": {
        "x-amzn-trace-id": f"Root=1-{TRACE_ID[:8]}-{TRACE_ID[8:]};Parent={PARENT_ID};Sampled=1"
    },
    # OpenTelemetry's Jaeger propagator sets the debug bit on sampled traces.
    "jaeger": {"uber-trace-id": f"{TRACE_ID}:{PARENT_ID}:{0:016x}:03"},
}
PROPAGATORS: dict[str, Callable[[], TextMapPropagator]] = {
    "b3multi": B3MultiFormat,
    "b3": B3SingleFormat,
    "xray": AwsXRayPropagator,
    "jaeger": JaegerPropagator,
}
#: Every header name any of the trace formats here uses.
TRACE_NAMES = {name for headers in RELAYED.values() for name in headers} | {
    "traceparent",
    "tracestate",
    "x-b3-flags",
    "x-b3-parentspanid",
}
CLIENTS = ["requests", "httpx-sync", "httpx-async", "aiohttp"]
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _global_textmap_back() -> Iterator[None]:
    before = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(before)


def use_propagator(*names: str) -> None:
    """Make the named formats OpenTelemetry's global propagator, in order."""
    made: list[TextMapPropagator] = []
    for name in names:
        if name == "tracecontext":
            made.append(TraceContextTextMapPropagator())
        elif name == "baggage":
            made.append(W3CBaggagePropagator())
        else:
            made.append(PROPAGATORS[name]())
    propagate.set_global_textmap(CompositePropagator(made))


def get(client: str, url: str, **kwargs: Any) -> int:
    """One GET through a relaying client of kind ``client``; the status."""
    if client == "requests":
        with Session() as http:
            return http.get(url, timeout=TIMEOUT, **kwargs).status_code
    if client == "httpx-sync":
        with relay_httpx.install(httpx.Client(follow_redirects=True)) as sync:
            return sync.get(url, **kwargs).status_code

    async def run() -> int:
        if client == "httpx-async":
            async with relay_httpx.install(httpx.AsyncClient(follow_redirects=True)) as client_:
                return (await client_.get(url, **kwargs)).status_code
        configs = [relay_aiohttp.trace_config()]
        async with (
            aiohttp.ClientSession(trace_configs=configs) as http,
            http.get(url, **kwargs) as response,
        ):
            await response.read()
            return response.status

    return asyncio.run(run())


@contextmanager
def two_servers(**foreign: Any) -> Iterator[tuple[RecordingServer, RecordingServer]]:
    """(internal, foreign): a route names ``internal``; ``foreign`` gets
    ``Policy.foreign`` (changed by ``foreign``: ``trace=False``, ...)."""
    with recording_server() as internal, recording_server() as other:
        route = Policy.Route(hosts=("127.0.0.1",), ports={internal.port})
        outside = Policy.Route(baggage=False, headers=frozenset(), deadline=False, **foreign)
        ctxrelay.configure(Policy(routes=(route,), foreign=outside))
        yield internal, other


def trace_part(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name in TRACE_NAMES}


def baggage_of(headers: dict[str, str]) -> dict[str, str]:
    return dict(ctxrelay.extract({"baggage": headers.get("baggage", "")}, in_house=True))


def span_context_read_by(name: str, headers: dict[str, str]) -> trace.SpanContext:
    """The span context the propagator ``name`` reads from ``headers``."""
    # A mesh reads header names case-insensitively, as HTTP says (X-Ray asks
    # for "X-Amzn-Trace-Id").
    read = PROPAGATORS[name]().extract(requests.structures.CaseInsensitiveDict(headers))
    return trace.get_current_span(read).get_span_context()


# -- 1. the default propagator: nothing changes ------------------------------------------
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "formats", [(), ("tracecontext", "baggage"), ("tracecontext",), ("baggage",)]
)
def test_with_w3c_propagators_the_relayed_trace_goes_out_byte_for_byte(
    client: str, formats: tuple[str, ...]
) -> None:
    if formats:
        use_propagator(*formats)
    with two_servers() as (internal, _), ctxrelay.use(Context(FIELDS)):
        assert get(client, internal.url("/a")) == 200
    headers = internal.last("/a").headers
    assert (headers["x-request-id"], headers["baggage"]) == ("req-1", "tenant=acme")
    assert trace_part(headers) == {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}


def test_with_the_default_propagator_inject_writes_what_it_always_wrote() -> None:
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    odd = {**FIELDS, "tracestate": "a=1,,b=2"}  # OpenTelemetry would rewrite it: verbatim
    expected = {
        "x-request-id": "req-1",
        "traceparent": TRACEPARENT,
        "tracestate": "a=1,,b=2",
        "baggage": "tenant=acme",
    }
    for textmap in (propagate.get_global_textmap(), None):
        if textmap is None:
            use_propagator("tracecontext", "baggage")
        for destination in (None, "http://127.0.0.1:9/"):
            ctxrelay.configure(Policy(routes=(Policy.Route(hosts=("127.0.0.1",)),)))
            headers: dict[str, str] = {}
            with ctxrelay.use(Context(odd)):
                ctxrelay.inject(headers, destination=destination)
            assert headers == expected
            with ctxrelay.use(Context(odd)), tracer.start_as_current_span("call"):
                headers = {}
                ctxrelay.inject(headers, destination=destination)
                w3c: dict[str, str] = {}
                TraceContextTextMapPropagator().inject(w3c)
            assert headers == {"x-request-id": "req-1", **w3c, "baggage": "tenant=acme"}


# -- 2. B3, X-Ray, Jaeger over every client ------------------------------------------------
@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", RELAYED)
def test_the_relayed_trace_goes_out_in_the_propagators_format(client: str, name: str) -> None:
    use_propagator(name)
    with two_servers() as (internal, foreign), ctxrelay.use(Context(FIELDS)):
        assert get(client, internal.url("/a")) == 200
        assert get(client, foreign.url("/b")) == 200
    headers = internal.last("/a").headers
    assert trace_part(headers) == RELAYED[name]  # no traceparent: the mesh does not speak it
    assert (headers["x-request-id"], baggage_of(headers)) == ("req-1", {"tenant": "acme"})
    got = span_context_read_by(name, headers)
    assert (f"{got.trace_id:032x}", f"{got.span_id:016x}") == (TRACE_ID, PARENT_ID)
    # a destination no route names gets the trace, as it got traceparent
    assert trace_part(foreign.last("/b").headers) == RELAYED[name]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", RELAYED)
def test_an_active_span_goes_out_in_the_propagators_format(client: str, name: str) -> None:
    use_propagator(name)
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    with two_servers() as (internal, _), ctxrelay.use(Context(FIELDS)):
        with tracer.start_as_current_span("call") as span:
            assert get(client, internal.url("/a")) == 200
    headers = internal.last("/a").headers
    assert not {"traceparent", "tracestate"} & set(headers)
    got, mine = span_context_read_by(name, headers), span.get_span_context()
    assert (got.trace_id, got.span_id) == (mine.trace_id, mine.span_id)
    assert got.trace_flags.sampled


def test_an_unsampled_relayed_trace_stays_unsampled() -> None:
    use_propagator("b3multi")
    with two_servers() as (internal, _):
        with ctxrelay.use(Context({**FIELDS, "traceparent": TRACEPARENT[:-2] + "00"})):
            get("requests", internal.url("/a"))
    assert internal.last("/a").headers["x-b3-sampled"] == "0"


def test_a_set_with_tracecontext_sends_both_and_the_relayed_w3c_verbatim() -> None:
    use_propagator("tracecontext", "baggage", "b3multi")
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    with two_servers() as (internal, _), ctxrelay.use(Context(FIELDS)):
        get("httpx-sync", internal.url("/relayed"))
        with tracer.start_as_current_span("call") as span:
            get("httpx-sync", internal.url("/span"))
    relayed = internal.last("/relayed").headers
    assert trace_part(relayed) == {
        "traceparent": TRACEPARENT,
        "tracestate": TRACESTATE,
        **RELAYED["b3multi"],
    }
    spanned = trace_part(internal.last("/span").headers)
    ids = span.get_span_context()
    assert spanned["traceparent"].split("-")[1:3] == [f"{ids.trace_id:032x}", f"{ids.span_id:016x}"]
    assert (spanned["x-b3-traceid"], spanned["x-b3-spanid"]) == (
        f"{ids.trace_id:032x}",
        f"{ids.span_id:016x}",
    )
    assert "tracestate" not in spanned  # the relayed one would contradict the span


def test_a_span_from_before_use_does_not_speak_in_another_format_either() -> None:
    use_propagator("b3multi")
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    with two_servers() as (internal, _), tracer.start_as_current_span("request A"):
        with ctxrelay.use(Context(FIELDS)):  # message B, taken up in A's thread
            get("requests", internal.url("/a"))
    assert trace_part(internal.last("/a").headers) == RELAYED["b3multi"]


def test_many_threads_at_once_each_send_their_own_trace() -> None:
    use_propagator("b3")
    ids = [f"{n:032x}" for n in range(1, 33)]
    barrier = threading.Barrier(len(ids))
    failures: list[BaseException] = []

    def call(trace_id: str) -> None:
        try:
            fields = {"request_id": trace_id, "traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
            with ctxrelay.use(Context(fields)), Session() as http:
                barrier.wait(TIMEOUT)
                http.get(internal.url(f"/{trace_id}"), timeout=TIMEOUT)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    with two_servers() as (internal, _):
        threads = [threading.Thread(target=call, args=(i,)) for i in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
    assert not failures, failures
    for trace_id in ids:
        headers = internal.last(f"/{trace_id}").headers
        assert headers["x-request-id"] == trace_id
        assert headers["b3"] == f"{trace_id}-{PARENT_ID}-1"


# -- 3. the policy still decides -----------------------------------------------------------
@pytest.mark.parametrize("client", CLIENTS)
def test_a_destination_without_trace_gets_none_of_the_propagators_headers(client: str) -> None:
    use_propagator("tracecontext", "b3multi", "xray", "jaeger")
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    with two_servers(trace=False) as (internal, foreign), ctxrelay.use(Context(FIELDS)):
        with tracer.start_as_current_span("call"):
            get(client, foreign.url("/direct"))
            get(client, internal.redirect_url(foreign.url("/redirected")))
    assert trace_part(internal.last("/redirect").headers).keys() == {
        "traceparent",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-sampled",
        "x-amzn-trace-id",
        "uber-trace-id",
    }
    for path in ("/direct", "/redirected"):
        headers = foreign.last(path).headers
        assert trace_part(headers) == {}, path
        assert headers["x-request-id"] == "req-1"


@pytest.mark.parametrize("client", CLIENTS)
def test_propagators_never_write_baggage(client: str) -> None:
    # Jaeger writes OpenTelemetry's baggage as uberctx-* headers: not here.
    # It travels in ctxrelay's W3C baggage, where the route allows baggage.
    use_propagator("jaeger", "baggage")
    token = otel_context.attach(otel_baggage.set_baggage("region", "eu"))
    try:
        with two_servers() as (internal, foreign), ctxrelay.use(Context(FIELDS)):
            get(client, internal.url("/a"))
            get(client, foreign.url("/b"))
    finally:
        otel_context.detach(token)
    inside, outside = internal.last("/a").headers, foreign.last("/b").headers
    assert not [name for name in {**inside, **outside} if name.startswith("uberctx-")]
    assert baggage_of(inside) == {"tenant": "acme", "region": "eu"}
    assert "baggage" not in outside  # the foreign route gets no baggage, in any format
    assert "uber-trace-id" in inside
    assert "uber-trace-id" in outside


class Scribbler(TextMapPropagator):
    """A propagator that writes what no header should carry, beside a B3 trace."""

    def __init__(self, writes: dict[Any, Any]) -> None:
        self.writes = writes

    def extract(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> OtelContext:
        return context if context is not None else OtelContext()

    def inject(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        target: MutableMapping[Any, Any] = carrier  # type: ignore[assignment]
        target.update(self.writes)

    @property
    def fields(self) -> set[str]:
        return {str(name) for name in self.writes}


def test_what_a_propagator_writes_is_vetted_like_any_header() -> None:
    scribbler = Scribbler(
        {
            "X-Split": "a\r\nx-injected: 1",  # header splitting
            "authorization": "Bearer stolen",  # a credential no route names
            "baggage": "tenant=evil",  # baggage, by any name
            "uberctx-tenant": "evil",
            "ot-baggage-tenant": "evil",
            "jaeger-baggage": "tenant=evil",
            "x-request-id": "forged",  # ctxrelay's own header wins
            "x-number": 5,  # not text
            b"x-bytes": "v",  # not a str name
            "x-long": "v" * 5000,
            "X-Mesh-Hint": "fine",  # an ordinary header: lowercased, sent
        }
    )
    propagate.set_global_textmap(CompositePropagator([B3MultiFormat(), scribbler]))
    with two_servers() as (internal, _), ctxrelay.use(Context(FIELDS)):
        assert get("requests", internal.url("/a")) == 200
    headers = internal.last("/a").headers
    assert headers["x-request-id"] == "req-1"
    assert headers["x-mesh-hint"] == "fine"
    assert trace_part(headers) == RELAYED["b3multi"]
    assert baggage_of(headers) == {"tenant": "acme"}
    for name in ("x-split", "x-injected", "authorization", "x-number", "x-bytes", "x-long"):
        assert name not in headers, name
    assert not [name for name in headers if name.startswith(("uberctx-", "ot-baggage-"))]
    assert "jaeger-baggage" not in headers


# -- 4. an untrusted peer's baggage, read by OpenTelemetry's propagators -------------------
class Service:
    """Calls ``downstream`` through a relaying session; sets an OpenTelemetry
    baggage entry of its own first."""

    def __init__(self, downstream: str) -> None:
        self.downstream = downstream

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        token = otel_context.attach(otel_baggage.set_baggage("app_set", "yes"))
        try:
            with Session() as http:
                http.get(self.downstream, timeout=TIMEOUT)
        finally:
            otel_context.detach(token)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("order", ["otel-outside", "otel-inside"])
def test_baggage_an_untrusted_peer_sent_in_jaeger_or_w3c_form_never_travels_on(
    order: str,
) -> None:
    # OpenTelemetry's middleware reads every format the global propagator
    # knows, whoever sent it: uberctx-* (Jaeger) and baggage (W3C) included.
    use_propagator("b3multi", "jaeger", "baggage")
    with recording_server() as downstream:
        route = Policy.Route(hosts=("127.0.0.1",), ports={downstream.port})
        ctxrelay.configure(Policy(routes=(route,)))
        app: Any = Service(downstream.url("/down"))
        provider = TracerProvider()
        if order == "otel-outside":
            app = OpenTelemetryMiddleware(RelayMiddleware(app), tracer_provider=provider)
        else:
            app = RelayMiddleware(OpenTelemetryMiddleware(app, tracer_provider=provider))
        with serve_asgi(app) as base:
            client_ids = {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"}
            hostile = {"uberctx-tenant": "evil", "baggage": "role=admin"}
            response = requests.get(base + "/", headers={**client_ids, **hostile}, timeout=TIMEOUT)
            assert response.status_code == 204
    headers = downstream.last("/down").headers
    assert baggage_of(headers) == {"app_set": "yes"}
    assert not [name for name in headers if name.startswith("uberctx-")]
    assert headers["x-b3-traceid"] == TRACE_ID  # the trace goes on (as traceparent does)
    assert headers["x-b3-spanid"] != PARENT_ID  # from the server span, its child


# -- 5. a broken propagator never breaks the call -----------------------------------------
class Broken(TextMapPropagator):
    """A propagator whose ``inject`` (or ``fields``) raises."""

    def __init__(self, where: str) -> None:
        self.where = where

    def extract(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> OtelContext:
        return context if context is not None else OtelContext()

    def inject(
        self,
        carrier: CarrierT,
        context: OtelContext | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        raise RuntimeError("propagator bug")

    @property
    def fields(self) -> set[str]:
        if self.where == "fields":
            raise RuntimeError("propagator bug")
        return {"x-broken"}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("where", ["inject", "fields"])
def test_a_propagator_that_raises_never_breaks_the_call_and_w3c_goes_out(
    client: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    propagate.set_global_textmap(Broken(where))
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    with caplog.at_level(logging.DEBUG, logger="ctxrelay"):
        with two_servers() as (internal, _), ctxrelay.use(Context(FIELDS)):
            assert get(client, internal.url("/relayed")) == 200
            assert get(client, internal.url("/again")) == 200
            with tracer.start_as_current_span("call") as span:
                assert get(client, internal.url("/span")) == 200
    for path in ("/relayed", "/again"):
        headers = internal.last(path).headers
        assert trace_part(headers) == {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
        assert (headers["x-request-id"], baggage_of(headers)) == ("req-1", {"tenant": "acme"})
    spanned = internal.last("/span").headers["traceparent"]
    assert spanned.split("-")[1] == f"{span.get_span_context().trace_id:032x}"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # once, not once per call
    assert "propagator" in errors[0].getMessage()


# -- 6. gRPC metadata and in-house carriers -------------------------------------------------
def test_grpc_metadata_carries_the_propagators_trace() -> None:
    import grpc

    use_propagator("b3multi")
    with sync_server() as served:
        channel = grpc.intercept_channel(
            grpc.insecure_channel(served.target), ClientInterceptor(served.target)
        )
        with channel, ctxrelay.use(Context(FIELDS)):
            who = load(unary_unary(channel, "Who")(b"", timeout=TIMEOUT))
    metadata = dict(who["metadata"])
    assert trace_part(metadata) == RELAYED["b3multi"]
    assert metadata["x-request-id"] == "req-1"


def test_an_in_house_carrier_keeps_w3c_for_ctxrelay_to_read_back() -> None:
    use_propagator("b3multi")
    message: dict[str, str] = {}
    with ctxrelay.use(Context(FIELDS)):
        ctxrelay.inject(message)  # a task-queue message: the worker's extract reads W3C
    assert trace_part(message) == {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    worker = ctxrelay.extract(message, in_house=True)
    with two_servers() as (internal, _), ctxrelay.use(worker):
        get("requests", internal.url("/from-the-worker"))
    assert trace_part(internal.last("/from-the-worker").headers) == RELAYED["b3multi"]


# -- 7. OTEL_PROPAGATORS, and no OpenTelemetry at all ----------------------------------------
SCRIPT = """
import json, sys
if sys.argv[1] == "otel":
    import opentelemetry.trace
import ctxrelay
fields = {"request_id": "req-1", "traceparent": sys.argv[2]}
headers = {}
with ctxrelay.use(ctxrelay.Context(fields)):
    ctxrelay.inject(headers, destination="http://127.0.0.1:9/")
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry.propagat"))
print(json.dumps({"headers": headers, "loaded": loaded, "otel": "opentelemetry" in sys.modules}))
"""


def run_script(propagators: str | None, otel: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OTEL_PROPAGATORS"}
    if propagators is not None:
        env["OTEL_PROPAGATORS"] = propagators
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "otel" if otel else "plain", TRACEPARENT],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["stderr"] = done.stderr
    return result


W3C_ONLY = {"x-request-id": "req-1", "traceparent": TRACEPARENT}


@pytest.mark.parametrize(
    ("propagators", "headers"),
    [
        ("b3multi", {"x-request-id": "req-1", **RELAYED["b3multi"]}),
        ("tracecontext, b3", {**W3C_ONLY, **RELAYED["b3"]}),
        ("xray", {"x-request-id": "req-1", **RELAYED["xray"]}),
        ("jaeger,baggage", {"x-request-id": "req-1", **RELAYED["jaeger"]}),
    ],
)
def test_otel_propagators_is_honoured_when_opentelemetry_is_imported(
    propagators: str, headers: dict[str, str]
) -> None:
    result = run_script(propagators, otel=True)
    assert result["headers"] == headers
    assert "opentelemetry.propagate" in result["loaded"]


@pytest.mark.parametrize("propagators", [None, "tracecontext,baggage", "none"])
def test_w3c_propagators_in_the_environment_import_nothing_more(propagators: str | None) -> None:
    result = run_script(propagators, otel=True)
    assert result["headers"] == W3C_ONLY
    assert result["loaded"] == []


def test_without_opentelemetry_nothing_is_imported_whatever_the_environment_says() -> None:
    result = run_script("b3multi", otel=False)
    assert result["headers"] == W3C_ONLY
    assert result["otel"] is False


def test_an_unknown_name_in_otel_propagators_is_logged_and_w3c_goes_out() -> None:
    result = run_script("b3multi,no-such-format", otel=True)
    assert result["headers"] == W3C_ONLY
    assert "OTEL_PROPAGATORS" in result["stderr"]
