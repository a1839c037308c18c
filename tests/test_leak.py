"""No leak: wrapping and running keeps memory flat."""

from __future__ import annotations

import contextvars
import gc
import tracemalloc
import weakref

import ctxrelay
from tests.conftest import Relay


def _cycle(n: int) -> None:
    for i in range(n):
        with ctxrelay.bind(request_id=f"req-{i % 1000}"):
            wrapped = ctxrelay.wrap(ctxrelay.request_id)
        assert wrapped() == f"req-{i % 1000}"


def test_100k_wrap_and_run_cycles_keep_memory_bounded() -> None:
    _cycle(5_000)  # warm caches (regex, interned strings, the allocator)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _cycle(100_000)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024, f"memory grew by {growth} bytes over 100k cycles"


def test_pools_and_threads_keep_no_reference_to_a_finished_request(relay: Relay) -> None:
    class Marker:
        pass

    marker = Marker()
    ref = weakref.ref(marker)
    var: contextvars.ContextVar[object] = contextvars.ContextVar("leak_marker")
    token = var.set(marker)
    with relay.pool(2) as pool:
        # The worker threads are created inside the "request" holding marker.
        for _ in range(50):
            assert pool.submit(var.get).result() is not None
        t = relay.thread(target=var.get)
        t.start()
        t.join()
        var.reset(token)
        del marker
        gc.collect()
        # The pool's threads are still alive, yet hold nothing of the request
        # (under instrument(), a worker started inside it must not capture it).
        assert ref() is None
