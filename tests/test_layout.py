"""The package's layout rules, checked on its source.

* A module's ``__all__`` is its interface, inside the package too: no module
  imports another module's underscored name, or a name that module does not
  list in ``__all__``, and none reaches into another module's (or an imported
  class's) underscored attributes.
* The import graph between ctxrelay's own modules has no circles.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "ctxrelay"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), path


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The absolute name an ``ImportFrom`` refers to, if it is ctxrelay's."""
    if node.level == 0:
        name = node.module or ""
        return name if name == "ctxrelay" or name.startswith("ctxrelay.") else None
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _public(module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), "__all__", ()))


def _is_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _violations() -> Iterator[str]:
    for module, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        imported: dict[str, str] = {}  # local name -> "module" or "module.name"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(module, node, is_package)
            if target is None:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name == "*" or alias.name == "__all__":
                    continue  # a re-export of the whole interface (the old paths)
                if _is_module(f"{target}.{alias.name}"):
                    imported[local] = f"{target}.{alias.name}"  # a module object
                    continue
                imported[local] = f"{target}:{alias.name}"
                if target == module.rpartition(".")[0] and is_package:
                    continue
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{path.name}:{node.lineno}: imports {target}'s private {alias.name}"
                elif alias.name not in _public(target):
                    yield f"{path.name}:{node.lineno}: {alias.name} is not in {target}.__all__"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            owner = imported.get(node.value.id)
            attr = node.attr
            if owner is None or attr.startswith("__"):
                continue
            if not attr.startswith("_"):
                if ":" not in owner and attr not in _public(owner):  # a module's attribute
                    yield f"{path.name}:{node.lineno}: {owner}.{attr} is not in its __all__"
                continue
            yield f"{path.name}:{node.lineno}: reaches into {owner}'s private {attr}"


def test_no_module_uses_another_modules_private_names() -> None:
    found = sorted(set(_violations()))
    assert not found, "\n".join(found)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        edges = graph.setdefault(module, set())
        for node in tree.body:  # module level only: function-local imports are lazy
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                if target is None or target == module:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if _is_module(sub) else target)
    return graph


def test_the_import_graph_has_no_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") or nxt == "ctxrelay":
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycles.append([*trail, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize(
    "module",
    [
        m
        for m, _ in _modules()
        if m.split(".")[-1].startswith("_") and not m.split(".")[-1].startswith("__")
    ],
)
def test_every_private_module_declares_its_interface(module: str) -> None:
    assert hasattr(importlib.import_module(module), "__all__"), f"{module} has no __all__"


def test_one_peer_format_the_snapshot_and_the_trust_check_agree_on_ipv6() -> None:
    # The snapshot wrote "::1:5000" and the door "[::1]:5000": a policy
    # trusting ::1 trusted the door's peer and not request().client.
    import ctxrelay
    from ctxrelay import Policy, RequestSnapshot

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "query_string": b"",
        "headers": [],
        "client": ("::1", 5000),
        "server": ("::1", 8000),
    }
    snapshot = RequestSnapshot.from_asgi(scope)
    assert snapshot.client == "[::1]:5000"
    assert snapshot.host in ("[::1]:8000", "[::1]")
    wsgi = RequestSnapshot.from_wsgi({"REMOTE_ADDR": "::1", "REMOTE_PORT": "5000"})
    assert wsgi.client == "[::1]:5000"
    assert RequestSnapshot.from_wsgi({"REMOTE_ADDR": "10.0.0.1", "REMOTE_PORT": "80"}).client == (
        "10.0.0.1:80"
    )
    policy = Policy(trusted_peers=("::1",))
    assert policy.trusts(snapshot.client)
    assert policy.trusts(wsgi.client)
    assert ctxrelay.current() == {}


def test_the_demo_uses_only_the_public_api_and_import_ctxrelay_does_not_load_it() -> None:
    import subprocess
    import sys

    for path in sorted((PACKAGE / "demo").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
                module = node.module if node.level == 0 else ""
                private = [part for part in module.split(".") if part.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports {module}"
                assert not (node.level >= 2 and node.module.startswith("_")), (
                    f"{path.name}:{node.lineno} imports a private core module"
                )
    code = "import sys, ctxrelay; assert not [m for m in sys.modules if 'demo' in m]"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
