"""The recipe for any other carrier (docs/any-carrier.md), on real MQTT 5.

mosquitto on 127.0.0.1:1883, paho-mqtt clients; the context rides in the
messages' user properties with the three public calls only: ``inject``,
``extract(..., in_house=True)``, ``use``.  paho handles every message on one
network thread, so that thread is where a leak between messages would show.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import ctxrelay
from ctxrelay import Policy
from tests.brokers import need_mqtt

pytestmark = pytest.mark.broker

N = 200
WAIT = 30.0

Seen = tuple[bytes, dict[str, str], dict[str, str]]


def client() -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)


def publish(producer: mqtt.Client, topic: str, payload: bytes, entries: Any = None) -> None:
    """The recipe's publishing side (``entries`` given: a producer's own, raw)."""
    if entries is None:
        headers: dict[str, str] = {}
        ctxrelay.inject(headers)  # call 1
        entries = list(headers.items())
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho's
    if entries:
        properties.UserProperty = entries
    producer.publish(topic, payload, qos=1, properties=properties).wait_for_publish(WAIT)


@contextmanager
def mqtt_pair() -> Iterator[tuple[mqtt.Client, str, queue.Queue[Seen]]]:
    """(producer, topic, what the consumer's handler saw), both clients stopped after.

    Each item seen: (payload, the thread's context before binding, the
    context inside the binding).
    """
    host, port = need_mqtt()
    topic = f"ctxrelay/test/{uuid.uuid4().hex[:12]}"
    seen: queue.Queue[Seen] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        before = dict(ctxrelay.current())  # what the network thread holds between messages
        entries = getattr(message.properties, "UserProperty", [])
        ctx = ctxrelay.extract(entries, in_house=True)  # call 2
        try:
            with ctxrelay.use(ctx):  # call 3
                seen.put((bytes(message.payload), before, dict(ctxrelay.current())))
                if message.payload.startswith(b"fail"):
                    raise RuntimeError("handler failed")
        except RuntimeError:
            pass  # paho would stop its loop on an exception from a callback

    consumer = client()
    consumer.on_message = on_message
    consumer.on_subscribe = lambda *args: subscribed.put(True)
    consumer.connect(host, port)
    consumer.subscribe(topic, qos=1)
    consumer.loop_start()
    producer = client()
    connected: queue.Queue[bool] = queue.Queue()
    producer.on_connect = lambda *args: connected.put(True)
    producer.connect(host, port)
    producer.loop_start()
    try:
        subscribed.get(timeout=WAIT)
        connected.get(timeout=WAIT)
        yield producer, topic, seen
    finally:
        producer.loop_stop()
        producer.disconnect()
        consumer.loop_stop()
        consumer.disconnect()


def collect(seen: queue.Queue[Seen], count: int) -> list[Seen]:
    return [seen.get(timeout=WAIT) for _ in range(count)]


def test_the_documented_example_runs() -> None:
    need_mqtt()
    page = Path(__file__).resolve().parents[2] / "docs" / "any-carrier.md"
    (code,) = re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines() == ["o-1 for ada (r-42)", "o-2 for None (None)"]


def test_200_concurrent_messages_each_handled_in_its_own_context_and_nothing_between() -> None:
    with mqtt_pair() as (producer, topic, seen):
        expected: dict[bytes, dict[str, str]] = {}
        lock = threading.Lock()

        def send(i: int) -> None:
            payload = f"{'fail' if i % 7 == 0 else 'm'}-{i}".encode()
            if i % 5 == 0:  # some published outside any context
                fields: dict[str, str] = {}
                publish(producer, topic, payload)
            else:
                fields = {"request_id": f"r-{i}-{uuid.uuid4().hex[:6]}", "user": f"u{i}"}
                with ctxrelay.bind(**fields):
                    publish(producer, topic, payload)
            with lock:
                expected[payload] = fields

        threads = [threading.Thread(target=send, args=(i,)) for i in range(N)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        got = collect(seen, N)
    assert len(expected) == N
    for payload, before, inside in got:
        assert before == {}  # nothing left bound on paho's thread, after failures too
        assert inside == expected[payload]


def test_hostile_user_properties_are_dropped_and_never_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctxrelay.configure(Policy(capture={"x-tenant"}))
    # Control characters never get this far: mosquitto disconnects a client
    # whose user property holds one.  extract() drops them all the same.
    control = [("x-request-id", "r\x01x"), ("x-tenant", "ok\x1b[2J"), ("baggage", "u=a\x7fb")]
    assert ctxrelay.extract(control, in_house=True) == {}
    cases: dict[bytes, list[tuple[str, str]]] = {
        b"huge": [("x-tenant", "t" * 10_000), ("baggage", "user=" + "x" * 10_000)],
        b"trace": [("traceparent", "00-zz-zz-01"), ("x-request-id", "r-good")],
        b"repeated": [("x-request-id", "r-1"), ("x-request-id", "r-admin")],
        b"untrusted": [("baggage", "user=root")],
    }
    with mqtt_pair() as (producer, topic, seen):
        for payload, entries in cases.items():
            publish(producer, topic, payload, entries)
        got = {payload: inside for payload, _, inside in collect(seen, len(cases))}
        ctxrelay.configure(Policy(capture={"x-tenant"}, trust_in_house=False))
        publish(producer, topic, b"untrusted-last", [("baggage", "user=root")])
        got.update({payload: inside for payload, _, inside in collect(seen, 1)})
    assert got[b"huge"] == {}
    assert got[b"trace"] == {"request_id": "r-good"}
    assert got[b"repeated"] == {}
    assert got[b"untrusted"] == {"user": "root"}  # in-house baggage, trusted by default
    assert got[b"untrusted-last"] == {}  # ... and not once the policy stops trusting it


def test_the_policy_keeps_credentials_home_unless_a_route_names_them() -> None:
    fields = {"request_id": "r-p", "cookie": "session=s1", "x-gray": "canary", "user": "ada"}
    ctxrelay.configure(Policy(capture={"cookie", "x-gray"}))
    with ctxrelay.use(ctxrelay.Context(fields)):
        in_house: dict[str, str] = {}
        ctxrelay.inject(in_house)
        partner: dict[str, str] = {}
        ctxrelay.inject(partner, destination="mqtts://broker.partner.example")
        ctxrelay.configure(
            Policy(capture={"cookie", "x-gray"}, in_house=Policy.Route(sensitive={"cookie"}))
        )
        named: dict[str, str] = {}
        ctxrelay.inject(named)
    assert "cookie" not in in_house
    assert "session" not in in_house["baggage"]
    assert in_house["x-gray"] == "canary"
    assert partner == {"x-request-id": "r-p"}  # a destination no route names
    assert named["cookie"] == "session=s1"
    with mqtt_pair() as (producer, topic, seen):
        publish(producer, topic, b"in-house", list(in_house.items()))
        ((_, _, inside),) = collect(seen, 1)
    assert inside == {"request_id": "r-p", "user": "ada", "x-gray": "canary"}
