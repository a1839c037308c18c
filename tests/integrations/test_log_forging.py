"""Log forging (issue 10, item 6): no request can write a line of its own.

A request to ``/orders/1%0aINFO [req-admin] audit: ...`` reaches the app
with a newline in its path (servers percent-decode it).  Written raw by a
log integration, it forges a whole line under another request id.  So can a
captured header holding a C1 control (NEL is the latin-1 byte 0x85, which
h11 lets through), a trusted peer's baggage member holding U+2028, and an
ESC or CSI sequence that rewrites a terminal.

Each test sends such requests to a real server -- uvicorn for ASGI, waitress
for WSGI -- and reads what the real logging library wrote: stdlib ``logging``
through ``ContextFilter``, structlog through ``MergeContext`` and two of its
own renderers, loguru through ``ContextPatcher``, and the middlewares' own
"unhandled exception in GET <path>" lines.  Every record must be exactly one
line -- counted with ``str.splitlines()``, which also breaks at NEL, U+2028,
U+2029, VT, FF and FS -- no line may start with the forged text, no ESC or
CSI may reach the output, and what was escaped must come back unchanged.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay import _policy
from ctxrelay._escape import log_text
from ctxrelay.integrations import wsgi
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.logging import ContextFilter
from ctxrelay.integrations.loguru import ContextPatcher
from ctxrelay.integrations.structlog import MergeContext
from tests.servers import WAIT, new_id, serve_asgi, serve_wsgi

#: The line an attacker wants in the log: another request's id, an audit event.
FORGED = "INFO [req-admin] audit: granted admin to mallory"

#: Percent-encoded line breaks a path may carry to forge a line.
BREAKS = {
    "LF": "%0a",
    "CR LF": "%0d%0a",
    "CR": "%0d",
    "VT": "%0b",
    "FF": "%0c",
    "FS": "%1c",
    "NEL": "%c2%85",
    "LS U+2028": "%e2%80%a8",
    "PS U+2029": "%e2%80%a9",
    "ESC erase line": "%1b[2K%0d",
    "CSI": "%c2%9b2J",
    "RLO bidi override": "%e2%80%ae",
}
#: Every path sent: each break followed by the forged line, and terminal
#: controls alone (no space: structlog's console renderer quotes values
#: with a space, not these).
PATHS = {
    **{label: "/orders/1" + separator + quote(FORGED) for label, separator in BREAKS.items()},
    "ESC clear screen": "/orders/1%1b[2J%1b[3J%1b[H",
    "CSI clear screen": "/orders/1%c2%9b2J",
    "RLO alone": "/orders/1%e2%80%aetxt.exe",
}
#: A captured header value and a trusted peer's baggage member, each forging.
HEADERS = (
    (b"x-tenant", b"acme\x85" + FORGED.encode() + b"\x9b2J"),
    (b"baggage", b"user=alice%E2%80%A8" + quote(FORGED).encode()),
)

STDLIB_FORMAT = (
    "%(levelname)s [%(request_id)s] %(request_method)s %(request_path)s "
    "tenant=%(x_tenant)s user=%(user)s: %(message)s"
)
LOGURU_FORMAT = (
    "{level} [{extra[request_id]}] {extra[request_path]} "
    "tenant={extra[x-tenant]} user={extra[user]}: {message}"
)


def assert_one_line_per_record(output: str, records: int) -> None:
    lines = output.splitlines()
    assert len(lines) == records, lines
    for line in lines:
        assert not line.lstrip("\"' ").startswith("INFO [req-admin]"), line
    for control in ("\x1b", "\x9b", "\u202e"):  # ESC, CSI, right-to-left override
        assert control not in output, output


@dataclass
class Sinks:
    """What each logging library wrote, one buffer each, plus the records."""

    stdlib: io.StringIO = field(default_factory=io.StringIO)
    logfmt: io.StringIO = field(default_factory=io.StringIO)
    console: io.StringIO = field(default_factory=io.StringIO)
    loguru: io.StringIO = field(default_factory=io.StringIO)
    errors: io.StringIO = field(default_factory=io.StringIO)
    records: list[logging.LogRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            for buffer in (self.stdlib, self.logfmt, self.console, self.loguru, self.errors):
                buffer.seek(0)
                buffer.truncate()
            self.records.clear()


class Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def configured() -> Iterator[Sinks]:
    """stdlib, structlog and loguru each writing lines into a buffer, the way
    an application configures them; the middlewares' error loggers too."""
    found = Sinks()
    app_logger = logging.getLogger("tests.forging.app")
    handler = logging.StreamHandler(found.stdlib)
    handler.setFormatter(logging.Formatter(STDLIB_FORMAT))
    handler.addFilter(
        ContextFilter(fields={"x_tenant": "x-tenant", "user": "user"}, request=["method", "path"])
    )
    keep = Keep(found.records)
    errors = logging.StreamHandler(found.errors)
    errors.setFormatter(logging.Formatter("%(levelname)s [%(request_id)s] %(message)s"))
    errors.addFilter(ContextFilter())
    error_loggers = [logging.getLogger("ctxrelay.asgi"), logging.getLogger("ctxrelay.wsgi")]
    app_logger.addHandler(handler)
    app_logger.addHandler(keep)
    app_logger.setLevel(logging.INFO)
    app_logger.propagate = False
    for error_logger in error_loggers:
        error_logger.addHandler(errors)
        error_logger.addHandler(keep)
    sink_id = loguru_logger.add(found.loguru, format=LOGURU_FORMAT)
    try:
        yield found
    finally:
        loguru_logger.remove(sink_id)
        app_logger.removeHandler(handler)
        app_logger.removeHandler(keep)
        for error_logger in error_loggers:
            error_logger.removeHandler(errors)
            error_logger.removeHandler(keep)


@pytest.fixture
def sinks(configured: Sinks) -> Sinks:
    """The buffers, empty; the policy: capture ``x-tenant``, trust 127.0.0.1's baggage."""
    _policy.configure(_policy.Policy(capture={"x-tenant"}, trusted_peers=("127.0.0.1",)))
    configured.clear()
    return configured


def log_everywhere(found: Sinks) -> None:
    """What a handler does: one record through each library."""
    logging.getLogger("tests.forging.app").info("order viewed")
    for renderer, buffer in (
        (structlog.processors.LogfmtRenderer(), found.logfmt),
        (structlog.dev.ConsoleRenderer(colors=False), found.console),
    ):
        structlog.wrap_logger(
            structlog.PrintLogger(buffer),
            processors=[MergeContext(request=["method", "path"]), renderer],
        ).info("order viewed")
    loguru_logger.patch(
        ContextPatcher(fields=["x-tenant", "user"], request=["method", "path"])
    ).info("order viewed")


def asgi_app(found: Sinks) -> Any:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/boom"):
            raise RuntimeError("boom")
        log_everywhere(found)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return RelayMiddleware(app)


def wsgi_app(found: Sinks) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"].startswith("/boom"):
            raise RuntimeError("boom")
        log_everywhere(found)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return wsgi.RelayMiddleware(app)


@pytest.fixture(scope="module")
def uvicorn_url(configured: Sinks) -> Iterator[str]:
    with serve_asgi(asgi_app(configured)) as url:
        yield url


@pytest.fixture(scope="module")
def waitress_url(configured: Sinks) -> Iterator[str]:
    with serve_wsgi(wsgi_app(configured), threads=2) as url:
        yield url


def get(url: str, path: str, rid: str, headers: tuple[tuple[bytes, bytes], ...] = HEADERS) -> int:
    """GET ``path`` exactly as written (percent-escapes and all), with
    ``headers`` sent byte for byte."""
    with httpx.Client(timeout=WAIT) as client:
        request = client.build_request(
            "GET", url, headers=[(b"x-request-id", rid.encode()), *headers]
        )
        request.url = request.url.copy_with(raw_path=path.encode("ascii"))
        return client.send(request).status_code


OUTPUTS: dict[str, Callable[[Sinks], io.StringIO]] = {
    "stdlib": lambda found: found.stdlib,
    "structlog logfmt": lambda found: found.logfmt,
    "structlog console": lambda found: found.console,
    "loguru": lambda found: found.loguru,
}


@pytest.mark.parametrize("server", ["uvicorn", "waitress"])
@pytest.mark.parametrize("library", list(OUTPUTS))
def test_a_forging_path_header_and_baggage_write_one_line_per_record(
    request: pytest.FixtureRequest, sinks: Sinks, server: str, library: str
) -> None:
    url: str = request.getfixturevalue(f"{server}_url")
    for label, path in PATHS.items():
        sinks.clear()
        rid = new_id()
        assert get(url, path, rid) == 200, label
        text = OUTPUTS[library](sinks).getvalue()
        assert rid in text, label
        assert_one_line_per_record(text, 1)


@pytest.mark.parametrize("server", ["uvicorn", "waitress"])
def test_the_escaped_values_decode_back_to_what_the_request_held(
    request: pytest.FixtureRequest, sinks: Sinks, server: str
) -> None:
    url: str = request.getfixturevalue(f"{server}_url")
    for label, path in PATHS.items():
        sinks.clear()
        assert get(url, path, new_id()) == 200, label
        (record,) = sinks.records
        decoded = {
            name: unescape(value)
            for name, value in record.ctxrelay.items()  # type: ignore[attr-defined]
        }
        assert decoded["x-tenant"] == "acme\x85" + FORGED + "\x9b2J"
        assert decoded["user"] == "alice\u2028" + FORGED
        assert decoded["request_path"] == unquote(path), label


def test_the_escape_is_visible_in_a_stdlib_line(sinks: Sinks, uvicorn_url: str) -> None:
    rid = new_id()
    get(uvicorn_url, PATHS["LF"], rid)
    (line,) = sinks.stdlib.getvalue().splitlines()
    assert line == (
        f"INFO [{rid}] GET /orders/1\\n{FORGED} "
        f"tenant=acme\\x85{FORGED}\\x9b2J user=alice\\u2028{FORGED}: order viewed"
    )


@pytest.mark.parametrize(("server", "logger"), [("uvicorn", "asgi"), ("waitress", "wsgi")])
def test_the_middlewares_error_line_escapes_the_path(
    request: pytest.FixtureRequest, sinks: Sinks, server: str, logger: str
) -> None:
    url: str = request.getfixturevalue(f"{server}_url")
    for label, path in PATHS.items():
        sinks.clear()
        rid = new_id()
        assert get(url, "/boom" + path, rid, headers=()) == 500
        (record,) = [r for r in sinks.records if r.name == f"ctxrelay.{logger}"]
        message = record.getMessage()
        assert message.startswith("unhandled exception in GET /boom/orders/1"), label
        assert_one_line_per_record(message, 1)
        # The formatted record: its first line is the message, the rest the
        # traceback; no line of it is the forged one.
        lines = sinks.errors.getvalue().splitlines()
        assert lines[0] == f"ERROR [{rid}] {message}", label
        assert not any(line.startswith("INFO [req-admin]") for line in lines), label


def test_fields_the_app_binds_are_escaped_in_every_library(sinks: Sinks) -> None:
    with ctxrelay.bind(request_id="r-1", **{"x-tenant": "a\u2029" + FORGED, "user": "b\x85"}):
        log_everywhere(sinks)
    for output in OUTPUTS.values():
        assert_one_line_per_record(output(sinks).getvalue(), 1)


# -- the rule itself ----------------------------------------------------------
def unescape(shown: str) -> str:
    """The reverse of the escape, as docs/logging.md gives it."""
    return shown.encode("latin-1", "backslashreplace").decode("unicode_escape")


def dangerous(char: str) -> bool:
    code = ord(char)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or 0x2028 <= code <= 0x202E
        or 0x2066 <= code <= 0x2069
        or 0xD800 <= code <= 0xDFFF
    )


@given(st.text(st.characters(codec=None, exclude_categories=())))
def test_the_escape_leaves_no_line_break_or_control_and_is_reversible(text: str) -> None:
    shown = log_text(text)
    assert len(shown.splitlines()) <= 1
    assert not any(map(dangerous, shown))
    assert unescape(shown) == text


def test_the_common_value_is_returned_as_it_is() -> None:
    for value in ["req-1", "/orders/42", "café", "Root=1-abc", "a b \"c\" 'd'"]:
        assert log_text(value) is value
    assert log_text(10**10) == "<int>"
    assert log_text(b"/x\n") == "<bytes>"
    assert log_text("C:\\temp") == "C:\\\\temp"  # the backslash too: reversible
