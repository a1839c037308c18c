"""Sentry events captured in process, the way the SDK's own tests capture them.

:class:`CollectingTransport` is a ``sentry_sdk.transport.Transport`` that keeps
every event and transaction instead of sending it: the SDK hands it the
envelope it would have posted, already serialized.  :class:`DirectoryTransport`
writes each one as a JSON file instead, for events captured in another process
(a Celery worker, a process pool's child) that the test reads afterwards.
:func:`sentry` initialises the SDK with one of them and always undoes it.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sentry_sdk
from sentry_sdk import Scope
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from ctxrelay.integrations.sentry import SentryIntegration

__all__ = [
    "CollectingTransport",
    "DirectoryTransport",
    "init",
    "init_in_child",
    "read_events",
    "reset",
    "sentry",
]

Event = dict[str, Any]


def _payloads(envelope: Envelope) -> Iterator[Event]:
    for item in envelope.items:
        if item.type in ("event", "transaction") and item.payload.json is not None:
            yield item.payload.json


class CollectingTransport(Transport):
    """Keeps every event and transaction the SDK sends, in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def capture_envelope(self, envelope: Envelope) -> None:
        with self._lock:
            self.events.extend(_payloads(envelope))

    def of_type(self, kind: str) -> list[Event]:
        """The errors (``"error"``) or transactions (``"transaction"``) so far."""
        with self._lock:
            return [e for e in self.events if e.get("type", "error") == kind]


class DirectoryTransport(Transport):
    """Writes every event and transaction as ``<directory>/<uuid>.json``
    (written aside and renamed, so a reader never sees half a file)."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)

    def capture_envelope(self, envelope: Envelope) -> None:
        for payload in _payloads(envelope):
            name = uuid.uuid4().hex
            part = self.directory / f".{name}.part"
            part.write_text(json.dumps(payload))
            os.replace(part, self.directory / f"{name}.json")


def read_events(directory: Path) -> list[Event]:
    """What a :class:`DirectoryTransport` wrote so far."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


#: Options every test shares: no default or auto-enabled integration (in the
#: test process they would patch threading, logging and the frameworks for
#: the rest of the run), every transaction sampled, no background monitor
#: thread left behind.
BASE_OPTIONS: dict[str, Any] = {
    "default_integrations": False,
    "auto_enabling_integrations": False,
    "traces_sample_rate": 1.0,
    "enable_backpressure_handling": False,
}


def init(
    transport: Transport, *, integration: SentryIntegration | None = None, **options: Any
) -> None:
    """``sentry_sdk.init`` with ``transport`` and ctxrelay's integration."""
    sentry_sdk.init(
        transport=transport,
        integrations=[integration or SentryIntegration()],
        **{**BASE_OPTIONS, **options},
    )


def init_in_child(directory: str) -> None:
    """A process pool's initializer: Sentry in the child, events to files."""
    init(DirectoryTransport(directory))


@contextmanager
def sentry(
    transport: Transport, *, integration: SentryIntegration | None = None, **options: Any
) -> Iterator[None]:
    """The SDK initialised for the block; its client closed and the scopes
    of this thread and the global one reset afterwards, whatever happened."""
    init(transport, integration=integration, **options)
    try:
        yield
    finally:
        reset()


def reset() -> None:
    """Close the client, and reset the global scope and this thread's
    scopes (through ``Scope``: sentry-sdk 2.0 has no top-level helpers)."""
    sentry_sdk.get_client().close()
    Scope.get_global_scope().set_client(None)
    Scope.get_isolation_scope().clear()
    Scope.get_current_scope().clear()
