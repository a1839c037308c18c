"""The demo: one request through the order-confirmation shop, without and with the relay.

The real thing runs in a subprocess -- ``python -m ctxrelay.demo --json`` --
embedded (Celery's in-memory broker, a worker thread) and on Redis (a worker
process).  The tests check every hop of the relayed walk, and that the walk
without the relay loses the context: 401s downstream, the canary tag
lost, log lines without the request id, an audit that cannot read the request.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
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
from ctxrelay.demo.report import Result, Walk, problems
from ctxrelay.demo.shop import CANARY, USER
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


def test_relayed_walk_downstream_answers_200_and_cart_serves_the_canary(
    embedded: Document,
) -> None:
    hops = _hops(embedded, True)
    assert [hops[n]["status"] for n in (HANDLER_HOP, MEMBER_HOP, CART_HOP)] == [200, 200, 200]
    assert "canary cart" in hops[CART_HOP]["result"]
    assert "canary template" in hops[CELERY_HOP]["result"]


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
    assert (mail["request_id"], mail["user"], mail["canary"]) == (None, None, None)
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
    assert "OK: with ctxrelay every hop saw its request (exit status 0)." in out
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
        "self.thread_class",
    ]
    assert all(r["kind"] == "lost-context" for r in off["strict_mode"])
