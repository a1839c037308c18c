"""Dramatiq: a middleware carries the context to real worker processes.

The worker is ``python -m dramatiq`` on Redis, one process of two threads.
Every message is signed (``dramatiq_app.SECRET``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq import Message

import ctxrelay
from ctxrelay._signing import KEY, SIGNATURE, Signer, capture
from ctxrelay.integrations.dramatiq import ContextMiddleware, install, uninstall
from tests.brokers import WorkerProcess, flush_redis, need_redis, wait_until
from tests.integrations.dramatiq_app import SECRET, make_broker
from tests.integrations.fresh_ids import fresh, relayed

pytestmark = pytest.mark.broker

DB = 13
RUN = uuid.uuid4().hex[:8]
TIMEOUT_MS = 60_000


class DramatiqWorker:
    def __init__(self, backend: Any, actors: dict[str, Any], process: WorkerProcess) -> None:
        self.backend = backend
        self.actors = actors
        self.process = process

    def result(self, message: Any) -> Any:
        return message.get_result(backend=self.backend, block=True, timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DramatiqWorker]:
    url = need_redis(DB)
    queue = f"ctxrelay-dramatiq-{RUN}"
    broker, backend, actors = make_broker(url, queue)
    args = ["dramatiq", "tests.integrations.dramatiq_app:broker", "-p", "1", "-t", "2"]
    args += ["-Q", queue]
    env = {"CTXRELAY_TEST_BROKER": url, "CTXRELAY_TEST_QUEUE": queue}
    log = tmp_path_factory.mktemp("dramatiq") / "worker.log"
    process = WorkerProcess(args, log, env).start()
    try:
        yield DramatiqWorker(backend, actors, process)
    finally:
        process.stop()
        broker.close()
        flush_redis(DB)


def test_send_carries_the_context_to_the_worker(worker: DramatiqWorker) -> None:
    with ctxrelay.bind(request_id="r-dramatiq", tenant="acme"):
        message = worker.actors["fields"].send()
    fields = worker.result(message)
    assert relayed(fields) == {"request_id": "r-dramatiq", "tenant": "acme"}
    assert fields["message_id"] == message.message_id


def test_message_sent_outside_any_context_sees_only_its_message_id(
    worker: DramatiqWorker,
) -> None:
    message = worker.actors["fields"].send()
    assert fresh(worker.result(message)) == {"message_id": message.message_id}


def test_back_to_back_messages_in_the_worker_threads_do_not_bleed(worker: DramatiqWorker) -> None:
    sent: list[tuple[Message[Any], dict[str, str]]] = []
    for i in range(60):
        if i % 3 == 0:
            worker.actors["leaky"].send()
        if i % 2:
            sent.append((worker.actors["where"].send(), {}))
            continue
        with ctxrelay.bind(request_id=f"dq-b-{i}", user=f"u{i}"):
            sent.append(
                (worker.actors["where"].send(), {"request_id": f"dq-b-{i}", "user": f"u{i}"})
            )
    for message, expected in sent:
        assert relayed(worker.result(message)["fields"]) == expected


def test_retried_message_keeps_its_context(worker: DramatiqWorker, tmp_path: Path) -> None:
    with ctxrelay.bind(request_id="r-dq-retry"):
        message = worker.actors["fails_first"].send(str(tmp_path / "marker"))
    assert relayed(worker.result(message)) == {"request_id": "r-dq-retry"}


def test_delayed_message_keeps_its_context(worker: DramatiqWorker) -> None:
    with ctxrelay.bind(request_id="r-dq-delay"):
        message = worker.actors["fields"].send_with_options(delay=500)
    assert relayed(worker.result(message)) == {"request_id": "r-dq-delay"}


def test_pipeline_every_stage_sees_the_context(worker: DramatiqWorker) -> None:
    trail = worker.actors["trail"]
    with ctxrelay.bind(request_id="r-dq-pipe"):
        messages = [trail.message(), trail.message(), trail.message()]
        pipe: Any = dramatiq.pipeline(messages, broker=trail.broker)
        pipe.run()
    stages = pipe.get_result(block=True, timeout=TIMEOUT_MS)
    assert [relayed(f) for f in stages] == [{"request_id": "r-dq-pipe"}] * 3
    assert len({f["message_id"] for f in stages}) == 3


def _tampered(message_id: str) -> object:
    with ctxrelay.bind(request_id="r-bad", user="ada"):
        carrier = capture(message_id, Signer(SECRET))
    carrier["baggage"] = carrier["baggage"].replace("ada", "root")
    return carrier


def _unsigned(message_id: str) -> object:
    with ctxrelay.bind(request_id="r-bad"):
        carrier = capture(message_id, Signer(SECRET))
    del carrier[SIGNATURE]
    return carrier


BAD: dict[str, tuple[str, Callable[[str], object]]] = {
    "not-a-mapping": ("malformed", lambda _: "x-request-id=r-bad"),
    "oversized": ("malformed", lambda _: {"baggage": "a=" + "x" * 50_000}),
    "tampered": ("signature that does not match", _tampered),
    "unsigned": ("no signature", _unsigned),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_context_runs_with_an_empty_one_and_a_log_line(
    worker: DramatiqWorker, kind: str
) -> None:
    reason, make = BAD[kind]
    actor = worker.actors["fields"]
    message = actor.message()
    message.options[KEY] = make(message.message_id)  # kept as is: it already carries one
    actor.broker.enqueue(message)
    # None of the refused context: a fresh request id, made by the worker.
    assert fresh(worker.result(message)) == {"message_id": message.message_id}

    # The worker's log reaches its file asynchronously: wait for the line.
    def logged() -> bool:
        lines = worker.process.output().splitlines()
        return any(
            message.message_id in line and "ctxrelay" in line and reason in line for line in lines
        )

    wait_until(logged, "the worker's log line about the bad context")
    with ctxrelay.bind(request_id="r-dq-after-bad"):
        after = actor.send()
    assert relayed(worker.result(after)) == {"request_id": "r-dq-after-bad"}


def test_install_puts_one_middleware_first_and_uninstall_removes_it() -> None:
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    first = install(broker)
    assert install(broker) is first
    assert isinstance(broker.middleware[0], ContextMiddleware)
    assert sum(isinstance(m, ContextMiddleware) for m in broker.middleware) == 1
    uninstall(broker)
    uninstall(broker)
    assert not any(isinstance(m, ContextMiddleware) for m in broker.middleware)
    broker.close()


def test_the_old_name_of_the_broker_middleware_still_works_with_a_warning() -> None:
    import ctxrelay.integrations.dramatiq as integration

    with pytest.warns(DeprecationWarning, match="ContextMiddleware"):
        old = integration.RelayMiddleware
    assert old is ContextMiddleware
