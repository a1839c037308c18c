"""The public face is pinned: adding or removing a name is a decision."""

import ctxrelay


def test_all_is_sorted_and_pinned() -> None:
    assert ctxrelay.__all__ == sorted(ctxrelay.__all__)
    assert set(ctxrelay.__all__) == {
        "Context",
        "ContextExecutor",
        "Headers",
        "Policy",
        "ProcessPoolExecutor",
        "RequestSnapshot",
        "Thread",
        "ThreadPoolExecutor",
        "Timer",
        "active_policy",
        "bind",
        "configure",
        "current",
        "detached",
        "extract",
        "get",
        "inject",
        "instrument",
        "instrumented",
        "request",
        "request_id",
        "run_async",
        "uninstrument",
        "use",
        "wrap",
    }


def test_every_public_name_exists_and_is_documented() -> None:
    for name in ctxrelay.__all__:
        obj = getattr(ctxrelay, name)
        assert obj.__doc__, f"ctxrelay.{name} has no docstring"


def test_import_ctxrelay_imports_no_integration() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ctxrelay; "
        "bad = [m for m in sys.modules if m.startswith('ctxrelay.integrations.')"
        " or m.split('.')[0] in {'celery','fastapi','starlette','flask','django','httpx',"
        "'requests','aiohttp','structlog','loguru','rq','dramatiq','opentelemetry'}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
