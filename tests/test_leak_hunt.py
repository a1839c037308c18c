"""A stateful leak hunt: one request's context never reaches another request's work.

A Hypothesis ``RuleBasedStateMachine`` serves interleaved requests from a few
users through a real ASGI app (Starlette, async and sync endpoints) and a
WSGI app, each wrapped in its ctxrelay ``RelayMiddleware``, in process.  Every
request has a distinct id and carries its user (``x-user``) and a secret
session cookie (``cookie``), both captured as context fields by the policy,
plus the request snapshot.  Handlers leave things behind that outlive the
request, and later steps end them somewhere else:

* a generator holding ``with ctxrelay.bind(...)`` (advanced once, kept), later
  closed, dropped (refcount) or dropped into a reference cycle and collected
  by ``gc.collect()`` -- from within ANOTHER request or outside any request;
* a ``bind()`` scope entered by hand and exited in another
  ``contextvars.Context``; two nested scopes exited out of order;
* a WSGI body iterated partially, then closed by the server or dropped;
* application threads (``threading.Thread`` and ``ctxrelay.Thread``), pool
  tasks (``concurrent.futures``, ``ctxrelay.ThreadPoolExecutor``,
  ``loop.run_in_executor``, ``asyncio.to_thread``) and, rarely, tasks of a
  process pool created lazily (fork) inside a request under ``instrument()``;
* a "library" service thread (``tests/leakhunt_library.py``) started lazily
  by whichever request first uses it, which then handles events posted by
  later requests -- named with ``instrument(library_modules=[...])``, or
  started by the standard library (a ``QueueListener``, the path rule);
* ``with ctxrelay.detached():`` threads;
* ``instrument()``/``uninstrument()`` toggled in between.

Everything that runs records ``(the request it works for, what it saw)``.
After every step, and in assertions inside the steps, the machine checks:

* LEAK: nothing ever saw a field, or the snapshot, of a request other than
  the one it works for; library, service and detached work, and the test
  thread between steps, never see any request at all;
* WRONG: relayed work sees exactly its submitter's context (or, unrelayed
  without ``instrument()``, an empty one), handlers see exactly their own
  request, and out-of-order exits unwind.

The normal run (60 examples of up to 25 steps) takes about 4 s on 2 cores.
For a long hunt::

    CTXRELAY_LEAK_HUNT=2000 .venv/bin/python -m pytest tests/test_leak_hunt.py

runs 2000 examples of up to 40 steps (1500 took about 9 minutes), with the
suite's per-test timeout lifted.  ``--hypothesis-show-statistics`` lists
which interleavings came up (the ``event()`` lines).

WSGI requests run on the test thread, one ``contextvars.Context`` for request
after request, as a threaded server's worker thread does: a scope entered in
one WSGI request and ended in a later one (or between requests) is exited
in the very context it was entered in while another request is current
there -- the case fixed in 312f1c8, hunted here with the foreign ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import gc
import itertools
import logging
import multiprocessing
import os
import re
import threading
import warnings
import weakref
import wsgiref.util
from collections.abc import Callable, Generator, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import ctxrelay
from ctxrelay import Context, _policy
from ctxrelay._context import _CURRENT
from ctxrelay.integrations import asgi as relay_asgi
from ctxrelay.integrations import wsgi as relay_wsgi
from tests import leakhunt_library

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

# The hunt provokes strict-mode reports on purpose.
pytestmark = pytest.mark.ctxrelay_expect_reports

#: ``CTXRELAY_LEAK_HUNT=N``: run N examples (longer ones) instead of the quick default.
HUNT_EXAMPLES = int(os.environ.get("CTXRELAY_LEAK_HUNT") or 0)

EMPTY = Context()
USERS = ("alice", "bob", "carol", "dave")
#: What a handler may do.  ``executor`` (``loop.run_in_executor(None)`` and
#: ``asyncio.to_thread``) runs in the async endpoint only; ``process`` has its
#: own, rarer rule.
ACTIONS = (
    "gen",
    "scope",
    "nested",
    "thread",
    "ctxthread",
    "detached",
    "pool",
    "ctxpool",
    "library",
    "library-stdlib",
    "executor",
)
#: Where a leftover scope is ended: inside another request of each kind, or
#: on the test thread outside any request.
WHERE = ("asgi", "asgi-sync", "wsgi", "outside")
LIBRARY_MODULE = leakhunt_library.__name__
#: A handler's actions: leaving a scope behind comes up half the time, so
#: that the rules which end them elsewhere have something to end.
_ACTION_LISTS = st.lists(
    st.one_of(st.sampled_from(("gen", "scope")), st.sampled_from(ACTIONS)), max_size=3
)
#: Seconds: the bound of every wait (a liveness bound, never asserted as a duration).
WAIT = 10.0
FORK = (
    multiprocessing.get_context("fork")
    if "fork" in multiprocessing.get_all_start_methods()
    else None
)
# Older ctxrelay versions lack detached() and instrument(library_modules=...):
# guarded, so that the hunt runs against them too (and finds their leaks).
_detached: Callable[[], contextlib.AbstractContextManager[Any]] | None = getattr(
    ctxrelay, "detached", None
)
_RID = re.compile(r"req-\d+")
_request_numbers = itertools.count(1)


def _instrument() -> None:
    try:
        ctxrelay.instrument(library_modules=[LIBRARY_MODULE])
    except TypeError:  # an older ctxrelay: instrument() takes no arguments
        ctxrelay.instrument()


def _reset_instrumentation() -> None:
    with contextlib.suppress(TypeError):  # an older ctxrelay has no module names
        ctxrelay.instrument(library_modules=(), application_modules=())
    ctxrelay.uninstrument()


def _collect() -> None:
    gc.collect()


def _seen_in_process() -> Context:
    return ctxrelay.current()


def _describe(seen: Context) -> str:
    snapshot = seen.request
    of = None if snapshot is None else snapshot.headers.get("x-request-id")
    return f"{dict(seen)} with the snapshot of {of}"


# -- bookkeeping ---------------------------------------------------------------------


@dataclass
class Req:
    """One request: what it is, and what its handler saw on entry."""

    rid: str
    user: str
    kind: str
    cookie: str
    entry: Context | None = None
    #: Scopes of this request that were ended somewhere else.
    ended_elsewhere: int = 0

    @property
    def label(self) -> str:
        return f"{self.rid} ({self.kind}, {self.user})"


@dataclass(frozen=True)
class Seen:
    """One observation: who worked for which request, and what it saw."""

    owner: str | None  # the request id it works for; None: no request (library, detached, ...)
    where: str
    seen: Context
    exact: Context | None  # the context it must see exactly, if that is known


@dataclass
class Held:
    """A ``bind()`` scope a request left open: in a generator, or entered by hand."""

    owner: Req
    #: Where it was entered: "the test thread" (WSGI), "its task" (ASGI), "a copy" (AnyIO's).
    home: str
    seq: int
    what: str
    gen: Generator[None, None, None] | None = None
    scope: Any = None  # ctxrelay's scope object, entered and not exited


@dataclass
class Body:
    """A WSGI response body the server has not finished with."""

    owner: Req
    body: Iterable[bytes] | None
    steps: int


@dataclass
class Plan:
    """What one request's handler does (travels in the ASGI scope / WSGI environ)."""

    machine: LeakHunt
    req: Req
    actions: tuple[str, ...]
    chore: Callable[[], None] | None = None
    chore_label: str = ""
    park: bool = False
    parked: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    more: tuple[str, ...] = ()
    close_own: bool = False


@dataclass
class Parked:
    """An ASGI request suspended in its handler while other requests run."""

    plan: Plan
    task: asyncio.Task[None]
    sent: list[MutableMapping[str, Any]]


# -- the apps ----------------------------------------------------------------------------


async def _async_endpoint(request: Request) -> PlainTextResponse:
    plan: Plan = request.scope["leakhunt.plan"]
    machine = plan.machine
    machine.enter(plan)
    await machine.act_async(plan, plan.actions)
    if plan.park:
        plan.parked.set()
        await plan.gate.wait()
        machine.resumed(plan)
        await machine.act_async(plan, plan.more)
    return PlainTextResponse("ok")


def _sync_endpoint(request: Request) -> PlainTextResponse:
    # Starlette runs it on an AnyIO worker thread, in a copy of the request's context.
    plan: Plan = request.scope["leakhunt.plan"]
    plan.machine.enter(plan)
    for action in plan.actions:
        plan.machine.act(plan, action, "a copy")
    return PlainTextResponse("ok")


ASGI_APP = relay_asgi.RelayMiddleware(
    Starlette(routes=[Route("/async", _async_endpoint), Route("/sync", _sync_endpoint)])
)


def _wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    plan: Plan = environ["leakhunt.plan"]
    plan.machine.enter(plan)
    for action in plan.actions:
        plan.machine.act(plan, action, "the test thread")
    start_response("200 OK", [("content-type", "text/plain")])
    return plan.machine.wsgi_body(plan.req)


WSGI_APP = relay_wsgi.RelayMiddleware(_wsgi_app)


# -- the machine ---------------------------------------------------------------------------


class LeakHunt(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._checked = 0
        self._raised = False
        self._requests: dict[str, Req] = {}
        self._tags = itertools.count(1)
        self.held: list[Held] = []
        self.bodies: list[Body] = []
        self.parked: list[Parked] = []
        self._threads: list[threading.Thread] = []
        self._release = threading.Event()
        self._services: dict[str, leakhunt_library.Service] = {}
        self._events: dict[str, str] = {}
        self._plain_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ctx_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._process_pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._threads_before = set(threading.enumerate())
        self._loop = asyncio.new_event_loop()
        self._gc_was_enabled = gc.isenabled()
        # Only explicit gc.collect() calls finalize the cycles: inside the
        # request that the step names, as production would meet them.
        gc.disable()
        self._policy = _policy.active()
        ctxrelay.configure(ctxrelay.Policy(capture={"cookie", "x-user"}))
        self._log_lines: list[str] = []
        self._log_handler = _Lines(self._log_lines)
        logging.getLogger("ctxrelay").addHandler(self._log_handler)

    # -- observing and judging -----------------------------------------------------

    def observe(
        self, owner: str | None, where: str, seen: Context, exact: Context | None = None
    ) -> None:
        with self._lock:
            self._seen.append(Seen(owner, where, seen, exact))

    def _owned(self, seen: Context, req: Req) -> bool:
        fields = dict(seen)
        if (
            fields.pop("request_id", None) != req.rid
            or fields.pop("x-user", None) != req.user
            or fields.pop("cookie", None) != req.cookie
        ):
            return False
        # Everything the request binds itself is tagged with its id.
        if any(not value.startswith(req.rid + "/") for value in fields.values()):
            return False
        snapshot = seen.request
        return snapshot is not None and snapshot.headers.get("x-request-id") == req.rid

    def _others_in(self, seen: Context, owner: str | None) -> set[str]:
        texts = list(seen.values())
        snapshot = seen.request
        if snapshot is not None:
            texts += [value for _, value in snapshot.headers.multi_items()]
        found = {rid for text in texts for rid in _RID.findall(text) if rid != owner}
        if owner is not None:
            user = seen.get("x-user")
            if user is not None and user != self._requests[owner].user:
                found.add(f"user {user}")
        return found

    def _check(self) -> None:
        with self._lock:
            new = self._seen[self._checked :]
            self._checked = len(self._seen)
        for obs in new:
            self._judge(obs)

    def _judge(self, obs: Seen) -> None:
        seen = obs.seen
        others = self._others_in(seen, obs.owner)
        working_for = "no request" if obs.owner is None else obs.owner
        if others:
            self._leak(
                f"{obs.where}: working for {working_for}, it saw {sorted(others)}: "
                f"{_describe(seen)}"
            )
        if obs.exact is not None and seen != obs.exact:
            self._wrong(
                f"{obs.where}: working for {working_for}, it saw {_describe(seen)}, "
                f"not {_describe(obs.exact)}"
            )
        if obs.owner is None:
            if seen != EMPTY:
                self._wrong(f"{obs.where}: working for no request, it saw {_describe(seen)}")
        elif obs.exact != EMPTY and not self._owned(seen, self._requests[obs.owner]):
            # Relayed work and handlers: the request's fields, snapshot included.
            self._wrong(f"{obs.where}: it saw {_describe(seen)}, not its own request")

    def _leak(self, message: str) -> None:
        self._raised = True
        raise AssertionError("LEAK: " + message)

    def _wrong(self, message: str) -> None:
        self._raised = True
        raise AssertionError("WRONG: " + message)

    # -- handlers -------------------------------------------------------------------------

    def enter(self, plan: Plan) -> None:
        req = plan.req
        entry = ctxrelay.current()
        req.entry = entry
        own = Context({"request_id": req.rid, "x-user": req.user, "cookie": req.cookie})
        self.observe(
            req.rid, f"{req.kind} handler of {req.label}, on entry", entry,
            own.with_request(entry.request),
        )  # fmt: skip
        if plan.chore is not None:
            plan.chore()
            self.observe(
                req.rid,
                f"{req.kind} handler of {req.label}, after {plan.chore_label} in it",
                ctxrelay.current(),
                entry,
            )

    def resumed(self, plan: Plan) -> None:
        req = plan.req
        where = f"asgi handler of {req.label}, resumed after other steps"
        self.observe(req.rid, where, ctxrelay.current())
        if plan.close_own:
            own = sorted((h for h in self.held if h.owner is req), key=lambda h: h.seq)
            for held in own:
                self.held.remove(held)
                if held.gen is not None:
                    held.gen.close()
                else:
                    held.scope.__exit__(None, None, None)
            # Ended in the order they were opened: each out-of-order exit unwinds
            # what was bound on top, so nothing of them is left -- unless some
            # were ended elsewhere (their context stays bound here, by design).
            exact = req.entry if req.ended_elsewhere == 0 else None
            where += f", after ending its {len(own)} open scopes in opening order"
            self.observe(req.rid, where, ctxrelay.current(), exact)

    async def act_async(self, plan: Plan, actions: tuple[str, ...]) -> None:
        for action in actions:
            if action == "executor":
                req = plan.req
                handoff = ctxrelay.current()
                plain = handoff if ctxrelay.instrumented() else EMPTY
                loop = asyncio.get_running_loop()
                where = f"loop.run_in_executor(None) task of {req.label}"
                await loop.run_in_executor(None, self._task, req.rid, where, plain)
                where = f"asyncio.to_thread task of {req.label}"
                await asyncio.to_thread(self._task, req.rid, where, handoff)
                self.observe(req.rid, f"asgi handler of {req.label}, after {action}", handoff)
            else:
                self.act(plan, action, "its task")

    def act(self, plan: Plan, action: str, home: str) -> None:
        req = plan.req
        rid = req.rid
        handoff = ctxrelay.current()
        # What work that only instrument() relays must see.
        plain = handoff if ctxrelay.instrumented() else EMPTY
        k = next(self._tags)
        by = f"of {req.label}"
        if action == "gen":
            tag = f"{rid}/g{k}"
            gen = self._held_bind(req, tag)
            next(gen)
            self.held.append(
                Held(req, home, k, f"{rid}'s generator {tag} (made in {home})", gen=gen)
            )
        elif action == "scope":
            tag = f"{rid}/s{k}"
            scope = ctxrelay.bind(scope=tag)
            scope.__enter__()
            self.held.append(
                Held(req, home, k, f"{rid}'s bind() scope {tag} (entered in {home})", scope=scope)
            )
        elif action == "nested":
            outer = ctxrelay.bind(outer=f"{rid}/o{k}")
            inner = ctxrelay.bind(inner=f"{rid}/i{k}")
            outer.__enter__()
            inner.__enter__()
            outer.__exit__(None, None, None)  # out of order: unwinds the inner one too
            self.observe(
                rid, f"handler {by}, after an out-of-order exit", ctxrelay.current(), handoff
            )
            inner.__exit__(None, None, None)  # already unwound: leaves it
            self.observe(
                rid, f"handler {by}, after the late inner exit", ctxrelay.current(), handoff
            )
        elif action == "thread":
            self._start_thread(rid, threading.Thread, f"threading.Thread {by}", plain)
        elif action == "ctxthread":
            self._start_thread(rid, ctxrelay.Thread, f"ctxrelay.Thread {by}", handoff)
        elif action == "detached":
            if _detached is None:
                return  # an older ctxrelay: no detached()
            with _detached():
                self._start_thread(None, threading.Thread, f"detached Thread {by}", EMPTY)
                self._start_thread(None, ctxrelay.Thread, f"detached ctxrelay.Thread {by}", EMPTY)
        elif action == "pool":
            if self._plain_pool is None:  # created lazily, inside whichever request comes first
                self._plain_pool = concurrent.futures.ThreadPoolExecutor(2, "leakhunt-plain")
            where = f"concurrent.futures pool task {by}"
            self._plain_pool.submit(self._task, rid, where, plain).result(WAIT)
        elif action == "ctxpool":
            if self._ctx_pool is None:
                self._ctx_pool = ctxrelay.ThreadPoolExecutor(2, "leakhunt-ctxrelay")
            where = f"ctxrelay pool task {by}"
            self._ctx_pool.submit(self._task, rid, where, handoff).result(WAIT)
        elif action in ("library", "library-stdlib"):
            kind = "named" if action == "library" else "stdlib"
            self._post(kind, f"posted by {req.label}")
        elif action == "process":
            self._process_task(req, handoff, plain)
        elif action == "executor":
            return  # async endpoint only
        else:  # pragma: no cover
            raise AssertionError(action)
        self.observe(rid, f"handler {by}, after {action}", ctxrelay.current())

    def _held_bind(self, req: Req, tag: str) -> Generator[None, None, None]:
        with ctxrelay.bind(gen=tag):
            self.observe(req.rid, f"generator {tag} of {req.label}", ctxrelay.current())
            yield

    def wsgi_body(self, req: Req) -> Iterator[bytes]:
        with ctxrelay.bind(body=f"{req.rid}/body"):
            while True:
                self.observe(req.rid, f"WSGI body of {req.label}", ctxrelay.current())
                yield b"chunk"

    def _task(self, owner: str | None, where: str, exact: Context) -> None:
        self.observe(owner, where, ctxrelay.current(), exact)

    def _start_thread(
        self,
        owner: str | None,
        factory: Callable[..., threading.Thread],
        where: str,
        exact: Context,
    ) -> None:
        started = threading.Event()
        thread = factory(
            target=self._app_thread,
            args=(owner, where, exact, started, self._release),
            name="leakhunt-app",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        assert started.wait(WAIT), f"{where} never ran"

    def _app_thread(
        self,
        owner: str | None,
        where: str,
        exact: Context,
        started: threading.Event,
        release: threading.Event,
    ) -> None:
        self.observe(owner, where, ctxrelay.current(), exact)
        started.set()
        release.wait(WAIT)
        # Work a request handed off keeps that request, and only that one.
        self.observe(owner, where + ", later", ctxrelay.current(), exact)

    def _post(self, kind: str, label: str) -> None:
        service = self._services.get(kind)
        if service is None:
            on_event = functools.partial(self._on_library_event, kind)
            service = self._services[kind] = leakhunt_library.Service(kind, on_event)
        event = f"e{next(self._tags)}"
        with self._lock:
            self._events[event] = f"the {kind} library's service thread, on the event {label}"
        service.post(event)
        assert service.flush(WAIT), f"the {kind} library never handled {event}"

    def _on_library_event(self, kind: str, event: str) -> None:
        with self._lock:
            where = self._events[event]
        self.observe(None, where, ctxrelay.current(), EMPTY)

    def _process_task(self, req: Req, handoff: Context, plain: Context) -> None:
        if FORK is None:
            return
        if self._process_pool is None:
            if not ctxrelay.instrumented():
                return  # only created under instrument(): a plain fork keeps the request
            # Lazily, inside this request: its workers fork on the first submit.
            self._process_pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=FORK)
        with warnings.catch_warnings():
            # Python 3.12+ frowns on fork() with threads running; fine for this pool.
            warnings.simplefilter("ignore", DeprecationWarning)
            future = self._process_pool.submit(_seen_in_process)
        seen = future.result(WAIT)
        self.observe(req.rid, f"process pool task of {req.label}", seen, plain)

    # -- serving ---------------------------------------------------------------------------

    def _new_request(self, kind: str, user: str) -> Req:
        rid = f"req-{next(_request_numbers)}"
        req = Req(rid, user, kind, cookie=f"session={rid}-secret-of-{user}")
        self._requests[rid] = req
        return req

    def _serve(
        self,
        kind: str,
        user: str,
        actions: Iterable[str] = (),
        *,
        chore: Callable[[], None] | None = None,
        chore_label: str = "",
        park: bool = False,
        body_steps: int = 0,
        keep_body: bool = False,
    ) -> Req:
        req = self._new_request(kind, user)
        plan = Plan(self, req, tuple(actions), chore, chore_label, park)
        if kind == "wsgi":
            self._serve_wsgi(plan, body_steps, keep_body)
        else:
            self._serve_asgi(plan, "/sync" if kind == "asgi-sync" else "/async")
        return req

    def _serve_wsgi(self, plan: Plan, body_steps: int, keep_body: bool) -> None:
        req = plan.req
        environ: dict[str, Any] = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ.update(HTTP_X_REQUEST_ID=req.rid, HTTP_X_USER=req.user, HTTP_COOKIE=req.cookie)
        environ["leakhunt.plan"] = plan
        statuses: list[str] = []

        def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            statuses.append(status)
            return None

        body = WSGI_APP(environ, start_response)
        assert statuses == ["200 OK"]
        chunks = iter(body)
        for _ in range(body_steps):
            next(chunks)
        if keep_body:
            self.bodies.append(Body(req, body, body_steps))
        else:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def _serve_asgi(self, plan: Plan, path: str) -> None:
        req = plan.req
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"shop.test"),
                (b"x-request-id", req.rid.encode()),
                (b"x-user", req.user.encode()),
                (b"cookie", req.cookie.encode()),
            ],
            "client": ("10.0.0.1", 40000),
            "server": ("shop.test", 80),
            "leakhunt.plan": plan,
        }
        received = False
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:
                return {"type": "http.disconnect"}
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        # As a server does: one task per request, in a copy of this (empty) context.
        task = self._loop.create_task(ASGI_APP(scope, receive, send))
        self._loop.run_until_complete(_settle(task, plan.parked))
        if task.done():
            _finished(task, sent)
        else:
            self.parked.append(Parked(plan, task, sent))

    def _end_elsewhere(
        self,
        user: str,
        where: str,
        chore: Callable[[], None],
        label: str,
    ) -> None:
        """Run ``chore`` inside a new request of kind ``where``, or outside any."""
        if where == "outside":
            chore()
            self.observe(
                None, f"the test thread, outside any request, after {label}",
                ctxrelay.current(), EMPTY,
            )  # fmt: skip
        else:
            self._serve(where, user, chore=chore, chore_label=label)
        self._check()

    # -- rules -------------------------------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        actions=_ACTION_LISTS,
        park=st.booleans(),
    )
    def asgi_request(self, user: str, actions: list[str], park: bool) -> None:
        self._serve("asgi", user, actions, park=park)
        self._check()

    @rule(user=st.sampled_from(USERS), actions=_ACTION_LISTS)
    def asgi_sync_request(self, user: str, actions: list[str]) -> None:
        self._serve("asgi-sync", user, actions)
        self._check()

    @rule(
        user=st.sampled_from(USERS),
        actions=_ACTION_LISTS,
        body_steps=st.integers(0, 2),
        keep_body=st.booleans(),
    )
    def wsgi_request(self, user: str, actions: list[str], body_steps: int, keep_body: bool) -> None:
        self._serve("wsgi", user, actions, body_steps=body_steps, keep_body=keep_body)
        self._check()

    @precondition(lambda self: bool(self.parked))
    @rule(
        index=st.integers(0, 7),
        actions=_ACTION_LISTS,
        close_own=st.booleans(),
    )
    def resume_asgi_request(self, index: int, actions: list[str], close_own: bool) -> None:
        parked = self.parked.pop(index % len(self.parked))
        parked.plan.more = tuple(actions)
        parked.plan.close_own = close_own
        event(f"resumed a parked ASGI request (close_own={close_own})")
        parked.plan.gate.set()
        self._loop.run_until_complete(_settle(parked.task, None))
        _finished(parked.task, parked.sent)
        self._check()

    @precondition(lambda self: any(h.gen is not None for h in self.held))
    @rule(
        index=st.integers(0, 7),
        user=st.sampled_from(USERS),
        where=st.sampled_from(WHERE),
        how=st.sampled_from(("close", "drop", "cycle")),
    )
    def end_generator(self, index: int, user: str, where: str, how: str) -> None:
        """Close a kept generator, or drop it (alone or in a reference cycle that
        ``gc.collect()`` frees), from within another request or outside any."""
        candidates = [h for h in self.held if h.gen is not None]
        held = candidates[index % len(candidates)]
        event(f"a generator made in {held.home}: {how} in {where}")
        self.held.remove(held)
        held.owner.ended_elsewhere += 1
        gen = held.gen
        assert gen is not None
        held.gen = None
        ref = weakref.ref(gen)
        chore: Callable[[], None]
        if how == "close":
            chore = gen.close
        elif how == "drop":
            box = [gen]
            chore = box.clear  # the last reference goes inside the chore
        else:
            cycle: list[object] = [gen]
            cycle.append(cycle)  # only the cyclic GC frees it
            del cycle
            chore = _collect
        del gen
        self._end_elsewhere(user, where, chore, f"{how} of {held.what}")
        if how != "close":  # (a closed one may live on in the chore's request: no matter)
            assert ref() is None, f"{held.what} outlived its {how}"

    @precondition(lambda self: any(h.scope is not None for h in self.held))
    @rule(index=st.integers(0, 7), user=st.sampled_from(USERS), where=st.sampled_from(WHERE))
    def exit_scope_elsewhere(self, index: int, user: str, where: str) -> None:
        """Exit a ``bind()`` scope in another context than it was entered in."""
        candidates = [h for h in self.held if h.scope is not None]
        held = candidates[index % len(candidates)]
        event(f"a scope entered in {held.home}: exit in {where}")
        self.held.remove(held)
        held.owner.ended_elsewhere += 1
        scope = held.scope

        def chore() -> None:
            scope.__exit__(None, None, None)

        self._end_elsewhere(user, where, chore, f"the exit of {held.what}")

    @precondition(lambda self: bool(self.bodies))
    @rule(index=st.integers(0, 7))
    def close_wsgi_body(self, index: int) -> None:
        """The server closes a partially iterated body (PEP 3333), between requests."""
        body = self.bodies.pop(index % len(self.bodies))
        event(f"a WSGI body after {body.steps} steps: closed")
        close = getattr(body.body, "close", None)
        if close is not None:
            close()
        self.observe(
            None, f"the test thread, after closing the WSGI body of {body.owner.label}",
            ctxrelay.current(), EMPTY,
        )  # fmt: skip
        self._check()

    @precondition(lambda self: bool(self.bodies))
    @rule(
        index=st.integers(0, 7),
        user=st.sampled_from(USERS),
        where=st.sampled_from(WHERE),
        how=st.sampled_from(("drop", "cycle")),
    )
    def drop_wsgi_body(self, index: int, user: str, where: str, how: str) -> None:
        """A server drops a partially iterated body without closing it."""
        body = self.bodies.pop(index % len(self.bodies))
        event(f"a WSGI body after {body.steps} steps: {how} in {where}")
        held, body.body = body.body, None
        chore: Callable[[], None]
        if how == "drop":
            box = [held]
            chore = box.clear
        else:
            cycle: list[object] = [held]
            cycle.append(cycle)
            del cycle
            chore = _collect
        del held
        self._end_elsewhere(user, where, chore, f"a {how} of the WSGI body of {body.owner.label}")

    @rule(kind=st.sampled_from(leakhunt_library.KINDS))
    def library_event_from_outside(self, kind: str) -> None:
        self._post(kind, "posted outside any request")
        self._check()

    @rule()
    def toggle_instrument(self) -> None:
        if ctxrelay.instrumented():
            ctxrelay.uninstrument()
        else:
            _instrument()

    @precondition(lambda self: bool(self._threads))
    @rule()
    def release_threads(self) -> None:
        self._release_threads()
        self._check()

    @rule(user=st.sampled_from(USERS), kind=st.sampled_from(("asgi", "asgi-sync", "wsgi")))
    def process_request(self, user: str, kind: str) -> None:
        had_pool = self._process_pool is not None
        self._serve(kind, user, ["process"])
        self._check()
        if self._process_pool is None:
            event("process task: none (no pool, not instrumented)")
        else:
            instrumented = "instrumented" if ctxrelay.instrumented() else "plain"
            event(f"process task: {instrumented}, {'reused' if had_pool else 'new'} pool")

    @invariant()
    def nobody_saw_another_request(self) -> None:
        self._check()
        seen = ctxrelay.current()
        if seen != EMPTY:
            others = self._others_in(seen, None)
            message = f"the test thread, between steps, holds {_describe(seen)}"
            if others:
                self._leak(message)
            self._wrong(message)
        secret = [line for line in self._log_lines if "-secret-of-" in line]
        if secret:
            self._leak(f"a ctxrelay log line shows a cookie: {secret[0]}")

    # -- teardown ------------------------------------------------------------------------

    def _release_threads(self) -> None:
        self._release.set()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(WAIT)
        self._release = threading.Event()
        stuck = [thread for thread in threads if thread.is_alive()]
        assert not stuck, f"{len(stuck)} application threads never finished"

    def teardown(self) -> None:
        try:
            self._teardown()
        finally:
            polluted = ctxrelay.current()
            if polluted != EMPTY:
                # The invariant reports it; start the next example clean.
                _CURRENT.set(EMPTY)
        if not self._raised:
            self._check()
            if polluted != EMPTY:
                self._leak(f"the test thread, after teardown, held {_describe(polluted)}")

    def _teardown(self) -> None:
        steps: list[Callable[[], None]] = [
            self._finish_parked,
            self._release_threads,
            self._end_leftovers,
            self._stop_services,
            self._stop_pools,
            self._close_loop,
            self._join_strays,
        ]
        try:
            for step in steps:
                try:
                    step()
                except BaseException:
                    # Finish cleaning up, then report the first failure.
                    for later in steps[steps.index(step) + 1 :]:
                        with contextlib.suppress(Exception):
                            later()
                    raise
        finally:
            logging.getLogger("ctxrelay").removeHandler(self._log_handler)
            _policy.configure(self._policy)
            _reset_instrumentation()
            if self._gc_was_enabled:
                gc.enable()

    def _finish_parked(self) -> None:
        parked, self.parked = self.parked, []
        for one in parked:
            one.plan.gate.set()
        for one in parked:
            self._loop.run_until_complete(_settle(one.task, None))
            _finished(one.task, one.sent)

    def _end_leftovers(self) -> None:
        # Ended where they harm nobody: each in a throw-away context.
        held, self.held = self.held, []
        for one in held:
            if one.gen is not None:
                contextvars.Context().run(one.gen.close)
        del held
        bodies, self.bodies = self.bodies, []
        for body in bodies:
            close = getattr(body.body, "close", None)
            if close is not None:
                close()  # as the server would: the middleware binds the request around it
        del bodies
        contextvars.Context().run(gc.collect)

    def _stop_services(self) -> None:
        for service in self._services.values():
            service.flush(WAIT)
            service.stop()
        alive = [kind for kind, service in self._services.items() if service.alive()]
        assert not alive, f"the library services {alive} never stopped"

    def _stop_pools(self) -> None:
        for pool in (self._plain_pool, self._ctx_pool, self._process_pool):
            if pool is not None:
                pool.shutdown(wait=True)

    def _close_loop(self) -> None:
        loop = self._loop
        if loop.is_closed():
            return
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def _join_strays(self) -> None:
        # AnyIO's worker threads stop when their request task ends.
        strays = [t for t in threading.enumerate() if t not in self._threads_before]
        for thread in strays:
            thread.join(WAIT)
        alive = [thread.name for thread in strays if thread.is_alive()]
        assert not alive, f"threads left running: {alive}"


class _Lines(logging.Handler):
    """Keeps every ctxrelay log line, as it would be written."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self._lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(f"{record.getMessage()} {record.__dict__.get('ctxrelay_report', '')}")


async def _settle(task: asyncio.Task[None], parked: asyncio.Event | None) -> None:
    """Run the loop until ``task`` is done, or has parked (``parked`` set)."""
    waiters: set[asyncio.Future[Any]] = {task}
    waiter = None if parked is None else asyncio.ensure_future(parked.wait())
    if waiter is not None:
        waiters.add(waiter)
    try:
        done, _ = await asyncio.wait(waiters, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if waiter is not None:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    assert done, "an ASGI request neither finished nor parked"


def _finished(task: asyncio.Task[None], sent: list[MutableMapping[str, Any]]) -> None:
    assert task.done(), "an ASGI request did not finish"
    task.result()  # the handler's own error, if any
    assert sent, "an ASGI request sent nothing"
    assert sent[0]["status"] == 200, sent


LeakHunt.TestCase.settings = settings(
    max_examples=HUNT_EXAMPLES or 60,
    stateful_step_count=40 if HUNT_EXAMPLES else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLeakHunt = LeakHunt.TestCase
if HUNT_EXAMPLES:  # a long hunt outlasts the suite's per-test timeout
    TestLeakHunt = pytest.mark.timeout(0)(TestLeakHunt)
