"""ctxrelay.integrations.loguru: the request's fields in ``record["extra"]``."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator

import pytest
from loguru import logger

import ctxrelay
from ctxrelay.integrations.loguru import ContextPatcher, patcher

from ..conftest import Relay
from .test_logging import RECORDS, REQUESTS, snapshot


@pytest.fixture
def sink() -> Iterator[io.StringIO]:
    """Lines of ``{extra[request_id]} {extra} {message}`` written by loguru."""
    stream = io.StringIO()
    handler_id = logger.add(stream, format="{extra[request_id]} {extra} {message}")
    try:
        yield stream
    finally:
        logger.remove(handler_id)


def test_patched_logger_puts_every_field_in_extra_with_secrets_masked(sink: io.StringIO) -> None:
    with ctxrelay.bind({"request_id": "r-1", "x-gray": "canary", "authorization": "AUTH-SECRET"}):
        logger.patch(patcher).info("paid")
    assert sink.getvalue().splitlines() == [
        "r-1 {'request_id': 'r-1', 'x-gray': 'canary', 'authorization': '***'} paid"
    ]


def test_a_format_using_extra_never_fails_outside_a_request(sink: io.StringIO) -> None:
    logger.patch(patcher).info("startup")
    assert sink.getvalue().splitlines() == ["- {'request_id': '-'} startup"]


def test_declared_fields_and_request_attributes_always_exist() -> None:
    stream = io.StringIO()
    handler_id = logger.add(
        stream, format="{extra[request_id]} {extra[tenant]} {extra[request_path]}"
    )
    log = logger.patch(ContextPatcher(fields=["tenant"], request=["path"]))
    try:
        log.info("outside")
        with ctxrelay.use(
            ctxrelay.Context(request_id="r-2", tenant="acme").with_request(snapshot())
        ):
            log.info("inside")
    finally:
        logger.remove(handler_id)
    assert stream.getvalue().splitlines() == ["- - -", "r-2 acme /orders"]


def test_values_bound_or_contextualized_in_loguru_win(sink: io.StringIO) -> None:
    log = logger.patch(patcher)
    with ctxrelay.bind(request_id="r-3", tenant="acme"):
        log.bind(tenant="bound").info("a")
        with logger.contextualize(request_id="contextualized"):
            log.info("b")
    assert sink.getvalue().splitlines() == [
        "r-3 {'request_id': 'r-3', 'tenant': 'bound'} a",
        "contextualized {'request_id': 'contextualized', 'tenant': 'acme'} b",
    ]


def test_serialized_json_carries_the_fields_under_extra() -> None:
    stream = io.StringIO()
    handler_id = logger.add(stream, serialize=True)
    try:
        with ctxrelay.bind(request_id="r-4", cookie="COOKIE-SECRET"):
            logger.patch(patcher).info("paid")
    finally:
        logger.remove(handler_id)
    record = json.loads(stream.getvalue())["record"]
    assert record["extra"] == {"request_id": "r-4", "cookie": "***"}


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid context field name"):
        ContextPatcher(fields=["bad name"])
    with pytest.raises(ValueError, match="headers"):
        ContextPatcher(request=["headers"])


def _log_many(expected: str, start: threading.Barrier) -> None:
    log = logger.patch(patcher)
    start.wait(timeout=30)
    for n in range(RECORDS):
        log.info("{} {}", expected, n)


def test_many_requests_logging_at_once_in_a_pool_each_get_their_own_id(relay: Relay) -> None:
    stream = io.StringIO()
    handler_id = logger.add(stream, format="{extra[request_id]} {message}")
    start = threading.Barrier(REQUESTS)
    try:
        with relay.pool(max_workers=REQUESTS) as pool:
            futures = []
            for i in range(REQUESTS):
                with ctxrelay.bind(request_id=f"req-{i}"):
                    futures.append(pool.submit(_log_many, f"req-{i}", start))
            for future in futures:
                future.result(timeout=60)
    finally:
        logger.remove(handler_id)
    lines = stream.getvalue().splitlines()
    assert len(lines) == REQUESTS * RECORDS
    wrong = [line for line in lines if line.split()[0] != line.split()[1]]
    assert not wrong, wrong[:5]
    assert {line.split()[0] for line in lines} == {f"req-{i}" for i in range(REQUESTS)}
