"""A Django urlconf and middleware for the request-scope tests: middleware
sets the user the Django ways (a sync middleware's ``with`` block, and
``process_view``), and the view reports what each later step saw."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import requests
from django.http import HttpRequest, HttpResponse, JsonResponse  # type: ignore[import-untyped]
from django.urls import path  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations.requests import install

from ..servers import WAIT, Mailbox

#: Set by the test before the server starts.
DOWNSTREAM: list[str] = []
MAILBOX = Mailbox()
POOL = ctxrelay.ThreadPoolExecutor(4)
LOG = logging.getLogger("tests.request_scope")


class WithBlockMiddleware:
    """A sync middleware that binds the user around the rest of the request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = request.headers.get("x-user-block")
        if user is None:
            return self.get_response(request)
        with ctxrelay.bind(user=user):
            return self.get_response(request)


class ProcessViewMiddleware:
    """A middleware that sets the user in ``process_view``: no block to wrap."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, *args: Any) -> None:
        user = request.headers.get("x-user-view")
        if user is not None:
            ctxrelay.bind_request(user=user)


def report(request: HttpRequest) -> JsonResponse:
    rid = ctxrelay.request_id()
    assert rid is not None
    LOG.info("view")
    with install(requests.Session()) as session:
        session.get(f"{DOWNSTREAM[0]}/down/{rid}", timeout=WAIT)
    # Work that goes on after the response: Django has no background tasks,
    # so a thread, which waits until the response was sent.
    sent = threading.Event()
    ctxrelay.Thread(target=_after, args=(sent, rid), daemon=True).start()
    response = JsonResponse(
        {
            "endpoint": ctxrelay.get("user"),
            "pool": POOL.submit(ctxrelay.get, "user").result(timeout=WAIT),
        }
    )
    response._resource_closers.append(sent.set)
    return response


def _after(sent: threading.Event, rid: str) -> None:
    sent.wait(WAIT)
    MAILBOX.post(rid, ctxrelay.get("user"))


urlpatterns = [path("report", report)]
