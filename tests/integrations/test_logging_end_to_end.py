"""Issue 6, end to end: every log line of a request carries that request's id.

A FastAPI app behind ctxrelay's ``RelayMiddleware``, served by a real
uvicorn on 127.0.0.1, handles many concurrent requests, each sent with its
own id.  Each handler logs, fans out to a ``ctxrelay.ThreadPoolExecutor``
whose tasks log, and publishes a Celery task that logs in a real worker
process (prefork, two children) on real Redis -- with stdlib ``logging``,
structlog and loguru alike.  The id a request was sent with also travels as
plain data (``expect``), so each line can be checked against it: every line
carries its own request's id, none another's, and no line is missing.

The worker's stdlib setup is the Celery snippet of ``docs/logging.md``, run
as written (see ``logging_celery_app``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from celery import Celery  # type: ignore[import-untyped]
from celery.result import AsyncResult  # type: ignore[import-untyped]
from fastapi import FastAPI
from loguru import logger as loguru_logger

import ctxrelay
from ctxrelay.integrations.asgi import RelayMiddleware
from ctxrelay.integrations.celery import uninstall
from ctxrelay.integrations.logging import install
from ctxrelay.integrations.loguru import patcher
from ctxrelay.integrations.structlog import merge_context
from tests.brokers import WorkerProcess, flush_redis, need_redis
from tests.integrations.celery_app import SECRET
from tests.integrations.logging_celery_app import STDLIB_LINE, TASK, make_app
from tests.servers import fire, serve_asgi

pytestmark = pytest.mark.broker

DB = 14  # this module's Redis database; the other queue tests use 9-13
RUN = uuid.uuid4().hex[:8]
REQUESTS = 60
POOL_TASKS = 3
TIMEOUT = 60
LIBRARIES = ("stdlib", "structlog", "loguru")

#: ``(id on the line, where it was logged, the id its request was sent with)``
Line = tuple[str, str, str]

_WEB_LINE = re.compile(r"(?P<rid>\S+) (?P<where>\S+) expect=(?P<expect>\S+)")


class WebLogs:
    """The web process's three loggers, each writing ``<id> <where> expect=<id>``."""

    def __init__(self) -> None:
        self.stdlib_out = io.StringIO()
        handler = logging.StreamHandler(self.stdlib_out)
        handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
        install(handler)
        self.stdlib = logging.getLogger(f"tests.e2e.{RUN}")
        self.stdlib.propagate = False
        self.stdlib.setLevel(logging.INFO)
        self.stdlib.addHandler(handler)
        self.structlog_out = io.StringIO()
        self.structlog = structlog.wrap_logger(
            structlog.PrintLogger(self.structlog_out),
            processors=[merge_context, structlog.processors.JSONRenderer()],
        )
        self.loguru_lines: list[str] = []
        self.loguru = loguru_logger.bind(e2e=RUN).patch(patcher)
        self._loguru_sink = loguru_logger.add(
            self.loguru_lines.append,
            format="{extra[request_id]} {message}",
            filter=lambda record: record["extra"].get("e2e") == RUN,
        )

    def log(self, where: str, expect: str) -> None:
        """One line with each library."""
        self.stdlib.info("%s expect=%s", where, expect)
        self.structlog.info(where, expect=expect)
        self.loguru.info("{} expect={}", where, expect)

    def lines(self) -> dict[str, list[Line]]:
        """What each library wrote, parsed."""
        structlog_lines = [json.loads(line) for line in self.structlog_out.getvalue().splitlines()]
        return {
            "stdlib": _parse_web(self.stdlib_out.getvalue().splitlines()),
            "structlog": [
                (e.get("request_id", "-"), e["event"], e["expect"]) for e in structlog_lines
            ],
            "loguru": _parse_web(line.rstrip("\n") for line in self.loguru_lines),
        }

    def close(self) -> None:
        loguru_logger.remove(self._loguru_sink)
        for handler in list(self.stdlib.handlers):
            self.stdlib.removeHandler(handler)


def _parse_web(lines: Any) -> list[Line]:
    parsed = []
    for line in lines:
        match = _WEB_LINE.fullmatch(line)
        assert match, f"unexpected web log line: {line!r}"
        parsed.append((match["rid"], match["where"], match["expect"]))
    return parsed


def make_api(logs: WebLogs, pool: ctxrelay.ThreadPoolExecutor, celery: Celery) -> Any:
    """The app under test: log, fan out to the pool, publish the task."""
    api = FastAPI()

    @api.get("/order")
    async def order(expect: str) -> dict[str, str]:
        logs.log("handler", expect)
        futures: list[Future[None]] = [
            pool.submit(logs.log, f"pool-{i}", expect) for i in range(POOL_TASKS)
        ]
        task = celery.signature(TASK, (expect,)).delay()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return {"task": task.id}

    return RelayMiddleware(api)


@dataclass
class Outcome:
    """What one run produced: the ids sent, the tasks' answers, every line."""

    sent: list[str]
    answers: dict[str, str]  # expect -> request id the task saw
    lines: dict[str, list[Line]]  # library -> lines from web and worker


def _worker_lines(logs: Path, worker_log: str) -> dict[str, list[Line]]:
    stdlib = [(m["rid"], "worker", m["expect"]) for m in STDLIB_LINE.finditer(worker_log)]
    structlog_lines = []
    for path in sorted(logs.glob("structlog-*.log")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            structlog_lines.append((event.get("request_id", "-"), event["event"], event["expect"]))
    loguru_lines = []
    for path in sorted(logs.glob("loguru-*.log")):
        for line in path.read_text().splitlines():
            rid, message = line.split(" ", 1)
            where, expect = message.split(" expect=")
            loguru_lines.append((rid, where, expect))
    return {"stdlib": stdlib, "structlog": structlog_lines, "loguru": loguru_lines}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    broker = need_redis(DB)
    tmp = tmp_path_factory.mktemp("logging-e2e")
    logs = tmp / "logs"
    logs.mkdir()
    queue = f"ctxrelay-logging-e2e-{RUN}"
    celery = make_app(broker, broker, queue, SECRET)
    args = ["celery", "-A", "tests.integrations.logging_celery_app", "worker", "-P", "prefork"]
    args += ["-c", "2", "-Q", queue, "-n", f"logging-e2e-{RUN}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_E2E_BROKER": broker, "CTXRELAY_E2E_QUEUE": queue}
    env |= {"CTXRELAY_E2E_LOGS": str(logs), "CTXRELAY_E2E_SECRET": SECRET}
    worker = WorkerProcess(args, tmp / "worker.log", env).start()
    web = WebLogs()
    pool = ctxrelay.ThreadPoolExecutor(max_workers=8)
    try:
        # Ready when it has served a task; published outside any request, it
        # runs with a fresh request id of its own (not the default "-").
        fresh = celery.signature(TASK, ("ready",)).delay().get(timeout=TIMEOUT)
        assert fresh != "-"
        with serve_asgi(make_api(web, pool, celery)) as url:
            replies = fire(url, "/order", REQUESTS, params=lambda rid: {"expect": rid})
        assert all(reply.status_code == 200 for _, reply in replies)
        answers = {
            rid: AsyncResult(reply.json()["task"], app=celery).get(timeout=TIMEOUT)
            for rid, reply in replies
        }
        worker_log = worker.output()
        assert "Logging error" not in worker_log, worker_log[-3000:]
        web_lines, worker_lines = web.lines(), _worker_lines(logs, worker_log)
        lines = {lib: web_lines[lib] + worker_lines[lib] for lib in LIBRARIES}
        yield Outcome([rid for rid, _ in replies], answers, lines)
    finally:
        web.close()
        pool.shutdown(wait=True)
        worker.stop()
        uninstall(celery)
        flush_redis(DB)


def test_the_celery_task_of_each_request_saw_that_requests_id(outcome: Outcome) -> None:
    assert len(set(outcome.sent)) == REQUESTS
    assert outcome.answers == {rid: rid for rid in outcome.sent}


@pytest.mark.parametrize("library", LIBRARIES)
def test_every_line_of_handler_pool_and_worker_carries_its_own_requests_id(
    outcome: Outcome, library: str
) -> None:
    lines = outcome.lines[library]
    ready = [line for line in lines if line[2] == "ready"]
    # Outside any request: the worker's fresh id, no request's.
    assert len(ready) == 1
    assert ready[0][1:] == ("worker", "ready")
    assert ready[0][0] not in {"-", *outcome.sent}
    mine = [line for line in lines if line[2] != "ready"]
    wrong = [line for line in mine if line[0] != line[2]]
    assert not wrong, f"{len(wrong)} {library} lines carry another id, e.g. {wrong[:3]}"
    # None missing, none twice: every request logged in each place exactly once.
    expected = Counter(
        (rid, where)
        for rid in outcome.sent
        for where in ("handler", *(f"pool-{i}" for i in range(POOL_TASKS)), "worker")
    )
    assert Counter((expect, where) for _, where, expect in mine) == expected
