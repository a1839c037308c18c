"""Trace and span ids on every log line, under OpenTelemetry's names.

``ContextFilter(trace_ids=True)`` (and the same option of the structlog
processor and the loguru patcher) sets ``otelTraceID``, ``otelSpanID``,
``otelTraceSampled`` and ``otelServiceName`` as OpenTelemetry's logging
instrumentation does: from the active span when there is a valid one, else
from the ``traceparent`` ctxrelay relayed, else OpenTelemetry's own no-span
values (``"0"``, ``"0"``, ``False``, ``""``).  The spans come from the real
SDK; OpenTelemetry's own ``LoggingInstrumentor`` is the real one.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from loguru import logger as loguru_logger
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import ctxrelay
from ctxrelay.integrations.logging import ContextFilter, install
from ctxrelay.integrations.loguru import ContextPatcher
from ctxrelay.integrations.structlog import MergeContext

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE}-{SPAN}-01"
FMT = "%(otelTraceID)s %(otelSpanID)s %(otelTraceSampled)s [%(otelServiceName)s] %(message)s"
_counter = itertools.count()
tracer = TracerProvider().get_tracer("tests.ctxrelay.log_ids")


def _logger(context_filter: ContextFilter, fmt: str = FMT) -> tuple[logging.Logger, io.StringIO]:
    logger = logging.getLogger(f"tests.ctxrelay.otel_ids.{next(_counter)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    install(handler, context_filter=context_filter)
    return logger, stream


def _ids(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def test_the_relayed_traceparent_gives_the_ids_when_no_span_is_active() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        log.info("paid")
    with ctxrelay.bind(request_id="r-2", traceparent=f"00-{TRACE}-{SPAN}-00"):
        log.info("unsampled")
    assert stream.getvalue().splitlines() == [
        f"{TRACE} {SPAN} True [] paid",
        f"{TRACE} {SPAN} False [] unsampled",
    ]


def test_without_a_span_or_a_traceparent_the_values_are_opentelemetrys_own() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    log.info("startup")
    with ctxrelay.bind(request_id="r-1"):
        log.info("paid")
    assert stream.getvalue().splitlines() == ["0 0 False [] startup", "0 0 False [] paid"]


def test_the_active_span_wins_over_the_relayed_traceparent() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        with tracer.start_as_current_span("handler") as span:
            log.info("in the span")
        log.info("after it")
    trace_id, span_id = _ids(span)
    assert stream.getvalue().splitlines() == [
        f"{trace_id} {span_id} True [] in the span",
        f"{TRACE} {SPAN} True [] after it",
    ]


def test_each_span_of_one_context_shows_its_own_span_id() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True), "%(otelSpanID)s")
    spans = []
    with ctxrelay.bind(request_id="r-1"):
        for _ in range(3):
            with tracer.start_as_current_span("step") as span:
                log.info("x")
                log.info("x")
            spans.append(_ids(span)[1])
    assert stream.getvalue().splitlines() == [s for s in spans for _ in range(2)]


def test_trace_ids_are_off_unless_asked_for() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger(f"tests.ctxrelay.otel_ids.{next(_counter)}")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    install(handler)
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        logger.warning("x")
    assert not hasattr(seen[0], "otelTraceID")


@pytest.mark.parametrize("build", [ContextFilter, MergeContext, ContextPatcher])
@pytest.mark.parametrize("value", ["false", 1, None])
def test_trace_ids_takes_only_true_or_false(build: Any, value: object) -> None:
    with pytest.raises(TypeError, match="trace_ids"):
        build(trace_ids=value)


CRAFTED = [
    pytest.param(f"00-{TRACE.upper()}-{SPAN}-01", id="upper-case-hex"),
    pytest.param(f"00-{TRACE[:-1]}-{SPAN}-01", id="short-trace-id"),
    pytest.param(f"00-{TRACE}0-{SPAN}-01", id="long-trace-id"),
    pytest.param(f"00-{TRACE}-{SPAN[:-1]}-01", id="short-span-id"),
    pytest.param(f"00-{'0' * 32}-{SPAN}-01", id="all-zero-trace-id"),
    pytest.param(f"00-{TRACE}-{'0' * 16}-01", id="all-zero-span-id"),
    pytest.param(f"ff-{TRACE}-{SPAN}-01", id="version-ff"),
    pytest.param(f"00-{TRACE}-{SPAN}-01-more", id="version-00-with-more"),
    pytest.param(f"00-{TRACE[:-2]}zz-{SPAN}-01", id="not-hex"),
    pytest.param(f"00-{TRACE}-{SPAN}-0x", id="flags-not-hex"),
    pytest.param(f"00-{TRACE}-{SPAN}-01\x85INFO forged", id="nel-after"),
    pytest.param(f"00-{TRACE[:16]}\u2028{TRACE[17:]}-{SPAN}-01", id="u2028-inside"),
    pytest.param(f" 00-{TRACE}-{SPAN}-01", id="leading-space"),
]


@pytest.mark.parametrize("crafted", CRAFTED)
def test_a_crafted_traceparent_never_reaches_the_line(crafted: str) -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    try:
        bound = ctxrelay.bind(request_id="r-1", traceparent=crafted)
    except ValueError:
        pytest.skip("ctxrelay refuses this value as a field already")
    with bound:
        log.info("paid")
    assert stream.getvalue().splitlines() == ["0 0 False [] paid"]


def test_a_later_version_with_more_after_the_flags_gives_its_ids() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    with ctxrelay.bind(traceparent=f"01-{TRACE}-{SPAN}-03-what-comes-next"):
        log.info("paid")
    assert stream.getvalue() == f"{TRACE} {SPAN} True [] paid\n"


@pytest.fixture
def instrumented() -> Iterator[None]:
    instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.logging",
        reason="opentelemetry-instrumentation-logging is not installed",
    )
    instrumentor = instrumentation.LoggingInstrumentor()
    instrumentor.instrument(inject_trace_context=True, enable_log_auto_instrumentation=False)
    try:
        yield
    finally:
        instrumentor.uninstrument()


@pytest.mark.usefixtures("instrumented")
def test_what_opentelemetrys_own_instrumentation_set_is_kept() -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        # OpenTelemetry's record factory saw no span and wrote its "0"s.
        log.info("no span")
        with tracer.start_as_current_span("handler") as span:
            log.info("in the span")
    trace_id, span_id = _ids(span)
    assert stream.getvalue().splitlines() == [
        "0 0 False [] no span",
        f"{trace_id} {span_id} True [] in the span",
    ]


class _BrokenSpan(trace.NonRecordingSpan):
    """An application's own span class whose context cannot be read."""

    def get_span_context(self) -> trace.SpanContext:
        raise RuntimeError("broken span")


def test_a_span_that_raises_never_breaks_the_log_call(caplog: pytest.LogCaptureFixture) -> None:
    log, stream = _logger(ContextFilter(trace_ids=True))
    broken = _BrokenSpan(trace.INVALID_SPAN_CONTEXT)
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT), trace.use_span(broken):
        log.info("first")
        log.info("second")
    assert stream.getvalue().splitlines() == [
        f"{TRACE} {SPAN} True [] first",
        f"{TRACE} {SPAN} True [] second",
    ]
    reports = [r for r in caplog.records if "trace ids" in r.getMessage()]
    assert len(reports) == 1


def test_a_span_left_over_from_another_request_does_not_speak_for_the_relayed_one() -> None:
    # A thread that served request A still holds A's span when it takes up
    # message B with use(): B's lines carry B's trace, not A's.
    log, stream = _logger(ContextFilter(trace_ids=True))
    message = ctxrelay.Context({"request_id": "b", "traceparent": PARENT})
    with tracer.start_as_current_span("request A"), ctxrelay.use(message):
        log.info("message B")
    assert stream.getvalue() == f"{TRACE} {SPAN} True [] message B\n"


def test_structlog_events_carry_the_ids_and_keep_their_own() -> None:
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[MergeContext(trace_ids=True), structlog.processors.JSONRenderer()],
    )
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        relayed = json.loads(log.info("paid"))
        with tracer.start_as_current_span("handler") as span:
            active = json.loads(log.info("in span"))
        own = json.loads(log.info("explicit", otelSpanID="mine"))
    plain = json.loads(log.info("outside"))
    trace_id, span_id = _ids(span)
    assert (relayed["otelTraceID"], relayed["otelSpanID"]) == (TRACE, SPAN)
    assert (relayed["otelTraceSampled"], relayed["otelServiceName"]) == (True, "")
    assert (active["otelTraceID"], active["otelSpanID"]) == (trace_id, span_id)
    assert own["otelSpanID"] == "mine"
    assert (plain["otelTraceID"], plain["otelSpanID"], plain["otelTraceSampled"]) == (
        "0",
        "0",
        False,
    )


def test_structlog_nests_the_ids_under_key_with_the_fields() -> None:
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[MergeContext(trace_ids=True, key="ctx"), structlog.processors.JSONRenderer()],
    )
    with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
        event = json.loads(log.info("paid"))
    assert event["ctx"]["otelTraceID"] == TRACE
    assert event["ctx"]["request_id"] == "r-1"


def test_loguru_extra_carries_the_ids_in_and_outside_a_request() -> None:
    sink = io.StringIO()
    handler = loguru_logger.add(
        sink, format="{extra[otelTraceID]} {extra[otelSpanID]} {message}", colorize=False
    )
    try:
        log: Any = loguru_logger.patch(ContextPatcher(trace_ids=True))
        with ctxrelay.bind(request_id="r-1", traceparent=PARENT):
            log.info("paid")
            with tracer.start_as_current_span("handler") as span:
                log.info("in span")
        log.info("startup")
    finally:
        loguru_logger.remove(handler)
    trace_id, span_id = _ids(span)
    assert sink.getvalue().splitlines() == [
        f"{TRACE} {SPAN} paid",
        f"{trace_id} {span_id} in span",
        "0 0 startup",
    ]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_opentelemetry_imported_the_ids_come_from_the_traceparent_alone() -> None:
    out = _run(
        f"""
        import logging, sys
        import ctxrelay
        from ctxrelay.integrations.logging import ContextFilter, setup

        setup("%(otelTraceID)s %(otelSpanID)s %(message)s", stream=sys.stdout, level="INFO",
              context_filter=ContextFilter(trace_ids=True))
        with ctxrelay.bind(traceparent="{PARENT}"):
            logging.getLogger("shop").info("paid")
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert out.splitlines() == [f"{TRACE} {SPAN} paid", "[]"]


def test_the_service_name_is_the_tracer_providers_once_one_is_set() -> None:
    # Read again when a new span is seen, until a provider is set: logging
    # usually starts before OpenTelemetry is configured.
    out = _run(
        """
        import logging, sys
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from ctxrelay.integrations.logging import ContextFilter, setup

        setup("[%(otelServiceName)s] %(message)s", stream=sys.stdout, level="INFO",
              context_filter=ContextFilter(trace_ids=True))
        log = logging.getLogger("shop")
        log.info("before")
        resource = Resource.create({"service.name": "shop\\nINFO forged"})
        trace.set_tracer_provider(TracerProvider(resource=resource))
        with trace.get_tracer("shop").start_as_current_span("confirm"):
            log.info("in a span")
        log.info("after")
        """
    )
    assert out.splitlines() == [
        "[] before",
        "[shop\\nINFO forged] in a span",
        "[shop\\nINFO forged] after",
    ]
