"""What each piece of work saw of the request: one :class:`Hop` per place it ran.

A hop is observed *where the work runs* -- in the pool thread, in the audit
thread after the response, in the Celery worker -- from what that code can
see there: ``ctxrelay.request_id()``, ``ctxrelay.get("user")``, and, for a
call to another service, what that service says arrived on the wire.  Each
hop also logs one line through stdlib ``logging`` with ctxrelay's
``ContextFilter`` on the handler; the line it produced is kept with the hop,
so the report shows the log exactly as an operator would read it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import ctxrelay
from ctxrelay.integrations.logging import ContextFilter, install, uninstall

__all__ = [
    "AUDIT",
    "AUDIT_HOP",
    "CART_HOP",
    "CELERY",
    "CELERY_HOP",
    "HANDLER",
    "HANDLER_HOP",
    "HOPS",
    "HTTP",
    "LOG_FORMAT",
    "MEMBER_HOP",
    "RECORDER",
    "Hop",
    "LineRecorder",
    "attach_logging",
    "detach_logging",
    "left_ms",
    "logging_to_recorder",
    "observe",
]

#: The kinds of hop: the request thread, a call to another service from a
#: pool thread, the audit thread that runs after the response, the Celery task.
HANDLER = "handler"
HTTP = "http"
AUDIT = "audit"
CELERY = "celery"

#: The hops of one walk, in the order the report shows them.
HANDLER_HOP = "order handler"
MEMBER_HOP = "member addresses"
CART_HOP = "cart items"
AUDIT_HOP = "audit thread"
CELERY_HOP = "mail task (Celery)"
HOPS = (HANDLER_HOP, MEMBER_HOP, CART_HOP, AUDIT_HOP, CELERY_HOP)

#: How the shop's log lines look: the request id and user come from the
#: context, put on each record by ``ContextFilter`` (``-`` when there is none).
LOG_FORMAT = "%(levelname)s [%(request_id)s %(user)s] %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class Hop:
    """What one piece of work saw of the request, where it ran."""

    name: str
    kind: str
    pid: int
    thread: str
    #: From the context where the work ran.
    request_id: str | None
    user: str | None
    #: Did the user's session cookie reach this hop (for a call: arrive at the
    #: other service)?  The Celery task must *not* get it (see shop.policy).
    cookie: bool
    #: The canary tag that reached this hop, if any.
    canary: str | None
    #: What happened, in a few words.
    result: str
    #: The line this hop logged, as formatted by the shop's handler.
    log_line: str
    #: The HTTP status another service answered (calls only).
    status: int | None = None
    #: The ``x-request-id`` the other service says it received (calls only):
    #: the id in this hop's context is not proof that it went out on the wire.
    arrived_request_id: str | None = None
    #: Whether the work ran after the client had the whole response (audit only).
    after_response: bool | None = None
    #: Milliseconds the work had left when it started (``ctxrelay.remaining()``
    #: where it ran); ``None``: no deadline there.
    deadline_ms: int | None = None
    #: The milliseconds the other service says it received in the deadline
    #: header (calls only): the time left, as it travelled on the wire.
    arrived_deadline_ms: int | None = None
    #: A call cut at the deadline (``ctxrelay.DeadlineExceeded``) instead of answered.
    cut: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (also how a Celery worker sends its hop back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Hop:
        """The hop :meth:`to_dict` described."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class LineRecorder(logging.Handler):
    """Keeps the last line formatted for each hop (records carry ``extra={"hop": name}``).

    An ordinary handler: ctxrelay's ``ContextFilter`` is installed on it like
    on any other, so what it keeps is what a log file would hold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.lines: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.lines[str(getattr(record, "hop", ""))] = self.format(record)


RECORDER = LineRecorder()
_SHOP = logging.getLogger("shop")


def attach_logging() -> None:
    """Send the ``shop`` loggers' records to :data:`RECORDER`, through a ``ContextFilter``."""
    install(RECORDER, context_filter=ContextFilter(fields=["user"]))
    _SHOP.addHandler(RECORDER)
    _SHOP.setLevel(logging.INFO)
    _SHOP.propagate = False  # the report shows the lines; keep the terminal for it


def detach_logging() -> None:
    """Undo :func:`attach_logging`."""
    _SHOP.removeHandler(RECORDER)
    uninstall(RECORDER)
    _SHOP.setLevel(logging.NOTSET)
    _SHOP.propagate = True


@contextmanager
def logging_to_recorder() -> Iterator[None]:
    """:func:`attach_logging` for the duration of the block."""
    attach_logging()
    try:
        yield
    finally:
        detach_logging()


def observe(
    name: str,
    kind: str,
    log: logging.Logger,
    message: str,
    *,
    cookie: bool,
    canary: str | None,
    result: str,
    status: int | None = None,
    arrived_request_id: str | None = None,
    after_response: bool | None = None,
    deadline_ms: int | None = None,
    arrived_deadline_ms: int | None = None,
    cut: bool = False,
) -> Hop:
    """Log ``message`` and describe this hop, from the context current here.

    ``deadline_ms``: what the work had left when it started; by default,
    what is left now."""
    if deadline_ms is None:
        deadline_ms = left_ms()
    log.info(message, extra={"hop": name})
    return Hop(
        name=name,
        kind=kind,
        pid=os.getpid(),
        thread=threading.current_thread().name,
        request_id=ctxrelay.request_id(),
        user=ctxrelay.get("user"),
        cookie=cookie,
        canary=canary,
        result=result,
        log_line=RECORDER.lines.get(name, ""),
        status=status,
        arrived_request_id=arrived_request_id,
        after_response=after_response,
        deadline_ms=deadline_ms,
        arrived_deadline_ms=arrived_deadline_ms,
        cut=cut,
    )


def left_ms() -> int | None:
    """The milliseconds the current context has left; ``None``: no deadline."""
    left = ctxrelay.remaining()
    return None if left is None else max(0, int(left * 1000))
