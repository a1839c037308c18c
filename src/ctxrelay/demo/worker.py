"""The demo's Celery worker process, for ``--broker``.

``python -m ctxrelay.demo.worker --broker redis://127.0.0.1:6379/0 --queue NAME``

It configures what every shop process configures -- the relay policy, the
log handler with ctxrelay's ``ContextFilter``, Celery with ctxrelay's
integration installed -- and serves ``NAME`` with a solo pool, so the task
runs on this process's main thread.  The integration is always installed
here; whether a task gets its request is decided by the publisher: the order
service installs it only in the relayed walk, and a message published
without it carries nothing to bind.
"""

from __future__ import annotations

import argparse
import os
import sys

import ctxrelay
from ctxrelay.integrations.celery import install

from .hops import attach_logging
from .shop import policy
from .tasks import make_app


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM (warm shutdown)."""
    parser = argparse.ArgumentParser(prog="python -m ctxrelay.demo.worker")
    parser.add_argument("--broker", required=True, help="broker URL, e.g. redis://127.0.0.1:6379/9")
    parser.add_argument("--queue", required=True, help="the queue to serve")
    args = parser.parse_args(argv)
    ctxrelay.configure(policy())
    attach_logging()
    app = make_app(args.broker, args.queue)
    install(app)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            f"--queues={args.queue}",
            f"--hostname=ctxrelay-demo-{os.getpid()}@%h",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
