"""A client that drops a Django streaming response never leaves that
request's context on the server thread for later requests.

Under WSGI, Django closes the view's generator in ``response.close()``, after
the middleware returned: the generator's ``with bind(...)`` exit ran outside
the request's binding and restored the request's context into the server
thread's own context, where the next requests' ``request_started``
receivers (and WSGI middleware around Django) saw it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import django  # type: ignore[import-untyped]
import httpx
import pytest
from django.conf import settings  # type: ignore[import-untyped]

from tests.integrations.django_app import settings as project_settings
from tests.servers import WAIT, serve_asgi, serve_wsgi

if not settings.configured:
    settings.configure(**{k: v for k, v in vars(project_settings).items() if k.isupper()})
    django.setup()

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
from django.core.signals import request_finished, request_started  # type: ignore[import-untyped]
from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

import ctxrelay
from tests.integrations.django_app.views import BOX

# These tests provoke strict-mode reports on purpose.
pytestmark = pytest.mark.ctxrelay_expect_reports

HEADER = "x-correlation-id"  # from settings.CTXRELAY


def _read_then_drop(base: str, path: str, rid: str = "req-dropped") -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{HEADER}: {rid}\r\n\r\n".encode())
        got = 0
        while got < 300_000:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        # An abortive close (RST): the server's next write fails at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.fixture
def receivers() -> Iterator[dict[str, list[dict[str, str]]]]:
    seen: dict[str, list[dict[str, str]]] = {"started": [], "finished": []}

    def on_started(**_: Any) -> None:
        seen["started"].append(dict(ctxrelay.current()))

    def on_finished(**_: Any) -> None:
        seen["finished"].append(dict(ctxrelay.current()))

    request_started.connect(on_started, dispatch_uid="ctxrelay-test-started")
    request_finished.connect(on_finished, dispatch_uid="ctxrelay-test-finished")
    try:
        yield seen
    finally:
        request_started.disconnect(dispatch_uid="ctxrelay-test-started")
        request_finished.disconnect(dispatch_uid="ctxrelay-test-finished")


def test_wsgi_dropped_stream_leaves_nothing_on_the_server_thread(
    receivers: dict[str, list[dict[str, str]]],
) -> None:
    with serve_wsgi(get_wsgi_application(), threads=1) as base:
        for i in range(3):
            _read_then_drop(base, f"/endless?user=alice{i}", f"req-dropped-{i}")
        # Django closed each generator in response.close(), as its own request.
        closed = BOX.wait([f"closed-alice{i}" for i in range(3)])
        assert closed == {f"closed-alice{i}": f"req-dropped-{i}" for i in range(3)}
        receivers["started"].clear()
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            for i in range(5):
                got = client.get("/sync", headers={HEADER: f"req-later-{i}"})
                assert got.json()["rid"] == f"req-later-{i}"
    # Before the middleware binds anything, the one server thread is clean.
    assert receivers["started"] == [{}] * 5


# (A sync iterator under ASGI is consumed whole by Django: only async here.)
@pytest.mark.parametrize("path", ["/aendless"])
def test_asgi_dropped_stream_leaves_nothing_for_later_requests(
    receivers: dict[str, list[dict[str, str]]], path: str
) -> None:
    with serve_asgi(get_asgi_application()) as base:
        for i in range(3):
            _read_then_drop(base, f"{path}?user=alice{i}")
        time.sleep(0.3)
        receivers["started"].clear()
        with httpx.Client(base_url=base, timeout=WAIT) as client:
            for i in range(5):
                got = client.get("/sync", headers={HEADER: f"req-later-{i}"})
                assert got.json()["rid"] == f"req-later-{i}"
    assert all("user" not in seen for seen in receivers["started"])
    assert all("alice" not in str(seen) for seen in receivers["started"])
