"""The codes ``ctxrelay check`` reports: one stable code per kind of lost hand-off."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DOCS_PAGE", "INSTRUMENT_COVERS", "RULES", "Rule"]

DOCS_PAGE = "docs/check.md"


@dataclass(frozen=True)
class Rule:
    """One code: its name, a one-line summary and the fix."""

    code: str
    name: str
    summary: str
    fix: str

    @property
    def anchor(self) -> str:
        """The anchor of the code's section in docs/check.md."""
        return self.code.lower()

    @property
    def doc(self) -> str:
        """Where the code is documented, relative to the repository root."""
        return f"{DOCS_PAGE}#{self.anchor}"


RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule(
            "CTX001",
            "syntax-error",
            "The file could not be parsed, so it was not checked.",
            "Fix the syntax error (or exclude the file).",
        ),
        Rule(
            "CTX101",
            "thread-pool-drops-context",
            "A concurrent.futures thread pool's submit()/map() runs the callable in a worker "
            "thread with an empty context: the request id, the trace and every field are lost.",
            "Use ctxrelay.ThreadPoolExecutor or ctxrelay.ContextExecutor(pool); or submit "
            "ctx.run with ctx = contextvars.copy_context() taken at the submit; or call "
            "ctxrelay.instrument() once at start-up.",
        ),
        Rule(
            "CTX102",
            "thread-drops-context",
            "A threading.Thread or Timer runs its target with an empty context.",
            "Use ctxrelay.Thread / ctxrelay.Timer (they capture at start()), or "
            "target=ctxrelay.wrap(fn), or call ctxrelay.instrument(); for a long-lived service "
            "thread that must start empty, start it inside `with ctxrelay.detached():`.",
        ),
        Rule(
            "CTX103",
            "run-in-executor-drops-context",
            "loop.run_in_executor() submits the callable to a plain executor without the "
            "caller's context (unlike asyncio.to_thread).",
            "Use asyncio.to_thread, pass a ctxrelay executor, pass ctxrelay.wrap(fn) or ctx.run "
            "with ctx = contextvars.copy_context() taken here, or call ctxrelay.instrument().",
        ),
        Rule(
            "CTX104",
            "process-pool-drops-context",
            "A ProcessPoolExecutor or multiprocessing pool runs the task in another process with "
            "no context (a contextvars.Context cannot be pickled, so ctx.run does not help); "
            "with the fork start method a worker may even keep the context of the request that "
            "forked it.",
            "Use ctxrelay.ProcessPoolExecutor (or ContextExecutor(pool)), or call "
            "ctxrelay.instrument(), which patches ProcessPoolExecutor and multiprocessing pools.",
        ),
        Rule(
            "CTX105",
            "copy-context-in-worker",
            "contextvars.copy_context() is called inside the submitted callable, so it copies "
            "the worker's context when the task runs, not the caller's at the hand-off.",
            "Take the copy at the hand-off: ctx = contextvars.copy_context(); "
            "pool.submit(ctx.run, fn, *args) -- or use a ctxrelay executor.",
        ),
        Rule(
            "CTX106",
            "shared-copied-context",
            "One copied contextvars.Context is handed to several tasks in a loop: two of them "
            "running at once raise RuntimeError('cannot enter context: ... is already entered'), "
            "and each task sees what the previous one set.",
            "Copy per task: pool.submit(contextvars.copy_context().run, fn, item) -- or use a "
            "ctxrelay executor, which copies at every submit().",
        ),
        Rule(
            "CTX201",
            "celery-app-not-relayed",
            "A Celery app that the project never gives to ctxrelay: tasks run without the "
            "publisher's context.",
            "Call ctxrelay.integrations.celery.install(app) (publishers and workers).",
        ),
        Rule(
            "CTX202",
            "rq-queue-not-relayed",
            "An RQ queue in a project that never uses ctxrelay's RQ job and worker classes: jobs "
            "run without the enqueuer's context.",
            "Use ctxrelay.integrations.rq.RelayJob (job_class) and RelayWorker.",
        ),
        Rule(
            "CTX203",
            "dramatiq-broker-not-relayed",
            "A Dramatiq broker that the project never gives to ctxrelay: actors run without the "
            "sender's context.",
            "Call ctxrelay.integrations.dramatiq.install(broker).",
        ),
        Rule(
            "CTX301",
            "requests-not-relayed",
            "An outgoing requests call without ctxrelay: the request id and trace do not reach "
            "the service called (module-level requests.get() makes a plain session every call).",
            "Use ctxrelay.integrations.requests.Session(), or install(session) on yours.",
        ),
        Rule(
            "CTX302",
            "httpx-not-relayed",
            "An httpx client (or module-level httpx call) without ctxrelay's request hook: the "
            "request id and trace do not reach the service called.",
            "client = ctxrelay.integrations.httpx.install(httpx.Client()), or "
            "event_hooks={'request': [request_hook]}.",
        ),
        Rule(
            "CTX303",
            "aiohttp-not-relayed",
            "An aiohttp ClientSession without ctxrelay's trace config: the request id and trace "
            "do not reach the service called.",
            "aiohttp.ClientSession(trace_configs=[ctxrelay.integrations.aiohttp.trace_config()]).",
        ),
    )
}

# What ctxrelay.instrument() makes relay: a project that calls it is not told about these.
INSTRUMENT_COVERS = frozenset({"CTX101", "CTX102", "CTX103", "CTX104", "CTX105"})
