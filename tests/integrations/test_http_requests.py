"""ctxrelay.integrations.requests against a real server on 127.0.0.1."""

from __future__ import annotations

import pytest
import requests

import ctxrelay
from ctxrelay.integrations.requests import Session, install, uninstall

from .outgoing import (
    CALLER_SECRET,
    assert_got_everything,
    assert_got_nothing_sensitive,
    context,
    two_servers,
)


@pytest.fixture(params=["subclass", "install"])
def session(request: pytest.FixtureRequest) -> requests.Session:
    return Session() if request.param == "subclass" else install(requests.Session())


def test_internal_host_receives_cookie_canary_baggage_and_request_id(
    session: requests.Session,
) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        assert session.get(internal.url("/a")).status_code == 200
    assert_got_everything(internal.last("/a"))


def test_foreign_host_receives_nothing_sensitive(session: requests.Session) -> None:
    with two_servers() as (_, foreign), ctxrelay.use(context()):
        session.get(foreign.url("/a"), headers=CALLER_SECRET)
    received = foreign.last("/a").headers
    assert not {"cookie", "baggage", "x-gray"} & received.keys()
    assert received["x-api-key"] == "k-123"  # the caller's own choice, sent as set


@pytest.mark.parametrize("status", [302, 307])
def test_redirect_from_internal_to_foreign_strips_sensitive_headers(
    session: requests.Session, status: int
) -> None:
    with two_servers() as (internal, foreign), ctxrelay.use(context()):
        target = internal.redirect_url(foreign.url("/landing"), status)
        response = session.get(target, headers=CALLER_SECRET)
    assert (response.status_code, len(response.history)) == (200, 1)
    assert_got_everything(internal.last("/redirect"))
    assert_got_nothing_sensitive(foreign.last("/landing"))


def test_redirect_within_the_internal_origin_keeps_them(session: requests.Session) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        session.get(internal.redirect_url(internal.url("/next")))
    assert_got_everything(internal.last("/next"))


def test_headers_the_caller_set_win(session: requests.Session) -> None:
    with two_servers() as (internal, _), ctxrelay.use(context()):
        session.get(internal.url("/a"), headers={"X-Gray": "stable", "X-Request-ID": "mine"})
    received = internal.last("/a").headers
    assert received["x-gray"] == "stable"
    assert received["x-request-id"] == "mine"
    assert received["cookie"] == "session=abc123"


def test_headers_come_from_the_context_current_at_send_time(session: requests.Session) -> None:
    with two_servers() as (internal, _):
        session.get(internal.url("/outside"))
        with ctxrelay.bind(request_id="late"):
            prepared = session.prepare_request(requests.Request("GET", internal.url("/late")))
        with ctxrelay.bind(request_id="at-send"):
            session.send(prepared)
    assert "x-request-id" not in internal.last("/outside").headers
    assert internal.last("/late").headers["x-request-id"] == "at-send"


def test_each_pool_task_sends_its_own_context(session: requests.Session) -> None:
    def call(i: int) -> None:
        session.get(internal.url(f"/task/{i}"))

    with two_servers() as (internal, _), ctxrelay.ThreadPoolExecutor(8) as pool:
        futures = []
        for i in range(40):
            with ctxrelay.bind(request_id=f"req-{i}", tenant=f"t{i}"):
                futures.append(pool.submit(call, i))
        for future in futures:
            future.result(timeout=30)
    for i in range(40):
        headers = internal.last(f"/task/{i}").headers
        assert headers["x-request-id"] == f"req-{i}"
        assert headers["baggage"] == f"tenant=t{i}"


def test_a_prepared_request_sent_again_carries_the_context_of_the_second_send(
    session: requests.Session,
) -> None:
    # One PreparedRequest sent for two users: the second send must not carry
    # the first user's cookie and request id (headers are computed per send).
    with two_servers() as (internal, _):
        prepared = session.prepare_request(requests.Request("GET", internal.url("/again")))
        with ctxrelay.bind(request_id="req-alice", cookie="session=alice"):
            session.send(prepared)
        first = internal.last("/again").headers
        with ctxrelay.bind(request_id="req-bob", cookie="session=bob"):
            session.send(prepared)
        second = internal.last("/again").headers
    assert (first["x-request-id"], first["cookie"]) == ("req-alice", "session=alice")
    assert (second["x-request-id"], second["cookie"]) == ("req-bob", "session=bob")


def test_a_request_id_http_cannot_carry_does_not_fail_the_request(
    session: requests.Session,
) -> None:
    # A non-latin-1 id (set by the app, or read from a queue message) made
    # http.client raise UnicodeEncodeError into the caller at send time.
    with two_servers() as (internal, _), ctxrelay.bind(request_id="req-€", tenant="acme"):
        assert session.get(internal.url("/euro")).status_code == 200
    received = internal.last("/euro").headers
    assert "x-request-id" not in received
    assert received["baggage"] == "tenant=acme"


def test_uninstall_undoes_install_exactly() -> None:
    session = requests.Session()
    send = session.send
    install(session)
    uninstall(uninstall(session))  # idempotent
    assert session.send == send
    assert "send" not in session.__dict__
    with two_servers() as (internal, _), ctxrelay.use(context()):
        session.get(internal.url("/a"), timeout=10)
    assert "x-request-id" not in internal.last("/a").headers
    session.close()


@pytest.mark.parametrize("not_a_session", [None, "x", 42])
def test_install_refuses_what_is_not_a_session(not_a_session: object) -> None:
    with pytest.raises(TypeError, match=r"requests\.Session"):
        install(not_a_session)  # type: ignore[arg-type]
