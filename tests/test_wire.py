"""ctxrelay.inject / ctxrelay.extract: the header format, limits and interop."""

from __future__ import annotations

import logging
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import ctxrelay
from ctxrelay import Context, Headers, Policy
from ctxrelay._context import validate_field

from .strategies import field_dicts, field_names, field_values

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
RESERVED = {"request_id", "traceparent", "tracestate"}
BAGGAGE_OCTETS = set(string.ascii_letters + string.digits + "!#$&'()*-./:<=>?@[]^_`{|}~%")

#: Contexts that relay as baggage: valid fields, reserved and sensitive names
#: (``aToken``: withheld by design) left out.
relayable = field_dicts.map(
    lambda d: {k: v for k, v in d.items() if k not in RESERVED and not Policy().is_sensitive(k)}
)

#: Anything a client could send as header lines, as str or bytes.
header_text = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    st.sampled_from(["baggage", "x-request-id", "traceparent", "tracestate", "cookie"]),
)
header_lines = st.lists(st.tuples(header_text, header_text), max_size=12)


def sent(fields: dict[str, str], destination: str | None = None) -> dict[str, str]:
    headers: dict[str, str] = {}
    with ctxrelay.use(Context(fields)):
        ctxrelay.inject(headers, destination=destination)
    return headers


def assert_all_valid(ctx: Context) -> None:
    for name, value in ctx.items():
        validate_field(name, value)


# -- extract ------------------------------------------------------------------
def test_extract_reads_request_id_trace_and_captured_headers() -> None:
    ctxrelay.configure(Policy(capture={"cookie", "X-Gray"}))
    ctx = ctxrelay.extract(
        {
            "X-Request-ID": "r-1",
            "Cookie": "a=1",
            "x-gray": "canary",
            "traceparent": TRACEPARENT,
            "tracestate": "vendor=x",
            "x-other": "not captured",
        }
    )
    assert ctx == {
        "request_id": "r-1",
        "cookie": "a=1",
        "x-gray": "canary",
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=x",
    }


def test_extract_ignores_baggage_from_an_untrusted_or_unknown_peer() -> None:
    ctxrelay.configure(Policy(trusted_peers=("10.0.0.0/8", "mesh.internal:15001")))
    headers = {"baggage": "tenant=acme", "x-request-id": "r-1"}
    assert ctxrelay.extract(headers) == {"request_id": "r-1"}
    assert ctxrelay.extract(headers, peer="") == {"request_id": "r-1"}
    assert ctxrelay.extract(headers, peer="203.0.113.9") == {"request_id": "r-1"}
    assert ctxrelay.extract(headers, peer="mesh.internal:80") == {"request_id": "r-1"}
    assert ctxrelay.extract(headers, peer="10.2.3.4:5555")["tenant"] == "acme"
    assert ctxrelay.extract(headers, peer="mesh.internal:15001")["tenant"] == "acme"


def test_an_edge_service_trusts_no_peer_by_default() -> None:
    assert ctxrelay.extract({"baggage": "tenant=acme"}, peer="127.0.0.1") == {}


def test_in_house_carriers_are_trusted_unless_the_policy_says_not() -> None:
    assert ctxrelay.extract({"baggage": "tenant=acme"}, in_house=True) == {"tenant": "acme"}
    ctxrelay.configure(Policy(trust_in_house=False))
    assert ctxrelay.extract({"baggage": "tenant=acme"}, in_house=True) == {}


def test_extract_takes_header_lines_bytes_and_multi_valued_headers() -> None:
    ctxrelay.configure(Policy(capture={"cookie"}))
    expected = {"cookie": "a=1; b=2", "x": "1", "y": "2"}
    text = [("cookie", "a=1"), ("Cookie", "b=2"), ("baggage", "x=1"), ("baggage", "y=2")]
    raw = [(name.encode(), value.encode()) for name, value in text]  # as ASGI has them
    assert ctxrelay.extract(raw, in_house=True) == expected
    assert ctxrelay.extract(Headers(text), in_house=True) == expected


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "garbage",
    ],
)
def test_extract_drops_an_invalid_traceparent_and_its_tracestate(traceparent: str) -> None:
    assert ctxrelay.extract({"traceparent": traceparent, "tracestate": "a=b"}) == {}


def test_extract_drops_invalid_entries_and_keeps_the_rest() -> None:
    header = "good=1, bad key=2,=3,noequals, ok=%E2%9C%93;prop=1,ctl=%0A,request_id=spoof"
    assert ctxrelay.extract({"baggage": header}, in_house=True) == {"good": "1", "ok": "✓"}


def test_extract_never_lets_baggage_override_header_or_local_fields() -> None:
    ctxrelay.configure(Policy(capture={"x-gray"}, local={"role"}))
    headers = {
        "baggage": "request_id=spoof,x-gray=prod,role=admin,traceparent=x,tenant=acme",
        "x-request-id": "real",
    }
    assert ctxrelay.extract(headers, in_house=True) == {"request_id": "real", "tenant": "acme"}


def test_extract_never_returns_a_request_id_that_could_split_a_header() -> None:
    assert ctxrelay.extract({"x-request-id": "a\r\nx-evil: 1"}) == {}
    assert ctxrelay.extract([("x-request-id", "a"), ("x-request-id", "b")]) == {}


@pytest.mark.parametrize("tail", ["\r\x00evil", "\x1b[31m", "x" * 5000])
def test_extract_never_returns_a_traceparent_that_is_not_a_valid_field(tail: str) -> None:
    # A future version may carry more after the flags; it must still be a
    # valid field (no control character, at most 4096 bytes), as a str line
    # (a queue message) or as raw bytes.
    traceparent = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-" + tail
    assert ctxrelay.extract({"traceparent": traceparent}) == {}
    assert ctxrelay.extract([(b"traceparent", traceparent.encode())]) == {}


@given(header_lines)
def test_extract_over_arbitrary_header_lines_never_raises_and_returns_valid_fields(
    lines: list[tuple[str | bytes, str | bytes]],
) -> None:
    ctx = ctxrelay.extract(lines, in_house=True)
    assert isinstance(ctx, Context)
    assert_all_valid(ctx)


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_extract_over_arbitrary_baggage_never_raises_and_returns_valid_fields(
    header: str,
) -> None:
    ctx = ctxrelay.extract({"baggage": header, "x-request-id": header}, in_house=True)
    assert_all_valid(ctx)


@pytest.mark.parametrize("junk", [None, 42, object(), "text", [None], [(1, 2, 3)], {1: 2}])
def test_extract_over_things_that_are_not_headers_returns_an_empty_context(junk: object) -> None:
    assert ctxrelay.extract(junk) == {}  # type: ignore[arg-type]


def test_oversized_inbound_baggage_is_bounded_by_the_limits() -> None:
    many = ",".join(f"k{i}=v" for i in range(10_000))
    assert len(ctxrelay.extract({"baggage": many}, in_house=True)) == 64
    huge = ",".join(f"k{i}={'x' * 1000}" for i in range(1000))
    ctx = ctxrelay.extract({"baggage": huge}, in_house=True)
    assert sum(len(k) + len(v) + 2 for k, v in ctx.items()) <= 8192
    assert all(v == "x" * 1000 for v in ctx.values())  # whole values, never cut


def test_oversized_header_lists_are_bounded() -> None:
    lines = [("x-junk", "y")] * 100_000 + [("x-request-id", "late")]
    assert ctxrelay.extract(lines) == {}


# -- inject -------------------------------------------------------------------
def test_inject_for_an_in_house_carrier_sends_fields_request_id_and_trace() -> None:
    ctxrelay.configure(Policy(capture={"cookie", "x-gray"}))
    fields = {"request_id": "r", "traceparent": TRACEPARENT, "tenant": "acme"}
    fields |= {"cookie": "s=1", "x-gray": "canary"}
    assert sent(fields) == {
        "x-request-id": "r",
        "traceparent": TRACEPARENT,
        "x-gray": "canary",
        "baggage": "tenant=acme",
    }


def test_a_destination_no_route_names_gets_only_request_id_and_trace() -> None:
    fields = {"request_id": "r", "traceparent": TRACEPARENT, "tenant": "acme"}
    assert sent(fields, "https://api.partner.example/v1") == {
        "x-request-id": "r",
        "traceparent": TRACEPARENT,
    }


def test_routes_match_hosts_wildcards_schemes_and_ports() -> None:
    route = Policy.Route(hosts=("*.internal.example", "10.0.0.0/8"), schemes={"https"}, ports={443})
    ctxrelay.configure(Policy(routes=(route,)))
    fields = {"tenant": "acme"}
    assert "baggage" in sent(fields, "https://orders.internal.example/x")
    assert "baggage" in sent(fields, "https://a.b.internal.example:443/x")
    assert "baggage" in sent(fields, "https://10.1.2.3/x")
    assert "baggage" not in sent(fields, "https://internal.example/x")  # not the apex
    assert "baggage" not in sent(fields, "https://evil-internal.example/x")
    assert "baggage" not in sent(fields, "http://orders.internal.example/x")  # scheme
    assert "baggage" not in sent(fields, "https://orders.internal.example:8443/x")  # port
    assert "baggage" not in sent(fields, "not a url")


def test_sensitive_headers_and_fields_go_only_where_a_route_names_them() -> None:
    open_route = Policy.Route(hosts=("open.example",), headers={"*"})
    named = Policy.Route(hosts=("named.example",), sensitive={"cookie", "session_token"})
    ctxrelay.configure(Policy(capture={"cookie", "x-gray"}, routes=(open_route, named)))
    fields = {"cookie": "s=1", "x-gray": "c", "session_token": "t", "tenant": "a"}
    assert sent(fields, "http://open.example/") == {"x-gray": "c", "baggage": "tenant=a"}
    assert sent(fields, "http://named.example/") == {
        "cookie": "s=1",
        "x-gray": "c",
        "baggage": "session_token=t,tenant=a",
    }


def test_local_fields_never_leave_the_process() -> None:
    everywhere = Policy.Route(sensitive={"cookie"})
    ctxrelay.configure(
        Policy(capture={"cookie"}, routes=(everywhere,), local={"cookie", "request_id", "db"})
    )
    fields = {"cookie": "s=1", "request_id": "r", "db": "primary", "tenant": "a"}
    assert sent(fields, "http://any.example/") == {"baggage": "tenant=a"}
    assert sent(fields) == {"baggage": "tenant=a"}


def test_headers_the_caller_set_win_whatever_their_case() -> None:
    headers = {"X-Request-Id": "mine", "BAGGAGE": "mine=1"}
    with ctxrelay.bind(request_id="r", tenant="a"):
        ctxrelay.inject(headers)
    assert headers == {"X-Request-Id": "mine", "BAGGAGE": "mine=1"}


def test_a_header_value_that_is_not_ascii_is_left_out_of_http_headers_only() -> None:
    # requests raises on it at send time, httpx refuses it, aiohttp re-encodes
    # it as UTF-8: an HTTP header carries it only as ASCII.  Baggage is
    # percent-encoded, and a queue message (destination=None) takes any text.
    route = Policy.Route(hosts=("in.example",))
    ctxrelay.configure(Policy(capture={"x-gray"}, routes=(route,)))
    fields = {"request_id": "req-€", "x-gray": "café", "tenant": "Jörg"}
    assert sent(fields, "http://in.example/") == {"baggage": "tenant=J%C3%B6rg"}
    assert sent(fields, "http://elsewhere.example/") == {}
    assert sent(fields) == {
        "x-request-id": "req-€",
        "x-gray": "café",
        "baggage": "tenant=J%C3%B6rg",
    }


def test_inject_outside_any_context_adds_nothing() -> None:
    headers: dict[str, str] = {}
    ctxrelay.inject(headers, destination="http://x.example/")
    assert headers == {}


def test_inject_never_raises_into_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(dict[str, str]):
        def __setitem__(self, key: str, value: str) -> None:
            raise RuntimeError("boom")

    with ctxrelay.bind(tenant="a"), caplog.at_level(logging.ERROR, "ctxrelay"):
        ctxrelay.inject(Broken())
    assert "inject() failed" in caplog.text


def test_baggage_values_are_percent_encoded_to_baggage_octets() -> None:
    value = 'a b,c;d=e%f+g"h\\i\tj Jörg ✓'
    header = sent({"v": value})["baggage"]
    assert set(header.removeprefix("v=")) <= BAGGAGE_OCTETS
    assert ctxrelay.extract({"baggage": header}, in_house=True) == {"v": value}


def test_past_the_field_limit_whole_fields_are_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fields = {f"f{i:03d}": "v" * (i % 7) for i in range(100)}
    with caplog.at_level(logging.WARNING, "ctxrelay"):
        got = ctxrelay.extract(sent(fields), in_house=True)
    assert len(got) == 64
    assert all(fields[name] == value for name, value in got.items())
    assert "dropped fields" in caplog.text


def test_past_the_byte_limit_the_largest_fields_go_first_and_none_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fields = {"tenant": "acme", "big1": "x" * 4000, "big2": "y" * 4090, "big3": "z" * 4000}
    with caplog.at_level(logging.WARNING, "ctxrelay"):
        headers = sent(fields)
    assert len(headers["baggage"]) <= 8192
    assert ctxrelay.extract(headers, in_house=True) == {
        "tenant": "acme",
        "big1": "x" * 4000,
        "big3": "z" * 4000,
    }
    assert "['big2']" in caplog.text


def test_configured_limits_apply() -> None:
    ctxrelay.configure(Policy(max_baggage_fields=2))
    assert len(ctxrelay.extract(sent({"a": "1", "b": "22", "c": "333"}), in_house=True)) == 2


@given(relayable)
def test_inject_then_extract_round_trips_every_valid_context(fields: dict[str, str]) -> None:
    assert ctxrelay.extract(sent(fields), in_house=True) == fields


@given(st.dictionaries(field_names, field_values, min_size=65, max_size=90))
def test_outgoing_baggage_is_bounded_whatever_the_context(fields: dict[str, str]) -> None:
    headers = sent(fields)
    got = ctxrelay.extract(headers, in_house=True)
    assert len(got) <= 64
    assert len(headers.get("baggage", "")) <= 8192
    assert all(fields[name] == value for name, value in got.items())


# -- OpenTelemetry ------------------------------------------------------------
otel_safe = relayable.map(lambda d: {k: v for k, v in d.items() if v == v.strip()})


@given(otel_safe)
def test_opentelemetry_reads_what_ctxrelay_injects(fields: dict[str, str]) -> None:
    headers = sent({**fields, "traceparent": TRACEPARENT})
    otel = TraceContextTextMapPropagator().extract(headers)
    otel = W3CBaggagePropagator().extract(headers, context=otel)
    assert dict(otel_baggage.get_all(otel)) == fields
    span = otel_trace_span_context(otel)
    assert f"{span.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


@given(otel_safe)
def test_ctxrelay_reads_what_opentelemetry_injects(fields: dict[str, str]) -> None:
    otel = otel_context.Context()
    for name, value in fields.items():
        otel = otel_baggage.set_baggage(name, value, context=otel)
    otel = TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT}, context=otel)
    headers: dict[str, str] = {}
    W3CBaggagePropagator().inject(headers, context=otel)
    TraceContextTextMapPropagator().inject(headers, context=otel)
    assert ctxrelay.extract(headers, in_house=True) == {**fields, "traceparent": TRACEPARENT}


def otel_trace_span_context(otel: otel_context.Context) -> trace.SpanContext:
    return trace.get_current_span(otel).get_span_context()


def test_an_active_opentelemetry_span_owns_the_trace_headers() -> None:
    tracer = TracerProvider().get_tracer("ctxrelay-test")
    fields = {"traceparent": TRACEPARENT, "tracestate": "old=1", "tenant": "a"}
    with ctxrelay.use(Context(fields)), tracer.start_as_current_span("call") as span:
        headers: dict[str, str] = {}
        ctxrelay.inject(headers)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert headers["traceparent"].split("-")[1] == trace_id
    assert headers["traceparent"] != TRACEPARENT
    assert "tracestate" not in headers  # the relayed one would contradict OTel's
    assert sent(fields)["traceparent"] == TRACEPARENT  # no span: relayed verbatim


def test_opentelemetry_baggage_rides_along_and_ctxrelay_fields_win() -> None:
    otel = otel_baggage.set_baggage("tenant", "from-otel")
    otel = otel_baggage.set_baggage("region", "eu", context=otel)
    token = otel_context.attach(otel)
    try:
        headers = sent({"tenant": "acme"})
    finally:
        otel_context.detach(token)
    assert ctxrelay.extract(headers, in_house=True) == {"tenant": "acme", "region": "eu"}
