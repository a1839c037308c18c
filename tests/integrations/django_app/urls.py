"""Routes of the test project."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from . import views

urlpatterns = [
    path("sync", views.sync_view),
    path("async", views.async_view),
    path("work", views.work),
    path("late/<str:mode>/<str:key>", views.late),
    path("stream", views.stream),
    path("astream", views.astream),
    path("boom", views.boom),
    path("endless", views.endless),
    path("aendless", views.aendless),
]
