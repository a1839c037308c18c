"""Shared fixtures: every test starts and ends outside any context, with the
standard library unpatched and the default policy in force."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ctxrelay
from ctxrelay import _policy


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    policy = _policy.active()
    assert ctxrelay.current() == ctxrelay.Context(), "a previous test leaked its context"
    yield
    ctxrelay.uninstrument()
    _policy.configure(policy)
    assert ctxrelay.current() == ctxrelay.Context(), "this test leaked its context"


PoolFactory = Callable[..., concurrent.futures.Executor]
ThreadFactory = Callable[..., threading.Thread]


class Relay:
    """How a test's code gets relayed: explicit ctxrelay wrappers, or the
    unchanged standard library under ``instrument()``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def pool(self, max_workers: int | None = None, **kwargs: Any) -> concurrent.futures.Executor:
        if self.mode == "explicit":
            return ctxrelay.ThreadPoolExecutor(max_workers, **kwargs)
        return concurrent.futures.ThreadPoolExecutor(max_workers, **kwargs)

    def thread(self, **kwargs: Any) -> threading.Thread:
        if self.mode == "explicit":
            return ctxrelay.Thread(**kwargs)
        return threading.Thread(**kwargs)

    def timer(self, interval: float, function: Callable[..., Any]) -> threading.Timer:
        if self.mode == "explicit":
            return ctxrelay.Timer(interval, function)
        return threading.Timer(interval, function)


@pytest.fixture(params=["explicit", "instrumented"])
def relay(request: pytest.FixtureRequest) -> Iterator[Relay]:
    if request.param == "instrumented":
        ctxrelay.instrument()
    try:
        yield Relay(request.param)
    finally:
        ctxrelay.uninstrument()
