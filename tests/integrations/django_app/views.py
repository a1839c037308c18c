"""Views of the test project: each reports what it sees of the request."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import JsonResponse, StreamingHttpResponse  # type: ignore[import-untyped]

import ctxrelay
from ctxrelay.integrations.asgi import valid_request_id
from tests.servers import WAIT, Mailbox

log = logging.getLogger("tests.web.django")

#: Where work that outlives the response posts what it saw.
BOX = Mailbox()


def accept_id(value: str) -> bool:
    """The validator named in ``settings.CTXRELAY``: the default rule, and
    no id starting with ``reject-``."""
    return valid_request_id(value) and not value.startswith("reject-")


def seen() -> dict[str, Any]:
    req = ctxrelay.request()
    return {
        "rid": ctxrelay.request_id(),
        "tenant": req.headers.get("x-tenant") if req else None,
        "cookie": req.cookies.get("session") if req else None,
        "path": req.path if req else None,
    }


def sync_view(request: Any) -> Any:
    return JsonResponse(seen())


async def async_view(request: Any) -> Any:
    await asyncio.sleep(0.002)
    return JsonResponse(seen())


def work(request: Any) -> Any:
    key = request.GET["key"]
    log.info("handled %s", key)
    ctxrelay.run_async(lambda: BOX.post(key, seen()))()
    return JsonResponse(seen())


def _late_reader(key: str) -> None:
    BOX.gate(key).wait(WAIT)
    BOX.post(key, seen())


def late(request: Any, mode: str, key: str) -> Any:
    if mode == "thread":
        ctxrelay.Thread(target=_late_reader, args=(key,)).start()
    elif mode == "wrap":
        threading.Thread(target=ctxrelay.wrap(_late_reader), args=(key,)).start()
    else:
        ctxrelay.run_async(_late_reader)(key)
    return JsonResponse({"started": mode})


def stream(request: Any) -> Any:
    def chunks() -> Iterator[str]:  # iterated by the WSGI server after the view
        for i in range(3):
            yield f"{i} {ctxrelay.request_id()}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def astream(request: Any) -> Any:
    async def chunks() -> AsyncIterator[str]:  # iterated by the ASGI handler
        for i in range(3):
            await asyncio.sleep(0)
            yield f"{i} {ctxrelay.request_id()}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def boom(request: Any) -> Any:
    raise RuntimeError(f"boom in {ctxrelay.request_id()}")


def endless(request: Any) -> Any:
    """A stream the client is expected to drop: its generator holds a scope."""
    user = request.GET["user"]

    def chunks() -> Iterator[bytes]:
        try:
            with ctxrelay.bind(user=user, session="cookie-of-" + user):
                while True:
                    yield b"x" * 65536
                    time.sleep(0.001)
        finally:  # closed by Django's response.close(): as which request?
            BOX.post(f"closed-{user}", ctxrelay.request_id())

    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")


async def aendless(request: Any) -> Any:
    user = request.GET["user"]

    async def chunks() -> AsyncIterator[bytes]:
        with ctxrelay.bind(user=user, session="cookie-of-" + user):
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0.001)

    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")
