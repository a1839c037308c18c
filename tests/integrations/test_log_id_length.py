"""``id_length``: the request id cut to N characters on every log line.

As asgi-correlation-id's ``CorrelationIdFilter(uuid_length=...)`` does, for
the stdlib filter, the structlog processor and the loguru patcher.  Only the
request id is cut; every other field is written whole.  Each test logs
through real handlers, renderers and sinks and reads the output.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import logging.config
from typing import Any

import pytest
import structlog
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay.integrations.logging import ContextFilter, install
from ctxrelay.integrations.loguru import ContextPatcher
from ctxrelay.integrations.structlog import MergeContext

LONG_ID = "7d5c2f4e-9b1a-4c3d-8e2f-0a1b2c3d4e5f"
_counter = itertools.count()


def _logger(fmt: str, context_filter: logging.Filter) -> tuple[logging.Logger, io.StringIO]:
    logger = logging.getLogger(f"tests.ctxrelay.id_length.{next(_counter)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    install(handler, context_filter=context_filter)  # type: ignore[arg-type]
    return logger, stream


def test_stdlib_lines_show_the_request_id_cut_and_every_other_field_whole() -> None:
    log, stream = _logger(
        "[%(request_id)s] [%(tenant)s] %(message)s",
        ContextFilter(id_length=8, fields=["tenant"]),
    )
    with ctxrelay.bind(request_id=LONG_ID, tenant="acme-corporation-eu-west"):
        log.info("paid")
    log.info("startup")
    assert stream.getvalue().splitlines() == [
        "[7d5c2f4e] [acme-corporation-eu-west] paid",
        "[-] [-] startup",
    ]


def test_the_json_fields_and_prefixed_attributes_carry_the_same_cut_id() -> None:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger(f"tests.ctxrelay.id_length.{next(_counter)}")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    install(handler, context_filter=ContextFilter(id_length=4, prefix="ctx_"))
    with ctxrelay.bind(request_id=LONG_ID, order="order-000123456"):
        logger.warning("x")
    (record,) = seen
    assert json.loads(json.dumps(vars(record)["ctxrelay"])) == {
        "request_id": "7d5c",
        "order": "order-000123456",
    }
    assert vars(record)["ctx_request_id"] == "7d5c"
    assert vars(record)["ctx_order"] == "order-000123456"


def test_an_id_shorter_than_the_length_is_written_whole() -> None:
    log, stream = _logger("[%(request_id)s] %(message)s", ContextFilter(id_length=32))
    with ctxrelay.bind(request_id="r-1"):
        log.info("paid")
    assert stream.getvalue() == "[r-1] paid\n"


def test_the_id_is_cut_before_it_is_escaped_so_no_line_is_forged() -> None:
    # The cut never splits an escape: a request id holding a line break is
    # cut to its first N characters, then written escaped, on one line.
    log, stream = _logger("[%(request_id)s] %(message)s", ContextFilter(id_length=4))
    with ctxrelay.bind(request_id="ab\x85INFO [req-admin] granted"):
        log.info("paid")
    assert stream.getvalue().splitlines() == ["[ab\\x85I] paid"]


def test_a_dictconfig_filter_takes_id_length() -> None:
    stream = io.StringIO()
    name = f"tests.ctxrelay.id_length.{next(_counter)}"
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "ctxrelay": {"()": "ctxrelay.integrations.logging.ContextFilter", "id_length": 6}
            },
            "formatters": {"line": {"format": "[%(request_id)s] %(message)s"}},
            "handlers": {
                "mem": {
                    "class": "logging.StreamHandler",
                    "stream": stream,
                    "formatter": "line",
                    "filters": ["ctxrelay"],
                }
            },
            "loggers": {name: {"handlers": ["mem"], "level": "INFO", "propagate": False}},
        }
    )
    with ctxrelay.bind(request_id=LONG_ID):
        logging.getLogger(name).info("paid")
    assert stream.getvalue() == "[7d5c2f] paid\n"


def test_structlog_events_carry_the_cut_id_and_whole_fields() -> None:
    log = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[MergeContext(id_length=8), structlog.processors.JSONRenderer()],
    )
    with ctxrelay.bind(request_id=LONG_ID, tenant="acme-corporation-eu-west"):
        line = log.info("paid")
    assert json.loads(line) == {
        "request_id": "7d5c2f4e",
        "tenant": "acme-corporation-eu-west",
        "event": "paid",
    }


def test_loguru_extra_carries_the_cut_id_and_whole_fields() -> None:
    sink = io.StringIO()
    handler = loguru_logger.add(
        sink, format="[{extra[request_id]}] [{extra[tenant]}] {message}", colorize=False
    )
    try:
        log = loguru_logger.patch(ContextPatcher(id_length=8, fields=["tenant"]))
        with ctxrelay.bind(request_id=LONG_ID, tenant="acme-corporation-eu-west"):
            log.info("paid")
        log.info("startup")
    finally:
        loguru_logger.remove(handler)
    assert sink.getvalue().splitlines() == [
        "[7d5c2f4e] [acme-corporation-eu-west] paid",
        "[-] [-] startup",
    ]


BUILDERS: list[Any] = [ContextFilter, MergeContext, ContextPatcher]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("length", [0, -1])
def test_a_length_below_one_is_refused(build: Any, length: int) -> None:
    with pytest.raises(ValueError, match="id_length"):
        build(id_length=length)


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("length", [True, False, "8", 8.0])
def test_a_length_that_is_not_an_int_is_refused(build: Any, length: object) -> None:
    with pytest.raises(TypeError, match="id_length"):
        build(id_length=length)


@pytest.mark.parametrize("build", BUILDERS)
def test_no_length_means_the_whole_id(build: Any) -> None:
    assert build(id_length=None).id_length is None
    assert build().id_length is None
