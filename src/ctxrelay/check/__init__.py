"""``ctxrelay check``: find the hand-offs that drop a request's context, before they run.

A static checker over Python source, standard library (``ast``) only, and never
imported by ``import ctxrelay``.  Run it as ``ctxrelay check [PATH ...]`` or
``python -m ctxrelay check``; or from Python::

    from ctxrelay.check import check_paths
    for finding in check_paths(["src"]).findings:
        print(finding.path, finding.line, finding.code, finding.message)

Codes and fixes: docs/check.md.
"""

from __future__ import annotations

from ._analyze import Finding
from ._cli import main, render_json, render_sarif, render_text
from ._rules import INSTRUMENT_COVERS, RULES, Rule
from ._run import CheckResult, Config, ConfigError, check_paths, find_config, load_config

__all__ = [
    "INSTRUMENT_COVERS",
    "RULES",
    "CheckResult",
    "Config",
    "ConfigError",
    "Finding",
    "Rule",
    "check_paths",
    "find_config",
    "load_config",
    "main",
    "render_json",
    "render_sarif",
    "render_text",
]
