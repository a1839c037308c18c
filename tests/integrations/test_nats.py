"""NATS: the context in message headers, through a real nats-server on
127.0.0.1:4222 (JetStream enabled), with real nats-py connections.

Handlers run bound to their own message's context -- never the
subscriber's, never the previous message's -- and are reset after.  A second
connection without ctxrelay plays the hostile (or merely foreign) producer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

import ctxrelay
from ctxrelay import Policy
from ctxrelay._carrier import KEY, SIGNATURE
from ctxrelay.integrations.nats import bound, context_of, install, uninstall
from tests.brokers import need_nats

pytestmark = pytest.mark.broker

SECRET = "ctxrelay-nats-test-secret-0123456789"
N = 200
WAIT = 30.0


def subject(kind: str) -> str:
    return f"ctxrelay.test.{kind}.{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def connections(
    secret: str | None = None, error_cb: Callable[[Exception], Awaitable[None]] | None = None
) -> AsyncIterator[tuple[Client, Client]]:
    """(a relaying connection, a bare one), both closed after."""
    url = need_nats()
    options: dict[str, Any] = {"error_cb": error_cb} if error_cb else {}
    relayed = install(await nats.connect(url, name="ctxrelay-test", **options), secret=secret)
    bare = await nats.connect(url, name="ctxrelay-test-bare")
    try:
        yield relayed, bare
    finally:
        uninstall(relayed)
        await relayed.close()
        await bare.close()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    result = asyncio.run(asyncio.wait_for(main(), 90))
    assert ctxrelay.current() == ctxrelay.Context()
    return result


class Seen:
    """What handlers saw, with a bounded wait for a count."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []
        self.changed = asyncio.Event()

    def add(self, item: dict[str, str]) -> None:
        self.items.append(item)
        self.changed.set()

    async def wait(self, count: int) -> list[dict[str, str]]:
        while len(self.items) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT)
        return self.items


# -- core NATS ---------------------------------------------------------------------
def test_publish_carries_the_context_and_the_handler_runs_bound_to_it() -> None:
    async def main() -> tuple[list[dict[str, str]], dict[str, str]]:
        async with connections() as (nc, bare):
            seen, subj = Seen(), subject("plain")

            async def handle(msg: Msg) -> None:
                seen.add(dict(ctxrelay.current()))

            await nc.subscribe(subj, cb=handle)
            raw: list[Msg] = []
            sub = await bare.subscribe(subj)
            await bare.flush()
            await nc.flush()
            with ctxrelay.bind(request_id="r-nats", tenant="acme"):
                await nc.publish(subj, b"one")
            await nc.publish(subj, b"two")  # outside any context: no headers at all
            raw.append(await sub.next_msg(timeout=WAIT))
            raw.append(await sub.next_msg(timeout=WAIT))
            got = await seen.wait(2)
            return got, {"first": str(raw[0].headers), "second": str(raw[1].headers)}

    got, raw = run(main)
    assert got == [{"request_id": "r-nats", "tenant": "acme"}, {}]
    # Plain W3C-style headers any consumer can read, plus the list of them.
    assert "'x-request-id': 'r-nats'" in raw["first"]
    assert "'baggage': 'tenant=acme'" in raw["first"]
    assert f"'{KEY}': 'x-request-id,baggage'" in raw["first"]
    assert raw["second"] == "None"


def test_200_concurrent_requests_each_handled_in_their_own_context_and_replied_with_it() -> None:
    async def main() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
        async with connections(SECRET) as (nc, _):
            subj = subject("rpc")

            async def respond(msg: Msg) -> None:
                await asyncio.sleep(0)  # let other handlers' messages interleave
                spawned = await asyncio.create_task(asyncio.sleep(0, ctxrelay.request_id()))
                with ctxrelay.bind(served_by=f"svc-{ctxrelay.get('user')}"):
                    await msg.respond(
                        f"{ctxrelay.request_id()}|{ctxrelay.get('user')}|{spawned}".encode()
                    )

            for _ in range(4):  # a queue group: four subscriptions, four tasks
                await nc.subscribe(subj, queue="workers", cb=respond)

            async def one(i: int) -> tuple[str, dict[str, Any], dict[str, str]]:
                rid = f"r-{i}-{uuid.uuid4().hex[:8]}"
                with ctxrelay.bind(request_id=rid, user=f"u{i}"):
                    reply = await nc.request(subj, f"m{i}".encode(), timeout=WAIT)
                    assert ctxrelay.request_id() == rid  # the requester's own, untouched
                rid_seen, user, spawned = reply.data.decode().split("|")
                back = dict(context_of(reply))
                return rid, {"rid": rid_seen, "user": user, "task": spawned}, back

            return list(await asyncio.gather(*(one(i) for i in range(N))))

    results = run(main)
    assert len(results) == N
    for i, (rid, handled, back) in enumerate(results):
        assert handled == {"rid": rid, "user": f"u{i}", "task": rid}
        assert dict(back) == {"request_id": rid, "user": f"u{i}", "served_by": f"svc-u{i}"}


def test_a_subscription_made_inside_a_request_never_hands_that_request_to_its_messages() -> None:
    async def main() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        after: list[dict[str, str]] = []

        async def on_error(exc: Exception) -> None:
            after.append(dict(ctxrelay.current()))  # nats-py calls it after our reset

        async with connections(error_cb=on_error) as (nc, bare):
            seen, subj = Seen(), subject("inherit")

            async def handle(msg: Msg) -> None:
                seen.add(dict(ctxrelay.current()))
                ctxrelay.bind(leaked="yes").__enter__()  # never exited: must not leak
                if msg.data == b"fail":
                    raise RuntimeError("handler failed")

            with ctxrelay.bind(request_id="subscriber"):  # the subscription's task copies this
                await nc.subscribe(subj, cb=handle)
            await nc.flush()  # the server has the subscription before bare publishes
            with ctxrelay.bind(request_id="r-1"):
                await nc.publish(subj, b"fail")
            await nc.flush()  # two connections: keep the order
            await bare.publish(subj, b"no context")
            await bare.flush()
            with ctxrelay.bind(request_id="r-3"):
                await nc.publish(subj, b"fail")
            await seen.wait(3)
            for _ in range(int(WAIT * 100)):
                if len(after) >= 2:
                    break
                await asyncio.sleep(0.01)
            return seen.items, after

    logging.getLogger("ctxrelay.nats").disabled = True  # the handler's own error lines
    try:
        seen, after = run(main)
    finally:
        logging.getLogger("ctxrelay.nats").disabled = False
    # Each message replaces what the task held (the subscriber's context), and
    # what a handler bound and left open dies with its message.
    assert seen == [{"request_id": "r-1"}, {}, {"request_id": "r-3"}]
    # Reset by token: the task's own value is back after each failed message.
    assert after == [{"request_id": "subscriber"}] * 2


def test_an_error_is_logged_while_the_message_context_is_still_bound() -> None:
    lines: list[tuple[str, str | None]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.getMessage(), ctxrelay.request_id()))

    async def quiet(exc: Exception) -> None:
        pass

    async def main() -> None:
        async with connections(error_cb=quiet) as (nc, _):
            done, subj = asyncio.Event(), subject("error")

            async def handle(msg: Msg) -> None:
                done.set()
                raise ValueError("bad order")

            await nc.subscribe(subj, cb=handle)
            with ctxrelay.bind(request_id="r-err"):
                await nc.publish(subj, b"x")
            await asyncio.wait_for(done.wait(), WAIT)
            await nc.flush()

    handler = Keep()
    logging.getLogger("ctxrelay.nats").addHandler(handler)
    try:
        run(main)
    finally:
        logging.getLogger("ctxrelay.nats").removeHandler(handler)
    assert lines == [(f"NATS handler for {lines[0][0].split()[-2]} raised", "r-err")]


def test_bound_resets_on_return_exception_and_cancellation_in_your_own_loop() -> None:
    async def main() -> list[tuple[dict[str, str], dict[str, str]]]:
        async with connections() as (nc, _):
            subj = subject("iter")
            sub = await nc.subscribe(subj)
            for i in range(3):
                with ctxrelay.bind(request_id=f"r-it-{i}"):
                    await nc.publish(subj, b"x")
            out = []
            with ctxrelay.bind(request_id="loop"):
                msg = await sub.next_msg(timeout=WAIT)
                with bound(msg):
                    inside = dict(ctxrelay.current())
                out.append((inside, dict(ctxrelay.current())))
                msg = await sub.next_msg(timeout=WAIT)
                failed: list[dict[str, str]] = []

                def fail() -> None:
                    with bound(msg):
                        failed.append(dict(ctxrelay.current()))
                        raise KeyError("handler failed")

                with pytest.raises(KeyError):
                    fail()
                out.append((failed[0], dict(ctxrelay.current())))
                msg = await sub.next_msg(timeout=WAIT)
                started = asyncio.Event()

                cancelled: list[dict[str, str]] = []

                async def stuck() -> None:
                    try:
                        with bound(msg):
                            started.set()
                            await asyncio.sleep(60)
                    except asyncio.CancelledError:
                        cancelled.append(dict(ctxrelay.current()))  # the task's own, reset
                        raise

                task = asyncio.create_task(stuck())
                await started.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                out.append((cancelled[0], dict(ctxrelay.current())))
            return out

    (a, after_a), (b, after_b), (c, after_c) = run(main)
    assert a == {"request_id": "r-it-0"}
    assert b == {"request_id": "r-it-1"}
    assert after_a == after_b == after_c == {"request_id": "loop"}
    assert c == {"request_id": "loop"}  # the cancelled task's own context: reset too


def test_a_forwarded_message_carries_the_current_context_not_the_one_it_came_with() -> None:
    async def main() -> tuple[dict[str, str], dict[str, str] | None]:
        async with connections() as (nc, bare):
            first, second = subject("fwd-in"), subject("fwd-out")
            outbox = await bare.subscribe(second)
            await bare.flush()

            async def forward(msg: Msg) -> None:
                with ctxrelay.use(ctxrelay.Context(request_id="r-forwarder")):
                    await nc.publish(second, msg.data, headers=msg.headers)  # copies its headers
                await nc.publish(second, msg.data, headers=msg.headers)  # bound: the message's

            await nc.subscribe(first, cb=forward)
            await nc.flush()
            with ctxrelay.bind(request_id="r-origin", user="ada"):
                await nc.publish(first, b"x", headers={"x-app": "kept"})
            a = await outbox.next_msg(timeout=WAIT)
            b = await outbox.next_msg(timeout=WAIT)
            return dict(a.headers or {}), b.headers

    a, b = run(main)
    assert a["x-request-id"] == "r-forwarder"
    assert "baggage" not in a  # ada was the origin's, not the forwarder's
    assert a["x-app"] == "kept"
    assert a[KEY] == "x-request-id"
    assert b is not None
    assert b["x-request-id"] == "r-origin"


def test_a_header_the_caller_set_wins_and_is_what_the_message_carries() -> None:
    async def main() -> dict[str, str]:
        async with connections(SECRET) as (nc, _):
            seen, subj = Seen(), subject("caller")

            async def handle(msg: Msg) -> None:
                seen.add(dict(ctxrelay.current()))

            await nc.subscribe(subj, cb=handle)
            await nc.flush()
            with ctxrelay.bind(request_id="r-bound"):
                await nc.publish(subj, b"x", headers={"X-Request-Id": "r-explicit"})
            return (await seen.wait(1))[0]

    assert run(main) == {"request_id": "r-explicit"}


# -- the policy --------------------------------------------------------------------
def test_the_in_house_route_decides_and_credentials_stay_home_unless_it_names_them() -> None:
    async def main() -> tuple[dict[str, str], dict[str, str]]:
        async with connections() as (nc, bare):
            subj = subject("policy")
            sub = await bare.subscribe(subj)
            await bare.flush()
            fields = {"request_id": "r-p", "cookie": "session=s1", "x-gray": "grün", "tenant": "a"}
            with ctxrelay.use(ctxrelay.Context(fields)):
                await nc.publish(subj, b"x")
                ctxrelay.configure(
                    Policy(
                        capture={"cookie", "x-gray"},
                        in_house=Policy.Route(sensitive={"cookie"}),
                    )
                )
                await nc.publish(subj, b"y")
            first = await sub.next_msg(timeout=WAIT)
            second = await sub.next_msg(timeout=WAIT)
            return dict(first.headers or {}), dict(second.headers or {})

    ctxrelay.configure(Policy(capture={"cookie", "x-gray"}))
    default, named = run(main)
    assert "cookie" not in default
    assert "session" not in default.get("baggage", "")
    assert default["x-gray"] == "grün"  # captured, not a credential: travels as itself
    assert named["cookie"] == "session=s1"


# -- hostile input -----------------------------------------------------------------
def _hostile(subj: str) -> list[tuple[str, dict[str, str], str]]:
    """(name, headers a producer without ctxrelay sends, the log line expected)."""
    return [
        ("control character", {KEY: "x-request-id", "x-request-id": "r\x01x"}, "malformed"),
        ("huge", {KEY: "baggage", "baggage": "user=" + "x" * 60_000}, "malformed"),
        ("bad traceparent", {KEY: "traceparent", "traceparent": "00-zz-zz-01"}, "malformed"),
        ("missing entry", {KEY: "x-request-id,baggage", "x-request-id": "r-1"}, "malformed"),
        ("too many", {KEY: ",".join(f"h{i}" for i in range(65))}, "malformed"),
        ("unsigned", {KEY: "x-request-id", "x-request-id": "r-admin"}, "no signature"),
        (
            "tampered",
            {KEY: "x-request-id", "x-request-id": "r-admin", SIGNATURE: "v1=" + "0" * 64},
            "a signature that does not match",
        ),
    ]


def test_hostile_headers_run_the_handler_with_an_empty_context_and_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[list[dict[str, str]], int]:
        async with connections(SECRET) as (nc, bare):
            seen, subj = Seen(), subject("hostile")

            async def handle(msg: Msg) -> None:
                seen.add(dict(ctxrelay.current()))

            await nc.subscribe(subj, cb=handle)
            await nc.flush()
            cases = _hostile(subj)
            for _, headers, _ in cases:
                await bare.publish(subj, b"x", headers=headers)
            await bare.flush()
            with ctxrelay.bind(request_id="r-after"):
                await nc.publish(subj, b"good")
            return await seen.wait(len(cases) + 1), len(cases)

    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        seen, count = run(main)
    # Two connections publish: the server orders each one's messages, not the
    # two against each other, so only the counts are fixed.
    assert sorted(seen, key=len) == [{}] * count + [{"request_id": "r-after"}]
    messages = [r.getMessage() for r in caplog.records if r.name == "ctxrelay"]
    for name, _, why in _hostile(""):
        assert any(why in m for m in messages), name
    assert not any("r-admin" in m or "\x01" in m or "xxxx" in m for m in messages)


def test_a_signed_context_moved_to_another_payload_or_subject_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[dict[str, str]]:
        async with connections(SECRET) as (nc, bare):
            seen, subj, other = Seen(), subject("moved"), subject("moved-other")
            spy = await bare.subscribe(subj)

            async def handle(msg: Msg) -> None:
                seen.add(dict(ctxrelay.current()))

            await nc.subscribe(subj, cb=handle)
            await nc.subscribe(other, cb=handle)
            await nc.flush()
            await bare.flush()
            with ctxrelay.bind(request_id="r-signed", user="ada"):
                await nc.publish(subj, b"pay 10")
            original = await spy.next_msg(timeout=WAIT)
            await seen.wait(1)
            await bare.publish(subj, b"pay 1000", headers=original.headers)  # other payload
            await bare.publish(other, b"pay 10", headers=original.headers)  # other subject
            return await seen.wait(3)

    with caplog.at_level(logging.WARNING, logger="ctxrelay"):
        seen = run(main)
    assert seen[0] == {"request_id": "r-signed", "user": "ada"}
    assert seen[1:] == [{}, {}]
    assert sum("does not match" in r.getMessage() for r in caplog.records) == 2


# -- JetStream ---------------------------------------------------------------------
@asynccontextmanager
async def stream(nc: Client) -> AsyncIterator[tuple[Any, str, str]]:
    """(JetStream context, stream name, subject prefix); the stream deleted after."""
    js = nc.jetstream()
    name = f"CTXRELAY_{uuid.uuid4().hex[:10].upper()}"
    prefix = f"ctxrelay.js.{name.lower()}"
    await js.add_stream(name=name, subjects=[f"{prefix}.>"])
    try:
        yield js, name, prefix
    finally:
        await js.delete_stream(name)


def test_jetstream_pull_consumer_binds_each_fetched_message_to_its_own_context() -> None:
    async def main() -> list[tuple[str, dict[str, str]]]:
        async with connections(SECRET) as (nc, _), stream(nc) as (js, name, prefix):
            acks = []
            for i in range(N):
                rid = f"r-js-{i}"
                with ctxrelay.bind(request_id=rid, user=f"u{i}"):
                    acks.append(await js.publish_async(f"{prefix}.orders", f"{i}".encode()))
            await asyncio.gather(*acks)
            psub = await js.pull_subscribe(f"{prefix}.orders", durable="pull", stream=name)
            out: list[tuple[str, dict[str, str]]] = []
            while len(out) < N:
                for msg in await psub.fetch(50, timeout=WAIT):  # one poll, many messages
                    with bound(msg):  # per message, never per poll
                        out.append((msg.data.decode(), dict(ctxrelay.current())))
                    await msg.ack()
            return out

    out = run(main)
    assert len(out) == N
    for data, fields in out:
        assert fields == {"request_id": f"r-js-{data}", "user": f"u{data}"}


def test_jetstream_push_consumer_redelivery_keeps_the_context_and_nothing_is_left() -> None:
    async def main() -> list[tuple[str, int, dict[str, str]]]:
        async with connections(SECRET) as (nc, bare), stream(nc) as (js, _, prefix):
            seen: list[tuple[str, int, dict[str, str]]] = []
            done = asyncio.Event()

            async def handle(msg: Msg) -> None:
                seen.append(
                    (msg.data.decode(), msg.metadata.num_delivered, dict(ctxrelay.current()))
                )
                if msg.data == b"retry" and msg.metadata.num_delivered == 1:
                    await msg.nak()  # redelivered: same headers, same context
                    return
                await msg.ack()
                if len(seen) == 4:
                    done.set()

            with ctxrelay.bind(request_id="r-retry"):
                await js.publish(f"{prefix}.a", b"retry")
            await bare.jetstream().publish(f"{prefix}.a", b"foreign")  # no context at all
            with ctxrelay.bind(request_id="r-last"):
                await js.publish(f"{prefix}.a", b"last")
            config = ConsumerConfig(ack_wait=30)
            await js.subscribe(f"{prefix}.a", cb=handle, manual_ack=True, config=config)
            await asyncio.wait_for(done.wait(), WAIT)
            return seen

    seen = run(main)
    assert ("retry", 1, {"request_id": "r-retry"}) in seen
    assert ("retry", 2, {"request_id": "r-retry"}) in seen
    assert ("foreign", 1, {}) in seen
    assert ("last", 1, {"request_id": "r-last"}) in seen


def test_jetstream_server_subjects_get_nothing_and_uninstall_stops_relaying() -> None:
    async def main() -> tuple[dict[str, str] | None, dict[str, str] | None]:
        async with connections() as (nc, bare):
            subj = subject("uninstall")
            spy = await bare.subscribe(subj)
            acks = await bare.subscribe("$JS.ACK.ctxrelay.>")
            await bare.flush()
            with ctxrelay.bind(request_id="r-ack"):
                await nc.publish("$JS.ACK.ctxrelay.x", b"+ACK")  # the server's: untouched
            ack = await acks.next_msg(timeout=WAIT)
            uninstall(nc)
            uninstall(nc)
            with ctxrelay.bind(request_id="r-gone"):
                await nc.publish(subj, b"x")
            plain = await spy.next_msg(timeout=WAIT)
            return ack.headers, plain.headers

    ack, plain = run(main)
    assert ack is None
    assert plain is None


def test_the_documented_example_runs() -> None:
    need_nats()
    page = Path(__file__).resolve().parents[2] / "docs" / "nats.md"
    (code,) = re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "pulled b'bob' r-bob" in result.stdout
