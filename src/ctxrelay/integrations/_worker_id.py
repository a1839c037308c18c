"""The request id a worker binds for a job that arrived without one.

A job published by celery beat, a cron script, a management command, a
producer without ctxrelay -- or whose carried context was refused (a bad
signature, a malformed carrier) -- would otherwise run with no request id,
and its log lines could not be told from the next job's.  The worker
integrations (Celery, RQ, Dramatiq, arq, taskiq) give such a job a fresh id,
made the way the web door makes one (django-guid #33, asgi-correlation-id's
Celery ``generator=``):

* ``generator=`` when one is given to the integration;
* else, under Django, the door configured by ``settings.CTXRELAY``
  (its ``generator``, ``transformer`` and ``validator``), read once, on the
  first job that needs an id -- Django is imported only when the process
  uses it (``DJANGO_SETTINGS_MODULE`` set, or ``django.conf`` imported);
* else :func:`ctxrelay._inbound.new_request_id`.

The id is checked by the door's own rule (:meth:`ctxrelay._inbound.Door.new_id`):
a generator that raises, returns something that is not a ``str`` or an id
the validator refuses is replaced by a random id, with a warning.  Nothing
here raises into the worker.

This is protocol, not framework glue: its home is the carrier module
(``ctxrelay._carrier``); it lives here until it moves there.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from .._context import REQUEST_ID, Context
from .._inbound import Door, RequestIdGenerator, new_request_id

__all__ = ["FreshIds"]

_log = logging.getLogger("ctxrelay")


class FreshIds:
    """Gives a job's context a request id when it has none (unless turned off).

    ``owner`` names the integration in the ``TypeError`` a wrong argument
    raises (at setup, where it belongs).
    """

    __slots__ = ("_door", "config", "enabled")

    def __init__(self, generate_id: object = True, generator: object = None, *, owner: str) -> None:
        if not isinstance(generate_id, bool):
            raise TypeError(
                f"{owner}: generate_id must be True or False, not {type(generate_id).__name__}"
            )
        if generator is not None and not callable(generator):
            raise TypeError(
                f"{owner}: generator must be a callable returning a new request id, "
                f"not {type(generator).__name__}"
            )
        #: What it was made from, to tell whether a configuration changed.
        self.config: tuple[bool, object] = (generate_id, generator)
        self.enabled: bool = generate_id
        gen: RequestIdGenerator | None = generator
        # None until the first job that needs one: then Django's, or the default.
        self._door: Door | None = None if gen is None else Door(generator=gen)

    def completed(self, ctx: Context) -> Context:
        """``ctx``, with a fresh request id when it has none.  Never raises."""
        if not self.enabled or REQUEST_ID in ctx:
            return ctx
        try:
            return ctx.set({REQUEST_ID: self._door_in_force().new_id()})
        except Exception:  # a validator that let through what no field may hold
            _log.exception("ctxrelay: could not make a request id for a job; using a random one")
            try:
                return ctx.set({REQUEST_ID: new_request_id()})
            except Exception:
                return ctx

    def _door_in_force(self) -> Door:
        door = self._door
        if door is None:
            # Two threads may both build it: equal doors, an atomic assignment.
            door = self._door = _door_from_django() or Door()
        return door


def _door_from_django() -> Door | None:
    """The door ``settings.CTXRELAY`` configures, when this process uses
    Django and configures one; ``None`` otherwise (and, logged, when the
    settings are wrong: the web door refuses to start then, a worker runs on
    with random ids)."""
    if "django.conf" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    try:
        from django.conf import settings  # type: ignore[import-untyped]

        config: Any = getattr(settings, "CTXRELAY", None)
    except Exception:  # not configured: not a Django process after all
        return None
    if not isinstance(config, dict) or not config:
        return None
    try:
        from .django import door_from_settings

        door, _ = door_from_settings()
    except Exception:
        _log.exception(
            "ctxrelay: settings.CTXRELAY could not be read for the jobs' request ids; "
            "they get random ones"
        )
        return None
    return door
