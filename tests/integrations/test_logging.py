"""ctxrelay.integrations.logging: the request's fields on every stdlib record.

Every test logs through real handlers and formatters and asserts on the
formatted output a user would read.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import logging.handlers
import multiprocessing
import pickle
import queue
import threading
from dataclasses import dataclass

import pytest
import structlog
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay.integrations.logging import (
    DEFAULT,
    ContextFilter,
    FrozenFields,
    install,
    setup,
    uninstall,
)
from ctxrelay.integrations.loguru import ContextPatcher
from ctxrelay.integrations.structlog import MergeContext

from ..conftest import Relay

REQUESTS = 8
RECORDS = 200


@dataclass
class Captured:
    """A logger whose records go through one handler into a string."""

    logger: logging.Logger
    handler: logging.StreamHandler[io.StringIO]

    def lines(self) -> list[str]:
        return self.handler.stream.getvalue().splitlines()


_counter = itertools.count()


def capture(fmt: str, context_filter: ContextFilter | None = None) -> Captured:
    """A fresh, non-propagating logger writing ``fmt`` lines to a string."""
    logger = logging.getLogger(f"tests.ctxrelay.logging.{next(_counter)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    install(handler, context_filter=context_filter)
    return Captured(logger, handler)


class JsonFormatter(logging.Formatter):
    """The few lines a user writes for JSON logs: the message plus the fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, str] = getattr(record, "ctxrelay", {})
        return json.dumps({"message": record.getMessage(), **fields})


_PLAIN = frozenset(logging.makeLogRecord({}).__dict__) | {"message"}


class EveryAttributeFormatter(logging.Formatter):
    """JSON of every attribute a plain record lacks, as python-json-logger emits."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _PLAIN}
        return json.dumps({"message": record.getMessage(), **extra}, default=str)


def snapshot(**overrides: str) -> ctxrelay.RequestSnapshot:
    return ctxrelay.RequestSnapshot(
        method=overrides.get("method", "POST"),
        path=overrides.get("path", "/orders"),
        client="10.0.0.7:5123",
        headers=[("cookie", "session=COOKIE-SECRET"), ("authorization", "Bearer AUTH-SECRET")],
    )


# -- what a record carries ----------------------------------------------------
def test_format_string_gets_request_id_and_declared_fields_inside_a_request() -> None:
    out = capture("%(request_id)s %(tenant)s %(message)s", ContextFilter(fields=["tenant"]))
    with ctxrelay.bind(request_id="r-1", tenant="acme"):
        out.logger.info("paid")
    assert out.lines() == ["r-1 acme paid"]


def test_records_outside_any_request_get_the_documented_defaults() -> None:
    fmt = "%(request_id)s %(tenant)s %(request_method)s %(ctxrelay)s %(message)s"
    out = capture(fmt, ContextFilter(fields=["tenant"], request=["method"]))
    out.logger.info("startup")
    assert DEFAULT == "-"
    assert out.lines() == ["- - - {} startup"]


def test_a_request_lacking_a_declared_field_gets_the_default_for_it_alone() -> None:
    out = capture("%(request_id)s %(tenant)s %(message)s", ContextFilter(fields=["tenant"]))
    with ctxrelay.bind(request_id="r-2"):
        out.logger.info("anonymous")
    assert out.lines() == ["r-2 - anonymous"]


def test_field_names_with_dash_or_dot_are_reachable_as_identifiers_and_in_the_dict() -> None:
    context_filter = ContextFilter(fields={"gray": "x-gray", "trace_id": "trace.id"})
    out = capture("%(gray)s %(trace_id)s {%(ctxrelay)s}", context_filter)
    dotted = capture("%(trace_id)s", ContextFilter(fields=["trace.id", "x-gray"]))
    with ctxrelay.bind({"x-gray": "canary", "trace.id": "t-9"}):
        out.logger.info("x")
        dotted.logger.info("x")
    assert out.lines() == ["canary t-9 {{'x-gray': 'canary', 'trace.id': 't-9'}}"]
    assert dotted.lines() == ["t-9"]


def test_json_output_carries_every_field_and_the_request_attributes() -> None:
    out = capture("", ContextFilter(request=["method", "path", "client"]))
    out.handler.setFormatter(JsonFormatter())
    ctx = ctxrelay.Context({"request_id": "r-3", "x-gray": "canary"}).with_request(snapshot())
    with ctxrelay.use(ctx):
        out.logger.info("paid")
    out.logger.info("later")
    assert [json.loads(line) for line in out.lines()] == [
        {
            "message": "paid",
            "request_id": "r-3",
            "x-gray": "canary",
            "request_method": "POST",
            "request_path": "/orders",
            "request_client": "10.0.0.7:5123",
        },
        {"message": "later"},
    ]


def test_request_attributes_are_on_the_record_for_format_strings() -> None:
    fmt = "%(request_method)s %(request_path)s %(request_client)s"
    out = capture(fmt, ContextFilter(request=["method", "path", "client"]))
    with ctxrelay.use(ctxrelay.Context(request_id="r").with_request(snapshot(path="/pay"))):
        out.logger.info("x")
    assert out.lines() == ["POST /pay 10.0.0.7:5123"]


def test_prefix_puts_every_field_on_the_record_but_never_over_logrecord_attributes() -> None:
    out = capture(
        "%(ctx_tenant)s %(ctx_x_gray)s %(ctx_msg)s %(message)s", ContextFilter(prefix="ctx_")
    )
    bare = capture("%(tenant)s %(msg)s %(message)s", ContextFilter(prefix=""))
    with ctxrelay.bind({"tenant": "acme", "x-gray": "canary", "msg": "not-the-message"}):
        out.logger.info("real message")
        bare.logger.info("real message")
    assert out.lines() == ["acme canary not-the-message real message"]
    assert bare.lines() == ["acme real message real message"]


def test_prefix_never_shadows_a_logrecord_method_so_the_line_is_not_lost() -> None:
    # A field named like a LogRecord method (from trusted baggage, say) must
    # not become an instance attribute: record.getMessage() would be a str.
    bare = capture("%(request_id)s %(message)s", ContextFilter(prefix=""))
    with ctxrelay.bind(request_id="r-1", getMessage="boom", getMessageX="kept"):
        bare.logger.info("real message")
    assert bare.lines() == ["r-1 real message"]
    with pytest.raises(ValueError, match="'getMessage'"):
        ContextFilter(fields=["getMessage"])


def test_an_explicit_extra_value_wins_over_the_context() -> None:
    out = capture("%(request_id)s %(tenant)s", ContextFilter(fields=["tenant"]))
    with ctxrelay.bind(request_id="r-4", tenant="acme"):
        out.logger.info("x", extra={"request_id": "given", "tenant": "other"})
        out.logger.info("x", extra={"tenant": "other"})
    assert out.lines() == ["given other", "r-4 other"]


def test_a_queue_listeners_filter_outside_the_request_keeps_what_the_request_set() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    install(target)  # the mistake: a filter on the listener's side, in its thread
    listener = logging.handlers.QueueListener(records, target, respect_handler_level=True)
    producer = logging.handlers.QueueHandler(records)
    install(producer)  # the right place: where the record is made
    logger = logging.getLogger("tests.ctxrelay.logging.queue")
    logger.propagate = False
    logger.addHandler(producer)
    listener.start()
    try:
        with ctxrelay.bind(request_id="r-5"):
            logger.warning("queued")
        logger.warning("outside")
    finally:
        listener.stop()
        logger.removeHandler(producer)
    assert stream.getvalue().splitlines() == ["r-5 queued", "- outside"]


def test_configure_takes_effect_at_once_for_a_context_already_logged() -> None:
    out = capture("%(ctxrelay)s")
    with ctxrelay.bind(request_id="r-6", pin="1234"):
        out.logger.info("before")
        ctxrelay.configure(ctxrelay.Policy(sensitive=frozenset({"pin"})))
        out.logger.info("after")
    assert out.lines() == [
        "{'request_id': 'r-6', 'pin': '1234'}",
        "{'request_id': 'r-6', 'pin': '***'}",
    ]


def test_each_short_lived_context_gets_its_own_id_even_when_memory_is_reused() -> None:
    # Contexts die after each block and CPython reuses their addresses: the
    # filter's per-context cache is keyed by id() and must never hand out an
    # earlier request's fields (it holds the contexts it remembers).
    out = capture("%(request_id)s %(message)s")
    for i in range(1000):
        with ctxrelay.bind(request_id=f"r-{i}"):
            out.logger.info("%d", i)
    assert out.lines() == [f"r-{i} {i}" for i in range(1000)]


class _BrokenPolicy(ctxrelay.Policy):
    def is_sensitive(self, name: str) -> bool:
        raise RuntimeError("broken policy")


def test_a_failure_inside_the_filter_is_logged_once_and_never_raised_into_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = capture("%(request_id)s %(message)s")
    ctxrelay.configure(_BrokenPolicy())
    with caplog.at_level(logging.WARNING, logger="ctxrelay"), ctxrelay.bind(request_id="r-7"):
        out.logger.info("one")
        out.logger.info("two")
    assert out.lines() == ["- one", "- two"]  # the record survives, without fields
    reports = [r for r in caplog.records if r.name == "ctxrelay"]
    assert len(reports) == 1
    assert "could not put the context on a log record" in reports[0].getMessage()


def test_field_names_a_format_string_or_logrecord_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="'msg'"):
        ContextFilter(fields=["msg"])
    with pytest.raises(ValueError, match="'ctxrelay'"):
        ContextFilter(fields={"ctxrelay": "x"})
    with pytest.raises(ValueError, match="'1st'"):
        ContextFilter(fields=["1st"])
    with pytest.raises(ValueError, match="query"):
        ContextFilter(request=["query"])


def test_frozen_fields_are_read_only_and_survive_json_copy_and_pickle() -> None:
    fields = FrozenFields({"request_id": "r", "x-gray": "canary"})
    with pytest.raises(TypeError):
        fields["request_id"] = "other"
    with pytest.raises(TypeError):
        fields.update(request_id="other")
    assert json.loads(json.dumps(fields)) == {"request_id": "r", "x-gray": "canary"}
    assert copy.deepcopy(fields) is fields
    restored = pickle.loads(pickle.dumps(fields))
    assert type(restored) is FrozenFields
    assert restored == fields


# -- setup, install, and the logger-filter pitfall -----------------------------
def new_app_logger() -> logging.Logger:
    """A fresh logger standing in for an application's top logger (or root).

    Made inside the test: pytest attaches its capture handlers to every
    non-propagating logger that exists when a test phase starts.
    """
    logger = logging.getLogger(f"tests.ctxrelay.app{next(_counter)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_setup_covers_records_of_child_loggers_that_propagate_up() -> None:
    app_logger = new_app_logger()
    stream = io.StringIO()
    setup("%(request_id)s %(name)s %(message)s", logger=app_logger, level="INFO", stream=stream)
    with ctxrelay.bind(request_id="r-8"):
        logging.getLogger(f"{app_logger.name}.db.pool").info("query")
    logging.getLogger(f"{app_logger.name}.db.pool").info("startup")
    assert stream.getvalue().splitlines() == [
        f"r-8 {app_logger.name}.db.pool query",
        f"- {app_logger.name}.db.pool startup",
    ]


class Collect(logging.Handler):
    """Keeps each record's request id, or None when it has none."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), getattr(record, "request_id", None)))


def test_a_filter_on_a_logger_misses_its_children_which_is_why_setup_uses_handlers() -> None:
    app_logger = new_app_logger()
    collect = Collect()
    app_logger.addHandler(collect)
    app_logger.addFilter(ContextFilter())
    with ctxrelay.bind(request_id="r-9"):
        app_logger.info("parent")
        logging.getLogger(f"{app_logger.name}.child").info("child")
    assert collect.seen == [("parent", "r-9"), ("child", None)]


def test_install_twice_keeps_one_filter_and_uninstall_removes_it() -> None:
    app_logger = new_app_logger()
    handler = Collect()
    app_logger.addHandler(handler)
    install(logger=app_logger)
    second = install(logger=app_logger.name, context_filter=ContextFilter(fields=["tenant"]))
    assert handler.filters == [second]
    uninstall(logger=app_logger)
    assert handler.filters == []


def test_install_on_a_logger_without_handlers_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="no handlers"):
        install(logger="tests.ctxrelay.no-handlers")


# -- threads, pools, processes ---------------------------------------------------
def _log_many(logger: logging.Logger, expected: str, start: threading.Barrier) -> None:
    start.wait(timeout=30)  # every request logs at the same time
    for n in range(RECORDS):
        logger.info("%s %d", expected, n)


def assert_each_line_has_its_own_id(lines: list[str]) -> None:
    """Lines are ``<request_id from the context> <expected id> <n>``."""
    assert len(lines) == REQUESTS * RECORDS
    assert all(line.split()[0] == line.split()[1] for line in lines), [
        line for line in lines if line.split()[0] != line.split()[1]
    ][:5]
    assert {line.split()[0] for line in lines} == {f"req-{i}" for i in range(REQUESTS)}


def test_many_requests_logging_at_once_in_a_pool_each_get_their_own_id(relay: Relay) -> None:
    out = capture("%(request_id)s %(message)s")
    start = threading.Barrier(REQUESTS)
    with relay.pool(max_workers=REQUESTS) as pool:
        futures = []
        for i in range(REQUESTS):
            with ctxrelay.bind(request_id=f"req-{i}"):
                futures.append(pool.submit(_log_many, out.logger, f"req-{i}", start))
        for future in futures:
            future.result(timeout=60)
    assert_each_line_has_its_own_id(out.lines())


def test_requests_on_their_own_threads_each_log_their_own_id(relay: Relay) -> None:
    out = capture("%(request_id)s %(message)s")
    start = threading.Barrier(REQUESTS)
    threads = []
    for i in range(REQUESTS):
        with ctxrelay.bind(request_id=f"req-{i}"):
            thread = relay.thread(target=_log_many, args=(out.logger, f"req-{i}", start))
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join(timeout=60)
    assert_each_line_has_its_own_id(out.lines())


def log_in_child(expected: str) -> list[str]:
    """Runs in a worker process: log with the three libraries, return the lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("stdlib %(request_id)s " + expected))
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("tests.ctxrelay.child")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for _ in range(5):
            logger.info("x")
    finally:
        logger.removeHandler(handler)
    events = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[MergeContext(), structlog.processors.JSONRenderer()],
    )
    lines = stream.getvalue().splitlines()
    for _ in range(5):
        event = json.loads(events.info("x"))
        lines.append(f"structlog {event.get('request_id')} {expected}")
    sink = io.StringIO()
    loguru_logger.configure(patcher=ContextPatcher())  # process-wide: a throw-away process
    handler_id = loguru_logger.add(sink, format="loguru {extra[request_id]} " + expected)
    try:
        for _ in range(5):
            loguru_logger.info("x")
    finally:
        loguru_logger.remove(handler_id)
    return lines + sink.getvalue().splitlines()


def test_a_process_pool_child_logs_with_the_submitting_requests_id() -> None:
    spawn = multiprocessing.get_context("spawn")  # no fork of a threaded test process
    with ctxrelay.ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        futures = []
        for i in range(4):
            with ctxrelay.bind(request_id=f"proc-{i}"):
                futures.append(pool.submit(log_in_child, f"proc-{i}"))
        results = [future.result(timeout=60) for future in futures]
    for i, lines in enumerate(results):
        assert len(lines) == 15
        assert all(line.split()[1:] == [f"proc-{i}", f"proc-{i}"] for line in lines), lines
        assert {line.split()[0] for line in lines} == {"stdlib", "structlog", "loguru"}


# -- secrets ---------------------------------------------------------------------
SECRETS = {
    "cookie": "COOKIE-SECRET",
    "authorization": "AUTH-SECRET",
    "x-shop-pin": "PIN-SECRET",
    "db_password": "PASSWORD-SECRET",
}


def test_no_configured_secret_appears_in_stdlib_structlog_or_loguru_output() -> None:
    ctxrelay.configure(ctxrelay.Policy(sensitive=frozenset({"x-shop-pin"})))
    names = list(SECRETS)
    ctx = ctxrelay.Context({"request_id": "r-s", **SECRETS}).with_request(snapshot())
    out = capture(
        "%(request_id)s %(cookie)s %(authorization)s %(x_shop_pin)s %(ctxrelay)s %(message)s",
        ContextFilter(fields=names, request=["method", "path", "host", "scheme", "client"]),
    )
    prefixed = capture("%(message)s", ContextFilter(prefix="ctx_", request=["method", "host"]))
    prefixed.handler.setFormatter(EveryAttributeFormatter())
    structlog_lines = io.StringIO()
    events = structlog.wrap_logger(
        structlog.PrintLogger(structlog_lines),
        processors=[
            MergeContext(request=["method", "path"]),
            MergeContext(key="ctxrelay"),
            structlog.processors.JSONRenderer(),
        ],
    )
    loguru_lines = io.StringIO()
    handler_id = loguru_logger.add(loguru_lines, serialize=True)
    try:
        with ctxrelay.use(ctx):
            out.logger.info("context %r, request %r", ctxrelay.current(), ctxrelay.request())
            prefixed.logger.info("paid")
            events.info("paid", context=repr(ctxrelay.current()))
            loguru_logger.patch(ContextPatcher(fields=names)).info("paid {!r}", ctxrelay.current())
    finally:
        loguru_logger.remove(handler_id)
    outputs = {
        "stdlib": "\n".join(out.lines()),
        "stdlib json": "\n".join(prefixed.lines()),
        "structlog": structlog_lines.getvalue(),
        "loguru": loguru_lines.getvalue(),
    }
    for library, text in outputs.items():
        assert "r-s" in text, library  # the line was written, with its fields
        assert "***" in text, library  # the secrets were there, masked
        for secret in SECRETS.values():
            assert secret not in text, (library, secret)
        assert "Bearer" not in text, library
        assert "session=" not in text, library
