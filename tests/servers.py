"""Real servers on 127.0.0.1, run in-process on a free port, for the web tests.

``serve_asgi(app)`` runs uvicorn, ``serve_wsgi(app)`` runs waitress (a real
threaded WSGI server: its worker threads serve request after request, which
is what the WSGI tests need to prove nothing leaks from one to the next).
Each yields the base URL and stops the server on exit; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
import waitress.server  # type: ignore[import-untyped]

import ctxrelay

__all__ = [
    "CONNECTIONS",
    "WAIT",
    "Mailbox",
    "RecordingHandler",
    "fire",
    "new_id",
    "recording",
    "serve_asgi",
    "serve_wsgi",
]

#: Requests in flight at once in the concurrency tests (the rest wait their turn).
CONNECTIONS = 64
#: Seconds: the upper bound of every wait on background work.
WAIT = 10.0


def new_id(prefix: str = "req") -> str:
    """A fresh, distinct request id the tests send."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


_START_TIMEOUT = 20.0


def _wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {_START_TIMEOUT} s")
        time.sleep(0.01)


@contextmanager
def serve_asgi(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port>; yield the base URL."""
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "off", "access_log": False}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **options))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started or not thread.is_alive(), "uvicorn")
        if not server.started:
            raise RuntimeError("uvicorn failed to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextmanager
def serve_wsgi(app: Any, *, threads: int = 8) -> Iterator[str]:
    """Serve ``app`` with waitress (``threads`` workers) on 127.0.0.1:<free port>."""
    server = waitress.server.create_server(
        app, host="127.0.0.1", port=0, threads=threads, connection_limit=1000, backlog=1024
    )
    port = server.effective_port
    closing = threading.Event()

    def run() -> None:
        try:
            server.run()
        except OSError:
            # Closing the listening socket from this thread races waitress's
            # select() in its own: EBADF there is the shutdown, not a failure.
            if not closing.is_set():
                raise

    thread = threading.Thread(target=run, name="waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        closing.set()
        server.close()
        thread.join(timeout=15)


class RecordingHandler(logging.Handler):
    """Keeps ``(message, request id bound when it was logged)`` for each record.

    ``logging`` calls handlers in the thread and context that logged, so the
    id seen here is the one a context filter would stamp on the line.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str | None]] = []
        self.records: list[logging.LogRecord] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        line = (record.getMessage(), ctxrelay.request_id())
        with self._changed:
            self.lines.append(line)
            self.records.append(record)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> None:
        """Wait (bounded) until a line whose message matches ``predicate`` arrives:
        a server may log after the client already has its response."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(predicate(message) for message, _ in self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching log line within {timeout} s")
                self._changed.wait(left)


@contextmanager
def recording(*names: str, level: int = logging.INFO) -> Iterator[RecordingHandler]:
    """Attach a :class:`RecordingHandler` to loggers ``names`` for the block."""
    handler = RecordingHandler()
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        yield handler
    finally:
        for lg, lvl in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(lvl)


class Mailbox:
    """Results posted by work that runs after the response, with bounded waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: dict[str, Any] = {}
        self.gates: dict[str, threading.Event] = {}

    def gate(self, key: str) -> threading.Event:
        with self._cond:
            return self.gates.setdefault(key, threading.Event())

    def post(self, key: str, value: Any) -> None:
        with self._cond:
            self.items[key] = value
            self._cond.notify_all()

    def wait(self, keys: list[str]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while not all(k in self.items for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [k for k in keys if k not in self.items]
                    raise AssertionError(f"{len(missing)} results never arrived: {missing[:3]}")
                self._cond.wait(left)
            return {k: self.items[k] for k in keys}


def fire(
    url: str,
    path: str,
    count: int,
    params: Callable[[str], dict[str, str]] | None = None,
    header: str = "x-request-id",
) -> list[tuple[str, httpx.Response]]:
    """Send ``count`` GET requests at once, each with its own new id in
    ``header``; return ``(id, response)`` pairs.  At most :data:`CONNECTIONS`
    are on the wire at a time (the semaphore also keeps httpcore's pool from
    queueing, which is slow with hundreds waiting)."""

    async def main() -> list[tuple[str, httpx.Response]]:
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        slots = asyncio.Semaphore(CONNECTIONS)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one() -> tuple[str, httpx.Response]:
                rid = new_id()
                query = params(rid) if params else None
                async with slots:
                    return rid, await client.get(path, headers={header: rid}, params=query)

            return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(main())


def call(app: Any, scope: MutableMapping[str, Any]) -> list[dict[str, Any]]:
    """Run one ASGI call that never suspends, synchronously; return what was sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    coro = app(scope, receive, send)
    try:
        coro.send(None)
    except StopIteration:
        return sent
    coro.close()
    raise AssertionError("the probe app suspended")
