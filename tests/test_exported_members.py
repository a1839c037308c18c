"""The public face is pinned: adding or removing a name is a decision."""

import ctxrelay


def test_all_is_sorted_and_pinned() -> None:
    assert ctxrelay.__all__ == sorted(ctxrelay.__all__)
    assert set(ctxrelay.__all__) == {
        "Context",
        "ContextExecutor",
        "DeadlineExceeded",
        "Headers",
        "Policy",
        "ProcessPoolExecutor",
        "RequestCancelled",
        "RequestSnapshot",
        "Scope",
        "Thread",
        "ThreadPoolExecutor",
        "Timer",
        "active_policy",
        "bind",
        "bind_request",
        "cancelled",
        "checkpoint",
        "configure",
        "current",
        "deadline",
        "detached",
        "extract",
        "get",
        "inject",
        "instrument",
        "instrumented",
        "remaining",
        "request",
        "request_id",
        "run_async",
        "strict",
        "strict_reports",
        "uninstrument",
        "use",
        "without_deadline",
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


INTEGRATIONS = {
    "asgi": ["RelayMiddleware", "valid_request_id"],
    "wsgi": ["RelayMiddleware", "valid_request_id"],
    "django": ["RelayMiddleware", "door_from_settings", "timeout_from_settings"],
    "celery": [
        "KEY", "Signer", "TASK_ID", "TASK_PARENT_ID", "TASK_ROOT_ID", "install", "uninstall",
    ],
    "rq": [
        "JOB_ID", "SUPPORTED", "RelayJob", "RelaySimpleWorker", "RelayWorker", "RelayWorkerMixin",
        "Signer",
    ],
    "dramatiq": ["ContextMiddleware", "MESSAGE_ID", "Signer", "install", "uninstall"],
    "requests": ["Session", "install", "uninstall"],
    "httpx": ["async_request_hook", "install", "request_hook", "uninstall"],
    "aiohttp": ["install", "trace_config", "uninstall"],
    "aiohttp_server": ["RelayMiddleware", "setup"],
    "nats": ["KEY", "Signer", "bound", "context_of", "install", "uninstall"],
    "arq": ["JOB_ID", "KEY", "Signer", "install", "install_worker"],
    "taskiq": ["ContextMiddleware", "KEY", "Signer", "TASK_ID", "carry", "install", "uninstall"],
    "logging": [
        "ContextFilter", "DEFAULT", "DEFAULT_FORMAT", "FrozenFields", "REQUEST_ATTRIBUTES",
        "install", "setup", "uninstall",
    ],
    "structlog": ["MergeContext", "merge_context"],
    "loguru": ["ContextPatcher", "patcher"],
    "grpc": [
        "AioServerInterceptor", "ClientInterceptor", "ServerInterceptor", "aio_client_interceptors",
        "destination_of", "relay_channel", "relay_server",
    ],
    "reactivex": ["RelayScheduler", "install", "installed", "uninstall"],
    "sentry": ["CONTEXT", "MAX_TAG_KEY", "MAX_TAG_VALUE", "SentryIntegration", "stamp"],
    "opentelemetry": ["ContextSpanProcessor", "DEFAULT_FIELDS", "PREFIX"],
}  # fmt: skip

#: Shared by several integrations whose extras may be missing: kept at a path
#: that imports without any extra, so a pickle always finds it.
SHARED = {"Signer": "ctxrelay._carrier"}


def _integration(name: str) -> object:
    import importlib

    if name == "django":
        import django  # type: ignore[import-untyped]
        from django.conf import settings  # type: ignore[import-untyped]

        if not settings.configured:
            settings.configure()
            django.setup()
    return importlib.import_module(f"ctxrelay.integrations.{name}")


def test_every_integrations_public_face_is_pinned() -> None:
    for name, expected in INTEGRATIONS.items():
        module = _integration(name)
        assert sorted(module.__all__) == sorted(expected), name  # type: ignore[attr-defined]


def test_public_objects_show_public_module_paths() -> None:
    for name in ctxrelay.__all__:
        obj = getattr(ctxrelay, name)
        assert obj.__module__ == "ctxrelay", name
    for integration in INTEGRATIONS:
        module = _integration(integration)
        for name in module.__all__:  # type: ignore[attr-defined]
            obj = getattr(module, name)
            where = getattr(obj, "__module__", None)
            if where is None:  # a constant
                continue
            assert where == SHARED.get(name) or not any(
                part.startswith("_") for part in where.split(".")
            ), f"{integration}.{name}: {where}"
