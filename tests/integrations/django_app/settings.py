"""Settings of the test project: ctxrelay's middleware first, configured the
Django way through ``settings.CTXRELAY``."""

from __future__ import annotations

DEBUG = False
SECRET_KEY = "ctxrelay-tests-only"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.integrations.django_app.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
LOGGING_CONFIG = None  # leave the test process's logging alone

MIDDLEWARE = ["ctxrelay.integrations.django.RelayMiddleware"]
CTXRELAY = {
    "header_name": "X-Correlation-ID",
    "validator": "tests.integrations.django_app.views.accept_id",
}
