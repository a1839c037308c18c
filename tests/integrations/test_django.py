"""The Django door: one project (tests/integrations/django_app) served under
WSGI by waitress and under ASGI by uvicorn on 127.0.0.1, driven by httpx.

The middleware is configured the Django way (``MIDDLEWARE`` and
``settings.CTXRELAY``: a custom header name and a validator by dotted path),
and every test runs under both servers, with sync and async views.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import django  # type: ignore[import-untyped]
import httpx
import pytest
from django.conf import settings  # type: ignore[import-untyped]

from tests.integrations.django_app import settings as project_settings
from tests.servers import WAIT, fire, new_id, recording, serve_asgi, serve_wsgi

if not settings.configured:
    settings.configure(**{k: v for k, v in vars(project_settings).items() if k.isupper()})
    django.setup()

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]
from django.test import override_settings  # type: ignore[import-untyped]

from ctxrelay.integrations.django import RelayMiddleware
from tests.integrations.django_app.views import BOX

N_CONCURRENT = 500
HEADER = "x-correlation-id"  # from settings.CTXRELAY
HEADERS = {"x-tenant": "acme", "cookie": "session=s3cr3t; theme=dark"}


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """``(kind, base URL)`` of the project served under WSGI, then ASGI."""
    if request.param == "wsgi":
        with serve_wsgi(get_wsgi_application(), threads=4) as url:
            yield "wsgi", url
    else:
        with serve_asgi(get_asgi_application()) as url:
            yield "asgi", url


def get(url: str, path: str, rid: str | None = None, **kw: Any) -> httpx.Response:
    headers = dict(HEADERS)
    if rid is not None:
        headers[HEADER] = rid
    return httpx.get(url + path, headers=headers, timeout=WAIT, **kw)


@pytest.mark.parametrize("view", ["/sync", "/async"])
def test_sync_and_async_views_see_id_headers_and_cookies(
    server: tuple[str, str], view: str
) -> None:
    _, url = server
    rid = new_id()
    response = get(url, view, rid)
    assert response.json() == {"rid": rid, "tenant": "acme", "cookie": "s3cr3t", "path": view}
    assert response.headers[HEADER] == rid
    assert "x-request-id" not in response.headers


def test_settings_validator_rejects_and_a_new_id_is_echoed(server: tuple[str, str]) -> None:
    _, url = server
    response = get(url, "/sync", "reject-me")
    rid = response.json()["rid"]
    assert rid != "reject-me"
    assert len(rid) == 32
    assert response.headers[HEADER] == rid


def test_every_streamed_chunk_carries_the_request_id(server: tuple[str, str]) -> None:
    kind, url = server
    # Django under ASGI wants async iterators (a sync one is warned about).
    path = "/stream" if kind == "wsgi" else "/astream"
    rid = new_id()
    response = get(url, path, rid)
    assert response.text.splitlines() == [f"{i} {rid}" for i in range(3)]
    assert response.headers[HEADER] == rid


def test_server_error_log_line_and_500_carry_the_request_id(server: tuple[str, str]) -> None:
    _, url = server
    rid = new_id()
    with recording("django.request", level=logging.ERROR) as logs:
        response = get(url, "/boom", rid)
        logs.wait_for(lambda message: message.startswith("Internal Server Error"))
    assert response.status_code == 500
    assert response.headers[HEADER] == rid
    assert ("Internal Server Error: /boom", rid) in logs.lines


@pytest.mark.parametrize("mode", ["thread", "wrap", "run_async"])
def test_thread_started_in_a_view_reads_the_request_after_the_response(
    server: tuple[str, str], mode: str
) -> None:
    _, url = server
    rid, key = new_id(), new_id("key")
    gate = BOX.gate(key)
    assert get(url, f"/late/{mode}/{key}", rid).json() == {"started": mode}
    assert key not in BOX.items
    gate.set()
    assert BOX.wait([key])[key] == {
        "rid": rid,
        "tenant": "acme",
        "cookie": "s3cr3t",
        "path": f"/late/{mode}/{key}",
    }


def test_500_concurrent_requests_each_see_only_their_own_id(server: tuple[str, str]) -> None:
    kind, url = server
    with recording("tests.web.django") as logs:
        results = fire(
            url, "/work", N_CONCURRENT, lambda rid: {"key": f"{kind}-{rid}"}, header=HEADER
        )
    ids = [rid for rid, _ in results]
    assert len(set(ids)) == N_CONCURRENT
    for rid, response in results:
        assert response.headers[HEADER] == rid
        assert response.json()["rid"] == rid
    background = BOX.wait([f"{kind}-{rid}" for rid in ids])
    assert all(background[f"{kind}-{rid}"]["rid"] == rid for rid in ids)
    prefix = f"handled {kind}-"
    handled = {msg[len(prefix) :]: bound for msg, bound in logs.lines if msg.startswith(prefix)}
    assert handled == {rid: rid for rid in ids}


def test_misconfigured_settings_fail_at_start_up_not_on_a_request() -> None:
    with (
        override_settings(CTXRELAY={"header": "x"}),
        pytest.raises(ImproperlyConfigured, match="unknown keys"),
    ):
        RelayMiddleware(lambda request: None)
    with (
        override_settings(CTXRELAY={"echo": "yes"}),
        pytest.raises(ImproperlyConfigured, match="echo"),
    ):
        RelayMiddleware(lambda request: None)
