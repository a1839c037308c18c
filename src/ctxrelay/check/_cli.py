"""``ctxrelay check``: the command line and its three output formats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from ._rules import INSTRUMENT_COVERS, RULES
from ._run import CheckResult, Config, ConfigError, check_paths, find_config, load_config
from ._run import validate_codes as _codes

__all__ = ["main", "render_json", "render_sarif", "render_text"]

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_INFORMATION_URI = "https://pypi.org/project/ctxrelay/"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ctxrelay")
    except Exception:
        return "0"


def render_text(result: CheckResult, out: TextIO, *, quiet: bool = False) -> None:
    """``path:line:col: CODE message``, one per line, then a summary (unless quiet)."""
    for f in result.findings:
        out.write(f"{f.path}:{f.line}:{f.column}: {f.code} {f.message}\n")
    if quiet:
        return
    count = len(result.findings)
    if count:
        noun = "finding" if count == 1 else "findings"
        out.write(f"Found {count} {noun} in {result.files} files checked.\n")
    else:
        out.write(f"All checks passed ({result.files} files checked).\n")


def _record(result: CheckResult) -> list[dict[str, Any]]:
    return [
        {
            "path": f.path,
            "line": f.line,
            "column": f.column,
            "end_line": f.end_line,
            "end_column": f.end_column,
            "code": f.code,
            "name": RULES[f.code].name,
            "message": f.message,
            "url": RULES[f.code].doc,
        }
        for f in result.findings
    ]


def render_json(result: CheckResult, out: TextIO) -> None:
    """A JSON array: path, line, column, end_line, end_column, code, name, message, url."""
    json.dump(_record(result), out, indent=2)
    out.write("\n")


def _uri(path: str) -> tuple[str, bool]:
    """A SARIF artifact URI: relative to the checkout (%SRCROOT%) when it can be."""
    if not os.path.isabs(path) and not path.startswith(".."):
        return path.replace(os.sep, "/"), True
    return Path(path).resolve().as_uri(), False


def render_sarif(result: CheckResult, out: TextIO) -> None:
    """SARIF 2.1.0, one run, the rules with their help: what GitHub code scanning reads."""
    codes = list(RULES)
    rules = [
        {
            "id": rule.code,
            "name": rule.name,
            "shortDescription": {"text": rule.summary.split(": ")[0].split(". ")[0]},
            "fullDescription": {"text": rule.summary},
            "help": {
                "text": f"{rule.summary}\nFix: {rule.fix}\nSee {rule.doc}",
                "markdown": f"{rule.summary}\n\n**Fix:** {rule.fix}\n\nSee `{rule.doc}`.",
            },
            "defaultConfiguration": {"level": "error" if rule.code == "CTX001" else "warning"},
            "properties": {"tags": ["context-propagation"]},
        }
        for rule in RULES.values()
    ]
    results = []
    for f in result.findings:
        uri, relative = _uri(f.path)
        location: dict[str, Any] = {"uri": uri}
        if relative:
            location["uriBaseId"] = "%SRCROOT%"
        region = {"startLine": f.line, "startColumn": f.column}
        if f.end_line >= f.line and (f.end_line > f.line or f.end_column > f.column):
            region["endLine"] = f.end_line
            region["endColumn"] = f.end_column
        results.append(
            {
                "ruleId": f.code,
                "ruleIndex": codes.index(f.code),
                "level": "error" if f.code == "CTX001" else "warning",
                "message": {"text": f.message},
                "locations": [
                    {"physicalLocation": {"artifactLocation": location, "region": region}}
                ],
            }
        )
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "ctxrelay",
                        "informationUri": _INFORMATION_URI,
                        "semanticVersion": _version(),
                        "rules": rules,
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": Path.cwd().resolve().as_uri() + "/"}},
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    json.dump(log, out, indent=2)
    out.write("\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxrelay check",
        description=(
            "Find the hand-offs that drop a request's context (thread and process pools, "
            "threads, run_in_executor, task queues, HTTP clients) before they run."
        ),
        epilog="Exit status: 0 clean, 1 findings, 2 usage error. Codes: docs/check.md.",
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help="files or directories (default: .)"
    )
    parser.add_argument(
        "--format",
        choices=("text", "json", "sarif"),
        default="text",
        help="output format (default: text, path:line:col: CODE message)",
    )
    parser.add_argument("--select", metavar="CODES", help="comma-separated code prefixes to report")
    parser.add_argument("--ignore", metavar="CODES", help="comma-separated code prefixes to skip")
    parser.add_argument(
        "--exclude", metavar="GLOBS", help="comma-separated path patterns to skip (added to config)"
    )
    parser.add_argument(
        "--assume-instrument",
        action="store_true",
        default=None,
        help="the project calls ctxrelay.instrument() where the checker cannot see it: "
        f"do not report {', '.join(sorted(INSTRUMENT_COVERS))}",
    )
    parser.add_argument("--config", metavar="PYPROJECT", help="read [tool.ctxrelay] from this file")
    parser.add_argument(
        "--isolated", action="store_true", help="ignore every pyproject.toml configuration"
    )
    parser.add_argument("--exit-zero", action="store_true", help="exit 0 even with findings")
    parser.add_argument("-q", "--quiet", action="store_true", help="text: no summary line")
    parser.add_argument("--explain", metavar="CODE", help="print what a code means and its fix")
    return parser


def _split(value: str | None) -> list[str]:
    return [] if value is None else [v for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ctxrelay check``; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return 0 if exc.code in (0, None) else 2
    if args.explain:
        rule = RULES.get(args.explain.strip().upper())
        if rule is None:
            print(f"ctxrelay check: unknown code {args.explain!r}", file=sys.stderr)
            return 2
        print(f"{rule.code} ({rule.name})\n\n{rule.summary}\n\nFix: {rule.fix}\n\nSee {rule.doc}")
        return 0
    paths: list[str] = args.paths or ["."]
    for path in paths:
        if not os.path.exists(path):
            print(f"ctxrelay check: {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        if args.isolated:
            config = Config()
        elif args.config:
            config = load_config(Path(args.config)) or Config(source=Path(args.config))
        else:
            config = find_config(paths)
        if args.select is not None:
            config = replace(config, select=_codes(_split(args.select), "--select"))
        if args.ignore is not None:
            config = replace(config, ignore=_codes(_split(args.ignore), "--ignore"))
        if args.exclude is not None:
            config = replace(config, exclude=(*config.exclude, *_split(args.exclude)))
    except ConfigError as exc:
        print(f"ctxrelay check: {exc}", file=sys.stderr)
        return 2
    result = check_paths(paths, config, assume_instrument=args.assume_instrument)
    if args.format == "json":
        render_json(result, sys.stdout)
    elif args.format == "sarif":
        render_sarif(result, sys.stdout)
    else:
        render_text(result, sys.stdout, quiet=args.quiet)
        if not args.quiet and (result.instrument_calls or result.assumed_instrument):
            where = (
                "assumed (--assume-instrument)"
                if result.assumed_instrument
                else "called at "
                + ", ".join(f"{p}:{line}" for p, line in result.instrument_calls[:3])
            )
            print(
                f"ctxrelay.instrument() {where}: "
                f"{', '.join(sorted(INSTRUMENT_COVERS))} not reported (it relays them).",
                file=sys.stderr,
            )
    if result.findings and not args.exit_zero:
        return 1
    return 0
