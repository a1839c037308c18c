"""The outgoing-HTTP scenario every client integration is tested against.

Two recording servers on 127.0.0.1, on two ports: the policy names one
(``internal``, which may receive the cookie) and not the other (``foreign``).
The request's context holds a request id, a captured cookie and canary tag,
and plain fields that travel as baggage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ctxrelay
from ctxrelay import Context, Policy

from ..httpserver import Received, RecordingServer, recording_server

#: What the inbound request left in the context.
FIELDS = {
    "request_id": "req-1",
    "cookie": "session=abc123",
    "x-gray": "canary",
    "tenant": "acme",
    "user": "Jörg Müller",
}

#: A credential the caller sets by hand: it must not follow a foreign redirect.
CALLER_SECRET = {"x-api-key": "k-123"}


@contextmanager
def two_servers() -> Iterator[tuple[RecordingServer, RecordingServer]]:
    """(internal, foreign), with a policy that trusts only ``internal``."""
    with recording_server() as internal, recording_server() as foreign:
        route = Policy.Route(hosts=("127.0.0.1",), ports={internal.port}, sensitive={"cookie"})
        ctxrelay.configure(Policy(capture={"cookie", "x-gray"}, routes=(route,)))
        yield internal, foreign


def context() -> Context:
    return Context(FIELDS)


def assert_got_everything(received: Received) -> None:
    headers = received.headers
    assert headers["x-request-id"] == "req-1"
    assert headers["cookie"] == "session=abc123"
    assert headers["x-gray"] == "canary"
    assert ctxrelay.extract({"baggage": headers["baggage"]}, in_house=True) == {
        "tenant": "acme",
        "user": "Jörg Müller",
    }


def assert_got_nothing_sensitive(received: Received) -> None:
    headers = received.headers
    assert "cookie" not in headers
    assert "x-api-key" not in headers
    assert "x-gray" not in headers
    assert "baggage" not in headers
    assert headers.get("x-request-id") == "req-1"  # a foreign host may correlate
