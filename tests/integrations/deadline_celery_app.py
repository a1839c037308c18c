"""The Celery app of the queue-deadline tests (tests/integrations/test_queue_deadlines.py).

The worker runs ``python -m celery -A tests.integrations.deadline_celery_app
worker``; the app is built from ``CTXRELAY_DEADLINE_*`` environment variables
(not celery_app's, so that module's own app is not built in this worker too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

import ctxrelay
from tests.integrations.celery_app import make_app


def remaining() -> dict[str, Any]:
    """The time the task has left, and the fields it sees."""
    return {"remaining": ctxrelay.remaining(), "fields": dict(ctxrelay.current())}


def mark(path: str) -> str:
    """Leave a file behind: the proof that the task ran."""
    Path(path).write_text(ctxrelay.request_id() or "-")
    return path


def _from_environment() -> Celery | None:
    broker = os.environ.get("CTXRELAY_DEADLINE_BROKER")
    if not broker:
        return None
    app = make_app(broker, broker, os.environ["CTXRELAY_DEADLINE_QUEUE"])
    register(app)
    return app


def register(app: Celery) -> None:
    app.task(name="d.remaining")(remaining)
    app.task(name="d.mark")(mark)


app = _from_environment()
