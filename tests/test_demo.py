"""The demo: one request through the order-confirmation shop, without and with the relay.

The real thing runs in a subprocess -- ``python -m ctxrelay.demo --json`` --
embedded (Celery's in-memory broker, a worker thread) and on Redis (a worker
process).  The tests check every hop of the relayed walk, and that the walk
without the relay loses the context: 401s downstream, the canary tag
lost, log lines without the request id, an audit that cannot read the request.
And the deadline: the order page runs under a default timeout, and the
deliberately slow cart is cut at it with the relay (the page answers 200 in
time and says so, the cart stops) but runs past it without (the door answers
504, the cart works its full time) -- and no walk's work outlives its walk.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctxrelay.demo.hops import (
    AUDIT_HOP,
    CART_HOP,
    CELERY_HOP,
    HANDLER_HOP,
    HOPS,
    MEMBER_HOP,
    Hop,
)
from ctxrelay.demo.report import CartWork, Result, Walk, problems
from ctxrelay.demo.shop import BUDGET, CANARY, ORDER_ID, RENDER_RESERVE, SLOW_CART, USER
from ctxrelay.demo.tasks import TASK, collect, make_app, worker_process
from tests.brokers import ROOT, flush_redis, need_rabbitmq, need_redis, redis_url

#: Seconds a whole demo run may take (it takes a few).
RUN_TIMEOUT = 100
#: The Redis database of these tests (see tests.brokers.REDIS_DATABASES).
REDIS_DB = 9

Document = dict[str, Any]


def _demo(*args: str, module: str = "ctxrelay.demo") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        check=False,
    )


def _json_demo(*args: str) -> Document:
    finished = _demo("--json", *args)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    document: Document = json.loads(finished.stdout)
    return document


@pytest.fixture(scope="module")
def embedded() -> Document:
    return _json_demo()


@pytest.fixture(scope="module")
def on_redis() -> Iterator[Document]:
    url = need_redis(REDIS_DB)
    try:
        yield _json_demo("--broker", url)
    finally:
        flush_redis(REDIS_DB)


def _walk(document: Document, relay: bool) -> Document:
    walks: list[Document] = [w for w in document["walks"] if w["relay"] is relay]
    assert len(walks) == 1
    return walks[0]


def _hops(document: Document, relay: bool) -> dict[str, Document]:
    return {hop["name"]: hop for hop in _walk(document, relay)["hops"]}


# -- the relayed walk, embedded ----------------------------------------------


def test_embedded_demo_succeeds_with_a_worker_thread_and_no_service(embedded: Document) -> None:
    assert embedded["ok"] is True
    assert "worker thread" in embedded["worker"]
    assert embedded["broker"].startswith("memory://")
    relayed = _walk(embedded, True)
    assert relayed["correct"] is True
    assert relayed["problems"] == []
    assert relayed["status"] == 200
    assert relayed["echoed_request_id"] == relayed["request_id"]


def test_relayed_walk_every_hop_sees_the_request_id_user_and_canary(embedded: Document) -> None:
    request_id = _walk(embedded, True)["request_id"]
    hops = _hops(embedded, True)
    assert list(hops) == list(HOPS)
    for hop in hops.values():
        assert (hop["request_id"], hop["user"], hop["canary"]) == (request_id, USER, CANARY), hop


def test_relayed_walk_cookie_reaches_member_cart_and_audit_but_never_the_broker(
    embedded: Document,
) -> None:
    hops = _hops(embedded, True)
    for name in (HANDLER_HOP, MEMBER_HOP, CART_HOP, AUDIT_HOP):
        assert hops[name]["cookie"] is True, name
    assert hops[CELERY_HOP]["cookie"] is False


def test_relayed_walk_member_answers_200_and_the_slow_cart_is_cut_at_the_deadline(
    embedded: Document,
) -> None:
    hops = _hops(embedded, True)
    assert [hops[n]["status"] for n in (HANDLER_HOP, MEMBER_HOP)] == [200, 200]
    assert [hops[n]["cut"] for n in HOPS] == [False, False, True, False, False]
    cart = hops[CART_HOP]
    assert cart["status"] is None  # it never answered: the call was cut
    assert cart["result"].startswith("cut at the deadline after ")
    assert cart["result"].endswith(": DeadlineExceeded")
    assert " shop.order: cart items cut at the deadline after " in cart["log_line"]
    assert "canary template" in hops[CELERY_HOP]["result"]
    # The page answered 200 within the budget, and says what it could not show.
    walk = _walk(embedded, True)
    assert walk["status"] == 200
    assert walk["page"] == "200, addresses: 2, items: not shown: no answer within the deadline"
    assert walk["answered_in"] < BUDGET
    assert (embedded["budget"], embedded["slow_cart"]) == (BUDGET, SLOW_CART)


def test_relayed_walk_the_time_left_travels_to_the_pool_and_on_the_wire(
    embedded: Document,
) -> None:
    hops = _hops(embedded, True)
    lookups = (BUDGET - RENDER_RESERVE) * 1000
    for name in (MEMBER_HOP, CART_HOP):
        hop = hops[name]
        # The pool thread had the lookups' deadline, and the service called
        # received what was left of it in the header.
        assert hop["deadline_ms"] is not None, hop
        assert 0 < hop["deadline_ms"] <= lookups, hop
        assert hop["arrived_deadline_ms"] is not None, hop
        assert 0 < hop["arrived_deadline_ms"] <= hop["deadline_ms"], hop
    assert 0 < hops[HANDLER_HOP]["arrived_deadline_ms"] <= BUDGET * 1000
    # The audit and the mail must outlive the request: without_deadline().
    assert (hops[AUDIT_HOP]["deadline_ms"], hops[CELERY_HOP]["deadline_ms"]) == (None, None)


def test_relayed_walk_the_cart_stops_working_when_its_call_is_cut(embedded: Document) -> None:
    cart = _walk(embedded, True)["cart"]
    assert cart["finished"] is False
    # Cut at the lookups' deadline; it saw the hang-up a poll later.
    assert cart["seconds"] < BUDGET < SLOW_CART
    assert cart["after_answer"] < SLOW_CART / 4


def test_relayed_walk_request_id_arrives_at_member_and_cart(embedded: Document) -> None:
    # What the services say they received, not what the calling thread held.
    request_id = _walk(embedded, True)["request_id"]
    hops = _hops(embedded, True)
    for name in (HANDLER_HOP, MEMBER_HOP, CART_HOP):
        assert hops[name]["arrived_request_id"] == request_id, name
    for name in (AUDIT_HOP, CELERY_HOP):  # not calls
        assert hops[name]["arrived_request_id"] is None, name


def test_relayed_walk_every_log_line_carries_request_id_and_user(embedded: Document) -> None:
    request_id = _walk(embedded, True)["request_id"]
    for hop in _hops(embedded, True).values():
        assert hop["log_line"].startswith(f"INFO [{request_id} {USER}] shop."), hop


def test_relayed_walk_work_really_leaves_the_request_thread(embedded: Document) -> None:
    hops = _hops(embedded, True)
    home = hops[HANDLER_HOP]["thread"]
    assert hops[MEMBER_HOP]["thread"].startswith("ctxrelay-pool")
    assert hops[CART_HOP]["thread"].startswith("ctxrelay-pool")
    assert hops[AUDIT_HOP]["thread"] == "audit"
    assert home not in {hops[n]["thread"] for n in HOPS if n != HANDLER_HOP}


def test_relayed_audit_reads_headers_and_cookies_after_the_response(embedded: Document) -> None:
    audit = _hops(embedded, True)[AUDIT_HOP]
    assert audit["after_response"] is True
    assert audit["result"] == "read GET /order/confirm: headers and cookies"
    assert (audit["cookie"], audit["canary"]) == (True, CANARY)


# -- the walk without the relay: the seeds' bugs -------------------------------


def test_unrelayed_walk_request_thread_still_has_everything(embedded: Document) -> None:
    # The context is there at the door: the bugs below come from the hops.
    handler = _hops(embedded, False)[HANDLER_HOP]
    request_id = _walk(embedded, False)["request_id"]
    assert (handler["request_id"], handler["user"], handler["cookie"]) == (request_id, USER, True)
    assert handler["status"] == 200


def test_unrelayed_walk_downstream_calls_get_401_without_cookie_or_canary(
    embedded: Document,
) -> None:
    hops = _hops(embedded, False)
    for name in (MEMBER_HOP, CART_HOP):
        hop = hops[name]
        assert (hop["status"], hop["cookie"], hop["canary"]) == (401, False, None), hop
        assert hop["arrived_request_id"] is None, hop
        assert hop["thread"].startswith("plain-pool")
    walk = _walk(embedded, False)
    assert hops[HANDLER_HOP]["arrived_request_id"] == walk["request_id"]
    for name in (MEMBER_HOP, CART_HOP):
        assert {"hop": name, "problem": "request id did not arrive"} in walk["problems"]


def test_unrelayed_walk_logs_lose_the_request_id_off_the_request_thread(
    embedded: Document,
) -> None:
    hops = _hops(embedded, False)
    for name in (MEMBER_HOP, CART_HOP, AUDIT_HOP, CELERY_HOP):
        assert (hops[name]["request_id"], hops[name]["user"]) == (None, None), name
        assert hops[name]["log_line"].startswith("INFO [- -] shop."), name


def test_unrelayed_walk_the_slow_cart_runs_past_the_deadline_and_the_door_answers_504(
    embedded: Document,
) -> None:
    walk = _walk(embedded, False)
    cart = _hops(embedded, False)[CART_HOP]
    # The plain pool thread has no deadline: the call waits for the slow cart,
    # and none travels on the wire.
    assert (cart["deadline_ms"], cart["arrived_deadline_ms"], cart["cut"]) == (None, None, False)
    assert cart["status"] == 401
    assert {"hop": CART_HOP, "problem": "ran past the deadline"} in walk["problems"]
    # The door answered at the page's timeout, naming the request.
    assert walk["status"] == 504
    assert walk["page"] == f"504 deadline exceeded (request id {walk['request_id']})"
    assert BUDGET <= walk["answered_in"] < SLOW_CART
    assert {"hop": "order page", "problem": "answered 504"} in walk["problems"]


def test_unrelayed_walk_the_cart_works_its_full_time_after_the_user_had_the_answer(
    embedded: Document,
) -> None:
    walk = _walk(embedded, False)
    cart = walk["cart"]
    assert cart["finished"] is True
    assert cart["seconds"] >= SLOW_CART - 0.05
    assert cart["after_answer"] >= SLOW_CART - walk["answered_in"] - 0.1
    assert any(p["problem"].startswith("the cart worked ") for p in walk["problems"])


def test_no_work_of_the_first_walk_outlives_it(embedded: Document) -> None:
    # The slow cart's call, the handler thread that waited for it, the audit
    # and the mail task all ended inside the walk: the next walk starts on a
    # quiet shop (its work cannot meet a late reply or a late call).
    off, on = embedded["walks"]
    assert off["cart"]["began"] >= off["began"]
    assert off["cart"]["ended"] <= off["ended"] <= on["began"]
    assert on["began"] <= on["cart"]["began"] <= on["cart"]["ended"] <= on["ended"]


def test_unrelayed_walk_audit_is_blind_and_mail_task_has_no_user(embedded: Document) -> None:
    hops = _hops(embedded, False)
    assert hops[AUDIT_HOP]["result"] == "ctxrelay.request() is None"
    assert hops[AUDIT_HOP]["after_response"] is True
    assert hops[CELERY_HOP]["result"].startswith("no user to mail")
    assert hops[CELERY_HOP]["canary"] is None
    walk = _walk(embedded, False)
    assert walk["correct"] is False
    assert {"hop": MEMBER_HOP, "problem": "answered 401"} in walk["problems"]


def test_walks_use_distinct_request_ids_and_neither_sees_the_others(embedded: Document) -> None:
    off, on = _walk(embedded, False)["request_id"], _walk(embedded, True)["request_id"]
    assert off != on
    assert all(hop["request_id"] in (off, None) for hop in _walk(embedded, False)["hops"])
    assert all(hop["request_id"] == on for hop in _walk(embedded, True)["hops"])


# -- a real broker and a worker process ----------------------------------------


@pytest.mark.broker
def test_redis_demo_relays_through_a_separate_worker_process(on_redis: Document) -> None:
    assert on_redis["ok"] is True
    assert on_redis["broker"] == redis_url(REDIS_DB)
    assert "worker process" in on_redis["worker"]
    request_id = _walk(on_redis, True)["request_id"]
    mail = _hops(on_redis, True)[CELERY_HOP]
    assert mail["pid"] != on_redis["pid"]
    assert (mail["request_id"], mail["user"], mail["canary"]) == (request_id, USER, CANARY)
    assert (mail["cookie"], mail["log_line"].startswith(f"INFO [{request_id} {USER}]")) == (
        False,
        True,
    )


@pytest.mark.broker
def test_redis_demo_unrelayed_task_reaches_the_worker_without_its_request(
    on_redis: Document,
) -> None:
    mail = _hops(on_redis, False)[CELERY_HOP]
    assert mail["pid"] != on_redis["pid"]
    # The worker has ctxrelay installed: a job arriving without a request id
    # runs with a fresh one -- never the request's, which did not travel.
    assert mail["request_id"] != _walk(on_redis, False)["request_id"]
    assert (mail["user"], mail["canary"]) == (None, None)
    assert _walk(on_redis, False)["correct"] is False


@pytest.mark.broker
def test_amqp_demo_relays_through_rabbitmq_with_rpc_results() -> None:
    # Celery 5 has no AMQP result backend: the demo must not use the broker URL as one.
    url = need_rabbitmq()
    document = _json_demo("--broker", url)
    assert document["ok"] is True
    assert document["broker"] == "amqp://guest:**@127.0.0.1:5672//"
    mail = _hops(document, True)[CELERY_HOP]
    assert mail["pid"] != document["pid"]
    assert (mail["user"], mail["canary"], mail["cookie"]) == (USER, CANARY, False)
    assert _hops(document, False)[CELERY_HOP]["result"] == f"no user to mail {ORDER_ID} to"


@pytest.mark.broker
def test_amqp_results_arrive_when_a_later_publisher_thread_reuses_an_earlier_ones_ident() -> None:
    # Celery's RPC backend names its reply queue after the publishing thread's
    # ident, which the OS reuses once that thread has ended; a consumer left
    # subscribed to the queue by an earlier result then takes half the
    # replies.  The demo's order handlers are such threads, one per walk.
    url = need_rabbitmq()
    queue = f"ctxrelay-demo-test-{uuid.uuid4().hex[:8]}"
    app = make_app(url, queue)
    idents: list[int] = []
    published: list[Any] = []

    def publish(order: str) -> None:
        idents.append(threading.get_ident())
        published.append(app.tasks[TASK].delay(order))

    with worker_process(app, queue):
        for number in range(4):
            publisher = threading.Thread(target=publish, args=(f"o-{number}",))
            publisher.start()
            publisher.join()  # ended: the next thread may get its ident
            reported = collect(published[number], 20)
            assert reported["result"] == f"no user to mail o-{number} to"
    if len(set(idents)) == len(idents):
        pytest.skip("every publisher thread had a new ident: the case cannot be made here")


def test_unsupported_broker_exits_2_with_one_line_before_anything_starts() -> None:
    finished = _demo("--broker", "sqs://key:secret@queue.example/")
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert finished.stderr == (
        "ctxrelay demo: unsupported broker sqs://key:**@queue.example/: "
        "use redis://... or amqp://... (or no --broker)\n"
    )


#: ``ctxrelay demo`` in an interpreter where the demo's packages cannot be found
#: (a ``None`` in ``sys.modules`` hides a module from imports and ``find_spec``).
_WITHOUT = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None
from ctxrelay.__main__ import main
sys.exit(main(["demo"]))
"""


@pytest.mark.parametrize(
    ("hidden", "said"),
    [
        (["fastapi", "celery"], "fastapi, celery not installed"),
        (["celery.contrib.testing.worker"], "cannot import celery.contrib.testing.worker"),
    ],
)
def test_without_the_demo_packages_one_line_names_the_extra(hidden: list[str], said: str) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _WITHOUT, *hidden],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert finished.returncode == 2
    assert finished.stdout == ""
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith(f"ctxrelay demo: {said}")
    assert "install the 'demo' extra: pip install 'ctxrelay[demo]'" in lines[0]


def test_unreachable_broker_exits_2_with_one_clear_line() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/{REDIS_DB}"
        finished = _demo("--json", "--broker", url)
    assert finished.returncode == 2
    assert finished.stdout == ""
    assert finished.stderr.startswith(f"ctxrelay demo: cannot reach the broker {url}: ")


def test_a_broker_password_is_never_printed() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        finished = _demo("--json", "--broker", f"redis://:hunter2-pass@127.0.0.1:{port}/9")
    assert finished.returncode == 2
    assert "hunter2" not in finished.stdout + finished.stderr
    assert finished.stderr.startswith(
        f"ctxrelay demo: cannot reach the broker redis://:**@127.0.0.1:{port}/9: "
    )


# -- the report and its verdict --------------------------------------------------


def test_text_report_through_the_ctxrelay_command_shows_both_walks() -> None:
    # `python -m ctxrelay demo` is what the `ctxrelay demo` console script runs.
    finished = _demo("demo", module="ctxrelay")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    out = finished.stdout
    assert out.startswith("ctxrelay demo: the order-confirmation page, walked twice.")
    assert "OK: with ctxrelay every hop saw its request, and its deadline (exit status 0)." in out
    assert f"RelayMiddleware(app,\ntimeout={BUDGET:g})" in out
    assert f"The deadline: the order page has {BUDGET:g} s, the cart works 2 s on a call." in out
    lines = out.splitlines()
    off = lines.index(next(line for line in lines if line.startswith("  relay off: after ")))
    assert re.fullmatch(
        r"  relay off: after \d+\.\d\d s the user saw: "
        r"504 deadline exceeded \(request id req-\w+\)",
        lines[off],
    )
    assert lines[off + 1].strip().startswith("the cart worked ")
    assert ", its full time: " in lines[off + 1]
    assert lines[off + 2].startswith("  relay on:  after ")
    assert lines[off + 2].endswith(
        " the user saw: 200, addresses: 2, items: not shown: no answer within the deadline"
    )
    assert "then stopped: its caller hung up at the deadline (x-request-timeout-ms: " in out
    member_off = next(line for line in out.splitlines() if line.startswith(MEMBER_HOP))
    assert "LOST" in member_off
    assert "401 login required" in member_off
    assert "relay on: every hop saw the whole request" in out
    assert "INFO [- -] shop.order: member addresses answered 401" in out
    # The relayed member row: the id in the pool thread, and the id member received.
    relayed_id = out.split("relay on ", 1)[1].split(".", 1)[0]
    member_on = out.splitlines()[out.splitlines().index(member_off) + 1]
    assert member_on.split()[:4] == ["on", "ctxrelay-pool_0", relayed_id, relayed_id]


_BREAKS: list[tuple[str, dict[str, Any]]] = [
    (MEMBER_HOP, {"request_id": None}),
    (CART_HOP, {"request_id": "req-other"}),
    (AUDIT_HOP, {"user": None}),
    (MEMBER_HOP, {"cookie": False}),
    (CELERY_HOP, {"cookie": True}),
    (CART_HOP, {"canary": None}),
    (CART_HOP, {"cut": False, "status": 200}),  # the slow cart answered: not cut
    (MEMBER_HOP, {"cut": True, "status": None}),  # a fast service cut
    (MEMBER_HOP, {"deadline_ms": None}),  # the pool thread had no deadline
    (CART_HOP, {"arrived_deadline_ms": None}),  # the time left never reached the cart
    (AUDIT_HOP, {"deadline_ms": 120}),  # work that must outlive the request
    (CELERY_HOP, {"deadline_ms": 120}),
    (MEMBER_HOP, {"status": 401}),
    (HANDLER_HOP, {"arrived_request_id": None}),
    (MEMBER_HOP, {"arrived_request_id": None}),
    (CART_HOP, {"arrived_request_id": "req-other"}),
    (AUDIT_HOP, {"after_response": False}),
    (CELERY_HOP, {"log_line": "INFO [- -] shop.mail: sending"}),
]


@pytest.mark.parametrize(("name", "change"), _BREAKS)
def test_verdict_fails_when_any_relayed_hop_breaks(
    embedded: Document, name: str, change: dict[str, Any]
) -> None:
    walk = _walk(embedded, True)
    hops = {h["name"]: Hop.from_dict(h) for h in walk["hops"]}
    request_id = walk["request_id"]
    assert problems(request_id, 200, request_id, hops) == ()
    hops[name] = dataclasses.replace(hops[name], **change)
    found = problems(request_id, 200, request_id, hops)
    assert found
    assert {hop for hop, _ in found} == {name}
    broken = Walk(True, request_id, 200, request_id, hops, 0.0, found)
    assert not Result(1, "memory://", "thread", (broken,)).ok


def test_verdict_fails_when_the_cart_works_its_full_time(embedded: Document) -> None:
    walk = _walk(embedded, True)
    hops = {h["name"]: Hop.from_dict(h) for h in walk["hops"]}
    request_id = walk["request_id"]
    stopped = CartWork(0.5, 0.0, False, 1.0, 1.5)
    assert problems(request_id, 200, request_id, hops, stopped) == ()
    worked_on = dataclasses.replace(stopped, seconds=SLOW_CART, after_answer=1.5, finished=True)
    assert problems(request_id, 200, request_id, hops, worked_on) == (
        (CART_HOP, "the cart worked 1.5 s past the answer"),
    )


def test_verdict_fails_when_a_hop_never_reports_or_stays_on_the_request_thread(
    embedded: Document,
) -> None:
    walk = _walk(embedded, True)
    hops = {h["name"]: Hop.from_dict(h) for h in walk["hops"]}
    request_id = walk["request_id"]
    missing = {n: h for n, h in hops.items() if n != CELERY_HOP}
    assert problems(request_id, 200, request_id, missing) == ((CELERY_HOP, "never reported"),)
    home = hops[HANDLER_HOP]
    inline = {**hops, CART_HOP: dataclasses.replace(hops[CART_HOP], thread=home.thread)}
    assert problems(request_id, 200, request_id, inline) == (
        (CART_HOP, "never left the request thread"),
    )


#: The demo with one thing broken: after ctxrelay's httpx hook, the order
#: service's client drops ``x-request-id``, so it never goes out on the wire.
_ID_NOT_FORWARDED = """
import sys
import ctxrelay.demo
from ctxrelay.demo import services

relay_headers = services.install

def drop_request_id(request):
    request.headers.pop("x-request-id", None)

def install(client):
    hooks = relay_headers(client).event_hooks
    hooks["request"] = [*hooks["request"], drop_request_id]
    client.event_hooks = hooks
    return client

services.install = install
sys.exit(ctxrelay.demo.main(["--json"]))
"""


def test_demo_exits_1_when_the_request_id_does_not_reach_member_and_cart() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _ID_NOT_FORWARDED],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr
    document = json.loads(finished.stdout)
    assert document["ok"] is False
    relayed = _walk(document, True)
    # Everything else still holds: the pool thread has the id, only the wire lacks it.
    assert all(hop["request_id"] == relayed["request_id"] for hop in relayed["hops"])
    assert {(p["hop"], p["problem"]) for p in relayed["problems"]} == {
        (name, "request id did not arrive") for name in (HANDLER_HOP, MEMBER_HOP, CART_HOP)
    }


def test_import_ctxrelay_imports_neither_the_demo_nor_an_integration() -> None:
    code = (
        "import sys, ctxrelay; prefixes = ('ctxrelay.demo', 'ctxrelay.integrations'); "
        "print([m for m in sys.modules if m.startswith(prefixes)])"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert finished.stdout.strip() == "[]"


def test_the_relay_off_walk_names_each_lost_hand_off_through_strict_mode(
    embedded: Document,
) -> None:
    off, on = embedded["walks"]
    assert on["strict_mode"] == []
    handoffs = {(Path(r["handoff_file"]).name, r["handoff_function"]) for r in off["strict_mode"]}
    assert handoffs == {("services.py", "confirm")}
    lines = sorted({r["handoff_line"] for r in off["strict_mode"]})
    source = (ROOT / "src/ctxrelay/demo/services.py").read_text().splitlines()
    # the two pool submits and the audit thread's start: the lines to change
    assert [source[n - 1].strip().split("(")[0] for n in lines] == [
        "addresses = self.pool.submit",
        "items = self.pool.submit",
        "self.audit.start",
    ]
    assert all(r["kind"] == "lost-context" for r in off["strict_mode"])
