"""ctxrelay's pytest plugin: lost and leaked context as failing tests.

Registered through the ``pytest11`` entry point, and inert unless asked:

``pytest --ctxrelay-strict``
    turns on strict mode (:func:`ctxrelay.strict`) for the run and fails a
    test during which strict mode reported something, showing the report
    (a scope exited in another context, a request that started with a
    leaked context, work handed off without relay that logged with none...).
    A test that provokes reports on purpose says so with
    ``@pytest.mark.ctxrelay_expect_reports``.

``ctxrelay_clean`` (a fixture)
    asserts that the test leaves no context behind on its thread, and no
    thread it started still running with a request's context.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import ctxrelay

from . import _strict

__all__ = ["ctxrelay_clean"]

_OPTION = "--ctxrelay-strict"
_MARK = "ctxrelay_expect_reports"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctxrelay")
    group.addoption(
        _OPTION,
        action="store_true",
        default=False,
        help="run with ctxrelay's strict mode on; fail a test during which it reported",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{_MARK}: the test provokes ctxrelay strict-mode reports on purpose"
    )
    if config.getoption(_OPTION):
        ctxrelay.strict()


def _format(report: dict[str, Any]) -> str:
    places = ", ".join(
        f"{name}: {report[name + '_file']}:{report[name + '_line']}"
        for name in ("entered", "exited", "started", "bound", "handoff", "used")
        if name + "_file" in report
    )
    return f"{report['kind']}: {report['message']}" + (f" [{places}]" if places else "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not item.config.getoption(_OPTION):
        return (yield)
    if not _strict.enabled():
        ctxrelay.strict()  # a test may have turned it off
    ctxrelay.strict_reports(clear=True)  # once per place: per test, here
    result = yield
    found = ctxrelay.strict_reports(clear=True)
    if found and item.get_closest_marker(_MARK) is None:
        raise pytest.fail.Exception(
            "ctxrelay strict mode reported during this test:\n"
            + "\n".join(f"  {_format(r)}" for r in found),
            pytrace=False,
        )
    return result


@pytest.fixture
def ctxrelay_clean() -> Iterator[None]:
    """Fail the test if it leaves a context on its thread, or a thread it
    started still running with a request's context."""
    was_on = _strict.enabled()
    if not was_on:
        ctxrelay.strict()
    before = set(_strict.threads_with_context())
    try:
        yield
        left = ctxrelay.current()
        assert not left, f"the test left a context bound on its thread: {left!r}"
        running = [t for t in _strict.threads_with_context() if t not in before]
        assert not running, (
            "threads started during the test still run with a request's context: "
            + ", ".join(repr(t.name) for t in running)
        )
    finally:
        if not was_on:
            ctxrelay.strict(False)
