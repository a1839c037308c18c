"""``RequestSnapshot`` and ``Headers``: a frozen copy of the inbound request.

Built from real servers' data (uvicorn's ASGI scope, wsgiref's WSGI environ)
and from hand-made hostile input that no well-behaved server would produce
but a buggy one or a test might: construction must never raise, and whatever
it keeps must be clean.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings

from ctxrelay import Headers, RequestSnapshot
from ctxrelay._request import MAX_HEADER_BYTES, MAX_HEADERS, MAX_HEADERS_TOTAL_BYTES
from tests.strategies import (
    BAD_VALUE_CHARS,
    hostile_asgi_headers,
    hostile_environ,
    request_snapshots,
)

FEW = settings(max_examples=60, deadline=None)

Scope = dict[str, Any]


def http_scope(**overrides: Any) -> Scope:
    """An ASGI 3 ``http`` scope shaped like the ones uvicorn hands over."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    scope.update(overrides)
    return scope


def assert_clean(headers: Headers) -> None:
    """What every snapshot promises about the headers it kept."""
    lines = headers.multi_items()
    assert len(lines) <= MAX_HEADERS
    assert sum(len(name) + len(value) for name, value in lines) <= MAX_HEADERS_TOTAL_BYTES
    for name, value in lines:
        assert name
        assert name == name.lower()
        assert name.isascii()
        assert not any(ch in name for ch in " :" + "".join(BAD_VALUE_CHARS))
        assert not any(ch in value for ch in BAD_VALUE_CHARS)
        assert len(value) <= MAX_HEADER_BYTES


# -- from a real ASGI server ---------------------------------------------------------


@pytest.fixture
def uvicorn_snapshots() -> Iterator[tuple[str, list[RequestSnapshot]]]:
    """A real uvicorn on 127.0.0.1 whose app snapshots every request's scope."""
    captured: list[RequestSnapshot] = []

    async def app(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        captured.append(RequestSnapshot.from_asgi(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", captured
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def test_from_asgi_snapshots_a_real_uvicorn_request(
    uvicorn_snapshots: tuple[str, list[RequestSnapshot]],
) -> None:
    base, captured = uvicorn_snapshots
    with httpx.Client() as client:
        response = client.post(
            f"{base}/orders/caf%C3%A9?expand=items&x=%20",
            headers=[
                ("Accept", "text/html"),
                ("accept", "application/json"),
                ("Cookie", 'session=abc; theme="dark mode"; session=second'),
                ("Cookie", "late=1; theme=light"),
                ("Authorization", "Bearer s3cr3t"),
                ("X-Request-ID", "req-42"),
            ],
        )
    assert response.status_code == 204
    (snap,) = captured
    assert snap.method == "POST"
    assert snap.scheme == "http"
    assert snap.host == base.removeprefix("http://")
    assert snap.path == "/orders/café"
    assert snap.query == "expand=items&x=%20"
    assert snap.client is not None
    assert snap.client.startswith("127.0.0.1:")
    assert snap.headers.get_all("accept") == ["text/html", "application/json"]
    assert snap.headers["X-Request-Id"] == "req-42"
    assert snap.cookies == {"session": "abc", "theme": "dark mode", "late": "1"}


def test_a_crlf_a_real_server_decodes_into_the_path_is_kept_but_escaped_in_the_repr(
    uvicorn_snapshots: tuple[str, list[RequestSnapshot]],
) -> None:
    base, captured = uvicorn_snapshots
    with httpx.Client() as client:
        assert client.get(f"{base}/a%0D%0AInjected:%201").status_code == 204
    (snap,) = captured
    assert snap.path == "/a\r\nInjected: 1"
    assert "\n" not in repr(snap)
    assert "\r" not in repr(snap)


# -- from ASGI scopes: the details -------------------------------------------------


def test_from_asgi_keeps_multi_valued_headers_in_arrival_order() -> None:
    snap = RequestSnapshot.from_asgi(
        http_scope(
            headers=[
                (b"x-forwarded-for", b"10.0.0.1"),
                (b"accept", b"a"),
                (b"X-Forwarded-For", b"10.0.0.2"),
                (b"x-forwarded-for", b"10.0.0.3"),
            ]
        )
    )
    assert snap.headers.get_all("X-Forwarded-For") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert snap.headers["x-forwarded-for"] == "10.0.0.1"
    assert snap.headers.multi_items() == [
        ("x-forwarded-for", "10.0.0.1"),
        ("accept", "a"),
        ("x-forwarded-for", "10.0.0.2"),
        ("x-forwarded-for", "10.0.0.3"),
    ]


def test_from_asgi_parses_cookies_with_quoted_values_and_the_first_occurrence_winning() -> None:
    snap = RequestSnapshot.from_asgi(
        http_scope(
            headers=[
                (b"cookie", b'a=1; b="quoted value"; a=2; flag; =nameless; c = spaced '),
                (b"cookie", b"b=late; d=4"),
            ]
        )
    )
    assert snap.cookies == {"a": "1", "b": "quoted value", "c": "spaced", "d": "4"}


def test_from_asgi_without_cookies_has_an_empty_read_only_cookie_mapping() -> None:
    snap = RequestSnapshot.from_asgi(http_scope())
    assert dict(snap.cookies) == {}
    with pytest.raises(TypeError):
        snap.cookies["a"] = "1"  # type: ignore[index]


def test_from_asgi_takes_the_host_from_the_host_header_else_from_the_server() -> None:
    with_header = http_scope(headers=[(b"host", b"shop.example")])
    assert RequestSnapshot.from_asgi(with_header).host == "shop.example"
    assert RequestSnapshot.from_asgi(http_scope()).host == "127.0.0.1:8000"
    unix_socket = http_scope(server=("/run/app.sock", None))
    assert RequestSnapshot.from_asgi(unix_socket).host == ""
    assert RequestSnapshot.from_asgi(http_scope(server=None)).host == ""


def test_from_asgi_formats_the_client_as_host_colon_port_or_none() -> None:
    assert RequestSnapshot.from_asgi(http_scope(client=["10.1.2.3", 443])).client == "10.1.2.3:443"
    assert RequestSnapshot.from_asgi(http_scope(client=None)).client is None


def test_from_asgi_keeps_the_raw_query_string_without_the_question_mark() -> None:
    snap = RequestSnapshot.from_asgi(http_scope(query_string=b"q=caf%C3%A9&n=1"))
    assert snap.query == "q=caf%C3%A9&n=1"
    assert RequestSnapshot.from_asgi(http_scope(query_string=b"")).query == ""


def test_from_asgi_snapshots_a_websocket_scope() -> None:
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "path": "/live",
        "raw_path": b"/live",
        "query_string": b"room=7",
        "root_path": "",
        "headers": [
            (b"host", b"chat.example"),
            (b"sec-websocket-protocol", b"v1"),
            (b"sec-websocket-protocol", b"v2"),
            (b"cookie", b"session=abc"),
        ],
        "client": ("10.0.0.9", 40000),
        "server": ("10.0.0.1", 443),
        "subprotocols": ["v1", "v2"],
    }
    snap = RequestSnapshot.from_asgi(scope)
    assert snap.scheme == "ws"
    assert snap.method == "GET"
    assert snap.host == "chat.example"
    assert snap.path == "/live"
    assert snap.query == "room=7"
    assert snap.client == "10.0.0.9:40000"
    assert snap.headers.get_all("sec-websocket-protocol") == ["v1", "v2"]
    assert snap.cookies == {"session": "abc"}
    assert RequestSnapshot.from_asgi({**scope, "scheme": "wss"}).scheme == "wss"


# -- from a real WSGI server ---------------------------------------------------------


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wsgiref_snapshots() -> Iterator[tuple[str, list[RequestSnapshot]]]:
    """A real wsgiref server on 127.0.0.1 whose app snapshots every environ."""
    captured: list[RequestSnapshot] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        captured.append(RequestSnapshot.from_wsgi(environ))
        start_response("204 No Content", [])
        return [b""]

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", captured
    finally:
        server.shutdown()
        thread.join(timeout=20)
        server.server_close()


def test_from_wsgi_snapshots_a_real_wsgiref_request(
    wsgiref_snapshots: tuple[str, list[RequestSnapshot]],
) -> None:
    base, captured = wsgiref_snapshots
    with httpx.Client() as client:
        response = client.put(
            f"{base}/caf%C3%A9/items?q=%C3%A9&n=1",
            headers=[
                ("Accept", "text/html"),
                ("Cookie", 'session=abc; theme="dark mode"'),
                ("X-Request-ID", "req-7"),
                ("Content-Type", "application/json"),
            ],
            content=b"{}",
        )
    assert response.status_code == 204
    (snap,) = captured
    assert snap.method == "PUT"
    assert snap.scheme == "http"
    assert snap.host == base.removeprefix("http://")
    # PEP 3333: PATH_INFO holds the bytes as latin-1; the snapshot decodes UTF-8
    assert snap.path == "/café/items"
    assert snap.query == "q=%C3%A9&n=1"
    assert snap.client is not None
    assert snap.client.startswith("127.0.0.1")
    assert snap.headers["accept"] == "text/html"
    assert snap.headers["x-request-id"] == "req-7"
    assert snap.headers["content-type"] == "application/json"
    assert snap.cookies == {"session": "abc", "theme": "dark mode"}


# -- from WSGI environs: the details -------------------------------------------------


def wsgi_environ(**overrides: Any) -> dict[str, Any]:
    """A WSGI environ shaped like the ones servers hand over (PEP 3333)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "app.internal",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
    }
    environ.update(overrides)
    return environ


def test_from_wsgi_reads_http_keys_and_content_type_as_headers() -> None:
    snap = RequestSnapshot.from_wsgi(
        wsgi_environ(
            HTTP_X_REQUEST_ID="req-1",
            HTTP_ACCEPT_LANGUAGE="fr",
            CONTENT_TYPE="text/plain",
            CONTENT_LENGTH="",
            HTTP_COOKIE="a=1; b=2",
        )
    )
    assert snap.headers["X-Request-Id"] == "req-1"
    assert snap.headers["accept-language"] == "fr"
    assert snap.headers["content-type"] == "text/plain"
    assert "content-length" not in snap.headers  # empty means absent
    assert snap.cookies == {"a": "1", "b": "2"}


def test_from_wsgi_joins_script_name_and_path_info_decoding_pep3333_strings() -> None:
    raw = "/café/ünï".encode().decode("latin-1")  # what a server puts in environ
    snap = RequestSnapshot.from_wsgi(wsgi_environ(SCRIPT_NAME="/app", PATH_INFO=raw))
    assert snap.path == "/app/café/ünï"


def test_from_wsgi_keeps_a_path_that_is_not_utf8_as_the_server_gave_it() -> None:
    snap = RequestSnapshot.from_wsgi(wsgi_environ(PATH_INFO="/\xff\xfe"))
    assert snap.path == "/\xff\xfe"


def test_from_wsgi_defaults_an_empty_path_to_slash() -> None:
    assert RequestSnapshot.from_wsgi(wsgi_environ(PATH_INFO="")).path == "/"


def test_from_wsgi_takes_the_host_header_else_server_name_and_port() -> None:
    assert RequestSnapshot.from_wsgi(wsgi_environ(HTTP_HOST="shop.example")).host == (
        "shop.example"
    )
    assert RequestSnapshot.from_wsgi(wsgi_environ()).host == "app.internal:8080"


def test_from_wsgi_formats_the_client_from_remote_addr_and_port() -> None:
    with_port = wsgi_environ(REMOTE_ADDR="10.0.0.5", REMOTE_PORT="61000")
    assert RequestSnapshot.from_wsgi(with_port).client == "10.0.0.5:61000"
    assert RequestSnapshot.from_wsgi(wsgi_environ(REMOTE_ADDR="10.0.0.5")).client == "10.0.0.5"
    assert RequestSnapshot.from_wsgi(wsgi_environ()).client is None


def test_from_wsgi_reads_method_scheme_and_query() -> None:
    snap = RequestSnapshot.from_wsgi(
        wsgi_environ(
            REQUEST_METHOD="delete", QUERY_STRING="a=1&b=%20", **{"wsgi.url_scheme": "https"}
        )
    )
    assert (snap.method, snap.scheme, snap.query) == ("DELETE", "https", "a=1&b=%20")


# -- immutability ----------------------------------------------------------------------


def test_a_snapshot_rejects_setattr_and_delattr() -> None:
    snap = RequestSnapshot.from_asgi(http_scope(headers=[(b"host", b"a.example")]))
    for name in ("method", "path", "host", "headers", "cookies", "new_attribute"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(snap, name, "x")
    for name in ("method", "path", "headers"):
        with pytest.raises(AttributeError, match="immutable"):
            delattr(snap, name)
    with pytest.raises(AttributeError):
        object.__setattr__(snap, "extra", 1)  # __slots__: no room for more
    assert (snap.method, snap.path, snap.host) == ("GET", "/", "a.example")


def test_headers_are_read_only_and_hand_out_copies() -> None:
    headers = Headers([("accept", "a"), ("accept", "b")])
    with pytest.raises(TypeError):
        headers["accept"] = "c"  # type: ignore[index]
    with pytest.raises(TypeError):
        del headers["accept"]  # type: ignore[attr-defined]
    headers.get_all("accept").append("c")
    headers.multi_items().clear()
    assert headers.get_all("accept") == ["a", "b"]
    assert headers.multi_items() == [("accept", "a"), ("accept", "b")]


# -- Headers -----------------------------------------------------------------------------


def test_headers_are_case_insensitive_and_keep_every_value() -> None:
    headers = Headers([("Accept", "a"), ("X-Id", "1"), ("ACCEPT", "b")])
    assert headers["accept"] == headers["ACCEPT"] == headers.get("Accept") == "a"
    assert headers.get_all("aCcEpT") == ["a", "b"]
    assert headers.multi_items() == [("accept", "a"), ("x-id", "1"), ("accept", "b")]
    assert list(headers) == ["accept", "x-id"]
    assert len(headers) == 2
    assert "X-ID" in headers
    not_a_name: object = 7
    assert not_a_name not in headers
    assert headers.get("missing") is None
    assert headers.get("missing", "d") == "d"
    assert headers.get_all("missing") == []
    with pytest.raises(KeyError):
        headers["missing"]


def test_headers_strip_and_lowercase_names_and_drop_invalid_ones() -> None:
    headers = Headers(
        [(" X-Pad ", "v"), ("bad name", "v"), ("a:b", "v"), ("", "v"), ("é", "v"), ("ok", "v")]
    )
    assert headers.multi_items() == [("x-pad", "v"), ("ok", "v")]


# -- hostile input -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\r", "\n", "\x00", "\r\n", "\x1b", "\x7f"])
def test_header_values_with_control_characters_are_dropped(bad: str) -> None:
    raw = f"a{bad}Injected: 1".encode("latin-1")
    asgi = RequestSnapshot.from_asgi(
        http_scope(headers=[(b"x-evil", raw), (b"cookie", raw), (b"x-ok", b"fine\tvalue")])
    )
    wsgi = RequestSnapshot.from_wsgi(
        wsgi_environ(HTTP_X_EVIL=raw.decode("latin-1"), HTTP_X_OK="fine\tvalue")
    )
    for snap in (asgi, wsgi):
        assert "x-evil" not in snap.headers
        assert snap.headers["x-ok"] == "fine\tvalue"  # tab is allowed
    assert dict(asgi.cookies) == {}


def test_a_header_value_over_the_cap_is_dropped_whole() -> None:
    at_cap = b"c" * MAX_HEADER_BYTES
    over = b"o" * (MAX_HEADER_BYTES + 1)
    snap = RequestSnapshot.from_asgi(
        http_scope(headers=[(b"x-at-cap", at_cap), (b"x-over", over), (b"cookie", b"big=" + over)])
    )
    assert snap.headers["x-at-cap"] == at_cap.decode()
    assert "x-over" not in snap.headers
    assert dict(snap.cookies) == {}  # a truncated cookie would be worse than none
    wsgi = RequestSnapshot.from_wsgi(wsgi_environ(HTTP_X_OVER=over.decode()))
    assert "x-over" not in wsgi.headers


def test_more_than_the_maximum_number_of_headers_are_capped_keeping_the_first() -> None:
    lines = [(f"x-h{i}".encode(), str(i).encode()) for i in range(MAX_HEADERS + 72)]
    snap = RequestSnapshot.from_asgi(http_scope(headers=lines))
    kept = snap.headers.multi_items()
    assert len(kept) == MAX_HEADERS
    assert kept == [(n.decode(), v.decode()) for n, v in lines[:MAX_HEADERS]]


def test_headers_beyond_the_total_size_cap_are_dropped() -> None:
    value = b"v" * 8000
    lines = [(b"host", b"shop.example")] + [(f"x-h{i:02}".encode(), value) for i in range(20)]
    snap = RequestSnapshot.from_asgi(http_scope(headers=lines))
    kept = snap.headers.multi_items()
    total = sum(len(n) + len(v) for n, v in kept)
    assert total <= MAX_HEADERS_TOTAL_BYTES
    assert total > MAX_HEADERS_TOTAL_BYTES - 8010  # filled up to the cap, not far below
    assert snap.host == "shop.example"
    assert [n for n, _ in kept[:9]] == ["host"] + [f"x-h{i:02}" for i in range(8)]


def test_malformed_asgi_header_entries_are_dropped() -> None:
    snap = RequestSnapshot.from_asgi(
        http_scope(
            headers=[
                (b"only-one",),
                b"not-a-pair",
                (b"a", b"b", b"c"),
                ("x-str-name", b"v"),
                (b"x-str-value", "v"),
                (b"x-zero", 0),  # bytes(0) == b"": not a header value
                (b"x-list", [104, 105]),  # bytes([104, 105]) == b"hi"
                (b"x-huge", 2**62),  # bytes(2**62) would try to allocate it
                None,
                7,
                (b"x-ok", b"fine"),
                [b"x-list-pair", b"kept"],
                (bytearray(b"x-bytearray"), bytearray(b"kept")),
            ]
        )
    )
    assert snap.headers.multi_items() == [
        ("x-ok", "fine"),
        ("x-list-pair", "kept"),
        ("x-bytearray", "kept"),
    ]


def test_from_wsgi_ignores_non_string_keys_and_values() -> None:
    environ = wsgi_environ(HTTP_X_NUM=5, HTTP_X_BYTES=b"v", HTTP_X_OK="fine")
    environ[("HTTP_X_TUPLE",)] = "v"  # type: ignore[index]
    snap = RequestSnapshot.from_wsgi(environ)
    assert snap.headers.multi_items() == [("x-ok", "fine")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_asgi_headers)
def test_from_asgi_never_raises_on_arbitrary_header_lists_and_keeps_only_clean_lines(
    headers: list[Any],
) -> None:
    snap = RequestSnapshot.from_asgi(http_scope(headers=headers))
    assert_clean(snap.headers)
    well_formed = {
        (bytes(n).decode("latin-1").strip().lower(), bytes(v).decode("latin-1"))
        for n, v in (h for h in headers if isinstance(h, (tuple, list)) and len(h) == 2)
        if isinstance(n, (bytes, bytearray)) and isinstance(v, (bytes, bytearray))
    }
    assert set(snap.headers.multi_items()) <= well_formed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_environ)
def test_from_wsgi_never_raises_on_arbitrary_environs_and_keeps_only_clean_lines(
    environ: dict[str, Any],
) -> None:
    snap = RequestSnapshot.from_wsgi(environ)
    assert_clean(snap.headers)
    candidates: set[tuple[str, str]] = set()
    for key, value in environ.items():
        if isinstance(key, str) and isinstance(value, str):
            if key.startswith("HTTP_"):
                candidates.add((key[5:].replace("_", "-").strip().lower(), value))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                candidates.add((key.replace("_", "-").lower(), value))
    assert set(snap.headers.multi_items()) <= candidates


# -- value semantics ------------------------------------------------------------------


@FEW
@given(request_snapshots)
def test_pickling_round_trips_to_an_equal_snapshot(snap: RequestSnapshot) -> None:
    back = pickle.loads(pickle.dumps(snap))
    assert back == snap
    assert hash(back) == hash(snap)
    assert back.headers.multi_items() == snap.headers.multi_items()
    assert dict(back.cookies) == dict(snap.cookies)
    assert (back.method, back.scheme, back.host, back.path, back.query, back.client) == (
        snap.method,
        snap.scheme,
        snap.host,
        snap.path,
        snap.query,
        snap.client,
    )


def test_unpickling_validates_header_lines_again() -> None:
    snap = RequestSnapshot(headers=[("x-ok", "fine"), ("x-evil", "placeholder")])
    # Tamper with the lines as a hostile process could before pickling.
    snap.headers._lines = (("x-ok", "fine"), ("x-evil", "a\r\nInjected: 1"))
    back = pickle.loads(pickle.dumps(snap))
    assert back.headers.multi_items() == [("x-ok", "fine")]


@FEW
@given(request_snapshots)
def test_snapshots_built_from_the_same_data_are_equal_and_hash_equal(
    snap: RequestSnapshot,
) -> None:
    twin = RequestSnapshot(
        method=snap.method.lower(),
        scheme=snap.scheme,
        host=snap.host,
        path=snap.path,
        query=snap.query,
        client=snap.client,
        headers=[(name.upper(), value) for name, value in snap.headers.multi_items()],
    )
    assert twin == snap
    assert hash(twin) == hash(snap)
    assert len({twin, snap}) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"method": "POST"},
        {"scheme": "https"},
        {"host": "other.example"},
        {"path": "/other"},
        {"query": "x=1"},
        {"client": "10.0.0.1:1"},
        {"headers": [("accept", "b")]},
    ],
    ids=lambda change: next(iter(change)),
)
def test_snapshots_differing_in_any_attribute_are_unequal(change: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "method": "GET",
        "scheme": "http",
        "host": "shop.example",
        "path": "/",
        "query": "",
        "client": None,
        "headers": [("accept", "a")],
    }
    assert RequestSnapshot(**base) == RequestSnapshot(**base)
    assert RequestSnapshot(**base) != RequestSnapshot(**{**base, **change})
    assert RequestSnapshot(**base) != base


def test_the_constructor_rejects_non_string_attributes() -> None:
    with pytest.raises(TypeError, match=r"RequestSnapshot\.path"):
        RequestSnapshot(path=b"/")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"RequestSnapshot\.client"):
        RequestSnapshot(client=("10.0.0.1", 1))  # type: ignore[arg-type]


def test_the_constructor_falls_back_to_the_host_header_and_uppercases_the_method() -> None:
    snap = RequestSnapshot(method="patch", headers=[("Host", "h.example")])
    assert (snap.method, snap.host) == ("PATCH", "h.example")
