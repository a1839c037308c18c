"""The pytest plugin, run as a user runs it: ``pytest --ctxrelay-strict`` on a
test module, in a subprocess (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

LEAKY = """
import contextvars, logging, concurrent.futures
import pytest
import ctxrelay

def _stream():
    with ctxrelay.bind(user="alice"):
        while True:
            yield

def test_closes_a_generator_in_another_context():
    stream = _stream()
    contextvars.Context().run(next, stream)
    contextvars.Context().run(stream.close)

@pytest.mark.ctxrelay_expect_reports
def test_says_it_expects_reports():
    stream = _stream()
    contextvars.Context().run(next, stream)
    contextvars.Context().run(stream.close)

def test_clean():
    with ctxrelay.bind(user="bob"):
        assert ctxrelay.get("user") == "bob"

def test_leaves_a_context(ctxrelay_clean):
    ctxrelay.bind(user="carol").__enter__()
"""


def test_inert_without_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not leaves")
    result.assert_outcomes(passed=3)


def test_strict_option_fails_the_test_that_provoked_a_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--ctxrelay-strict", "-k", "not leaves"
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_closes_a_generator_in_another_context*",
            "*ctxrelay strict mode reported during this test*",
            "*foreign-exit*entered: *test_leaky.py:6*",
        ]
    )


def test_the_clean_fixture_fails_a_test_that_leaves_a_context(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "leaves")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*left a context bound on its thread*carol*"])
