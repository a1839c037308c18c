"""The real brokers the queue tests talk to, and worker processes to run on them.

Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (``make test`` starts
them with ``scripts/ensure-services``).  When one cannot be reached, a test
that needs it fails under ``CI=true`` and is skipped elsewhere, with one line
saying how to start it.  Workers are separate processes in their own process
group, always torn down: SIGTERM, then SIGKILL after a bounded wait.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import redis

__all__ = [
    "RABBITMQ_URL",
    "WorkerProcess",
    "need_rabbitmq",
    "need_redis",
    "need_redis_server",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"

_HOW = {
    6379: "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''",
    5672: "rabbitmq-server -detached",
}


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(name: str, port: int) -> None:
    if _reachable(port):
        return
    message = f"{name} is not running on 127.0.0.1:{port}; start it with: {_HOW[port]}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def need_redis_server() -> None:
    """Skip (or fail on CI) if Redis is down; for tests that touch no database
    (pub/sub channels are server-wide, not per database)."""
    _need("Redis", 6379)


def need_redis(db: int) -> str:
    """The URL of Redis database ``db``, emptied; skip (or fail on CI) if down."""
    _need("Redis", 6379)
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    return f"redis://127.0.0.1:6379/{db}"


def flush_redis(db: int) -> None:
    """Remove what a test module created in its Redis database."""
    if _reachable(6379):
        redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


def need_rabbitmq() -> str:
    """The RabbitMQ URL; skip (or fail on CI) if it is down."""
    _need("RabbitMQ", 5672)
    return RABBITMQ_URL


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``ready`` every 50 ms until it is true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


class WorkerProcess:
    """``python -m <args>`` in its own session, output to ``log``."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.args = [sys.executable, "-m", *args]
        self.log = log
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start it (again); the log is appended to."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def output(self) -> str:
        """Everything it has logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL its whole process group (a prefork worker and its children)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL if it is still there after 15 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
