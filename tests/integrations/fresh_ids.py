"""What the queue tests share about the fresh request id a worker gives a
job that arrives without one (tests/integrations/test_worker_fresh_id.py
tests the feature itself)."""

from __future__ import annotations

import re

from ctxrelay._signing import WORKER_FIELDS

#: The request id a worker makes for a job that arrived without one.
FRESH_ID = re.compile(r"[0-9a-f]{32}")


def relayed(fields: dict[str, str]) -> dict[str, str]:
    """The fields that travelled, without the worker-local ids, nor the
    fresh request id the worker gave a job that arrived without one."""
    return {
        k: v
        for k, v in fields.items()
        if k not in WORKER_FIELDS and not (k == "request_id" and FRESH_ID.fullmatch(v))
    }


def fresh(fields: dict[str, str]) -> dict[str, str]:
    """``fields`` without the fresh request id they must hold."""
    rest = dict(fields)
    assert FRESH_ID.fullmatch(rest.pop("request_id", "")), fields
    return rest
