"""The asynchronous work of the story: a Celery task that mails the confirmation.

The task runs in a Celery worker, far from the request: all it knows of the
request is what its message carried.  With ctxrelay's Celery integration
installed (:func:`ctxrelay.integrations.celery.install`) the message carries
the request id, the user and the canary tag -- not the session cookie, which
the shop's policy keeps out of the broker.

Two workers are offered:

* :func:`embedded_worker` -- the default, needing no service: Celery's
  in-memory broker and result backend, and a worker thread in this process
  (``celery.contrib.testing.worker.start_worker``).  Messages still go
  through the broker, encoded and decoded like any other.
* :func:`worker_process` -- for ``--broker redis://...`` or ``amqp://...``:
  a real broker and a separate worker process (``python -m
  ctxrelay.demo.worker``).  Results come back through Redis itself, or,
  on RabbitMQ, through Celery's RPC backend (reply messages on the same
  broker): Celery 5 has no AMQP result backend, so the broker URL cannot be
  the backend there.

:func:`collect` reads a task's result and leaves nothing of it behind, so
that one walk of the demo cannot disturb the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.backends.rpc import RPCBackend  # type: ignore[import-untyped]
from celery.contrib.testing.worker import start_worker  # type: ignore[import-untyped]
from kombu.utils.url import maybe_sanitize_url

import ctxrelay

from .hops import CELERY, CELERY_HOP, observe
from .shop import CANARY

__all__ = [
    "TASK",
    "BrokerUnreachable",
    "UnsupportedBroker",
    "Worker",
    "backend_for",
    "collect",
    "embedded_worker",
    "make_app",
    "send_confirmation",
    "shown",
    "worker_process",
]

#: The task's registered name, the same in the publisher and in the worker.
TASK = "shop.send_confirmation"

_log = logging.getLogger("shop.mail")


def send_confirmation(order_id: str) -> dict[str, Any]:
    """Mail the order confirmation to the user, with the canary template if tagged.

    Returns the hop it observed, so the demo can show what the worker saw.
    """
    user = ctxrelay.get("user")
    canary = ctxrelay.get("x-gray")
    template = "canary" if canary == CANARY else "stable"
    if user is None:
        result = f"no user to mail {order_id} to"
        message = f"cannot send the confirmation of {order_id}: no user"
    else:
        result = f"mailed {order_id} to {user} ({template} template)"
        message = f"sending the confirmation of {order_id} to {user}, {template} template"
    hop = observe(
        CELERY_HOP,
        CELERY,
        _log,
        message,
        cookie=ctxrelay.get("cookie") is not None,
        canary=canary,
        result=result,
    )
    return hop.to_dict()


class UnsupportedBroker(Exception):
    """The ``--broker`` given is neither Redis nor AMQP: said at once."""


#: Broker URL schemes the demo knows a result backend for.
_REDIS = ("redis", "rediss")
_AMQP = ("amqp", "amqps", "pyamqp")


def backend_for(broker: str | None) -> str:
    """Where the task's result goes back: memory, the Redis broker itself, or
    RPC reply messages on an AMQP broker (Celery 5 has no AMQP result backend).

    Raises :class:`UnsupportedBroker` for any other broker."""
    if broker is None:
        return "cache+memory://"
    scheme = broker.partition("://")[0].lower()
    if scheme in _REDIS:
        return broker
    if scheme in _AMQP:
        return "rpc://"
    shown_url = str(maybe_sanitize_url(broker))
    raise UnsupportedBroker(
        f"unsupported broker {shown_url}: use redis://... or amqp://... (or no --broker)"
    )


def make_app(broker: str | None, queue: str) -> Celery:
    """The shop's Celery app on ``broker`` (``None``: in memory), publishing to ``queue``."""
    app = Celery(
        "ctxrelay-demo",
        broker=broker or "memory://localhost/",
        backend=backend_for(broker),
        set_as_current=False,
    )
    app.conf.update(
        task_default_queue=queue,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )
    if broker is None:
        # The in-memory transport polls; the default (1 s) would dominate the demo.
        app.conf.broker_transport_options = {"polling_interval": 0.01}
    app.task(name=TASK)(send_confirmation)
    return app


def collect(published: Any, timeout: float) -> Any:
    """The result of the task ``published``, once its worker has reported it
    (at most ``timeout`` seconds); then the result is forgotten, and on
    RabbitMQ its reply queue deleted.

    It polls (``ready()``) rather than waiting in ``get()``, and that is the
    point.  Celery's RPC backend receives replies on a queue named after the
    *publishing thread* -- the process, the thread's ident, the app -- and the
    consumer that ``get()`` opens stays subscribed for the rest of the
    process.  Thread idents are reused once a thread has ended: the order
    handler of a later walk, on a fresh thread, can get an earlier handler's
    ident and so its reply queue, which still has the earlier walk's consumer
    on it; RabbitMQ then hands the new reply to either consumer -- often the
    stale one -- and ``get()`` times out.  Polling opens no consumer, and the queue is
    deleted once its reply is read: nothing of one walk is left to catch the
    next one's result.  (The next publish declares the queue again.)
    """
    until = time.monotonic() + timeout
    try:
        while not published.ready():
            if time.monotonic() >= until:
                raise TimeoutError(f"no result within {timeout:g} s")
            time.sleep(0.02)
        return published.get(timeout=timeout)  # ready: read from its cache
    finally:
        # A real result backend keeps it otherwise; Celery before 5.4 raises
        # NotImplementedError for RPC results, which get() consumed already.
        with contextlib.suppress(NotImplementedError):
            published.forget()
        _delete_reply_queue(published.backend)


def _delete_reply_queue(backend: Any) -> None:
    if not isinstance(backend, RPCBackend):
        return  # Redis and memory results are keys: forget() removed them
    try:
        with backend.app.connection_for_write() as connection:
            backend.binding(connection.default_channel).delete()
    except Exception as exc:
        print(f"ctxrelay demo: could not delete the reply queue: {exc!r}", file=sys.stderr)


def shown(app: Celery) -> str:
    """``app``'s broker URL as the demo prints it: the password masked, as Celery does."""
    return str(maybe_sanitize_url(str(app.conf.broker_url)))


@dataclass(frozen=True)
class Worker:
    """A running worker: what to call it in the report, and where its output goes."""

    description: str
    log: Path | None = None

    def output(self) -> str:
        """What a worker process has printed so far (empty for a thread)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")


@contextmanager
def embedded_worker(app: Celery) -> Iterator[Worker]:
    """A Celery worker thread in this process, on ``app``'s in-memory broker."""
    with start_worker(app, perform_ping_check=False, loglevel="WARNING", shutdown_timeout=15):
        yield Worker(
            "a worker thread in this process (celery.contrib.testing.worker, solo pool),"
            f" in-memory broker {app.conf.broker_url}"
        )


class BrokerUnreachable(Exception):
    """The ``--broker`` given cannot be reached: said at once, not after retries."""


def _reach(app: Celery) -> None:
    broker = shown(app)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        raise BrokerUnreachable(f"cannot reach the broker {broker}: {exc}") from exc


@contextmanager
def worker_process(app: Celery, queue: str) -> Iterator[Worker]:
    """``python -m ctxrelay.demo.worker`` on ``app``'s broker, serving ``queue``;
    on exit it is stopped (SIGTERM, then SIGKILL) and the queue deleted.
    Raises :class:`BrokerUnreachable` first if the broker does not answer."""
    _reach(app)
    broker = str(app.conf.broker_url)  # the worker needs the password; output never shows it
    handle, name = tempfile.mkstemp(prefix="ctxrelay-demo-worker-", suffix=".log")
    log = Path(name)
    command = [sys.executable, "-m", "ctxrelay.demo.worker", "--broker", broker, "--queue", queue]
    with os.fdopen(handle, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield Worker(
            f"worker process pid {process.pid} (python -m ctxrelay.demo.worker, solo pool),"
            f" broker {shown(app)}, queue {queue}",
            log,
        )
    finally:
        _stop(process)
        log.unlink(missing_ok=True)
        _delete_queue(app, queue)


def _delete_queue(app: Celery, queue: str) -> None:
    # Leave the user's broker as it was: the queue was the demo's alone.
    try:
        with app.connection_for_write() as connection:
            # Declared first, so that a virtual transport (Redis) knows the
            # bindings it must remove with it.
            bound = app.amqp.queues[queue](connection.default_channel)
            bound.declare()
            bound.delete()
    except Exception as exc:
        print(f"ctxrelay demo: could not delete queue {queue}: {exc!r}", file=sys.stderr)


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Its own session, so the signal reaches only the worker we started.
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # Celery's warm shutdown
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
