"""Celery: the context reaches real workers on real brokers, and leaves with the task.

Workers are separate ``python -m celery worker`` processes (prefork, threads,
solo) on Redis (broker and result backend) and RabbitMQ, started once per
module.  Every message is signed (see ``celery_app.SECRET``).  Celery's known
holes are each tested: custom headers not where documented (celery #4875),
lost on retry (#7523), eager mode (#1874), chord callbacks published from
another task.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, signals  # type: ignore[import-untyped]
from celery.result import AsyncResult, ResultSet  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay._signing import (
    KEY,
    SIGNATURE,
    Signer,
    binding,
    capture,
    restore,
)
from ctxrelay.integrations.celery import install, uninstall
from tests.brokers import WorkerProcess, flush_redis, need_rabbitmq, need_redis, wait_until
from tests.integrations.celery_app import SECRET, make_app
from tests.integrations.fresh_ids import fresh, relayed

pytestmark = pytest.mark.broker

DB = 11  # this module's Redis database; the RQ and Dramatiq tests use others
RUN = uuid.uuid4().hex[:8]  # this run's queue names: parallel runs do not collide
TIMEOUT = 60

_apps: list[Celery] = []


class Worker:
    """A Celery worker process and the app that publishes to it."""

    def __init__(self, app: Celery, process: WorkerProcess) -> None:
        self.app = app
        self.process = process

    def task(self, name: str) -> Any:
        return self.app.signature(name)

    def run(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.signature(name, args).apply_async(**options).get(timeout=TIMEOUT)


def _start(tmp: Path, broker: str, backend: str, pool: str, concurrency: int, name: str) -> Worker:
    queue = f"ctxrelay-celery-{name}-{RUN}"
    app = make_app(broker, backend, queue)
    _apps.append(app)
    args = ["celery", "-A", "tests.integrations.celery_app", "worker", "-P", pool]
    args += ["-c", str(concurrency), "-Q", queue, "-n", f"{name}-{RUN}@%h", "-l", "info"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"CTXRELAY_TEST_BROKER": broker, "CTXRELAY_TEST_BACKEND": backend}
    env["CTXRELAY_TEST_QUEUE"] = queue
    worker = Worker(app, WorkerProcess(args, tmp / f"{name}.log", env).start())
    try:
        worker.run("t.fields")  # ready: it served a task
    except BaseException:
        worker.process.stop()
        raise
    return worker


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = need_redis(DB)
    yield url
    flush_redis(DB)


@contextmanager
def _worker(
    tmp_path_factory: pytest.TempPathFactory, broker: str, backend: str, pool: str, n: int
) -> Iterator[Worker]:
    worker = _start(tmp_path_factory.mktemp(pool), broker, backend, pool, n, pool)
    try:
        yield worker
    finally:
        worker.process.stop()
        if broker.startswith("amqp"):  # Redis queues go with the flushed database
            with worker.app.connection_for_write() as connection:
                connection.default_channel.queue_delete(worker.app.conf.task_default_queue)
        uninstall(worker.app)
        _apps.remove(worker.app)


@pytest.fixture(scope="module")
def prefork(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    with _worker(tmp_path_factory, redis_url, redis_url, "prefork", 4) as worker:
        yield worker


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    with _worker(tmp_path_factory, redis_url, redis_url, "solo", 1) as worker:
        yield worker


@pytest.fixture(scope="module")
def threads(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    with _worker(tmp_path_factory, redis_url, redis_url, "threads", 2) as worker:
        yield worker


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Worker]:
    broker = need_rabbitmq()
    with _worker(tmp_path_factory, broker, redis_url, "prefork", 1) as worker:
        yield worker


# -- the plain path ----------------------------------------------------------
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_delay_carries_the_publishers_context_to_the_worker(
    pool: str, request: pytest.FixtureRequest
) -> None:
    worker: Worker = request.getfixturevalue(pool)
    with ctxrelay.bind(request_id=f"r-{pool}", tenant="acme", user="ada"):
        result = worker.task("t.fields").delay()
    fields = result.get(timeout=TIMEOUT)
    assert relayed(fields) == {"request_id": f"r-{pool}", "tenant": "acme", "user": "ada"}
    assert fields["task_id"] == result.id


def test_task_published_outside_any_context_sees_only_its_own_task_ids(
    prefork: Worker,
) -> None:
    result = prefork.task("t.fields").delay()
    fields = result.get(timeout=TIMEOUT)
    assert fresh(fields) == {"task_id": result.id, "task_root_id": result.id}


def test_send_task_by_name_carries_the_context(prefork: Worker) -> None:
    with ctxrelay.bind(request_id="r-send-task"):
        result = prefork.app.send_task("t.fields")
    assert relayed(result.get(timeout=TIMEOUT)) == {"request_id": "r-send-task"}


def test_rabbitmq_broker_carries_the_context(rabbit: Worker) -> None:
    with ctxrelay.bind(request_id="r-amqp", tenant="acme"):
        result = rabbit.task("t.fields").delay()
    assert relayed(result.get(timeout=TIMEOUT)) == {"request_id": "r-amqp", "tenant": "acme"}


@pytest.mark.parametrize("protocol", [1, 2])
def test_both_message_protocols_carry_the_context(prefork: Worker, protocol: int) -> None:
    # celery #4875: custom headers land in different places per protocol.
    prefork.app.conf.task_protocol = protocol
    try:
        with ctxrelay.bind(request_id=f"r-protocol-{protocol}"):
            result = prefork.task("t.fields").delay()
    finally:
        prefork.app.conf.task_protocol = 2
    assert relayed(result.get(timeout=TIMEOUT)) == {"request_id": f"r-protocol-{protocol}"}


# -- canvas ------------------------------------------------------------------
def test_chain_every_link_sees_the_context_and_its_own_task_ids(prefork: Worker) -> None:
    trail = prefork.task("t.trail")
    with ctxrelay.bind(request_id="r-chain", user="ada"):
        result = chain(trail.clone(), trail.clone(), trail.clone()).apply_async()
    links = result.get(timeout=TIMEOUT)
    assert [relayed(f) for f in links] == [{"request_id": "r-chain", "user": "ada"}] * 3
    # Each link has its own id; the parent is the previous link, the root the first.
    ids = [f["task_id"] for f in links]
    assert len(set(ids)) == 3
    assert [f.get("task_parent_id") for f in links[1:]] == ids[:2]
    assert {f["task_root_id"] for f in links} == {ids[0]}


def test_group_every_member_sees_the_context(prefork: Worker) -> None:
    fields = prefork.task("t.fields")
    with ctxrelay.bind(request_id="r-group"):
        result = group(fields.clone() for _ in range(6)).apply_async()
    members = result.get(timeout=TIMEOUT)
    assert [relayed(f) for f in members] == [{"request_id": "r-group"}] * 6
    assert len({f["task_id"] for f in members}) == 6


def test_chord_header_and_callback_see_the_context(prefork: Worker) -> None:
    # The callback is published by whichever header task finishes last.
    fields = prefork.task("t.fields")
    with ctxrelay.bind(request_id="r-chord", tenant="acme"):
        result = chord([fields.clone() for _ in range(4)], prefork.task("t.gather")).apply_async()
    outcome = result.get(timeout=TIMEOUT)
    expected = {"request_id": "r-chord", "tenant": "acme"}
    assert [relayed(f) for f in outcome["header"]] == [expected] * 4
    assert relayed(outcome["callback"]) == expected


def test_link_callback_sees_the_context(prefork: Worker) -> None:
    callback_id = uuid.uuid4().hex
    with ctxrelay.bind(request_id="r-link"):
        parent = prefork.task("t.trail").apply_async(
            link=prefork.task("t.trail").set(task_id=callback_id)
        )
    parent.get(timeout=TIMEOUT)
    links = AsyncResult(callback_id, app=prefork.app).get(timeout=TIMEOUT)
    assert [relayed(f) for f in links] == [{"request_id": "r-link"}] * 2
    assert links[1]["task_parent_id"] == parent.id


def test_link_error_errback_sees_the_context(prefork: Worker) -> None:
    errback_id = uuid.uuid4().hex
    with ctxrelay.bind(request_id="r-link-error"):
        failing = prefork.task("t.boom").apply_async(
            link_error=prefork.task("t.errback_by_id").set(task_id=errback_id)
        )
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    fields = AsyncResult(errback_id, app=prefork.app).get(timeout=TIMEOUT)
    assert fields["failed"] == failing.id
    assert fields["request_id"] == "r-link-error"


# -- retries and delays -----------------------------------------------------
@pytest.mark.parametrize("task", ["t.retry_explicit", "t.retry_auto"])
def test_retry_with_countdown_keeps_the_context(prefork: Worker, task: str) -> None:
    # celery #7523: the retried message must still carry the context.
    with ctxrelay.bind(request_id=f"r-{task}", user="ada"):
        result = prefork.task(task).delay()
    outcome = result.get(timeout=TIMEOUT)
    assert outcome["retries"] == 1
    assert relayed(outcome["fields"]) == {"request_id": f"r-{task}", "user": "ada"}
    assert outcome["fields"]["task_id"] == result.id


@pytest.mark.parametrize("delay", ["countdown", "eta"])
def test_countdown_and_eta_keep_the_context(prefork: Worker, delay: str) -> None:
    import datetime

    options: dict[str, Any] = (
        {"countdown": 1}
        if delay == "countdown"
        else {"eta": datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)}
    )
    with ctxrelay.bind(request_id=f"r-{delay}"):
        result = prefork.task("t.fields").apply_async(**options)
    assert relayed(result.get(timeout=TIMEOUT)) == {"request_id": f"r-{delay}"}


# -- isolation ---------------------------------------------------------------
def test_2000_tasks_through_4_processes_each_see_their_own_context(prefork: Worker) -> None:
    where = prefork.task("t.where")
    results: list[tuple[int, Any]] = []
    for i in range(2000):
        if i % 10 == 9:
            results.append((i, where.apply_async()))  # published with no context
            continue
        with ctxrelay.bind(request_id=f"stress-{i}", user=f"u{i}"):
            results.append((i, where.apply_async()))
    outcomes = ResultSet([r for _, r in results], app=prefork.app).get(timeout=120)
    pids = set()
    for (i, result), outcome in zip(results, outcomes, strict=True):
        pids.add(outcome["pid"])
        expected = {} if i % 10 == 9 else {"request_id": f"stress-{i}", "user": f"u{i}"}
        assert relayed(outcome["fields"]) == expected, i
        assert outcome["fields"]["task_id"] == result.id
    assert len(pids) > 1  # the work really spread over the pool's processes


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_back_to_back_tasks_in_one_thread_do_not_bleed(
    pool: str, request: pytest.FixtureRequest
) -> None:
    worker: Worker = request.getfixturevalue(pool)
    where = worker.task("t.where")
    outcomes: list[tuple[str | None, dict[str, Any]]] = []
    for i in range(40):
        if i % 2:
            outcomes.append((None, where.apply_async().get(timeout=TIMEOUT)))
        elif i % 4 == 0:
            worker.run("t.leaky")  # binds without ever unbinding
            outcomes.append((None, where.apply_async().get(timeout=TIMEOUT)))
        else:
            with ctxrelay.bind(request_id=f"b-{pool}-{i}"):
                result = where.apply_async()
            outcomes.append((f"b-{pool}-{i}", result.get(timeout=TIMEOUT)))
    threads_used = {(o["pid"], o["thread"]) for _, o in outcomes}
    assert len(threads_used) <= 2  # the same one or two threads served them all
    for rid, outcome in outcomes:
        assert relayed(outcome["fields"]) == ({} if rid is None else {"request_id": rid})


def test_failure_and_retry_log_lines_carry_the_request_id(solo: Worker) -> None:
    with ctxrelay.bind(request_id="r-fails"):
        failing = solo.task("t.boom").delay()
        retried = solo.task("t.retry_explicit").delay()
    with pytest.raises(ValueError, match="boom"):
        failing.get(timeout=TIMEOUT)
    retried.get(timeout=TIMEOUT)
    clean = solo.run("t.fields")
    assert relayed(clean) == {}
    log = solo.process.output().splitlines()
    assert any("[rid=r-fails]" in line and "about to fail" in line for line in log)
    assert any("[rid=r-fails]" in line and "raised unexpected" in line for line in log)
    assert any("[rid=r-fails]" in line and "retry" in line.lower() for line in log)
    # Nothing bled into the worker thread: the next task's lines carry its
    # own fresh id, the consumer's "received" line (outside it) none.
    mentions = [line for line in log if clean["task_id"] in line]
    assert mentions
    fresh(clean)
    own = {"[rid=-]", f"[rid={clean['request_id']}]"}
    assert all(any(rid in line for rid in own) for line in mentions), mentions


def test_process_pool_inside_a_task_relays_the_task_context(threads: Worker) -> None:
    with ctxrelay.bind(request_id="r-process-pool", tenant="acme"):
        result = threads.task("t.in_process_pool").delay()
    fields = result.get(timeout=TIMEOUT)
    assert relayed(fields) == {"request_id": "r-process-pool", "tenant": "acme"}
    assert fields["task_id"] == result.id


# -- faults and bad input ---------------------------------------------------
def test_acks_late_task_redelivered_after_sigkill_keeps_its_context(
    rabbit: Worker, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    with ctxrelay.bind(request_id="r-redelivered", user="ada"):
        result = rabbit.task("t.slow_acks_late").delay(str(marker))
    wait_until(marker.exists, "the acks_late task starting")
    rabbit.process.kill()  # mid-task: the message was never acknowledged
    rabbit.process.start()  # RabbitMQ redelivers it at once to the new worker
    fields = result.get(timeout=TIMEOUT)
    assert relayed(fields) == {"request_id": "r-redelivered", "user": "ada"}
    assert fields["task_id"] == result.id


@contextmanager
def _relay_off() -> Iterator[None]:
    """Publish raw messages: the relay's publish signal is disconnected."""
    apps = list(_apps)
    for app in apps:
        uninstall(app)
    try:
        yield
    finally:
        for app in apps:
            install(app, secret=SECRET)


def _signed(task_id: str, task: str = "t.fields", **fields: str) -> dict[str, str]:
    with ctxrelay.bind(**fields):
        return capture(binding(task, task_id), Signer(SECRET))


def _tampered(task_id: str) -> dict[str, str]:
    carrier = _signed(task_id, request_id="r-bad", user="ada")
    carrier["baggage"] = carrier["baggage"].replace("ada", "root")
    return carrier


def _unsigned(task_id: str) -> dict[str, str]:
    carrier = _signed(task_id, request_id="r-bad")
    del carrier[SIGNATURE]
    return carrier


def _junk_baggage(task_id: str) -> dict[str, str]:
    # Validly signed, so only the all-or-nothing read can refuse it.
    carrier = {"x-request-id": "r-bad", "baggage": "%zz;=,user"}
    carrier[SIGNATURE] = Signer(SECRET).sign(carrier, binding("t.fields", task_id))
    return carrier


BAD: dict[str, tuple[str, Callable[[str], object]]] = {
    "not-a-mapping": ("malformed", lambda _: "request_id=r-bad"),
    "not-str": ("malformed", lambda _: {"x-request-id": 42}),
    "oversized": ("malformed", lambda tid: {"x-request-id": "r", "baggage": "a=" + "x" * 50_000}),
    "bad-baggage": ("malformed", _junk_baggage),
    "tampered": ("signature that does not match", _tampered),
    "unsigned": ("no signature", _unsigned),
    "copied-from-another-task": (
        "signature that does not match",
        lambda _: _signed("another-task", request_id="r-bad"),
    ),
    # Same message id, signed for another task: the task name is bound too.
    "copied-onto-another-task": (
        "signature that does not match",
        lambda tid: _signed(tid, "t.other", request_id="r-bad"),
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_relay_headers_run_with_an_empty_context_and_a_log_line(
    solo: Worker, kind: str
) -> None:
    reason, make = BAD[kind]
    task_id = f"bad-{kind}-{uuid.uuid4().hex}"
    carrier = make(task_id)
    with _relay_off():
        result = solo.app.send_task("t.fields", task_id=task_id, headers={KEY: carrier})
    seen = result.get(timeout=TIMEOUT)
    # None of the refused context: a fresh request id, made by the worker.
    assert fresh(seen) == {"task_id": task_id, "task_root_id": task_id}

    # The worker's log reaches its file asynchronously: wait for the line.
    def logged() -> bool:
        lines = solo.process.output().splitlines()
        return any(task_id in line and "ctxrelay" in line and reason in line for line in lines)

    wait_until(logged, "the worker's log line about the bad context")
    # ... and the worker keeps serving.
    with ctxrelay.bind(request_id="r-after-bad"):
        assert relayed(solo.run("t.fields")) == {"request_id": "r-after-bad"}


# -- eager mode (no broker) -------------------------------------------------
@pytest.fixture
def eager() -> Iterator[Celery]:
    app = make_app("memory://", "cache+memory://", "eager")
    app.conf.task_always_eager = True
    try:
        yield app
    finally:
        uninstall(app)


def test_eager_task_sees_the_callers_context_and_leaves_it_intact(eager: Celery) -> None:
    # celery #1874: eager mode publishes nothing; the task still gets the context.
    with ctxrelay.bind(request_id="r-eager", user="ada") as outer:
        result = eager.signature("t.fields").delay()
        assert ctxrelay.current() == outer
    fields = result.get()
    assert relayed(fields) == {"request_id": "r-eager", "user": "ada"}
    assert fields["task_id"] == result.id


UNINSTALL_MID_TASK = """
import ctxrelay
from ctxrelay.integrations.celery import uninstall
from tests.integrations.celery_app import make_app

app = make_app("memory://", "cache+memory://", "eager")  # installs ctxrelay
app.conf.task_always_eager = True

def uninstalls():
    uninstall(app)  # the only app: every signal but the reset goes now
    return ctxrelay.request_id()

app.task(name="t.uninstalls")(uninstalls)
with ctxrelay.bind(request_id="r-mid-uninstall"):
    seen = app.signature("t.uninstalls").delay().get()
    left = sorted(ctxrelay.current())
print(seen, left, dict(ctxrelay.current()))
"""


def test_uninstall_while_a_task_runs_still_resets_that_tasks_context() -> None:
    # In a fresh interpreter, so that this app is the only one installed.
    result = subprocess.run(
        [sys.executable, "-c", UNINSTALL_MID_TASK],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    # The task saw its context, and its binding (task ids) ended with it.
    assert result.stdout.split("\n")[-2] == "r-mid-uninstall ['request_id'] {}"


def test_eager_chain_and_retry_keep_the_context(eager: Celery) -> None:
    trail = eager.signature("t.trail")
    with ctxrelay.bind(request_id="r-eager-chain"):
        links = chain(trail.clone(), trail.clone()).apply_async().get()
        retried = eager.signature("t.retry_explicit").delay().get()
    assert [relayed(f) for f in links] == [{"request_id": "r-eager-chain"}] * 2
    assert links[0]["task_id"] != links[1]["task_id"]
    assert retried["retries"] == 1
    assert relayed(retried["fields"]) == {"request_id": "r-eager-chain"}


def test_eager_task_outside_any_context_sees_none(eager: Celery) -> None:
    fields = eager.signature("t.fields").delay().get()
    assert relayed(fields) == {}
    assert ctxrelay.current() == ctxrelay.Context()


# -- install / uninstall -----------------------------------------------------
def _receivers() -> int:
    return sum(1 for key, _ in signals.before_task_publish.receivers if key[0] == "ctxrelay")


def test_install_is_idempotent_and_uninstall_undoes_it() -> None:
    app = Celery("ctxrelay_install_test", set_as_current=False)
    others = bool(_apps)
    install(app, secret=SECRET)
    install(app, secret=SECRET)
    assert _receivers() == 1
    uninstall(app)
    uninstall(app)
    assert _receivers() == (1 if others else 0)


def test_two_apps_with_different_secrets_are_refused() -> None:
    first = Celery("ctxrelay_secret_a", set_as_current=False)
    second = Celery("ctxrelay_secret_b", set_as_current=False)
    install(first, secret=SECRET)
    try:
        with pytest.raises(ValueError, match="same secret"):
            install(second, secret="another-secret-of-16-bytes")
    finally:
        uninstall(first)
        uninstall(second)


# -- the signature itself ------------------------------------------------------
def test_signer_rotation_signs_with_the_first_secret_and_accepts_any() -> None:
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    with ctxrelay.bind(request_id="r-rotate"):
        by_old = capture("task-1", Signer(old))
    rotating = Signer([new, old])
    assert rotating.verify(by_old, "task-1")
    assert not rotating.verify(by_old, "task-2")  # bound to the message id
    assert not Signer(new).verify(by_old, "task-1")


def test_signer_refuses_a_short_secret() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Signer("short")


def test_signer_takes_a_bytearray_as_one_secret_never_as_zero_byte_keys() -> None:
    # list(bytearray) is a list of ints, and bytes(48) is 48 zero bytes: a
    # key anyone could sign with.  (Untyped callers pass bytearrays.)
    secret = bytearray(b"a-bytearray-secret-0123")
    forged = {"baggage": "user=mallory"}
    forged[SIGNATURE] = Signer(bytes(48)).sign(forged, "task-1")
    assert not Signer(secret).verify(forged, "task-1")  # type: ignore[arg-type]
    with ctxrelay.bind(request_id="r-bytes"):
        signed = capture("task-1", Signer(secret))  # type: ignore[arg-type]
    assert Signer(bytes(secret)).verify(signed, "task-1")
    with pytest.raises(TypeError, match="str or bytes"):
        Signer([48])  # type: ignore[list-item]


def test_a_non_ascii_signature_is_refused_as_not_matching_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    carrier = _signed("task-1", request_id="r-sig")
    carrier[SIGNATURE] = "v1=" + "é" * 64
    with caplog.at_level(logging.ERROR, logger="ctxrelay"):
        ctx = restore(carrier, "task-1", Signer(SECRET), source="task 'x'")
    assert ctx == ctxrelay.Context()
    assert [r.getMessage() for r in caplog.records] == [
        "ctxrelay: task 'x' carries a context with a signature that does not match;"
        " it runs with an empty context"
    ]
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize(
    "carrier",
    [
        {"x-gray": "bad\nvalue", "x-request-id": "r-1"},  # a captured header
        {"X-Request-ID": "bad\x00", "baggage": "user=ada"},  # another spelling
        {"x-request-id": "r-1", "x-request-id ": "r-2", "baggage": "user=ada"},  # twice
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "bad\x01",
            "baggage": "user=ada",
        },
        {"Baggage": "user=ada,%zz;=", "x-request-id": "r-1"},
    ],
    ids=["captured-header", "request-id-spelling", "request-id-twice", "tracestate", "Baggage"],
)
def test_an_unreadable_entry_in_any_spelling_empties_the_whole_context(
    carrier: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # All or nothing: never a partial context (docs/queues.md).
    previous = ctxrelay.configure(ctxrelay.Policy(capture={"x-gray"}))
    try:
        with caplog.at_level(logging.WARNING, logger="ctxrelay"):
            ctx = restore(carrier, "task-1", None, source="task 'x'")
    finally:
        ctxrelay.configure(previous)
    assert ctx == ctxrelay.Context()
    assert any("malformed context" in r.getMessage() for r in caplog.records)


def test_a_well_formed_carrier_with_captured_and_trace_entries_is_read_whole() -> None:
    previous = ctxrelay.configure(ctxrelay.Policy(capture={"x-gray"}))
    try:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        with ctxrelay.bind(
            {"request_id": "r-1", "x-gray": "canary", "user": "ada", "traceparent": parent}
        ):
            sent = ctxrelay.current()
            carrier = capture("task-1", None)
        assert dict(restore(carrier, "task-1", None, source="t")) == dict(sent)
    finally:
        ctxrelay.configure(previous)


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_task_sets_a_field_for_the_rest_of_itself_and_no_other_task_sees_it(
    pool: str, request: pytest.FixtureRequest
) -> None:
    worker: Worker = request.getfixturevalue(pool)
    results: list[tuple[Any, str | None]] = []
    for i in range(12):
        with ctxrelay.bind(request_id=f"r-scope-{pool}-{i}"):
            results.append((worker.task("t.sets_user").delay(f"u{i}"), f"u{i}"))
            results.append((worker.task("t.fields").delay(), None))
    for result, user in results:
        got = result.get(timeout=TIMEOUT)
        if user is not None:
            assert got == {"task": user, "pool": user}
        else:
            assert "user" not in got
