"""The Celery app and worker of the OpenTelemetry span tests, and a span exporter to files.

The worker runs ``python -m celery -A tests.integrations.opentelemetry_celery_app
worker``; the module-level ``app`` is configured from ``CTXRELAY_OTEL_*``
environment variables.  The worker sets up OpenTelemetry's SDK as an
application would -- a ``TracerProvider`` with ctxrelay's
``ContextSpanProcessor`` -- and exports every span it ends with
:class:`DirectoryExporter` into ``CTXRELAY_OTEL_SPANS``, where the test reads
them.  Its task starts a span and a child span, each named after the request
that published it (as data, to check the attributes against).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import ctxrelay
from ctxrelay.integrations.celery import install
from ctxrelay.integrations.opentelemetry import ContextSpanProcessor

TRACED = "otel.traced"
PING = "otel.ping"
#: The policy of the web process and the worker alike: the user header and
#: the cookie become fields (the cookie never goes into a message).
POLICY = ctxrelay.Policy(capture={"x-user", "cookie"})
#: The fields the tests put on spans.
FIELDS = ("request_id", "x-user")

Span = dict[str, Any]


class DirectoryExporter(SpanExporter):
    """Writes every span as ``<directory>/<uuid>.json``: its name and attributes
    (written aside and renamed, so a reader never sees half a file)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            name = uuid.uuid4().hex
            part = self.directory / f".{name}.part"
            part.write_text(
                json.dumps({"name": span.name, "attributes": dict(span.attributes or {})})
            )
            os.replace(part, self.directory / f"{name}.json")
        return SpanExportResult.SUCCESS


def read_spans(directory: Path) -> list[Span]:
    """What a :class:`DirectoryExporter` wrote so far."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def make_app(broker: str, queue: str, secret: str) -> Celery:
    """An app routing its tasks to ``queue``, with ctxrelay installed (the
    secret shared by every app installed in the test process)."""
    app = Celery("ctxrelay_otel", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_expires=600,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )
    install(app, secret=secret)
    app.task(name=TRACED)(traced)
    app.task(name=PING)(ping)
    return app


_provider: TracerProvider | None = None


def traced(expect: str) -> None:
    """A span and a child span, named after the request that published the task."""
    assert _provider is not None
    tracer = _provider.get_tracer("tests.worker")
    with tracer.start_as_current_span(f"task {expect}"):
        with tracer.start_as_current_span(f"task step {expect}"):
            pass


def ping() -> str | None:
    return ctxrelay.request_id()


def _from_environment() -> Celery | None:
    global _provider
    broker = os.environ.get("CTXRELAY_OTEL_BROKER")
    if not broker:
        return None
    ctxrelay.configure(POLICY)
    # Before the pool forks: every child inherits the provider (no thread).
    _provider = TracerProvider()
    _provider.add_span_processor(ContextSpanProcessor(FIELDS))
    _provider.add_span_processor(
        SimpleSpanProcessor(DirectoryExporter(os.environ["CTXRELAY_OTEL_SPANS"]))
    )
    return make_app(broker, os.environ["CTXRELAY_OTEL_QUEUE"], os.environ["CTXRELAY_OTEL_SECRET"])


app = _from_environment()
