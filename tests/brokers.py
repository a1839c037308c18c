"""The real brokers the queue tests talk to, and worker processes to run on them.

Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (``make test`` starts
them with ``scripts/ensure-services`` and leaves them running).  When one
cannot be reached, a test that needs it fails under ``CI=true`` and is skipped
elsewhere, with one line saying how to start it.  ``CTXRELAY_TEST_REDIS=host:port``
points the suite at another Redis (``make test-matrix`` starts a private one).

What the suite may write to Redis (the README lists it too):

* only the databases of :data:`REDIS_DATABASES`, 5 to 15 -- never 0 to 4;
* a test module claims its database with :func:`need_redis`, which writes the
  key :data:`OWNER_KEY` (this process's id) into it.  A database that holds
  keys without that mark is someone else's, and one that another live test
  run has claimed is in use: either way the test skips (fails under CI) and
  touches nothing.  A mark left by a run that has ended is that run's
  leftover: the database is emptied and claimed again;
* :func:`flush_redis` empties the database only if this process claimed it,
  so it removes only what the suite created, and leaves the mark set to
  ``released`` (a closing Celery connection may still write its bindings
  after it: the next claim empties them as the suite's leftovers).

Workers are separate processes in their own process group, always torn down:
SIGTERM, then SIGKILL after a bounded wait.
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
from typing import NoReturn

import pytest
import redis

__all__ = [
    "OWNER_KEY",
    "RABBITMQ_URL",
    "REDIS_DATABASES",
    "WorkerProcess",
    "flush_redis",
    "need_mqtt",
    "need_nats",
    "need_rabbitmq",
    "need_redis",
    "need_redis_server",
    "redis_url",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"

_REDIS_HOST, _, _port = os.environ.get("CTXRELAY_TEST_REDIS", "127.0.0.1:6379").rpartition(":")
REDIS_PORT = int(_port)

#: The Redis databases the suite may use, and who uses each.
REDIS_DATABASES = {
    5: "tests/integrations/test_queue_deadlines.py, tests/integrations/test_worker_fresh_id.py",
    6: "tests/integrations/test_sentry.py, tests/integrations/test_opentelemetry_spans.py",
    7: "tests/integrations/test_arq.py",
    8: "tests/integrations/test_taskiq.py",
    9: "tests/test_demo.py",
    10: "tests/integrations/test_celery_revoke.py",
    11: "tests/integrations/test_celery.py",
    12: "tests/integrations/test_rq.py",
    13: "tests/integrations/test_dramatiq.py",
    14: "tests/integrations/test_logging_end_to_end.py",
    15: "tests/test_docs.py",
}

#: The key that marks a database as claimed by a test run; its value is the pid.
OWNER_KEY = "ctxrelay-tests:owner"
#: Its value once the run emptied the database: the suite's, claimed by no one.
RELEASED = "released"

_HOW = {
    "Redis": f"redis-server --daemonize yes --bind 127.0.0.1 --port {REDIS_PORT} --save ''",
    "RabbitMQ": "rabbitmq-server -detached",
    "NATS": "nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/ctxrelay-nats &",
    "MQTT": "mosquitto -d -p 1883",
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _need(name: str, host: str, port: int) -> None:
    if not _reachable(host, port):
        _unavailable(f"{name} is not running on {host}:{port}; start it with: {_HOW[name]}")


def need_redis_server() -> None:
    """Skip (or fail on CI) if Redis is down; for tests that touch no database
    (pub/sub channels are server-wide, not per database)."""
    _need("Redis", _REDIS_HOST, REDIS_PORT)


def redis_url(db: int) -> str:
    """The URL of the suite's Redis database ``db`` (one of :data:`REDIS_DATABASES`)."""
    if db not in REDIS_DATABASES:
        raise ValueError(f"Redis database {db} is not one the suite documents: {REDIS_DATABASES}")
    return f"redis://{_REDIS_HOST}:{REDIS_PORT}/{db}"


def _client(db: int) -> redis.Redis:
    return redis.Redis(host=_REDIS_HOST, port=REDIS_PORT, db=db)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def need_redis(db: int) -> str:
    """Claim Redis database ``db`` for this run and return its URL, or skip
    (fail on CI) if Redis is down or the database is not the suite's to use."""
    url = redis_url(db)
    _need("Redis", _REDIS_HOST, REDIS_PORT)
    client = _client(db)
    mark = client.get(OWNER_KEY)
    where = f"Redis database {db} on {_REDIS_HOST}:{REDIS_PORT}"
    if mark is None:
        if client.dbsize() > 0:
            _unavailable(
                f"{where} holds {client.dbsize()} keys that ctxrelay's tests did not create "
                f"(no {OWNER_KEY!r} key); the tests leave them alone: empty it "
                f"(redis-cli -n {db} flushdb) if they are yours to lose"
            )
    else:
        pid = int(mark) if mark.isdigit() else 0
        if pid != os.getpid():
            if pid and _alive(pid):
                _unavailable(f"{where} is in use by another ctxrelay test run (pid {pid})")
            client.flushdb()  # a finished run's leftovers: everything here is the suite's
    client.set(OWNER_KEY, str(os.getpid()))
    return url


def flush_redis(db: int) -> None:
    """Empty Redis database ``db`` if this process claimed it: everything in it
    was created by the suite (see :func:`need_redis`)."""
    if not _reachable(_REDIS_HOST, REDIS_PORT):
        return
    client = _client(db)
    if client.get(OWNER_KEY) == str(os.getpid()).encode():
        client.flushdb()
        # A mark stays, released (no live run's pid): a Celery connection
        # still closing may write its bindings (_kombu.binding.*) after this,
        # and the next claim must know those keys as the suite's leftovers,
        # not as someone else's data -- nor as a run still using it.
        client.set(OWNER_KEY, RELEASED)


def need_rabbitmq() -> str:
    """The RabbitMQ URL; skip (or fail on CI) if it is down."""
    _need("RabbitMQ", "127.0.0.1", 5672)
    return RABBITMQ_URL


def need_nats() -> str:
    """The NATS URL (a server with JetStream on 127.0.0.1:4222); skip (or
    fail on CI) if it is down."""
    _need("NATS", "127.0.0.1", 4222)
    return "nats://127.0.0.1:4222"


def need_mqtt() -> tuple[str, int]:
    """(host, port) of the MQTT broker on 127.0.0.1:1883; skip (or fail on
    CI) if it is down."""
    _need("MQTT", "127.0.0.1", 1883)
    return "127.0.0.1", 1883


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
