"""Running the checker over paths: discovery, ``[tool.ctxrelay]``, pragmas."""

from __future__ import annotations

import ast
import gc
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any

from ._analyze import Finding, ModuleFacts, Pending, Project
from ._rules import INSTRUMENT_COVERS, RULES

__all__ = [
    "CheckResult",
    "Config",
    "ConfigError",
    "check_paths",
    "find_config",
    "load_config",
    "validate_codes",
]

DEFAULT_EXCLUDE = (
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    ".eggs",
    "*.egg-info",
    "__pycache__",
    "node_modules",
    "build",
    "dist",
    "site-packages",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
)
_DEFAULT_NAMES = frozenset(p for p in DEFAULT_EXCLUDE if "*" not in p)
_CONFIG_KEYS = {"select", "ignore", "exclude", "assume-instrument"}
# A file that holds none of these cannot hand work off in a way the checker knows: it
# is parsed (a syntax error is still reported) but not walked.  Classes of the project
# that are pools or threads are added by name (see check_paths).
_TRIGGERS = (
    rb"submit|map|Thread|Timer|Pool|[Ee]xecutor|copy_context|ctxrelay|Celery|Queue|Broker|"
    rb"requests|httpx|aiohttp|Session|Client"
)
_PRAGMA = re.compile(rb"#\s*ctxrelay:\s*ignore(?:\[([A-Za-z0-9_,\s]*)\])?")


class ConfigError(ValueError):
    """A bad option or ``[tool.ctxrelay]`` value: a usage error (exit status 2)."""


@dataclass(frozen=True)
class Config:
    """What to check and what to report."""

    select: tuple[str, ...] = ()  # code prefixes; empty: every code
    ignore: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # glob patterns, on top of DEFAULT_EXCLUDE
    assume_instrument: bool = False
    source: Path | None = None  # the pyproject.toml it came from

    def enabled(self, code: str) -> bool:
        """Is ``code`` reported under this selection?"""
        if self.select and not any(code.startswith(p) for p in self.select):
            return False
        return not any(code.startswith(p) for p in self.ignore)


@dataclass
class CheckResult:
    """The outcome of one run."""

    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    lines: int = 0
    instrument_calls: list[tuple[str, int]] = field(default_factory=list)
    assumed_instrument: bool = False


def validate_codes(prefixes: Iterable[str], what: str) -> tuple[str, ...]:
    """Upper-case selectors, each matching at least one code."""
    out: list[str] = []
    for raw in prefixes:
        prefix = raw.strip().upper()
        if not prefix:
            continue
        if prefix == "ALL":
            prefix = "CTX"
        if not any(code.startswith(prefix) for code in RULES):
            raise ConfigError(f"{what}: {raw!r} matches no code (codes: {', '.join(RULES)})")
        out.append(prefix)
    return tuple(out)


def _toml_module() -> ModuleType | None:
    """The TOML parser: tomllib (3.11+), else tomli when installed, else None (3.10 alone)."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:  # the same parser, published for 3.10 (pytest and many tools install it)
        return importlib.import_module("tomli")
    except ImportError:
        return None


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    module = _toml_module()
    if module is None:
        return _mini_toml(text, path)  # Python 3.10 without tomli
    try:
        data: dict[str, Any] = module.loads(text)
    except module.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return data


# -- Python 3.10 without tomli: [tool.ctxrelay] and the file's structure ---------------
#
# ctxrelay has no dependency, and 3.10 has no tomllib.  This reader checks what
# makes a TOML file readable at all -- strings closed, brackets balanced, table
# headers and "key = value" lines well formed -- and reads the values of
# [tool.ctxrelay] only (strings, lists of strings, booleans): a bad value in
# another table goes unnoticed, as it does not change what the checker does.

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_KEY}(?:[ \t]*\.[ \t]*{_KEY})*"
_TABLE = re.compile(rf"\[[ \t]*({_DOTTED})[ \t]*\]|\[\[[ \t]*({_DOTTED})[ \t]*\]\]")
_ASSIGN = re.compile(rf"({_DOTTED})[ \t]*=[ \t]*(.*)", re.DOTALL)
_WORD = re.compile(r"[A-Za-z0-9_-]+")
_TRIPLE = ('"""', "'''")
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))", re.DOTALL)
_ESCAPES = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    '"': '"',
    "\\": "\\",
}


def _keys(dotted: str) -> list[str]:
    return [k.strip("\"'") for k in re.findall(_KEY, dotted)]


def _string(text: str, i: int, where: str) -> tuple[str, int]:
    """The TOML string that starts at ``text[i]``: its value, and the index past it."""
    delimiter = text[i : i + 3] if text.startswith(_TRIPLE, i) else text[i]
    basic = delimiter[0] == '"'
    end = i + len(delimiter)
    while not text.startswith(delimiter, end):
        if end >= len(text) or (text[end] == "\n" and len(delimiter) == 1):
            raise ConfigError(f"{where}: a string is not closed")
        end += 2 if basic and text[end] == "\\" else 1
    value = text[i + len(delimiter) : end]
    if len(delimiter) == 3:  # a newline right after the opening quotes is not part of it
        value = value.removeprefix("\r").removeprefix("\n")
        if basic:  # a backslash at the end of a line joins it to the next
            value = re.sub(r"\\[ \t]*\r?\n\s*", "", value)
    if basic:
        value = _ESCAPE.sub(lambda m: _unescape(m, where), value)
    return value, end + len(delimiter)


def _unescape(match: re.Match[str], where: str) -> str:
    code = match.group(1) or match.group(2)
    if code:
        return chr(int(code, 16))
    if match.group(3) in _ESCAPES:
        return _ESCAPES[match.group(3)]
    raise ConfigError(f"{where}: a string has the unknown escape \\{match.group(3)}")


def _statements(text: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, statement): comments dropped, strings and true/false spelled as
    Python's, a statement joined over the lines its brackets or strings span."""
    out: list[str] = []
    depth = 0
    line = first = 1
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\"'":
            value, after = _string(text, i, f"{path}:{line}")
            out.append(repr(value))
            line += text.count("\n", i, after)
            i = after
            continue
        if char == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"{path}:{line}: {char!r} closes nothing")
        elif char == "\n":
            line += 1
            if not depth:
                yield first, "".join(out).strip()
                out, first = [], line
            char = " "
        elif char.isalnum() or char in "_-":
            word = _WORD.match(text, i)
            char = word.group() if word else char
            i += len(char) - 1
            char = {"true": "True", "false": "False"}.get(char, char)
        out.append(char)
        i += 1
    if depth:
        raise ConfigError(f"{path}:{first}: a bracket is not closed")
    yield first, "".join(out).strip()


def _mini_toml(text: str, path: Path) -> dict[str, Any]:  # Python 3.10 without tomli
    """The file's [tool.ctxrelay] table, its structure checked (see above)."""
    ours: dict[str, Any] | None = None
    table: list[str] = []
    in_ours = False
    for number, statement in _statements(text, path):
        if not statement:
            continue
        where = f"{path}:{number}"
        if statement.startswith("["):
            header = _TABLE.fullmatch(statement)
            if header is None:
                raise ConfigError(f"{where}: not a table header: {statement}")
            table = _keys(header.group(1) or header.group(2))
            in_ours = table == ["tool", "ctxrelay"] and header.group(1) is not None
            if in_ours:
                if ours is not None:
                    raise ConfigError(f"{where}: [tool.ctxrelay] appears twice")
                ours = {}
            elif table[:2] == ["tool", "ctxrelay"]:  # a sub-table: an unknown key
                ours = {} if ours is None else ours
                ours.setdefault(table[2], {})
            continue
        assignment = _ASSIGN.fullmatch(statement)
        if assignment is None:
            raise ConfigError(f"{where}: expected key = value: {statement}")
        key, value = _keys(assignment.group(1)), assignment.group(2).strip()
        if not value:
            raise ConfigError(f"{where}: {assignment.group(1)} has no value")
        if in_ours and ours is not None:
            if len(key) > 1:  # a dotted key: a table, which no option is
                ours.setdefault(key[0], {})
                continue
            if key[0] in ours:
                raise ConfigError(f"{where}: {key[0]} is set twice in [tool.ctxrelay]")
            try:
                ours[key[0]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{where}: cannot read {key[0]} = {value}") from None
        elif (table + key)[:2] == ["tool", "ctxrelay"]:
            raise ConfigError(
                f"{where}: on Python 3.10 without tomli, ctxrelay reads its options from "
                "a [tool.ctxrelay] table only: write them there (or install tomli)"
            )
    return {} if ours is None else {"tool": {"ctxrelay": ours}}


def load_config(path: Path) -> Config | None:
    """The ``[tool.ctxrelay]`` section of a pyproject.toml, or None when it has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    data = _parse_toml(text, path)
    section = data.get("tool", {}).get("ctxrelay")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tool.ctxrelay] must be a table")
    unknown = set(section) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in [tool.ctxrelay]: {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_CONFIG_KEYS))})"
        )

    def strings(key: str) -> tuple[str, ...]:
        value = section.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: [tool.ctxrelay] {key} must be a list of strings")
        return tuple(value)

    assume = section.get("assume-instrument", False)
    if not isinstance(assume, bool):
        raise ConfigError(f"{path}: [tool.ctxrelay] assume-instrument must be true or false")
    return Config(
        select=validate_codes(strings("select"), f"{path}: select"),
        ignore=validate_codes(strings("ignore"), f"{path}: ignore"),
        exclude=strings("exclude"),
        assume_instrument=assume,
        source=path,
    )


def find_config(paths: Sequence[str]) -> Config:
    """Walk up from the first path (or the working directory) to a [tool.ctxrelay]."""
    start = Path(paths[0] if paths else ".").resolve()
    if not start.is_dir():
        start = start.parent
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            config = load_config(candidate)
            if config is not None:
                return config
    return Config()


def _excluded(path: Path, root: Path, patterns: Sequence[str]) -> bool:
    name = path.name
    try:
        relative = path.relative_to(root).as_posix()
    except ValueError:
        relative = path.as_posix()
    for pattern in patterns:
        bare = pattern.rstrip("/")
        if fnmatch(name, bare) or fnmatch(relative, bare) or relative.startswith(bare + "/"):
            return True
    return False


def discover(paths: Sequence[str], config: Config) -> Iterator[Path]:
    """Python files under the paths: excluded names skipped below each given path."""
    user = config.exclude
    base = config.source.parent if config.source is not None else Path.cwd()
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if user and (
                _excluded(path.resolve(), base.resolve(), user)
                or any(_excluded(p, base.resolve(), user) for p in path.resolve().parents)
            ):
                continue
            if path not in seen:
                seen.add(path)
                yield path
            continue
        resolved_base = base.resolve()
        for directory, dirs, files in os.walk(path):
            here = Path(directory)
            dirs[:] = sorted(
                d
                for d in dirs
                if d not in _DEFAULT_NAMES
                and not d.endswith(".egg-info")
                and not (user and _excluded((here / d).resolve(), resolved_base, user))
            )
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                file = here / name
                if user and _excluded(file.resolve(), resolved_base, user):
                    continue
                if file not in seen:
                    seen.add(file)
                    yield file


def _display(path: Path) -> str:
    text = os.path.relpath(path) if path.is_absolute() else os.path.normpath(path)
    if text.startswith(".."):
        text = str(path)
    return text.replace(os.sep, "/") if os.sep != "/" else text


class _Source:
    __slots__ = ("data", "lines", "path")

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.data = data
        self.lines: list[bytes] | None = None

    def line(self, number: int) -> bytes:
        if self.lines is None:
            self.lines = self.data.splitlines()
        if 1 <= number <= len(self.lines):
            return self.lines[number - 1]
        return b""

    def column(self, line: int, offset: int) -> int:
        """A 1-based character column from ast's UTF-8 byte offset."""
        text = self.line(line)
        if text.isascii():
            return offset + 1
        return len(text[:offset].decode("utf-8", "replace")) + 1

    def ignored(self, code: str, first: int, last: int) -> bool:
        for number in range(first, last + 1):
            text = self.line(number)
            if b"ctxrelay:" not in text:
                continue
            for match in _PRAGMA.finditer(text):
                codes = match.group(1)
                if codes is None:
                    return True
                for wanted in codes.decode().replace(" ", "").split(","):
                    if wanted and code.startswith(wanted.upper()):
                        return True
        return False


def _finding(source: _Source, pending: Pending) -> Finding:
    node = pending.node
    line = getattr(node, "lineno", 1)
    end_line = getattr(node, "end_lineno", None) or line
    return Finding(
        path=source.path,
        line=line,
        column=source.column(line, getattr(node, "col_offset", 0)),
        code=pending.code,
        message=pending.message,
        end_line=end_line,
        end_column=source.column(end_line, getattr(node, "end_col_offset", None) or 0),
        span=(line, end_line),
    )


def check_paths(
    paths: Sequence[str], config: Config | None = None, *, assume_instrument: bool | None = None
) -> CheckResult:
    """Check every Python file under ``paths``; findings sorted, pragmas applied."""
    if config is None:
        config = find_config(paths)
    if assume_instrument is not None:
        config = replace(config, assume_instrument=assume_instrument)
    enabled = gc.isenabled()
    gc.disable()  # millions of AST nodes stay alive until the project is resolved
    try:
        return _check(paths, config)
    finally:
        if enabled:
            gc.enable()


def _check(paths: Sequence[str], config: Config) -> CheckResult:
    result = CheckResult(assumed_instrument=config.assume_instrument)
    modules: list[ModuleFacts] = []
    sources: dict[str, _Source] = {}
    quiet: list[tuple[_Source, ast.Module]] = []  # parsed, but no trigger in them
    triggers = re.compile(_TRIGGERS)
    for path in discover(paths, config):
        shown = _display(path)
        result.files += 1
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.findings.append(
                Finding(shown, 1, 1, "CTX001", f"could not read the file: {exc.strerror}", 1, 1)
            )
            continue
        result.lines += data.count(b"\n")
        source = _Source(shown, data)
        sources[shown] = source
        tree = _parse(source, result)
        if tree is None:
            continue
        if triggers.search(data):
            _walk(source, tree, modules, result)
        else:
            quiet.append((source, tree))
    project = Project(modules)
    while quiet:
        # subclasses, in files without a trigger word, of the project's pools and threads
        names = project.handoff_class_names()
        if not names:
            break
        pattern = re.compile(b"|".join(re.escape(n.encode()) for n in sorted(names)))
        found = [(s, t) for s, t in quiet if pattern.search(s.data)]
        if not found:
            break
        quiet = [(s, t) for s, t in quiet if not pattern.search(s.data)]
        for source, tree in found:
            _walk(source, tree, modules, result)
        project = Project(modules)
    result.instrument_calls = project.instrumented
    instrumented = config.assume_instrument or bool(project.instrumented)
    for module in modules:
        source = sources[module.path]
        for pending in project.pending(module):
            if pending.covered and instrumented and pending.code in INSTRUMENT_COVERS:
                continue
            if pending.needs and pending.needs in project.integrations:
                continue
            result.findings.append(_finding(source, pending))
    kept: set[Finding] = set()
    for finding in result.findings:
        if not config.enabled(finding.code):
            continue
        source_of = sources.get(finding.path)
        first, last = finding.span if finding.span != (0, 0) else (finding.line, finding.line)
        if source_of is not None and source_of.ignored(finding.code, first, last):
            continue
        kept.add(finding)
    result.findings = sorted(kept)
    return result


def _parse(source: _Source, result: CheckResult) -> ast.Module | None:
    shown = source.path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the checked code's own SyntaxWarnings
            return ast.parse(source.data, filename=shown)
    except SyntaxError as exc:
        line = exc.lineno or 1
        column = max(exc.offset or 1, 1)
        result.findings.append(
            Finding(
                shown,
                line,
                column,
                "CTX001",
                f"syntax error, not checked: {exc.msg}",
                line,
                column,
                (line, line),
            )
        )
    except (ValueError, RecursionError, MemoryError) as exc:
        result.findings.append(
            Finding(shown, 1, 1, "CTX001", f"could not parse, not checked: {exc}", 1, 1)
        )
    return None


def _walk(
    source: _Source, tree: ast.Module, modules: list[ModuleFacts], result: CheckResult
) -> None:
    try:
        modules.append(ModuleFacts(source.path, tree))
    except RecursionError:
        result.findings.append(
            Finding(source.path, 1, 1, "CTX001", "nested too deeply to check", 1, 1)
        )
