"""The WSGI door: Flask served by waitress (a real threaded server) on
127.0.0.1, driven by httpx, plus raw WSGI calls for hostile input.

A waitress worker thread serves request after request: none may start with
the previous request's context.  A thread started in a view runs after the
response and still reads the request's headers and cookies (seed 002).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
from flask import Flask, Response, jsonify, request
from hypothesis import given, settings
from hypothesis import strategies as st

import ctxrelay
from ctxrelay.integrations.wsgi import RelayMiddleware, valid_request_id
from tests.servers import WAIT, Mailbox, fire, new_id, recording, serve_wsgi

N_CONCURRENT = 500
HEADERS = {"x-tenant": "acme", "cookie": "session=s3cr3t; theme=dark"}
FLASK_LOGGER = "tests.web.flask"


def seen() -> dict[str, Any]:
    req = ctxrelay.request()
    return {
        "rid": ctxrelay.request_id(),
        "thread": threading.get_ident(),
        "tenant": req.headers.get("x-tenant") if req else None,
        "cookie": req.cookies.get("session") if req else None,
        "path": req.path if req else None,
    }


class Spy:
    """Outermost WSGI layer: records the context each worker thread holds
    when a request arrives, before ctxrelay binds anything."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrivals: list[ctxrelay.Context] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.arrivals.append(ctxrelay.current())
        return self.app(environ, start_response)


def make_flask(box: Mailbox) -> tuple[Flask, Spy]:
    app = Flask(FLASK_LOGGER)

    def late_reader(key: str) -> None:
        box.gate(key).wait(WAIT)
        box.post(key, seen())

    @app.get("/view")
    def view() -> Any:
        return jsonify(seen())

    @app.get("/work")
    def work() -> Any:
        key = request.args["key"]
        app.logger.info("handled %s", key)
        ctxrelay.run_async(lambda: box.post(key, seen()))()
        return jsonify(seen())

    @app.get("/late/<mode>/<key>")
    def late(mode: str, key: str) -> Any:
        if mode == "thread":
            ctxrelay.Thread(target=late_reader, args=(key,)).start()
        elif mode == "wrap":
            threading.Thread(target=ctxrelay.wrap(late_reader), args=(key,)).start()
        else:
            ctxrelay.run_async(late_reader)(key)
        return jsonify(started=mode)

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:  # iterated by waitress after the view returned
            for i in range(3):
                yield f"{i} {ctxrelay.request_id()}\n"

        return Response(chunks(), mimetype="text/plain")

    @app.get("/boom")
    def boom() -> Any:
        raise RuntimeError(f"boom in {ctxrelay.request_id()}")

    app.wsgi_app = RelayMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    spy = Spy(app.wsgi_app)
    app.wsgi_app = spy  # type: ignore[method-assign]
    return app, spy


@pytest.fixture(scope="module")
def box() -> Mailbox:
    return Mailbox()


@pytest.fixture(scope="module")
def flask_server(box: Mailbox) -> Iterator[tuple[str, Spy]]:
    app, spy = make_flask(box)
    with serve_wsgi(app, threads=4) as url:
        yield url, spy


def get(url: str, path: str, rid: str | None = None) -> httpx.Response:
    headers = dict(HEADERS)
    if rid is not None:
        headers["x-request-id"] = rid
    return httpx.get(url + path, headers=headers, timeout=WAIT)


def test_flask_view_sees_inbound_id_headers_and_cookies(flask_server: tuple[str, Spy]) -> None:
    url, _ = flask_server
    rid = new_id()
    response = get(url, "/view", rid)
    body = response.json()
    assert (body["rid"], body["tenant"], body["cookie"], body["path"]) == (
        rid,
        "acme",
        "s3cr3t",
        "/view",
    )
    assert response.headers["x-request-id"] == rid


def test_flask_missing_id_is_generated_and_echoed(flask_server: tuple[str, Spy]) -> None:
    url, _ = flask_server
    response = get(url, "/view")
    assert response.headers["x-request-id"] == response.json()["rid"]
    assert len(response.json()["rid"]) == 32


def test_worker_threads_never_carry_a_previous_requests_context(
    flask_server: tuple[str, Spy],
) -> None:
    url, spy = flask_server
    before = len(spy.arrivals)
    ids = [new_id() for _ in range(40)]
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        bodies = [client.get("/view", headers={"x-request-id": rid}).json() for rid in ids]
    assert [body["rid"] for body in bodies] == ids
    threads = {body["thread"] for body in bodies}
    assert len(threads) < len(ids)  # workers were reused...
    arrivals = spy.arrivals[before:]
    assert len(arrivals) == len(ids)
    assert all(ctx == ctxrelay.Context() for ctx in arrivals)  # ...and arrived clean


def test_every_chunk_of_a_streamed_body_carries_the_request_id(
    flask_server: tuple[str, Spy],
) -> None:
    url, _ = flask_server
    rid = new_id()
    response = get(url, "/stream", rid)
    assert response.text.splitlines() == [f"{i} {rid}" for i in range(3)]
    assert response.headers["x-request-id"] == rid


def test_flask_error_log_line_and_500_carry_the_request_id(flask_server: tuple[str, Spy]) -> None:
    url, _ = flask_server
    rid = new_id()
    with recording(FLASK_LOGGER, level=logging.ERROR) as logs:
        response = get(url, "/boom", rid)
    assert response.status_code == 500
    assert response.headers["x-request-id"] == rid
    assert ("Exception on /boom [GET]", rid) in logs.lines


@pytest.mark.parametrize("mode", ["thread", "wrap", "run_async"])
def test_thread_started_in_a_view_reads_the_request_after_the_response(
    flask_server: tuple[str, Spy], box: Mailbox, mode: str
) -> None:
    url, _ = flask_server
    rid, key = new_id(), new_id("key")
    gate = box.gate(key)
    assert get(url, f"/late/{mode}/{key}", rid).json() == {"started": mode}
    assert key not in box.items
    gate.set()  # the response is complete; Flask has long popped its request
    result = box.wait([key])[key]
    assert (result["rid"], result["tenant"], result["cookie"], result["path"]) == (
        rid,
        "acme",
        "s3cr3t",
        f"/late/{mode}/{key}",
    )


def test_500_concurrent_flask_requests_each_see_only_their_own_id(
    flask_server: tuple[str, Spy], box: Mailbox
) -> None:
    url, _ = flask_server
    with recording(FLASK_LOGGER) as logs:
        results = fire(url, "/work", N_CONCURRENT, params=lambda rid: {"key": "w-" + rid})
    ids = [rid for rid, _ in results]
    assert len(set(ids)) == N_CONCURRENT
    for rid, response in results:
        assert response.headers["x-request-id"] == rid
        assert response.json()["rid"] == rid
    background = box.wait(["w-" + rid for rid in ids])
    assert all(background["w-" + rid]["rid"] == rid for rid in ids)
    handled = {msg[len("handled w-") :]: bound for msg, bound in logs.lines}
    assert handled == {rid: rid for rid in ids}


# -- raw WSGI, in process: hostile input -------------------------------------
def environ(**headers: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/raw",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
    }
    for name, value in headers.items():
        env["HTTP_" + name.upper()] = value
    return env


class WsgiProbe:
    def __init__(self) -> None:
        self.contexts: list[ctxrelay.Context] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.contexts.append(ctxrelay.current())
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]


def call(app: Any, env: dict[str, Any]) -> tuple[list[tuple[str, str]], bytes]:
    started: list[tuple[str, str]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.extend(headers)
        return lambda data: None

    body = app(env, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return started, data


@pytest.mark.parametrize(
    "bad", ["", "A" * 129, "has space", "nul\x00byte", "cr\r\nSet-Cookie: x=1", "\xff\xfe"]
)
def test_invalid_ids_are_replaced_with_a_debug_log(
    bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    probe = WsgiProbe()
    with caplog.at_level(logging.DEBUG, logger="ctxrelay"):
        headers, _ = call(RelayMiddleware(probe), environ(X_REQUEST_ID=bad))
    rid = probe.contexts[0]["request_id"]
    assert ("x-request-id", rid) in headers
    assert len(rid) == 32
    assert any("replaced an invalid inbound x-request-id" in m for m in caplog.messages)


def test_header_values_with_cr_lf_nul_are_never_stored() -> None:
    probe = WsgiProbe()
    call(
        RelayMiddleware(probe, update_request_header=False),
        environ(X_OK="fine", X_CR="a\rb", X_LF="a\nb", X_NUL="a\x00b", COOKIE="s=1\r\nx: y"),
    )
    req = probe.contexts[0].request
    assert req is not None
    assert dict(req.headers) == {"x-ok": "fine"}
    assert dict(req.cookies) == {}


def test_a_body_generator_and_its_close_run_bound_and_nothing_stays_bound() -> None:
    seen_in_body: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            for _ in range(2):
                seen_in_body.append(ctxrelay.request_id())
                yield b"x"
        finally:
            seen_in_body.append(ctxrelay.request_id())  # run by close()

    call(RelayMiddleware(app), environ(X_REQUEST_ID="body-1"))
    assert seen_in_body == ["body-1", "body-1", "body-1"]
    assert ctxrelay.current() == ctxrelay.Context()


def test_an_app_error_is_logged_with_the_id_and_the_context_reset() -> None:
    def failing(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise ValueError("app failed")

    with (
        recording("ctxrelay.wsgi", level=logging.ERROR) as logs,
        pytest.raises(ValueError, match="app failed"),
    ):
        call(RelayMiddleware(failing), environ(X_REQUEST_ID="err-1"))
    assert logs.lines == [("unhandled exception in GET /raw", "err-1")]
    assert ctxrelay.current() == ctxrelay.Context()


junk = st.one_of(st.none(), st.integers(), st.text(max_size=30), st.binary(max_size=10))


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(
        st.one_of(st.sampled_from(["HTTP_X_REQUEST_ID", "HTTP_COOKIE", "REMOTE_PORT"]), st.text()),
        junk,
        max_size=8,
    ),
    base=st.dictionaries(
        st.sampled_from(["REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "REMOTE_ADDR"]), junk
    ),
)
def test_no_environ_makes_the_middleware_raise(extra: dict[str, Any], base: dict[str, Any]) -> None:
    probe = WsgiProbe()
    headers, data = call(RelayMiddleware(probe), {**environ(), **base, **extra})
    assert data == b"ok"
    rid = probe.contexts[0]["request_id"]
    assert valid_request_id(rid)
    assert ("x-request-id", rid) in headers
    assert ctxrelay.current() == ctxrelay.Context()
