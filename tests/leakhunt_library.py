"""Plays "a library that lazily starts a long-lived service thread", for
``tests/test_leak_hunt.py``.

Think of redis-py's pub/sub thread, a scheduler, a metrics exporter or a
logging library's queue listener: the first ``post()`` starts the thread, and
the first ``post()`` typically happens inside some request.  The thread then
handles every later event, whoever posts it, so it must never carry the
request that happened to start it.

Two flavours, one per way ctxrelay tells a library's thread from the
application's (``ctxrelay._lifetime``):

* ``"named"``: the library starts its own ``threading.Thread`` from this
  module.  It lives in the test tree, not in site-packages, so ctxrelay knows
  it is a library only when told: ``instrument(library_modules=[__name__])``.
* ``"stdlib"``: the library starts a ``logging.handlers.QueueListener``, whose
  thread the standard library starts (ctxrelay's path rule).

Each event is handed to ``on_event(event)`` on the service thread; the
callback observes whatever it needs there.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
from collections.abc import Callable

__all__ = ["KINDS", "Service"]

KINDS = ("named", "stdlib")

#: Seconds: the bound of every wait (never asserted on as a duration).
WAIT = 10.0


class _Deliver(logging.Handler):
    """The queue listener's handler: hands each event to the callback."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self._service = service

    def handle(self, record: logging.LogRecord) -> bool:
        self._service._deliver(str(record.msg))
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() is used
        self.handle(record)


class Service:
    """A service thread started on first use, from inside this module."""

    def __init__(self, kind: str, on_event: Callable[[str], None]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown service kind {kind!r}")
        self.kind = kind
        self._on_event = on_event
        self._lock = threading.Condition()
        self._posted = 0
        self._handled = 0
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._listener: logging.handlers.QueueListener | None = None
        self._stopped = False

    @property
    def started(self) -> bool:
        return self._thread is not None or self._listener is not None

    def post(self, event: str) -> None:
        """Queue ``event``; start the service thread if this is the first use."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the service is stopped")
            self._posted += 1
            if not self.started:
                self._start()
        if self.kind == "stdlib":
            self._queue.put(logging.makeLogRecord({"msg": event}))
        else:
            self._queue.put(event)

    def _start(self) -> None:
        # Lazily, from the library's own code: whatever request is current
        # here is only the one that happened to come first.
        if self.kind == "stdlib":
            self._listener = logging.handlers.QueueListener(self._queue, _Deliver(self))
            self._listener.start()
        else:
            self._thread = threading.Thread(
                target=self._serve, name="leakhunt-library", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            self._deliver(str(event))

    def _deliver(self, event: str) -> None:
        try:
            self._on_event(event)
        finally:
            with self._lock:
                self._handled += 1
                self._lock.notify_all()

    def flush(self, timeout: float = WAIT) -> bool:
        """Wait (bounded) until every posted event was handled."""
        with self._lock:
            return self._lock.wait_for(lambda: self._handled >= self._posted, timeout)

    def stop(self) -> None:
        """Stop the thread (if it was started) and wait for it."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._listener is not None:
            self._listener.stop()  # enqueues its sentinel and joins
        elif self._thread is not None:
            self._queue.put(None)
            self._thread.join(WAIT)

    def alive(self) -> bool:
        """Whether the service thread still runs."""
        if self._listener is not None:
            thread = self._listener._thread
            return thread is not None and thread.is_alive()
        return self._thread is not None and self._thread.is_alive()
