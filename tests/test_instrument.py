"""instrument(): unchanged code relays; idempotent, thread-safe, exactly undone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.pool
import multiprocessing.process
import threading

import pytest

import ctxrelay
from ctxrelay import _instrument

ORIGINALS: dict[tuple[type, str], object] = {
    (threading.Thread, "start"): threading.Thread.__dict__["start"],
    (concurrent.futures.ThreadPoolExecutor, "submit"): (
        concurrent.futures.ThreadPoolExecutor.__dict__["submit"]
    ),
    (asyncio.BaseEventLoop, "run_in_executor"): asyncio.BaseEventLoop.__dict__["run_in_executor"],
    (concurrent.futures.ProcessPoolExecutor, "submit"): (
        concurrent.futures.ProcessPoolExecutor.__dict__["submit"]
    ),
    (multiprocessing.process.BaseProcess, "start"): (
        multiprocessing.process.BaseProcess.__dict__["start"]
    ),
    **{
        (multiprocessing.pool.Pool, name): multiprocessing.pool.Pool.__dict__[name]
        for name in (
            "__init__", "apply_async", "map", "map_async", "starmap", "starmap_async",
            "imap", "imap_unordered",
        )
    },
}  # fmt: skip


def current_attributes() -> dict[tuple[type, str], object]:
    return {(owner, name): owner.__dict__[name] for owner, name in ORIGINALS}


def confirm_order() -> dict[str, str | None]:
    """Seed 000's order page, as a Python team writes it: no ctxrelay in sight."""
    result: dict[str, str | None] = {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        address = pool.submit(lambda: ctxrelay.get("user"))
        cart = pool.submit(lambda: ctxrelay.get("user"))
        result["address"], result["cart"] = address.result(), cart.result()
    audit: list[str | None] = []
    t = threading.Thread(target=lambda: audit.append(ctxrelay.get("user")))
    t.start()
    t.join()
    result["audit"] = audit[0]
    return result


def test_unchanged_seed_code_loses_the_user_without_instrument() -> None:
    with ctxrelay.bind(user="alice"):
        assert confirm_order() == {"address": None, "cart": None, "audit": None}


def test_unchanged_seed_code_relays_under_instrument() -> None:
    ctxrelay.instrument()
    with ctxrelay.bind(user="alice"):
        assert confirm_order() == {"address": "alice", "cart": "alice", "audit": "alice"}


def test_instrument_is_idempotent_and_uninstrument_restores_exactly() -> None:
    assert not ctxrelay.instrumented()
    ctxrelay.instrument()
    patched = current_attributes()
    assert all(patched[key] is not ORIGINALS[key] for key in ORIGINALS)
    ctxrelay.instrument()
    assert current_attributes() == patched  # no second layer
    assert ctxrelay.instrumented()
    ctxrelay.uninstrument()
    assert all(current_attributes()[key] is ORIGINALS[key] for key in ORIGINALS)
    ctxrelay.uninstrument()  # a second call is a no-op
    assert not ctxrelay.instrumented()
    with ctxrelay.bind(user="alice"):
        assert confirm_order()["address"] is None


def test_patched_functions_look_like_the_originals() -> None:
    ctxrelay.instrument()
    submit = concurrent.futures.ThreadPoolExecutor.submit
    assert submit.__name__ == "submit"
    assert submit.__wrapped__ is ORIGINALS[(concurrent.futures.ThreadPoolExecutor, "submit")]  # type: ignore[attr-defined]


def test_instrument_from_many_threads_at_once_patches_once() -> None:
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait(timeout=10)
        ctxrelay.instrument()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_instrument._patches) == len(ORIGINALS)
    submit = concurrent.futures.ThreadPoolExecutor.submit
    assert submit.__wrapped__ is ORIGINALS[(concurrent.futures.ThreadPoolExecutor, "submit")]  # type: ignore[attr-defined]


def test_uninstrument_leaves_a_patch_applied_over_ours(caplog: pytest.LogCaptureFixture) -> None:
    ctxrelay.instrument()
    ours = threading.Thread.__dict__["start"]

    def theirs(self: threading.Thread) -> None:
        ours(self)

    threading.Thread.start = theirs  # type: ignore[method-assign]
    try:
        ctxrelay.uninstrument()
        assert threading.Thread.__dict__["start"] is theirs
        assert "patched again" in caplog.text
        assert (
            concurrent.futures.ThreadPoolExecutor.__dict__["submit"]
            is ORIGINALS[(concurrent.futures.ThreadPoolExecutor, "submit")]
        )
    finally:
        threading.Thread.start = ORIGINALS[(threading.Thread, "start")]  # type: ignore[method-assign,assignment]


def test_drop_ins_under_instrument_capture_once_and_still_relay() -> None:
    ctxrelay.instrument()
    with ctxrelay.ThreadPoolExecutor(2) as pool, ctxrelay.bind(user="alice"):
        assert pool.submit(lambda: ctxrelay.get("user")).result() == "alice"
        box: list[str | None] = []
        t = ctxrelay.Thread(target=lambda: box.append(ctxrelay.get("user")))
        t.start()
        t.join()
        assert box == ["alice"]


def test_coexists_with_opentelemetry_threading_instrumentor_in_either_order() -> None:
    from opentelemetry import context as otel_context
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    key = otel_context.create_key("tenant")
    timer_attributes = dict(threading.Timer.__dict__)

    def seen() -> tuple[str | None, object]:
        return ctxrelay.get("user"), otel_context.get_value(key)

    for ours_first in (True, False):
        instrumentor = ThreadingInstrumentor()
        if ours_first:
            ctxrelay.instrument()
            instrumentor.instrument()
        else:
            instrumentor.instrument()
            ctxrelay.instrument()  # wraps OTel's submit instead of replacing it
        try:
            token = otel_context.attach(otel_context.set_value(key, "acme"))
            try:
                with ctxrelay.bind(user="alice"), concurrent.futures.ThreadPoolExecutor(2) as pool:
                    assert pool.submit(seen).result() == ("alice", "acme")
            finally:
                otel_context.detach(token)
        finally:
            if ours_first:
                instrumentor.uninstrument()
                ctxrelay.uninstrument()
            else:
                ctxrelay.uninstrument()
                instrumentor.uninstrument()
    assert (
        concurrent.futures.ThreadPoolExecutor.__dict__["submit"]
        is ORIGINALS[(concurrent.futures.ThreadPoolExecutor, "submit")]
    )
    # uninstrument() removed the wrapper of our Thread.start that OTel's unwrap
    # leaves on Timer when it instrumented after us: no Timer relays ours now.
    box: list[str | None] = []
    with ctxrelay.bind(user="alice"):
        timer = threading.Timer(0, lambda: box.append(ctxrelay.get("user")))
        timer.start()
    timer.join()
    assert box == [None]
    # OTel's own unwrap leaves Timer.start wrapped around Thread.start even
    # when used alone (it wraps the inherited attribute); undo that leftover
    # so later tests see a clean threading module.
    for name in ("start", "run"):
        if name in timer_attributes:
            setattr(threading.Timer, name, timer_attributes[name])
        elif name in threading.Timer.__dict__:
            delattr(threading.Timer, name)


def test_long_lived_stdlib_threads_started_in_a_request_do_not_keep_it() -> None:
    # seed 001 / TTL #733: under instrument(), a service thread started during
    # a request must not capture it -- every later task would run in it.
    import logging.handlers
    import multiprocessing.pool
    import queue

    ctxrelay.instrument()
    records: queue.Queue[object] = queue.Queue()
    seen_by_listener: list[str | None] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen_by_listener.append(ctxrelay.get("user"))

    with ctxrelay.bind(user="first"):
        pool = multiprocessing.pool.ThreadPool(2)
        listener = logging.handlers.QueueListener(records, Probe())
        listener.start()
    try:
        with ctxrelay.bind(user="second"):
            # Each task runs in its own submitter's context -- never "first".
            assert pool.apply_async(ctxrelay.get, ("user",)).get(10) == "second"
        assert pool.apply_async(ctxrelay.get, ("user",)).get(10) is None
        logger = logging.getLogger("ctxrelay.test.queue")
        logger.addHandler(logging.handlers.QueueHandler(records))
        logger.propagate = False
        logger.warning("from outside any request")
        listener.stop()
        assert seen_by_listener == [None]
    finally:
        pool.terminate()
        pool.join()
        logging.getLogger("ctxrelay.test.queue").handlers.clear()
