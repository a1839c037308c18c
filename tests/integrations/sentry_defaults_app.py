"""Sentry as an application sets it up, in a process of its own.

``python -m tests.integrations.sentry_defaults_app <directory> <requests>``
initialises the SDK the way its documentation says -- ``sentry_sdk.init``
with ctxrelay's integration, and the SDK's default and auto-enabled
integrations (FastAPI, Starlette, Flask, threading, logging, ...) -- then
serves a FastAPI app and a Flask app, each behind ctxrelay's door as
ctxrelay's documentation says, sends them ``<requests>`` failing requests
each (every one with its own id, user header and cookie), and exits.  Every
event and transaction is written into ``<directory>`` as a JSON file.

In a process of its own because the auto-enabled integrations patch
Starlette, Flask and ``threading`` for the rest of the process's life.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import sentry_sdk
from fastapi import FastAPI, Request
from flask import Flask, request

import ctxrelay
from ctxrelay.integrations import asgi, wsgi
from ctxrelay.integrations.sentry import SentryIntegration
from tests.integrations.sentry_capture import DirectoryTransport
from tests.servers import serve_asgi, serve_wsgi

POLICY = ctxrelay.Policy(capture={"x-user", "cookie"})


def user_of(rid: str) -> str:
    return f"user-of-{rid}"


def cookie_of(rid: str) -> str:
    return f"session=session-secret-{rid}"


def fastapi_app() -> Any:
    api = FastAPI()

    @api.get("/order")
    async def order(request: Request) -> None:
        raise ValueError(f"fastapi handler failed for {request.headers['x-request-id']}")

    return asgi.RelayMiddleware(api, log_errors=False)  # outermost, as docs/web.md says


def flask_app() -> Any:
    app = Flask("sentry_defaults")

    @app.get("/order")
    def order() -> str:
        raise ValueError(f"flask handler failed for {request.headers['x-request-id']}")

    app.wsgi_app = wsgi.RelayMiddleware(app.wsgi_app, log_errors=False)  # type: ignore[method-assign]
    return app


def send(url: str, prefix: str, count: int) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for n in range(count):
            rid = f"req-{prefix}-{n}"
            headers = {"x-request-id": rid, "x-user": user_of(rid), "cookie": cookie_of(rid)}
            # A connection of its own: the server closes it after the app's exception.
            headers["connection"] = "close"
            assert client.get("/order", headers=headers).status_code == 500


def main(directory: str, count: int) -> None:
    ctxrelay.configure(POLICY)
    sentry_sdk.init(
        transport=DirectoryTransport(directory),
        integrations=[SentryIntegration()],
        traces_sample_rate=1.0,
    )
    try:
        with serve_asgi(fastapi_app()) as url:
            send(url, "fastapi", count)
        with serve_wsgi(flask_app()) as url:
            send(url, "flask", count)
    finally:
        sentry_sdk.get_client().close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
