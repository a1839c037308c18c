"""ctxrelay.integrations.structlog: the request's fields in every event dict."""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Any

import pytest
import structlog

import ctxrelay
from ctxrelay.integrations.structlog import MergeContext, merge_context

from ..conftest import Relay
from .test_logging import RECORDS, REQUESTS, snapshot


def render(*processors: Any) -> Any:
    """A structlog logger whose calls return the JSON line they would write."""
    return structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[*processors, structlog.processors.JSONRenderer(sort_keys=True)],
    )


def test_every_field_is_added_and_sensitive_ones_are_masked() -> None:
    log = render(merge_context)
    with ctxrelay.bind({"request_id": "r-1", "x-gray": "canary", "cookie": "COOKIE-SECRET"}):
        line = log.info("paid")
    assert json.loads(line) == {
        "event": "paid",
        "request_id": "r-1",
        "x-gray": "canary",
        "cookie": "***",
    }


def test_nothing_is_added_outside_a_request() -> None:
    assert json.loads(render(merge_context).info("startup")) == {"event": "startup"}


def test_keys_the_event_already_has_win_over_the_context() -> None:
    log = render(merge_context).bind(tenant="bound")
    with ctxrelay.bind(request_id="r-2", tenant="acme"):
        assert json.loads(log.info("x", request_id="explicit")) == {
            "event": "x",
            "request_id": "explicit",
            "tenant": "bound",
        }


def test_key_nests_the_fields_and_request_adds_snapshot_attributes() -> None:
    log = render(MergeContext(request=["method", "path"], key="ctx"))
    with ctxrelay.use(ctxrelay.Context(request_id="r-3").with_request(snapshot())):
        line = log.info("x")
    assert json.loads(line) == {
        "event": "x",
        "ctx": {"request_id": "r-3", "request_method": "POST", "request_path": "/orders"},
    }
    assert json.loads(log.info("outside")) == {"event": "outside"}


def test_a_processor_changing_the_nested_fields_affects_only_its_own_event() -> None:
    # The prepared fields are shared by every event of the context: a later
    # processor that edits the nested dict in place must get its own copy.
    def move_order_into_ctx(_: Any, __: str, event_dict: Any) -> Any:
        event_dict["ctx"]["order"] = event_dict.pop("order")
        event_dict["ctx"].pop("user")
        return event_dict

    merge = MergeContext(key="ctx")
    editing, plain = render(merge, move_order_into_ctx), render(merge)
    with ctxrelay.bind(request_id="r-4", user="ada"):
        first = json.loads(editing.info("paid", order="o-1"))
        after = json.loads(plain.info("shipped"))
    assert first["ctx"] == {"request_id": "r-4", "order": "o-1"}
    assert after == {"event": "shipped", "ctx": {"request_id": "r-4", "user": "ada"}}


def test_unknown_request_attributes_are_refused() -> None:
    with pytest.raises(ValueError, match="cookies"):
        MergeContext(request=["cookies"])


def test_a_policy_configured_later_masks_a_context_already_logged() -> None:
    log = render(merge_context)
    with ctxrelay.bind(request_id="r-4", pin="1234"):
        assert json.loads(log.info("x"))["pin"] == "1234"
        ctxrelay.configure(ctxrelay.Policy(sensitive=frozenset({"pin"})))
        assert json.loads(log.info("x"))["pin"] == "***"


def test_stdlib_records_rendered_by_processor_formatter_get_the_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(sort_keys=True),
            foreign_pre_chain=[merge_context],
        )
    )
    logger = logging.getLogger("tests.ctxrelay.structlog.foreign")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with ctxrelay.bind(request_id="r-5"):
            logger.info("from stdlib")
    finally:
        logger.removeHandler(handler)
    assert json.loads(stream.getvalue()) == {"event": "from stdlib", "request_id": "r-5"}


def _log_many(lines: list[str], expected: str, start: threading.Barrier) -> None:
    log = render(merge_context)
    start.wait(timeout=30)
    for n in range(RECORDS):
        lines.append(log.info("x", expected=expected, n=n))


def test_many_requests_logging_at_once_in_a_pool_each_get_their_own_id(relay: Relay) -> None:
    lines: list[str] = []  # list.append is atomic
    start = threading.Barrier(REQUESTS)
    with relay.pool(max_workers=REQUESTS) as pool:
        futures = []
        for i in range(REQUESTS):
            with ctxrelay.bind(request_id=f"req-{i}", tenant=f"tenant-{i}"):
                futures.append(pool.submit(_log_many, lines, f"req-{i}", start))
        for future in futures:
            future.result(timeout=60)
    events = [json.loads(line) for line in lines]
    assert len(events) == REQUESTS * RECORDS
    wrong = [e for e in events if e.get("request_id") != e["expected"]]
    assert not wrong, wrong[:5]
    assert all(e["tenant"] == e["expected"].replace("req", "tenant") for e in events)
