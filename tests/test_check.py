"""``ctxrelay check``: every rule, the relayed forms it must stay silent on, aliases and
indirections, pragmas, selection, pyproject configuration, the three formats, exit
statuses, syntax errors, and the console script."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctxrelay.check import RULES, Config, ConfigError, _run, check_paths, main

SCRIPTS = Path(sys.executable).parent


def findings(tmp_path: Path, source: str, config: Config | None = None) -> list[tuple[int, str]]:
    """(line, code) of every finding in ``source``, checked as a project of its own."""
    path = tmp_path / "mod.py"
    path.write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    result = check_paths([str(path)], config or Config())
    return [(f.line, f.code) for f in result.findings]


def codes(tmp_path: Path, source: str, config: Config | None = None) -> list[str]:
    return [code for _, code in findings(tmp_path, source, config)]


# -- true positives, one rule at a time ----------------------------------------------------

TRUE_POSITIVES = {
    "CTX101 submit": (
        """
        import concurrent.futures
        def f(fn):
            with concurrent.futures.ThreadPoolExecutor() as pool:
                pool.submit(fn, 1)
        """,
        ["CTX101"],
    ),
    "CTX101 map": (
        """
        from concurrent.futures import ThreadPoolExecutor
        def f(fn, items):
            pool = ThreadPoolExecutor(4)
            return list(pool.map(fn, items))
        """,
        ["CTX101"],
    ),
    "CTX101 lambda": (
        """
        from concurrent.futures import ThreadPoolExecutor
        def f(fn):
            with ThreadPoolExecutor() as pool:
                pool.submit(lambda: fn(1))
        """,
        ["CTX101"],
    ),
    "CTX101 asyncio.run handed off (not a Context's run)": (
        """
        import asyncio
        from concurrent.futures import ThreadPoolExecutor
        def f(coro):
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, coro).result()
        """,
        ["CTX101"],
    ),
    "CTX102 Thread": (
        """
        import threading
        def f(fn):
            threading.Thread(target=fn, daemon=True).start()
        """,
        ["CTX102"],
    ),
    "CTX102 Timer": (
        """
        from threading import Timer
        def f(fn):
            Timer(5.0, fn).start()
        """,
        ["CTX102"],
    ),
    "CTX102 Thread subclass": (
        """
        import threading
        class Worker(threading.Thread):
            def run(self):
                pass
        def f():
            Worker().start()
        """,
        ["CTX102"],
    ),
    "CTX103 default executor": (
        """
        import asyncio
        async def f(fn):
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        """,
        ["CTX103"],
    ),
    "CTX103 plain pool from a getter": (
        """
        import asyncio, functools
        from concurrent.futures import ThreadPoolExecutor
        _POOL = None
        def pool():
            global _POOL
            if _POOL is None:
                _POOL = ThreadPoolExecutor()
            return _POOL
        async def f(fn, **kw):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool(), functools.partial(fn, **kw))
        """,
        ["CTX103"],
    ),
    "CTX104 ProcessPoolExecutor": (
        """
        from concurrent.futures import ProcessPoolExecutor
        def f(fn):
            with ProcessPoolExecutor() as pool:
                pool.submit(fn, 1)
        """,
        ["CTX104"],
    ),
    "CTX104 ctx.run cannot cross processes": (
        """
        import contextvars
        from concurrent.futures import ProcessPoolExecutor
        def f(fn):
            ctx = contextvars.copy_context()
            with ProcessPoolExecutor() as pool:
                pool.submit(ctx.run, fn)
        """,
        ["CTX104"],
    ),
    "CTX104 multiprocessing.Pool": (
        """
        import multiprocessing
        def f(fn, items):
            with multiprocessing.Pool(2) as pool:
                pool.map(fn, items)
                pool.apply_async(fn, (1,))
        """,
        ["CTX104", "CTX104"],
    ),
    "CTX104 get_context().Pool": (
        """
        import multiprocessing as mp
        def f(fn, items):
            ctx = mp.get_context("spawn")
            with ctx.Pool(2) as pool:
                pool.imap_unordered(fn, items)
        """,
        ["CTX104"],
    ),
    "CTX105 copy_context() in the lambda (bengal PR #159)": (
        """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        def f(fn, pages):
            with ThreadPoolExecutor() as executor:
                for page in pages:
                    executor.submit(lambda p=page: contextvars.copy_context().run(fn, p))
        """,
        ["CTX105"],
    ),
    "CTX105 copy_context() in the submitted function (dash PR #3862)": (
        """
        from contextvars import copy_context
        from concurrent.futures import ThreadPoolExecutor
        def f(executor: ThreadPoolExecutor, fn):
            def execute():
                ctx = copy_context()
                return ctx.run(fn)
            return executor.submit(execute)
        """,
        ["CTX105"],
    ),
    "CTX105 copy_context() in a thread's target": (
        """
        import contextvars, threading
        def f(fn):
            threading.Thread(target=lambda: contextvars.copy_context().run(fn)).start()
        """,
        ["CTX105"],
    ),
    "CTX106 one copy for a loop of tasks": (
        """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        def f(fn, pages):
            ctx = contextvars.copy_context()
            with ThreadPoolExecutor() as executor:
                futures = {executor.submit(ctx.run, fn, p): p for p in pages}
        """,
        ["CTX106"],
    ),
    "CTX201 Celery": (
        """
        from celery import Celery
        app = Celery("shop", broker="redis://")
        """,
        ["CTX201"],
    ),
    "CTX202 RQ": (
        """
        from redis import Redis
        from rq import Queue
        q = Queue("orders", connection=Redis())
        """,
        ["CTX202"],
    ),
    "CTX203 Dramatiq": (
        """
        from dramatiq.brokers.redis import RedisBroker
        broker = RedisBroker()
        """,
        ["CTX203"],
    ),
    "CTX301 requests": (
        """
        import requests
        def f():
            requests.get("https://orders.internal/api")
            s = requests.Session()
            return s
        """,
        ["CTX301", "CTX301"],
    ),
    "CTX302 httpx": (
        """
        import httpx
        client = httpx.Client()
        httpx.post("https://x/")
        """,
        ["CTX302", "CTX302"],
    ),
    "CTX303 aiohttp": (
        """
        import aiohttp
        async def f():
            async with aiohttp.ClientSession() as http:
                await http.get("https://x/")
        """,
        ["CTX303"],
    ),
}


@pytest.mark.parametrize("case", list(TRUE_POSITIVES), ids=list(TRUE_POSITIVES))
def test_true_positives(tmp_path: Path, case: str) -> None:
    source, expected = TRUE_POSITIVES[case]
    assert codes(tmp_path, source) == expected


def test_every_rule_has_a_true_positive_here() -> None:
    covered = {code for _, expected in TRUE_POSITIVES.values() for code in expected}
    assert covered | {"CTX001"} == set(RULES)


# -- the relayed forms: silent ---------------------------------------------------------------

RELAYED = {
    "ctxrelay.ThreadPoolExecutor": """
        import ctxrelay
        def f(fn):
            with ctxrelay.ThreadPoolExecutor(4) as pool:
                pool.submit(fn, 1)
                list(pool.map(fn, [1]))
        """,
    "ctxrelay.ProcessPoolExecutor": """
        from ctxrelay import ProcessPoolExecutor
        def f(fn):
            with ProcessPoolExecutor() as pool:
                pool.submit(fn, 1)
        """,
    "ContextExecutor(pool)": """
        import concurrent.futures
        from ctxrelay import ContextExecutor
        def f(fn):
            pool = ContextExecutor(concurrent.futures.ThreadPoolExecutor())
            pool.submit(fn)
        """,
    "ctxrelay.Thread and Timer": """
        import ctxrelay
        def f(fn):
            ctxrelay.Thread(target=fn).start()
            ctxrelay.Timer(1.0, fn).start()
        """,
    "wrap(fn)": """
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from ctxrelay import wrap
        def f(fn):
            with ThreadPoolExecutor() as pool:
                pool.submit(wrap(fn), 1)
            threading.Thread(target=wrap(fn)).start()
        """,
    "ctx.run with the copy at the hand-off": """
        import contextvars, threading
        from concurrent.futures import ThreadPoolExecutor
        def f(fn, items):
            ctx = contextvars.copy_context()
            with ThreadPoolExecutor() as pool:
                pool.submit(ctx.run, fn, 1)
            threading.Thread(target=ctx.run, args=(fn,)).start()
            with ThreadPoolExecutor() as pool:
                for item in items:
                    pool.submit(contextvars.copy_context().run, fn, item)
                for item in items:
                    per_task = contextvars.copy_context()
                    pool.submit(per_task.run, fn, item)
        """,
    "partial(ctx.run, ...) and cast(...)": """
        import asyncio
        from contextvars import copy_context
        from functools import partial
        from typing import Callable, cast
        async def f(fn):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, partial(copy_context().run, fn))
            relayed = cast(Callable[[], int], partial(copy_context().run, fn))
            await loop.run_in_executor(None, relayed)
        """,
    "lambda: ctx.run(fn) (PEP 567's example)": """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        def f(fn):
            current_context = contextvars.copy_context()
            executor = ThreadPoolExecutor()
            executor.submit(lambda: current_context.run(fn))
        """,
    "asyncio.to_thread and anyio": """
        import asyncio
        import anyio.to_thread
        from anyio import to_thread
        async def f(fn):
            await asyncio.to_thread(fn)
            await to_thread.run_sync(fn)
            await anyio.to_thread.run_sync(fn)
        """,
    "a helper that copies at the call": """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        def with_context(fn):
            ctx = contextvars.copy_context()
            return lambda *a: ctx.run(fn, *a)
        def f(fn):
            with ThreadPoolExecutor() as pool:
                pool.submit(with_context(fn))
        """,
    "a pool subclass that copies in submit (sentry PR #111451)": """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        class ContextPropagatingThreadPoolExecutor(ThreadPoolExecutor):
            def submit(self, fn, /, *args, **kwargs):
                return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)
        def f(fn):
            with ContextPropagatingThreadPoolExecutor(4) as pool:
                pool.submit(fn)
        """,
    "a service thread started in detached()": """
        import threading, ctxrelay
        def f(consume):
            with ctxrelay.detached():
                threading.Thread(target=consume, daemon=True).start()
        """,
    "a helper chain that copies, through a module-level alias": """
        import contextvars, functools
        from concurrent.futures import Executor
        _copy_context = contextvars.copy_context
        def _task(fn):
            return functools.partial(_copy_context().run, fn)
        def relayed_task(executor, fn):
            return _task(fn)
        class Relaying:
            def __init__(self, executor: Executor):
                self.executor = executor
            def submit(self, fn, *args):
                task = relayed_task(self.executor, fn)
                return self.executor.submit(task, *args)
        """,
    "another package's Timer is not threading's": """
        import threading, timeit
        class Timer(threading.Timer):
            pass
        def f():
            return timeit.Timer("pass").timeit(10)
        """,
    "an unknown receiver is given the benefit of the doubt": """
        def f(client, form, pool):
            client.submit(print)
            form.submit()
            pool.map(print, [1])
        """,
    "unrelated .run and .map": """
        import subprocess
        def f(items):
            subprocess.run(["true"])
            return list(map(str, items))
        """,
    "queues and clients given to ctxrelay": """
        import httpx, aiohttp, requests
        from celery import Celery
        from ctxrelay.integrations import celery as relay_celery
        from ctxrelay.integrations.httpx import install, request_hook
        from ctxrelay.integrations.requests import Session, install as install_session
        from ctxrelay.integrations.aiohttp import trace_config
        app = Celery("shop")
        relay_celery.install(app)
        client = install(httpx.Client())
        hooked = httpx.AsyncClient(event_hooks={"request": [request_hook]})
        http = Session()
        plain = requests.Session()
        install_session(plain)
        async def f():
            async with aiohttp.ClientSession(trace_configs=[trace_config()]) as s:
                pass
        """,
}


@pytest.mark.parametrize("case", list(RELAYED), ids=list(RELAYED))
def test_relayed_forms_are_silent(tmp_path: Path, case: str) -> None:
    assert findings(tmp_path, RELAYED[case]) == []


# -- aliases and indirections --------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        """
        from concurrent.futures import ThreadPoolExecutor as TPE
        def f(fn):
            with TPE(2) as ex:
                ex.submit(fn)
        """,
        """
        import concurrent.futures as cf
        def f(fn):
            cf.ThreadPoolExecutor().submit(fn)
        """,
        """
        from concurrent import futures
        def f(fn):
            futures.ThreadPoolExecutor().map(fn, [1])
        """,
        """
        from concurrent.futures import *
        def f(fn):
            ThreadPoolExecutor().submit(fn)
        """,
        """
        from concurrent.futures.thread import ThreadPoolExecutor
        def f(fn):
            pool = ThreadPoolExecutor()
            alias = pool
            alias.submit(fn)
        """,
        """
        from concurrent.futures import ThreadPoolExecutor
        class Service:
            def __init__(self):
                self._pool = ThreadPoolExecutor()
            def handle(self, fn):
                self._pool.submit(fn)
        """,
        """
        from concurrent.futures import Executor
        def f(pool: Executor, fn):
            pool.submit(fn)
        """,
        """
        from typing import Optional
        from concurrent.futures import Executor, ThreadPoolExecutor
        def f(fn, pool: Optional[Executor] = None):
            pool = pool or ThreadPoolExecutor()
            pool.submit(fn)
        """,
        """
        from concurrent.futures import ThreadPoolExecutor
        class Service:
            pool: "ThreadPoolExecutor | None" = None
            def handle(self, fn):
                self.pool.submit(fn)
        """,
        """
        from concurrent.futures import ThreadPoolExecutor
        class Base:
            def __init__(self):
                self.pool = ThreadPoolExecutor()
        class Child(Base):
            def handle(self, fn):
                self.pool.submit(fn)
        """,
        """
        from concurrent.futures import ThreadPoolExecutor
        class MyPool(ThreadPoolExecutor):
            pass
        def f(fn):
            MyPool().submit(fn)
        """,
        """
        import concurrent.futures
        Pool = concurrent.futures.ThreadPoolExecutor
        def f(fn):
            Pool().submit(fn)
        """,
    ],
    ids=[
        "from-import-as",
        "import-module-as",
        "from-package-import-module",
        "star-import",
        "submodule-and-local-alias",
        "self-attribute-other-method",
        "parameter-annotated-Executor",
        "optional-parameter-or-default",
        "class-annotation-string",
        "attribute-set-in-base-class",
        "subclass-without-submit",
        "module-level-alias",
    ],
)
def test_aliases_and_indirections(tmp_path: Path, source: str) -> None:
    assert codes(tmp_path, source) == ["CTX101"]


def test_a_pool_class_from_another_module_of_the_project(tmp_path: Path) -> None:
    (tmp_path / "pools.py").write_text(
        "import threading\nclass Worker(threading.Thread):\n    def run(self): pass\n"
    )
    (tmp_path / "app.py").write_text("from pools import Worker\ndef go():\n    Worker().start()\n")
    result = check_paths([str(tmp_path)], Config())
    assert [(Path(f.path).name, f.line, f.code) for f in result.findings] == [
        ("app.py", 3, "CTX102")
    ]


def test_a_module_level_copy_is_not_at_the_hand_off(tmp_path: Path) -> None:
    source = """
        import contextvars
        from concurrent.futures import ThreadPoolExecutor
        CTX = contextvars.copy_context()
        def f(fn):
            ThreadPoolExecutor().submit(CTX.run, fn)
        """
    assert codes(tmp_path, source) == ["CTX101"]


# -- instrument() -------------------------------------------------------------------------

HANDOFFS = """
    import asyncio, threading, multiprocessing
    from concurrent.futures import ThreadPoolExecutor, ProcessPoolExecutor
    def f(fn):
        ThreadPoolExecutor().submit(fn)
        threading.Thread(target=fn).start()
        ProcessPoolExecutor().submit(fn)
        multiprocessing.Pool().map(fn, [1])
    async def g(fn):
        await asyncio.get_running_loop().run_in_executor(None, fn)
    import requests
    requests.get("https://x/")
    """


def test_instrument_called_anywhere_covers_what_it_patches(tmp_path: Path) -> None:
    assert sorted(set(codes(tmp_path, HANDOFFS))) == [
        "CTX101",
        "CTX102",
        "CTX103",
        "CTX104",
        "CTX301",
    ]
    (tmp_path / "startup.py").write_text("import ctxrelay\nctxrelay.instrument()\n")
    (tmp_path / "mod.py").write_text(textwrap.dedent(HANDOFFS))
    result = check_paths([str(tmp_path)], Config())
    assert [f.code for f in result.findings] == ["CTX301"]  # HTTP is not instrument()'s
    assert [(Path(p).name, line) for p, line in result.instrument_calls] == [("startup.py", 2)]


def test_observe_only_instrument_does_not_relay(tmp_path: Path) -> None:
    source = textwrap.dedent(HANDOFFS) + "\nimport ctxrelay\nctxrelay.instrument(relay=False)\n"
    assert "CTX101" in codes(tmp_path, source)


def test_assume_instrument(tmp_path: Path) -> None:
    assert codes(tmp_path, HANDOFFS, Config(assume_instrument=True)) == ["CTX301"]
    path = tmp_path / "mod.py"
    assert main([str(path), "--assume-instrument", "-q"]) == 1  # CTX301 is still there
    assert main([str(path), "--assume-instrument", "--ignore", "CTX3"]) == 0


def test_a_shared_copy_is_reported_even_with_instrument(tmp_path: Path) -> None:
    source = TRUE_POSITIVES["CTX106 one copy for a loop of tasks"][0]
    assert codes(tmp_path, source, Config(assume_instrument=True)) == ["CTX106"]


# -- pragmas, selection, configuration ----------------------------------------------------


def test_pragmas(tmp_path: Path) -> None:
    source = """
        import threading
        from concurrent.futures import ThreadPoolExecutor
        def f(fn):
            pool = ThreadPoolExecutor()
            pool.submit(fn)  # ctxrelay: ignore[CTX101]
            pool.submit(fn)  # ctxrelay: ignore[CTX102]
            pool.submit(fn)  # ctxrelay: ignore
            pool.submit(fn)  # ctxrelay: ignore[ctx1, CTX2]
            threading.Thread(
                target=fn,
            ).start()  # ctxrelay: ignore[CTX102]
            pool.submit(fn)
        """
    assert findings(tmp_path, source) == [(6, "CTX101"), (12, "CTX101")]


def test_select_and_ignore(tmp_path: Path) -> None:
    source = HANDOFFS
    assert set(codes(tmp_path, source, Config(select=("CTX10",)))) == {
        "CTX101",
        "CTX102",
        "CTX103",
        "CTX104",
    }
    assert set(codes(tmp_path, source, Config(select=("CTX1",), ignore=("CTX104",)))) == {
        "CTX101",
        "CTX102",
        "CTX103",
    }
    assert codes(tmp_path, source, Config(select=("CTX301",))) == ["CTX301"]


@pytest.fixture(params=["parser", "own-reader"])
def toml_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each configuration test twice: with the TOML parser (tomllib, or tomli on 3.10)
    and with the reader Python 3.10 falls back to when tomli is not installed."""
    if request.param == "own-reader":
        monkeypatch.setattr(_run, "_toml_module", lambda: None)
    elif _run._toml_module() is None:
        pytest.skip("no TOML parser here (Python 3.10 without tomli)")
    return str(request.param)


def test_pyproject_section_is_found_walking_up(tmp_path: Path, toml_reader: str) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.ctxrelay]\nignore = ["CTX3"]\n'
        'exclude = ["generated"]\nassume-instrument = false\n'
    )
    package = tmp_path / "src" / "app"
    package.mkdir(parents=True)
    (package / "mod.py").write_text(textwrap.dedent(HANDOFFS))
    (package / "generated").mkdir()
    (package / "generated" / "x.py").write_text("import requests\nrequests.get('x')\n")
    result = check_paths([str(package)])
    assert {f.code for f in result.findings} == {"CTX101", "CTX102", "CTX103", "CTX104"}
    assert result.files == 1
    (tmp_path / "pyproject.toml").write_text("[tool.ctxrelay]\nassume-instrument = true\n")
    assert {f.code for f in check_paths([str(package)]).findings} == {"CTX301"}


@pytest.mark.parametrize(
    "section",
    [
        "[tool.ctxrelay]\nselct = ['CTX1']\n",
        "[tool.ctxrelay]\nselect = ['NOPE']\n",
        "[tool.ctxrelay]\nassume-instrument = 'yes'\n",
        "[tool.ctxrelay]\nignore = 3\n",
        "[tool.ctxrelay\n",
        '[project]\nname = "x\n[tool.ctxrelay]\n',
        "[tool.ctxrelay.extra]\nx = 1\n",
    ],
    ids=[
        "unknown-key",
        "unknown-code",
        "not-a-bool",
        "not-a-list",
        "bad-toml",
        "bad-toml-elsewhere",
        "sub-table",
    ],
)
def test_bad_configuration_is_a_usage_error(
    tmp_path: Path, section: str, capsys: pytest.CaptureFixture[str], toml_reader: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(section)
    (tmp_path / "mod.py").write_text("x = 1\n")
    assert main([str(tmp_path)]) == 2
    assert "ctxrelay check:" in capsys.readouterr().err


def test_default_excludes_apply_below_the_given_path(tmp_path: Path) -> None:
    for name in (".venv", "build", "node_modules", "x.egg-info"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.py").write_text("import requests\nrequests.get('x')\n")
    assert check_paths([str(tmp_path)], Config()).files == 0
    assert check_paths([str(tmp_path / ".venv")], Config()).files == 1


# -- output formats and exit statuses --------------------------------------------------


def _project(tmp_path: Path) -> Path:
    path = tmp_path / "svc.py"
    path.write_text(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def f(fn):\n"
        "    # é: a non-ASCII comment\n"
        "    pool = ThreadPoolExecutor(); pool.submit(fn)  # é\n"
    )
    return path


def test_text_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _project(tmp_path)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:4:34: CTX101 ThreadPoolExecutor.submit()")
    assert out[-1] == "Found 1 finding in 1 files checked."


def test_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _project(tmp_path)
    assert main([str(path), "--format", "json"]) == 1
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1
    record = records[0]
    assert {k: record[k] for k in ("path", "line", "column", "code")} == {
        "path": str(path),
        "line": 4,
        "column": 34,
        "code": "CTX101",
    }
    assert record["message"].startswith("ThreadPoolExecutor.submit()")
    assert record["url"] == "docs/check.md#ctx101"
    assert main([str(tmp_path / "nothing"), "--format", "json"]) == 2


def test_sarif_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["svc.py", "--format", "sarif"]) == 1
    log = json.loads(capsys.readouterr().out)
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "ctxrelay"
    assert [rule["id"] for rule in driver["rules"]] == list(RULES)
    assert all(
        rule["help"]["text"] and rule["shortDescription"]["text"] for rule in driver["rules"]
    )
    (result,) = run["results"]
    assert result["ruleId"] == "CTX101"
    assert driver["rules"][result["ruleIndex"]]["id"] == "CTX101"
    assert result["level"] == "warning"
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"] == {"uri": "svc.py", "uriBaseId": "%SRCROOT%"}
    assert location["region"]["startLine"] == 4
    assert location["region"]["startColumn"] == 34
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"].endswith("/")


def test_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = tmp_path / "clean.py"
    clean.write_text("import ctxrelay\nctxrelay.ThreadPoolExecutor().submit(print)\n")
    assert main([str(clean)]) == 0
    assert "All checks passed" in capsys.readouterr().out
    assert main([str(_project(tmp_path))]) == 1
    assert main([str(_project(tmp_path)), "--exit-zero"]) == 0
    assert main([str(tmp_path / "missing.py")]) == 2
    assert main(["--format", "xml", str(clean)]) == 2
    assert main(["--select", "CTX999", str(clean)]) == 2
    assert main(["--no-such-option"]) == 2
    assert main(["--explain", "ctx105"]) == 0
    assert "copy_context()" in capsys.readouterr().out
    assert main(["--explain", "CTX999"]) == 2


def test_syntax_errors_are_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "a_broken.py").write_text("def f(:\n    pass\n")
    (tmp_path / "b_binary.py").write_bytes(b"x = 1\x00\n")
    (tmp_path / "c_ok.py").write_text("import threading\nthreading.Thread(target=print).start()\n")
    (tmp_path / "d_warns.py").write_text("x = '\\d'\nassert (x, 'always true')\n")
    result = check_paths([str(tmp_path)], Config())
    assert [(Path(f.path).name, f.line, f.code) for f in result.findings] == [
        ("a_broken.py", 1, "CTX001"),
        ("b_binary.py", 1, "CTX001"),
        ("c_ok.py", 2, "CTX102"),
    ]
    assert result.files == 4


def test_deeply_nested_code_does_not_crash(tmp_path: Path) -> None:
    (tmp_path / "deep.py").write_text("x = " + "[" * 150 + "]" * 150 + "\n")
    result = check_paths([str(tmp_path)], Config())
    assert all(f.code == "CTX001" for f in result.findings)


# -- the command line -------------------------------------------------------------------


def test_console_script_in_a_subprocess(tmp_path: Path) -> None:
    path = _project(tmp_path)
    script = SCRIPTS / "ctxrelay"
    run = subprocess.run(
        [str(script), "check", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert [r["code"] for r in json.loads(run.stdout)] == ["CTX101"]
    module = subprocess.run(
        [sys.executable, "-m", "ctxrelay", "check", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert module.returncode == 2
    assert "no such file" in module.stderr


def test_import_ctxrelay_does_not_import_the_checker() -> None:
    code = "import sys, ctxrelay; print(any(m.startswith('ctxrelay.check') for m in sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "False"


def test_ctxrelay_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from ctxrelay.__main__ import main as cli

    assert cli([]) == 2
    err = capsys.readouterr().err
    assert "ctxrelay demo" in err
    assert "ctxrelay check" in err


def test_pre_commit_hook_definition() -> None:
    text = (Path(__file__).resolve().parent.parent / ".pre-commit-hooks.yaml").read_text()
    assert "- id: ctxrelay-check" in text
    assert "entry: ctxrelay check" in text
    assert "types: [python]" in text


# -- [tool.ctxrelay] without tomllib: Python 3.10's own reader ----------------------------
#
# On 3.10, ctxrelay reads pyproject.toml with tomli when it is installed, and with a
# small reader of its own when not (ctxrelay has no dependency).  Every case below is
# checked against that reader, and against the real parser where one is importable
# (tomllib on 3.11+, tomli on 3.10): they must agree.

REAL_TOML = _run._toml_module()
THIS_PYPROJECT = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()

READABLE = {
    "ours, with comments and a list over lines": (
        '[project]\nname = "x"\n\n[tool.ctxrelay]  # ours\n'
        'select = [\n  "CTX1",  # in-process\n  "CTX2",\n]\n'
        "ignore = ['CTX104']\nexclude = [\"untrue#not-a-comment\"]\n"
        "assume-instrument = true\n\n[tool.other]\nselect = 1\n",
        {
            "select": ["CTX1", "CTX2"],
            "ignore": ["CTX104"],
            "exclude": ["untrue#not-a-comment"],
            "assume-instrument": True,
        },
    ),
    "this project's own pyproject.toml, and ours after it": (
        THIS_PYPROJECT + '\n[ tool . "ctxrelay" ]\nexclude = ["a\\"b", \'c\\d\']\n',
        {"exclude": ['a"b', "c\\d"]},
    ),
    "brackets, hashes and headers inside strings and nested lists": (
        'readme = """\n[tool.ctxrelay]\nselect = 1  # not a comment\n"""\n'
        "raw = '''\n[not a table\n'''\n"
        "matrix = [\n  [1, 2],\n  [\n    3,\n  ],\n]\n"
        'inline = { a = "[", b = { c = "]" } }\n'
        'dotted.key = "x"\n"quoted key" = true\n\n[[tool.many]]\nx = 1\n'
        "[tool.ctxrelay]\nassume-instrument = false\n",
        {"assume-instrument": False},
    ),
    "strings: escapes, literal and multi-line": (
        "\n".join(
            [
                "[tool.ctxrelay]",
                "exclude = [",
                r'  "caf\u00e9\t\\x",',
                r"  'C:\gen\',",
                "  '''\none\ntwo''',",
                '  """\nsrc/\\\n    gen""",',
                "]",
            ]
        ),
        {"exclude": ["caf\u00e9\t\\x", "C:\\gen\\", "one\ntwo", "src/gen"]},
    ),
    "no section of ours": ('[project]\nname = "x"\n', None),
    "an empty file": ("", None),
}


@pytest.mark.parametrize(("text", "expected"), list(READABLE.values()), ids=list(READABLE))
def test_the_python_3_10_reader_reads_what_tomllib_reads(
    tmp_path: Path, text: str, expected: dict[str, object] | None
) -> None:
    ours = _run._mini_toml(text, tmp_path / "pyproject.toml").get("tool", {}).get("ctxrelay")
    assert ours == expected
    if REAL_TOML is not None:
        assert REAL_TOML.loads(text).get("tool", {}).get("ctxrelay") == expected


UNREADABLE = {
    "a header not closed": "[tool.ctxrelay\n",
    "a bracket closing nothing": "[tool.x]]\n",
    "a string not closed": '[project]\nname = "x\n',
    "a multi-line string not closed": "[project]\nreadme = '''x\n",
    "a list not closed": "[project]\ndeps = [\n  'a',\n",
    "a line that is not key = value": "[project]\njust words\n",
    "a key with no value": "[tool.ctxrelay]\nselect =\n",
    "an option set twice": "[tool.ctxrelay]\nselect = ['CTX1']\nselect = ['CTX2']\n",
    "our table twice": "[tool.ctxrelay]\n[tool.ctxrelay]\n",
    "a bad value of ours": "[tool.ctxrelay]\nselect = [CTX1]\n",
    "an unknown escape": '[project]\nname = "a\\d"\n',
}


@pytest.mark.parametrize("text", list(UNREADABLE.values()), ids=list(UNREADABLE))
def test_the_python_3_10_reader_refuses_what_tomllib_refuses(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"pyproject\.toml:\d+: "):
        _run._mini_toml(text, tmp_path / "pyproject.toml")
    if REAL_TOML is not None:
        with pytest.raises(REAL_TOML.TOMLDecodeError):
            REAL_TOML.loads(text)


def test_the_python_3_10_reader_says_so_for_options_outside_a_table_of_ours(
    tmp_path: Path,
) -> None:
    # Valid TOML that it does not read: it refuses, rather than ignore the options.
    for text in ('[tool]\nctxrelay = { select = ["CTX1"] }\n', 'tool.ctxrelay.select = ["X"]\n'):
        with pytest.raises(ConfigError, match=r"\[tool\.ctxrelay\] table only.*install tomli"):
            _run._mini_toml(text, tmp_path / "pyproject.toml")
