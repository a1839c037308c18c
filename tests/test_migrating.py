"""The migration page (docs/migrating.md) against the libraries it replaces.

Each section of the page has a "Before" program (the peer library) and an
"After" one (ctxrelay).  Both are taken from the page as written and run,
each in a fresh interpreter, followed by the same probe: the same requests
through a real in-process call (httpx's ``ASGITransport``, Flask's
``test_client``, Django's test ``Client``), the same log lines read back.
Where the page says the two behave the same, the probe's results must be
equal; where it says they differ, the difference is asserted.  A peer that
is not installed skips its "Before" side only: the "After" side always runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ctxrelay

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "migrating.md"
FENCE = re.compile(r"```(python|py)\n(.*?)```", re.DOTALL)

#: An inbound id every peer accepts (a UUID4 in hex).
VALID = "3f2a9c1e0b7d4e6fa8c5d2b1e0f9a7c3"
HEX32 = re.compile(r"[0-9a-f]{32}")


def _sections() -> dict[str, str]:
    text = PAGE.read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def example(section: str, which: str) -> str:
    """The first code block under ``### <which>`` of ``## <section>``."""
    body = _sections()[section]
    after_heading = body.split(f"### {which}\n", 1)[1]
    found = FENCE.search(after_heading)
    assert found is not None, f"{section}: no code block under '### {which}'"
    return found.group(2)


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: only ctxrelay's side of the page is checked")


def run(code: str, probe: str = "") -> tuple[dict[str, Any], list[str]]:
    """Run ``code`` then ``probe`` in a fresh interpreter; the probe's JSON
    (its ``PROBE`` line) and the stdout lines printed after ``PROBE-START``."""
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{probe}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    probed = [json.loads(line[len("PROBE ") :]) for line in out if line.startswith("PROBE ")]
    start = out.index("PROBE-START") + 1 if "PROBE-START" in out else 0
    logged = [line for line in out[start:] if not line.startswith("PROBE")]
    return (probed[-1] if probed else {}), logged


def test_every_section_has_a_before_and_an_after() -> None:
    sections = _sections()
    for peer in (
        "asgi-correlation-id",
        "starlette-context",
        "django-guid",
        "django-log-request-id",
        "flask-log-request-id",
        "structlog's contextvars",
        "loguru",
        "OpenTelemetry",
    ):
        assert peer in sections, peer
        example(peer, "Before")
        assert FENCE.search(sections[peer].split("### After\n", 1)[1]).group(1) == "python"  # type: ignore[union-attr]


# -- asgi-correlation-id ---------------------------------------------------------------

ASGI_ORDERS_PROBE = f"""
import asyncio, json, re, httpx
stream.seek(0)
stream.truncate()
async def _probe():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as c:
        sent = await c.get("/orders/7", headers={{"X-Request-ID": "{VALID}"}})
        fresh = await c.get("/orders/8")
        odd = await c.get("/orders/9", headers={{"X-Request-ID": "req-1"}})
    return sent, fresh, odd
sent, fresh, odd = asyncio.run(_probe())
log.info("outside")
lines = stream.getvalue().splitlines()
new = fresh.headers.get("x-request-id") or ""
print("PROBE " + json.dumps({{
    "echo": sent.headers.get("x-request-id"),
    "body": sent.json(),
    "fresh_shape": bool(re.fullmatch("[0-9a-f]{{32}}", new)),
    "fresh_everywhere": fresh.json()["request_id"] == new and lines[1] == f"INFO [{{new}}] order 8",
    "lines": [lines[0], lines[3]],
    "odd": odd.headers.get("x-request-id"),
}}))
"""


def test_asgi_correlation_id_after_echoes_logs_and_generates_as_before() -> None:
    after, _ = run(example("asgi-correlation-id", "After"), ASGI_ORDERS_PROBE)
    assert after["echo"] == VALID
    assert after["body"] == {"order": "7", "request_id": VALID}
    assert after["fresh_shape"]
    assert after["fresh_everywhere"]
    assert after["lines"] == [f"INFO [{VALID}] order 7", "INFO [-] outside"]
    # The default rule differs (the table says so): ctxrelay keeps "req-1".
    assert after["odd"] == "req-1"

    _needs("asgi_correlation_id")
    before, _ = run(example("asgi-correlation-id", "Before"), ASGI_ORDERS_PROBE)
    odd_before = before.pop("odd")
    assert HEX32.fullmatch(odd_before), "asgi-correlation-id keeps only UUIDs by default"
    del after["odd"]
    assert before == after


def test_asgi_correlation_id_filter_rename_keeps_the_format_string() -> None:
    import io
    import logging

    from ctxrelay.integrations.logging import ContextFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter(fields={"correlation_id": "request_id"}, default="-"))
    handler.setFormatter(logging.Formatter("[%(correlation_id)s] [%(request_id)s] %(message)s"))
    log = logging.getLogger("tests.migrating.rename")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    with ctxrelay.bind(request_id="r-9"):
        log.info("in")
    log.info("out")
    assert stream.getvalue().splitlines() == ["[r-9] [r-9] in", "[-] [-] out"]


# -- starlette-context -----------------------------------------------------------------

STARLETTE_PROBE = f"""
import asyncio, json, re, httpx
async def _probe():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        headers = {{"X-Request-ID": "{VALID}", "User-Agent": "probe/2", "x-user": "bo"}}
        sent = await c.get("/whoami", headers=headers)
        fresh = await c.get("/whoami")
        bad = await c.get("/whoami", headers={{"X-Request-ID": "not-a-uuid"}})
    return sent, fresh, bad
sent, fresh, bad = asyncio.run(_probe())
new = fresh.headers.get("x-request-id") or ""
print("PROBE " + json.dumps({{
    "echo": sent.headers.get("x-request-id"),
    "body": sent.json(),
    "fresh_shape": bool(re.fullmatch("[0-9a-f]{{32}}", new)),
    "fresh_body": fresh.json()["request_id"] == new,
    "fresh_user": fresh.json()["user"],
    "bad": bad.status_code,
    "bad_body": bad.text,
}}))
"""


def test_starlette_context_after_answers_as_before() -> None:
    after, _ = run(example("starlette-context", "After"), STARLETTE_PROBE)
    assert after == {
        "echo": VALID,
        "body": {"request_id": VALID, "user_agent": "probe/2", "user": "bo"},
        "fresh_shape": True,
        "fresh_body": True,
        "fresh_user": "anonymous",
        "bad": 400,
        "bad_body": "invalid request id\n",
    }
    _needs("starlette_context")
    before, _ = run(example("starlette-context", "Before"), STARLETTE_PROBE)
    assert before.pop("bad_body") == ""  # its default_error_response: an empty 400
    del after["bad_body"]
    assert before == after


def test_starlette_context_table_reads() -> None:
    with ctxrelay.bind(user="ada", tenant="acme"):
        assert dict(ctxrelay.current()) == {"user": "ada", "tenant": "acme"}
        assert ctxrelay.request() is None  # context.exists(): no door opened a request
    with pytest.raises(TypeError):
        ctxrelay.bind(user=42).__enter__()  # type: ignore[arg-type]


# -- Django ----------------------------------------------------------------------------

DJANGO_HARNESS = """
_settings = {}
exec(BEFORE, _settings)
import logging
import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path
settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    **{k: v for k, v in _settings.items() if k.isupper()},
)
django.setup()
def order(request, order_id):
    logging.getLogger("shop").info("order %s", order_id)
    return JsonResponse({"order": order_id})
def health(request):
    return JsonResponse({"ok": True})
urlpatterns = [path("orders/<order_id>", order), path("health/", health)]
"""


def _django_before(section: str) -> str:
    return f"BEFORE = {example(section, 'Before')!r}\n{DJANGO_HARNESS}"


GUID_PROBE = f"""
import json, re
from django.test import Client
print("PROBE-START", flush=True)
c = Client()
sent = c.get("/orders/7", headers={{"Correlation-ID": "{VALID}"}})
bad = c.get("/orders/8", headers={{"Correlation-ID": "not-a-guid"}})
none = c.get("/orders/9")
health = c.get("/health/")
print("PROBE " + json.dumps({{
    "echo": sent.get("Correlation-ID"),
    "expose": "correlation-id" in sent.get("Access-Control-Expose-Headers", "").lower(),
    "bad": bad.get("Correlation-ID"),
    "none": none.get("Correlation-ID"),
    "health": health.has_header("Correlation-ID"),
}}))
"""


def _guid_result(probe: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    assert HEX32.fullmatch(probe["bad"])
    assert HEX32.fullmatch(probe["none"])
    shop = [line for line in lines if line.startswith("INFO [")]
    assert shop == [
        f"INFO [{VALID}] order 7",
        f"INFO [{probe['bad']}] order 8",
        f"INFO [{probe['none']}] order 9",
    ]
    return {k: probe[k] for k in ("echo", "expose", "health")}


def test_django_guid_after_echoes_validates_ignores_and_logs_as_before() -> None:
    after = _guid_result(*run(example("django-guid", "After"), GUID_PROBE))
    assert after == {"echo": VALID, "expose": True, "health": False}
    _needs("django_guid")
    before = _guid_result(*run(_django_before("django-guid"), GUID_PROBE))
    assert before == after


LOG_REQUEST_ID_PROBE = """
import json, logging
from django.test import Client
print("PROBE-START", flush=True)
c = Client()
sent = c.get("/orders/7", headers={"X-Request-ID": "req-42"})
none = c.get("/orders/8")
logging.getLogger("shop").info("outside any request")
print("PROBE " + json.dumps({"echo": sent.get("X-Request-ID"), "none": none.get("X-Request-ID")}))
"""


def _request_id_lines(probe: dict[str, Any], lines: list[str]) -> tuple[list[str], list[str]]:
    """(the app's lines, the door's request lines), ids checked."""
    assert probe["echo"] == "req-42"
    assert HEX32.fullmatch(probe["none"])
    app = [line for line in lines if " shop: " in line]
    assert app == [
        "INFO [req-42] shop: order 7",
        f"INFO [{probe['none']}] shop: order 8",
        "INFO [none] shop: outside any request",
    ]
    door = [line for line in lines if " shop: " not in line]
    assert [line.split("]")[0] for line in door] == ["INFO [req-42", f"INFO [{probe['none']}"]
    return [line.replace(probe["none"], "<new>") for line in app], door


def test_django_log_request_id_after_echoes_and_logs_each_request_as_before() -> None:
    app, door = _request_id_lines(
        *run(example("django-log-request-id", "After"), LOG_REQUEST_ID_PROBE)
    )
    assert re.fullmatch(r"INFO \[req-42\] ctxrelay\.django: GET /orders/7 200 [\d.]+ms", door[0])
    _needs("log_request_id")
    app_before, door_before = _request_id_lines(
        *run(_django_before("django-log-request-id"), LOG_REQUEST_ID_PROBE)
    )
    assert app_before == app
    assert door_before[0] == (
        "INFO [req-42] log_request_id.middleware: method=GET path=/orders/7 status=200"
    )


# -- flask-log-request-id --------------------------------------------------------------

AWS = "Root=1-67891233-abcdef012345678912345678;Sampled=1"
FLASK_CASES = [
    {"X-Amzn-Trace-Id": AWS},
    {"X-Correlation-ID": "corr-7"},
    {"X-Request-ID": "req-1", "X-Correlation-ID": "corr-7"},
    {"X-Correlation-ID": "corr-7", "X-Amzn-Trace-Id": AWS},
    {"X-Amzn-Trace-Id": f"Self=1-67891233-12456789abcdef012345678;{AWS}"},
]


def test_flask_log_request_id_after_picks_the_id_the_auto_parser_picked() -> None:
    probe = f"""
import json
ids = [client.get("/orders/1", headers=h).json["request_id"] for h in {FLASK_CASES!r}]
print("PROBE " + json.dumps({{"ids": ids}}))
"""
    after, _ = run(example("flask-log-request-id", "After"), probe)
    assert after["ids"][:3] == ["1-67891233-abcdef012345678912345678", "corr-7", "req-1"]

    _needs("flask_log_request_id")
    parsed = f"""
import json
from flask_log_request_id.parser import auto_parser
ids = []
for h in {FLASK_CASES!r}:
    with app.test_request_context(headers=h):
        ids.append(auto_parser())
print("PROBE " + json.dumps({{"ids": ids}}))
"""
    before, _ = run(example("flask-log-request-id", "Before"), parsed)
    assert before == after


def test_flask_log_request_id_answers_500_on_this_flask_as_the_page_says() -> None:
    _needs("flask_log_request_id")
    probe = """
import json, logging
from flask import Flask
from flask_log_request_id import RequestID, RequestIDLogFilter
logging.disable(logging.CRITICAL)  # Flask's own traceback of the 500
status = app.test_client().get("/orders/1").status_code
other = Flask("other")
other.config["LOG_REQUEST_ID_LOG_ALL_REQUESTS"] = True
RequestID(other)
lines = logging.StreamHandler()
lines.addFilter(RequestIDLogFilter())
logging.getLogger("flask_log_request_id").addHandler(lines)
logging.getLogger("flask_log_request_id").setLevel(logging.INFO)
other.get("/quiet")(lambda: "no log line here")
logging.disable(logging.NOTSET)
logging.getLogger("flask.app").disabled = True
all_requests = other.test_client().get("/quiet").status_code
print("PROBE " + json.dumps({"status": status, "all_requests": all_requests}))
"""
    before, _ = run(example("flask-log-request-id", "Before"), probe)
    assert before == {"status": 500, "all_requests": 500}, (
        "flask-log-request-id works again: update the page's warning"
    )


# -- structlog -------------------------------------------------------------------------

LINES_PROBE = """
import json
print("PROBE " + json.dumps({"lines": stream.getvalue().splitlines()}))
"""


def test_structlog_after_logs_what_before_logged_and_the_pool_line_too() -> None:
    after, _ = run(example("structlog's contextvars", "After"), LINES_PROBE)
    after_lines = [json.loads(line) for line in after["lines"]]
    assert after_lines == [
        {"event": "paid", "request_id": "r-1", "user": "alice"},
        {"event": "receipt mailed", "request_id": "r-1", "user": "alice"},
    ]
    _needs("structlog")
    before, _ = run(example("structlog's contextvars", "Before"), LINES_PROBE)
    before_lines = [json.loads(line) for line in before["lines"]]
    assert before_lines[0] == after_lines[0]
    assert before_lines[1] == {"event": "receipt mailed"}  # lost in the plain pool thread


def test_structlog_table_equivalents() -> None:
    with ctxrelay.bind(request_id="r-1", user="alice"):
        with ctxrelay.use(ctxrelay.current().remove("user")):  # unbind_contextvars("user")
            assert dict(ctxrelay.current()) == {"request_id": "r-1"}  # get_contextvars()
        assert ctxrelay.get("user") == "alice"  # back at the end of the block
        with ctxrelay.detached():  # clear_contextvars() for a block
            assert dict(ctxrelay.current()) == {}

    @ctxrelay.bind(job="nightly")  # bound_contextvars as a decorator
    def job() -> str | None:
        return ctxrelay.get("job")

    assert job() == "nightly"
    assert ctxrelay.get("job") is None


# -- loguru ----------------------------------------------------------------------------


def test_loguru_after_logs_what_before_logged_and_the_pool_line_too() -> None:
    after, _ = run(example("loguru", "After"), LINES_PROBE)
    assert after["lines"] == ["INFO [r-1] paid", "INFO [r-1] receipt mailed", "INFO [-] idle"]
    _needs("loguru")
    before, _ = run(example("loguru", "Before"), LINES_PROBE)
    assert before["lines"] == ["INFO [r-1] paid", "INFO [-] receipt mailed", "INFO [-] idle"]


def test_loguru_per_logger_patch_and_declared_defaults() -> None:
    probe = """
import io, json
from loguru import logger
import ctxrelay
from ctxrelay.integrations.loguru import ContextPatcher, patcher
stream = io.StringIO()
logger.remove()
logger.add(stream, format="[{extra[request_id]}] [{extra[tenant]}] {message}")
log = logger.patch(ContextPatcher(fields=["tenant"], default="-"))
plain = logger.patch(patcher)
log.info("idle")
with ctxrelay.bind(request_id="r-2", tenant="acme"):
    log.info("busy")
    plain.bind(tenant="own").info("bound wins")
print("PROBE " + json.dumps({"lines": stream.getvalue().splitlines()}))
"""
    result, _ = run("", probe)
    assert result["lines"] == ["[-] [-] idle", "[r-2] [acme] busy", "[r-2] [own] bound wins"]


# -- OpenTelemetry ---------------------------------------------------------------------

OTEL_PROBE = """
import json
print("PROBE " + json.dumps({"tenant": tenant, "outgoing": outgoing}))
"""


def test_opentelemetry_after_relays_the_same_headers() -> None:
    after, _ = run(example("OpenTelemetry", "After"), OTEL_PROBE)
    assert after == {
        "tenant": "acme",
        "outgoing": {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "baggage": "tenant=acme",
        },
    }
    _needs("opentelemetry.propagate")
    before, _ = run(example("OpenTelemetry", "Before"), OTEL_PROBE)
    assert before == after


def test_opentelemetry_global_b3_propagator_is_honoured_as_opentelemetry_writes_it() -> None:
    """The table's row: ``set_global_textmap(B3MultiFormat())`` shapes ctxrelay's
    outgoing trace headers as OpenTelemetry's own ``inject`` writes them."""
    _needs("opentelemetry.propagators.b3")
    probe = """
import json
from opentelemetry import trace
from opentelemetry.propagate import inject, set_global_textmap
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
import ctxrelay

set_global_textmap(B3MultiFormat())
trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
theirs = {}
inject(theirs, context=trace.set_span_in_context(NonRecordingSpan(remote)))
traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ours = {}
with ctxrelay.bind(request_id="req-1", traceparent=traceparent):
    ctxrelay.inject(ours, destination="http://cart.internal.example/")
print("PROBE " + json.dumps({"theirs": theirs, "ours": ours}))
"""
    result, _ = run("", probe)
    theirs = {name.lower(): value for name, value in result["theirs"].items()}
    ours = result["ours"]
    assert ours.pop("x-request-id") == "req-1"
    assert "traceparent" not in ours
    assert (
        ours
        == theirs
        == {
            "x-b3-traceid": "0af7651916cd43dd8448eb211c80319c",
            "x-b3-spanid": "b7ad6b7169203331",
            "x-b3-sampled": "1",
        }
    )


OTEL_LOG_PROBE = """
import io, json, logging
from opentelemetry.sdk.trace import TracerProvider
capture = io.StringIO()
line = logging.StreamHandler(capture)
line.setFormatter(logging.Formatter("%(otelTraceID)s %(otelSpanID)s %(message)s"))
for h in logging.getLogger("shop").handlers + logging.getLogger().handlers:
    for f in h.filters:
        line.addFilter(f)
logging.getLogger("shop").addHandler(line)
with TracerProvider().get_tracer("probe").start_as_current_span("probe") as probe_span:
    logging.getLogger("shop").info("probed")
logging.getLogger("shop").info("outside")
ids = probe_span.get_span_context()
print("PROBE " + json.dumps({
    "lines": capture.getvalue().splitlines(),
    "expected": f"{ids.trace_id:032x} {ids.span_id:016x} probed",
}))
"""


def test_opentelemetry_log_ids_after_match_the_logging_instrumentation() -> None:
    after, _ = run(example("OpenTelemetry", "Log lines: after"), OTEL_LOG_PROBE)
    assert after["lines"] == [after["expected"], "0 0 outside"]
    _needs("opentelemetry.instrumentation.logging")
    before, _ = run(example("OpenTelemetry", "Log lines: before"), OTEL_LOG_PROBE)
    assert before["lines"] == [before["expected"], "0 0 outside"]


def test_asgi_correlation_id_uuid_length_and_id_length_cut_alike() -> None:
    probe = """
import io, json, logging
from ctxrelay.integrations.logging import ContextFilter
import ctxrelay
stream = io.StringIO()
handler = logging.StreamHandler(stream)
handler.addFilter(ContextFilter(fields={"correlation_id": "request_id"}, id_length=8))
handler.setFormatter(logging.Formatter("[%(correlation_id)s] %(message)s"))
log = logging.getLogger("ours")
log.addHandler(handler)
log.setLevel(logging.INFO)
with ctxrelay.bind(request_id="3f2a9c1e0b7d4e6fa8c5d2b1e0f9a7c3"):
    log.info("paid")
theirs = ""
try:
    from asgi_correlation_id import CorrelationIdFilter, correlation_id
except ImportError:
    pass
else:
    other = io.StringIO()
    h = logging.StreamHandler(other)
    h.addFilter(CorrelationIdFilter(uuid_length=8))
    h.setFormatter(logging.Formatter("[%(correlation_id)s] %(message)s"))
    their_log = logging.getLogger("theirs")
    their_log.addHandler(h)
    their_log.setLevel(logging.INFO)
    token = correlation_id.set("3f2a9c1e0b7d4e6fa8c5d2b1e0f9a7c3")
    their_log.info("paid")
    correlation_id.reset(token)
    theirs = other.getvalue()
print("PROBE " + json.dumps({"ours": stream.getvalue(), "theirs": theirs}))
"""
    result, _ = run("", probe)
    assert result["ours"] == "[3f2a9c1e] paid\n"
    if result["theirs"]:
        assert result["theirs"] == result["ours"]
