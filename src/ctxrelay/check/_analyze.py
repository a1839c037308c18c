"""The analysis behind ``ctxrelay check``: standard-library ``ast`` only.

Each file is parsed once and walked once (``ModuleFacts``): its imports, the values
names and ``self`` attributes are bound to, the classes and functions it defines, and
the calls that may hand work off.  Then the project is resolved as a whole
(``Project``): a hand-off is judged by what its receiver is (a thread pool, a process
pool, a thread ...) and by the callable handed off (``ctx.run`` with the copy taken at
the hand-off, ``ctxrelay.wrap(fn)``, a helper that captures ...).  Whatever cannot be
seen statically is given the benefit of the doubt: an unknown receiver is not a
finding.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["Finding", "ModuleFacts", "Pending", "Project"]

# What an expression is, as far as the checker can see.
TPE = "thread pool"
PPE = "process pool"
EXEC = "executor"
MPPOOL = "multiprocessing pool"
MPCTX = "multiprocessing context"
THREAD = "thread"
RELAY = "relayed"

_THREAD_POOLS = {
    "concurrent.futures.ThreadPoolExecutor",
    "concurrent.futures.thread.ThreadPoolExecutor",
}
_PROCESS_POOLS = {
    "concurrent.futures.ProcessPoolExecutor",
    "concurrent.futures.process.ProcessPoolExecutor",
}
_EXECUTORS = {"concurrent.futures.Executor", "concurrent.futures._base.Executor"}
_MP_POOLS = {
    "multiprocessing.Pool",
    "multiprocessing.pool.Pool",
    "multiprocessing.pool.ThreadPool",
    "multiprocessing.dummy.Pool",
}
_THREADS = {"threading.Thread", "threading.Timer"}
_RELAYS = {
    "ctxrelay.ThreadPoolExecutor",
    "ctxrelay.ProcessPoolExecutor",
    "ctxrelay.ContextExecutor",
    "ctxrelay.Thread",
    "ctxrelay.Timer",
}
_KNOWN_CLASSES: dict[str, str] = {
    **dict.fromkeys(_THREAD_POOLS, TPE),
    **dict.fromkeys(_PROCESS_POOLS, PPE),
    **dict.fromkeys(_EXECUTORS, EXEC),
    **dict.fromkeys(_MP_POOLS, MPPOOL),
    "multiprocessing.get_context": MPCTX,
    "multiprocessing.context.BaseContext": MPCTX,
    **dict.fromkeys(_THREADS, THREAD),
    **dict.fromkeys(_RELAYS, RELAY),
}
_MP_METHODS = frozenset(
    {
        "apply",
        "apply_async",
        "map",
        "map_async",
        "starmap",
        "starmap_async",
        "imap",
        "imap_unordered",
    }
)
_COPY_CONTEXT = {"contextvars.copy_context"}
_WRAP = {"ctxrelay.wrap"}
_PARTIAL = {"functools.partial"}
_INSTRUMENT = {"ctxrelay.instrument"}
_DETACHED = {"ctxrelay.detached"}
_CELERY_APPS = {"celery.Celery", "celery.app.Celery", "celery.app.base.Celery"}
_RQ_QUEUES = {"rq.Queue", "rq.queue.Queue"}
_HTTP_VERBS = ("get", "post", "put", "patch", "delete", "head", "options", "request")
_REQUESTS_CALLS = {f"requests.{v}" for v in _HTTP_VERBS} | {
    f"requests.api.{v}" for v in _HTTP_VERBS
}
_REQUESTS_SESSIONS = {"requests.Session", "requests.session", "requests.sessions.Session"}
_HTTPX_CALLS = {f"httpx.{v}" for v in (*_HTTP_VERBS, "stream")}
_HTTPX_CLIENTS = {"httpx.Client", "httpx.AsyncClient"}
_AIOHTTP_CALLS = {"aiohttp.request"}
_AIOHTTP_SESSIONS = {"aiohttp.ClientSession", "aiohttp.client.ClientSession"}
_CAST = {"typing.cast", "typing_extensions.cast"}
# Generic[X] whose X is what a call hands out (a getter, a @contextmanager).
_YIELDING = {
    f"{module}.{name}"
    for module in ("typing", "collections.abc", "typing_extensions", "contextlib")
    for name in (
        "Generator",
        "Iterator",
        "AsyncGenerator",
        "AsyncIterator",
        "ContextManager",
        "AsyncContextManager",
        "AbstractContextManager",
        "AbstractAsyncContextManager",
    )
}
_TYPING_WRAPPERS = {
    "typing.Optional",
    "typing.Union",
    "typing.Annotated",
    "typing_extensions.Annotated",
}
# Names a star import brings in, for the modules the checker knows.
_STAR_EXPORTS = {
    "concurrent.futures": ("ThreadPoolExecutor", "ProcessPoolExecutor", "Executor"),
    "threading": ("Thread", "Timer"),
    "multiprocessing": ("Pool", "get_context"),
    "contextvars": ("copy_context",),
    "ctxrelay": (
        "ThreadPoolExecutor",
        "ProcessPoolExecutor",
        "ContextExecutor",
        "Thread",
        "Timer",
        "wrap",
        "instrument",
        "detached",
    ),
}
# Attribute and function names worth a closer look at a call; anything else is skipped.
_CALL_ATTRS = frozenset(
    {"submit", "map", "run_in_executor", "Pool", *_MP_METHODS, *_HTTP_VERBS, "stream"}
)
_CALL_NAMES = frozenset(
    {
        "Thread",
        "Timer",
        "Celery",
        "Queue",
        "Session",
        "session",
        "Client",
        "AsyncClient",
        "ClientSession",
        "RedisBroker",
        "RabbitmqBroker",
        "StubBroker",
        "instrument",
        "install",
        "trace_config",
        "copy_context",
    }
)


@dataclass(frozen=True, order=True)
class Finding:
    """One place that drops the context."""

    path: str
    line: int
    column: int  # 1-based, in characters
    code: str
    message: str
    end_line: int
    end_column: int
    # the lines a pragma may sit on (the whole flagged expression)
    span: tuple[int, int] = field(compare=False, default=(0, 0))


@dataclass
class Pending:
    """A finding before project-wide facts (instrument(), installs) decide on it."""

    code: str
    node: ast.AST
    message: str
    covered: bool = False  # by ctxrelay.instrument()
    needs: str = ""  # a project fact that silences it


class _Scope:
    """A function (or the module, or a class body): the names bound in it."""

    __slots__ = ("assigns", "cls", "globals", "kind", "node", "params", "parent")

    def __init__(self, node: ast.AST, parent: _Scope | None, kind: str, cls: _Class | None) -> None:
        self.node = node
        self.parent = parent
        self.kind = kind  # "module", "function", "class"
        self.cls = cls  # the class whose method this is
        self.assigns: dict[str, list[tuple[ast.AST, tuple[int, ...]]]] = {}
        self.params: dict[str, ast.expr | None] = {}
        self.globals: set[str] = set()


class _Class:
    __slots__ = ("annotations", "attrs", "bases", "methods", "module", "name", "node", "scope")

    def __init__(self, node: ast.ClassDef, module: ModuleFacts, scope: _Scope) -> None:
        self.node = node
        self.name = node.name
        self.module = module
        self.scope = scope  # where the class statement is
        self.bases = node.bases
        self.methods: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef, _Scope]] = {}
        self.attrs: dict[str, list[tuple[ast.expr, _Scope]]] = {}
        self.annotations: dict[str, list[ast.expr]] = {}


@dataclass
class _Call:
    node: ast.Call
    scope: _Scope
    loops: tuple[int, ...]
    detached: bool


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    parts.reverse()
    return parts


def _normal(name: str) -> str:
    if name.startswith("ctxrelay."):
        head, _, last = name.rpartition(".")
        if head in ("ctxrelay._relay", "ctxrelay._instrument", "ctxrelay._context"):
            return "ctxrelay." + last
    return name


class ModuleFacts:
    """What one module binds, defines and calls: collected in a single walk."""

    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.imports: dict[str, str] = {}
        self.star: list[str] = []
        self.imported_modules: set[str] = set()
        self.classes: dict[str, _Class] = {}
        self.functions: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef, _Scope]] = {}
        self.calls: list[_Call] = []
        self.scopes: dict[int, _Scope] = {}  # id(def or lambda node) -> its scope
        self.module_scope = _Scope(tree, None, "module", None)
        self._loops: list[int] = []
        self._detached = 0
        self._walk_body(tree.body, self.module_scope, None)

    # -- the walk ---------------------------------------------------------------------

    def _walk_body(self, body: Iterable[ast.AST], scope: _Scope, cls: _Class | None) -> None:
        for node in body:
            self._walk(node, scope, cls)

    def _walk(self, node: ast.AST, scope: _Scope, cls: _Class | None) -> None:
        kind = type(node)
        if kind is ast.Call:
            assert isinstance(node, ast.Call)
            self._note_call(node, scope)
        elif kind is ast.FunctionDef or kind is ast.AsyncFunctionDef:
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            self._walk_function(node, scope, cls)
            return
        elif kind is ast.Lambda:
            assert isinstance(node, ast.Lambda)
            inner = _Scope(node, scope, "function", None)
            self.scopes[id(node)] = inner
            for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs):
                inner.params[arg.arg] = None
            for default in node.args.defaults:
                self._walk(default, scope, None)
            saved = self._loops
            self._loops = []
            self._walk(node.body, inner, None)
            self._loops = saved
            return
        elif kind is ast.ClassDef:
            assert isinstance(node, ast.ClassDef)
            self._walk_class(node, scope)
            return
        elif kind is ast.Assign:
            assert isinstance(node, ast.Assign)
            for target in node.targets:
                self._bind(target, node.value, scope)
        elif kind is ast.AnnAssign:
            assert isinstance(node, ast.AnnAssign)
            if node.value is not None:
                self._bind(node.target, node.value, scope)
            if isinstance(node.target, ast.Name):
                if scope.kind == "class" and cls is not None:
                    cls.annotations.setdefault(node.target.id, []).append(node.annotation)
                elif node.value is None:
                    scope.params.setdefault(node.target.id, node.annotation)
            elif self._is_self_attr(node.target, scope):
                assert isinstance(node.target, ast.Attribute)
                owner = scope.cls
                assert owner is not None
                owner.annotations.setdefault(node.target.attr, []).append(node.annotation)
        elif kind is ast.NamedExpr:
            assert isinstance(node, ast.NamedExpr)
            self._bind(node.target, node.value, scope)
        elif kind is ast.With or kind is ast.AsyncWith:
            assert isinstance(node, ast.With | ast.AsyncWith)
            detached = 0
            for item in node.items:
                self._walk(item.context_expr, scope, cls)
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, item.context_expr, scope)
                if (
                    isinstance(item.context_expr, ast.Call)
                    and self.qualify(item.context_expr.func) in _DETACHED
                ):
                    detached = 1
            self._detached += detached
            self._walk_body(node.body, scope, cls)
            self._detached -= detached
            return
        elif kind is ast.For or kind is ast.AsyncFor or kind is ast.While:
            assert isinstance(node, ast.For | ast.AsyncFor | ast.While)
            if isinstance(node, ast.While):
                self._walk(node.test, scope, cls)
            else:
                self._walk(node.iter, scope, cls)
            self._loops.append(id(node))
            self._walk_body(node.body, scope, cls)
            self._loops.pop()
            self._walk_body(node.orelse, scope, cls)
            return
        elif kind in (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp):
            assert isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp)
            first = node.generators[0]
            self._walk(first.iter, scope, cls)
            self._loops.append(id(node))
            for sub in ast.iter_child_nodes(node):
                if sub is not first:
                    self._walk(sub, scope, cls)
            for if_ in first.ifs:
                self._walk(if_, scope, cls)
            self._loops.pop()
            return
        elif kind is ast.Import:
            assert isinstance(node, ast.Import)
            for alias in node.names:
                self.imported_modules.add(alias.name)
                if alias.asname:
                    self.imports[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    self.imports[top] = top
            return
        elif kind is ast.ImportFrom:
            assert isinstance(node, ast.ImportFrom)
            module = "." * node.level + (node.module or "")
            self.imported_modules.add(module)
            for alias in node.names:
                if alias.name == "*":
                    self.star.append(module)
                    continue
                self.imports[alias.asname or alias.name] = f"{module}.{alias.name}"
                self.imported_modules.add(f"{module}.{alias.name}")
            return
        elif kind is ast.Global or kind is ast.Nonlocal:
            assert isinstance(node, ast.Global | ast.Nonlocal)
            if kind is ast.Global:
                scope.globals.update(node.names)
            return
        for child in ast.iter_child_nodes(node):
            self._walk(child, scope, cls)

    def _walk_function(
        self, node: ast.FunctionDef | ast.AsyncFunctionDef, scope: _Scope, cls: _Class | None
    ) -> None:
        for decorator in node.decorator_list:
            self._walk(decorator, scope, None)
        for default in (*node.args.defaults, *node.args.kw_defaults):
            if default is not None:
                self._walk(default, scope, None)
        inner = _Scope(node, scope, "function", cls)
        self.scopes[id(node)] = inner
        args = node.args
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs):
            inner.params[arg.arg] = arg.annotation
        for extra in (args.vararg, args.kwarg):
            if extra is not None:
                inner.params[extra.arg] = None
        if cls is not None:
            cls.methods[node.name] = (node, inner)
        elif scope.kind == "module":
            self.functions[node.name] = (node, inner)
        else:
            scope.assigns.setdefault(node.name, []).append((node, tuple(self._loops)))
        saved = self._loops
        self._loops = []
        self._walk_body(node.body, inner, None)
        self._loops = saved

    def _walk_class(self, node: ast.ClassDef, scope: _Scope) -> None:
        for expr in (*node.decorator_list, *node.bases, *(k.value for k in node.keywords)):
            self._walk(expr, scope, None)
        info = _Class(node, self, scope)
        inner = _Scope(node, scope, "class", info)
        self.classes.setdefault(node.name, info)
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                self._walk_function(stmt, inner, info)
            else:
                self._walk(stmt, inner, info)

    def _is_self_attr(self, target: ast.expr, scope: _Scope) -> bool:
        return (
            scope.kind == "function"
            and scope.cls is not None
            and isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id in ("self", "cls")
        )

    def _bind(self, target: ast.expr, value: ast.expr, scope: _Scope) -> None:
        if isinstance(target, ast.Name):
            into = scope
            if target.id in scope.globals:
                into = self.module_scope
            into.assigns.setdefault(target.id, []).append((value, tuple(self._loops)))
            if scope.kind == "class" and scope.cls is not None:
                scope.cls.attrs.setdefault(target.id, []).append((value, scope))
        elif self._is_self_attr(target, scope):
            assert isinstance(target, ast.Attribute)
            assert scope.cls is not None
            scope.cls.attrs.setdefault(target.attr, []).append((value, scope))
        elif isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
            for sub_target, sub_value in zip(target.elts, value.elts, strict=False):
                self._bind(sub_target, sub_value, scope)

    def _note_call(self, node: ast.Call, scope: _Scope) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            name = func.attr
            if name not in _CALL_NAMES and name not in _CALL_ATTRS and not name[:1].isupper():
                return
        elif isinstance(func, ast.Name):
            name = func.id
            if (
                name not in _CALL_NAMES
                and not name[:1].isupper()
                and not self.imports.get(name, "").startswith("ctxrelay")
            ):
                return
        else:
            return
        self.calls.append(_Call(node, scope, tuple(self._loops), self._detached > 0))

    # -- names --------------------------------------------------------------------------

    def qualify(self, node: ast.expr, depth: int = 0) -> str | None:
        """The dotted name an expression stands for, through this module's imports
        and module-level aliases (``TPE = concurrent.futures.ThreadPoolExecutor``)."""
        parts = _dotted(node)
        if parts is None:
            return None
        head = parts[0]
        bound = self.imports.get(head)
        if bound is None and depth < 4:
            values = self.module_scope.assigns.get(head)
            if values is not None and len(values) == 1:
                value = values[0][0]
                if isinstance(value, ast.Name | ast.Attribute) and value is not node:
                    bound = self.qualify(value, depth + 1)
        if bound is None:
            for module in self.star:
                if head in _STAR_EXPORTS.get(module, ()):
                    bound = f"{module}.{head}"
                    break
        if bound is not None:
            parts[0] = bound
        return _normal(".".join(parts))


class Project:
    """Every module of one run, resolved together."""

    def __init__(self, modules: list[ModuleFacts]) -> None:
        self.modules = modules
        self.classes: dict[str, list[_Class]] = {}
        self.functions: dict[str, list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, _Scope]]] = {}
        for module in modules:
            for name, info in module.classes.items():
                self.classes.setdefault(name, []).append(info)
            for name, fn in module.functions.items():
                self.functions.setdefault(name, []).append(fn)
        self._class_kind: dict[int, str | None] = {}
        self._kinds: dict[tuple[int, int], str | None] = {}
        self._by_root = {id(module.module_scope): module for module in modules}
        # the names the project's own modules can be imported by ("" for relative)
        self.project_names: set[str] = {""}
        for module in modules:
            parts = module.path.replace("\\", "/").split("/")
            self.project_names.update(p.removesuffix(".py") for p in parts if p)
        self.instrumented: list[tuple[str, int]] = []
        self.integrations: set[str] = set()
        for module in modules:
            for imported in module.imported_modules:
                if imported.startswith("ctxrelay.integrations."):
                    self.integrations.add(imported.split(".")[2])
                elif imported == "ctxrelay.integrations":
                    self.integrations.update(
                        v.split(".")[2]
                        for v in module.imports.values()
                        if v.startswith("ctxrelay.integrations.")
                    )
            for call in module.calls:
                if self._is_instrument(module, call.node):
                    self.instrumented.append((module.path, call.node.lineno))

    @staticmethod
    def _is_instrument(module: ModuleFacts, node: ast.Call) -> bool:
        if module.qualify(node.func) not in _INSTRUMENT:
            return False
        for keyword in node.keywords:
            if (
                keyword.arg == "relay"
                and isinstance(keyword.value, ast.Constant)
                and keyword.value.value is False
            ):
                return False  # observe-only: it watches, it does not relay
        return True

    def handoff_class_names(self) -> set[str]:
        """The project's classes that are pools or threads (their subclasses matter)."""
        return {
            name
            for name, infos in self.classes.items()
            if any(self.class_kind(info) is not None for info in infos)
        }

    # -- kinds --------------------------------------------------------------------------

    def class_kind(self, info: _Class, depth: int = 0) -> str | None:
        """What instances of a project class are: a pool, a thread, relayed, or None."""
        key = id(info)
        if key in self._class_kind:
            return self._class_kind[key]
        self._class_kind[key] = None  # cycles
        kind: str | None = None
        for base in info.bases:
            base_kind = self.named_kind(info.module, base, depth + 1)
            if base_kind is not None:
                kind = base_kind
                break
        if kind in (TPE, PPE, EXEC, THREAD) and self._relays(info, kind):
            kind = RELAY
        self._class_kind[key] = kind
        return kind

    def _relays(self, info: _Class, kind: str) -> bool:
        """Does a subclass of a pool or thread carry the context itself?

        A pool subclass that overrides submit() or map() is taken to do it (that is
        what such overrides are for: sentry's, langchain's, weave's ...); a thread
        subclass only when its start()/run()/__init__ copy the context.
        """
        if kind != THREAD:
            return "submit" in info.methods or "map" in info.methods
        for name in ("start", "run", "__init__"):
            method = info.methods.get(name)
            if method is not None and self._mentions_relay(info.module, method[0]):
                return True
        return False

    def _mentions_relay(self, module: ModuleFacts, node: ast.AST) -> bool:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name | ast.Attribute):
                name = module.qualify(sub)
                if name is not None and (
                    name in _COPY_CONTEXT or name.startswith("ctxrelay.") or name == "ctxrelay"
                ):
                    return True
        return False

    def named_kind(self, module: ModuleFacts, node: ast.expr, depth: int = 0) -> str | None:
        """What the class or factory a name stands for makes."""
        name = module.qualify(node)
        if name is None:
            return None
        known = _KNOWN_CLASSES.get(name)
        if known is not None:
            return known
        if name.startswith(("ctxrelay.", "concurrent.", "threading.", "multiprocessing.")):
            return None
        if depth > 8:
            return None
        parts = _dotted(node)
        if parts is not None and (parts[0] in module.imports or module.star):
            head = name.partition(".")[0]
            if head and head not in self.project_names:
                return None  # a class of another package (timeit.Timer is not ours)
        last = name.rpartition(".")[2]
        for info in self.classes.get(last, ()):
            kind = self.class_kind(info, depth + 1)
            if kind is not None:
                return kind
        return None

    def annotation_kind(self, module: ModuleFacts, node: ast.expr | None) -> str | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                parsed = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
            return self.annotation_kind(module, parsed)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return _merge(
                (self.annotation_kind(module, node.left), self.annotation_kind(module, node.right))
            )
        if isinstance(node, ast.Subscript):
            if module.qualify(node.value) in _YIELDING:
                inner = node.slice
                first = inner.elts[0] if isinstance(inner, ast.Tuple) and inner.elts else inner
                return self.annotation_kind(module, first)
            if module.qualify(node.value) in _TYPING_WRAPPERS:
                inner = node.slice
                elts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
                if module.qualify(node.value) in (
                    "typing.Annotated",
                    "typing_extensions.Annotated",
                ):
                    elts = elts[:1]
                return _merge(self.annotation_kind(module, e) for e in elts)
            return None
        return self.named_kind(module, node)

    def kind(self, module: ModuleFacts, scope: _Scope, node: ast.AST, depth: int = 0) -> str | None:
        """What an expression evaluates to, as far as can be seen."""
        key = (id(node), id(scope))
        if key in self._kinds:
            return self._kinds[key]
        self._kinds[key] = None  # a cycle (x = x or Pool()) sees nothing more
        found = self._kind(module, scope, node, depth) if depth <= 12 else None
        self._kinds[key] = found
        return found

    def _kind(self, module: ModuleFacts, scope: _Scope, node: ast.AST, depth: int) -> str | None:
        if isinstance(node, ast.Call):
            return self._call_kind(module, scope, node, depth)
        if isinstance(node, ast.Name):
            return _merge(
                self.kind(m, s, value, depth + 1)
                for m, s, value in self._values(module, scope, node.id)
            ) or self._param_kind(module, scope, node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                owner = self._owner(scope)
                if owner is not None:
                    return self._attr_kind(owner, node.attr, depth)
            return None
        if isinstance(node, ast.BoolOp):
            return _merge(self.kind(module, scope, v, depth + 1) for v in node.values)
        if isinstance(node, ast.IfExp):
            return _merge(
                (
                    self.kind(module, scope, node.body, depth + 1),
                    self.kind(module, scope, node.orelse, depth + 1),
                )
            )
        if isinstance(node, ast.NamedExpr | ast.Await):
            return self.kind(module, scope, node.value, depth + 1)
        return None

    def _owner(self, scope: _Scope | None) -> _Class | None:
        while scope is not None:
            if scope.cls is not None:
                return scope.cls
            scope = scope.parent
        return None

    def _attr_kind(self, owner: _Class, attr: str, depth: int, seen: int = 0) -> str | None:
        kinds: list[str | None] = [
            self.annotation_kind(owner.module, annotation)
            for annotation in owner.annotations.get(attr, ())
        ]
        for value, where in owner.attrs.get(attr, ()):
            kinds.append(self.kind(owner.module, where, value, depth + 1))
        found = _merge(kinds)
        if found is None and seen < 4:
            # an attribute set in a base class defined in the project
            for base in owner.bases:
                last = (owner.module.qualify(base) or "").rpartition(".")[2]
                for info in self.classes.get(last, ()):
                    if info is not owner:
                        found = self._attr_kind(info, attr, depth + 1, seen + 1)
                        if found is not None:
                            return found
        return found

    def _values(
        self, module: ModuleFacts, scope: _Scope, name: str
    ) -> Iterator[tuple[ModuleFacts, _Scope, ast.AST]]:
        """The values a name may hold where it is used: its own scope, then outward."""
        current: _Scope | None = scope
        while current is not None:
            if current.kind == "class" and current is not scope:
                current = current.parent
                continue
            if name in current.assigns:
                for value, _ in current.assigns[name]:
                    yield module, current, value
                return
            if name in current.params:
                return
            current = current.parent

    def _param_kind(self, module: ModuleFacts, scope: _Scope, name: str) -> str | None:
        current: _Scope | None = scope
        while current is not None:
            if current.kind == "class" and current is not scope:
                current = current.parent
                continue
            if name in current.params:
                return self.annotation_kind(module, current.params[name])
            if name in current.assigns:
                return None
            current = current.parent
        return None

    def _call_kind(
        self, module: ModuleFacts, scope: _Scope, node: ast.Call, depth: int
    ) -> str | None:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in ("Pool", "ThreadPool")
            and self.kind(module, scope, func.value, depth + 1) == MPCTX
        ):
            return MPPOOL
        named = self.named_kind(module, func)
        if named is not None:
            if named == EXEC:
                return None  # the abstract class is not called
            return named
        if module.qualify(func) in _WRAP:
            return None
        # a function of the project that returns a pool (a getter, a factory)
        target: tuple[ast.FunctionDef | ast.AsyncFunctionDef, _Scope] | None = None
        if isinstance(func, ast.Name):
            for _, _, value in self._values(module, scope, func.id):
                if isinstance(value, ast.FunctionDef | ast.AsyncFunctionDef):
                    target = (value, module.scopes[id(value)])
            if target is None:
                target = module.functions.get(func.id)
            if target is None and func.id in module.imports:
                imported = module.imports[func.id].rpartition(".")[2]
                for candidate in self.functions.get(imported, ()):
                    target = candidate
        elif (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in ("self", "cls")
        ):
            owner = self._owner(scope)
            if owner is not None:
                target = owner.methods.get(func.attr)
        if target is None:
            return None
        fn, fn_scope = target
        owner_module = self._module_of(fn_scope)
        # what the body hands out says more than the declared type (a getter declared
        # `-> Executor` that returns a relaying pool)
        kinds: list[str | None] = []
        for sub in _returns(fn):
            if sub.value is not None:
                kinds.append(self.kind(owner_module, fn_scope, sub.value, depth + 1))
        return _merge(kinds) or self.annotation_kind(owner_module, fn.returns)

    def _module_of(self, scope: _Scope | None) -> ModuleFacts:
        assert scope is not None
        while scope.parent is not None:
            scope = scope.parent
        return self._by_root[id(scope)]

    # -- the callable handed off --------------------------------------------------------

    def callable_state(
        self, module: ModuleFacts, call: _Call, fn: ast.AST, seen: frozenset[int] = frozenset()
    ) -> tuple[str, ast.AST]:
        """How the callable handed off gets its context.

        "relayed": captured at the hand-off; "inner": copy_context() runs in the worker
        (CTX105); "shared": one copy handed to several tasks (CTX106); "lost".
        """
        if id(fn) in seen or len(seen) > 8:
            return "lost", fn
        seen = seen | {id(fn)}
        scope = call.scope
        if isinstance(fn, ast.Attribute) and fn.attr == "run":
            return self._context_run(module, call, fn), fn
        if isinstance(fn, ast.Call):
            name = module.qualify(fn.func)
            if name in _WRAP:
                return "relayed", fn
            if name in _PARTIAL and fn.args:
                return self.callable_state(module, call, fn.args[0], seen)
            if name in _CAST and len(fn.args) == 2:
                return self.callable_state(module, call, fn.args[1], seen)
            if name is not None and self._captures_at_call(module, call.scope, fn):
                return "relayed", fn
            return "lost", fn
        if isinstance(fn, ast.Lambda):
            inner = _inner_copy(module, fn.body, fn)
            if inner is not None:
                return "inner", inner
            body = fn.body
            if isinstance(body, ast.Call):
                if isinstance(body.func, ast.Attribute) and body.func.attr == "run":
                    return self._context_run(module, call, body.func), fn
                if module.qualify(body.func) in _WRAP:
                    return "relayed", fn
            return "lost", fn
        if isinstance(fn, ast.Name):
            for _, _, value in self._values(module, scope, fn.id):
                if isinstance(value, ast.FunctionDef | ast.AsyncFunctionDef):
                    inner = _inner_copy(module, value, value)
                    if inner is not None:
                        return "inner", inner
                    continue
                state, where = self.callable_state(module, call, value, seen)
                if state != "lost":
                    return state, where
                return "lost", fn
            if fn.id in module.functions:
                defined = module.functions[fn.id][0]
                inner = _inner_copy(module, defined, defined)
                if inner is not None:
                    return "inner", inner
        return "lost", fn

    def _context_run(self, module: ModuleFacts, call: _Call, fn: ast.Attribute) -> str:
        """`X.run` handed off: a Context copied here, or something else's run()."""
        ctx = fn.value
        if isinstance(ctx, ast.Call):
            name = module.qualify(ctx.func)
            if name in _COPY_CONTEXT:
                return "relayed"
            if name == "contextvars.Context":
                return "lost"  # a new, empty context
            return "relayed"  # some factory's Context: benefit of the doubt
        if isinstance(ctx, ast.Name):
            if ctx.id in module.imports and not module.imports[ctx.id].endswith(
                ("copy_context", "Context")
            ):
                return "lost"  # asyncio.run, trio.run ...: a module's run(), not a Context's
            return self._copied_name(module, call, ctx.id)
        return "relayed"  # self._ctx.run: a context captured elsewhere

    def _copied_name(self, module: ModuleFacts, call: _Call, name: str) -> str:
        """`name.run` handed off: a copy taken at the hand-off, shared by a loop, or not."""
        current: _Scope | None = call.scope
        while current is not None:
            if current.kind == "class" and current is not call.scope:
                current = current.parent
                continue
            if name in current.assigns:
                for value, loops in current.assigns[name]:
                    if isinstance(value, ast.Call):
                        called = module.qualify(value.func)
                        if called in _COPY_CONTEXT:
                            if current.kind == "module":
                                return "lost"  # copied at import time, not at the hand-off
                            if current is call.scope and len(call.loops) > len(loops):
                                return "shared"
                            return "relayed"
                        if called == "contextvars.Context":
                            return "lost"
                return "relayed"
            if name in current.params:
                return "relayed"  # a Context passed in: captured by the caller
            current = current.parent
        return "relayed"

    def _captures_at_call(self, module: ModuleFacts, scope: _Scope, fn: ast.Call) -> bool:
        """A helper called at the hand-off that copies the context there (and wraps)."""
        func = fn.func
        defs: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        if isinstance(func, ast.Name):
            for _, _, value in self._values(module, scope, func.id):
                if isinstance(value, ast.FunctionDef | ast.AsyncFunctionDef):
                    defs.append(value)
            name = (module.qualify(func) or func.id).rpartition(".")[2]
            defs.extend(d for d, _ in self.functions.get(name, ()))
        elif isinstance(func, ast.Attribute):
            defs.extend(d for d, _ in self.functions.get(func.attr, ()))
            owner = self._owner(scope)
            if owner is not None and func.attr in owner.methods:
                defs.append(owner.methods[func.attr][0])
        return any(self._copies(d, 0) for d in defs)

    def _copies(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, depth: int) -> bool:
        """Does calling ``fn`` copy the context then (itself, or a helper it calls)?"""
        module = self._module_of(self._scope_of(fn))
        for sub in _own_nodes(fn):
            if not isinstance(sub, ast.Call):
                continue
            name = module.qualify(sub.func) if module is not None else None
            if (
                name in _COPY_CONTEXT
                or name in _WRAP
                or _last(sub.func) in ("copy_context", "wrap")
            ):
                return True
            if depth < 3 and isinstance(sub.func, ast.Name):
                for inner, _ in self.functions.get(sub.func.id, ()):
                    if inner is not fn and self._copies(inner, depth + 1):
                        return True
        return False

    def _scope_of(self, fn: ast.AST) -> _Scope | None:
        for module in self.modules:
            scope = module.scopes.get(id(fn))
            if scope is not None:
                return scope
        return None

    # -- judging the hand-offs ----------------------------------------------------------

    def pending(self, module: ModuleFacts) -> Iterator[Pending]:
        for call in module.calls:
            if call.detached:
                continue
            yield from self._judge(module, call)

    def _judge(self, module: ModuleFacts, call: _Call) -> Iterator[Pending]:
        node = call.node
        func = node.func
        qualified = module.qualify(func)
        if isinstance(func, ast.Attribute):
            attr = func.attr
            if attr in ("submit", "map") or attr in _MP_METHODS or attr == "run_in_executor":
                receiver = self.kind(module, call.scope, func.value)
                if attr == "run_in_executor":
                    yield from self._run_in_executor(module, call)
                    return
                if receiver in (TPE, EXEC) and attr in ("submit", "map"):
                    yield from self._handoff(module, call, "CTX101", receiver, attr)
                    return
                if receiver == PPE and attr in ("submit", "map"):
                    yield Pending(
                        "CTX104",
                        node,
                        f"ProcessPoolExecutor.{attr}() runs the task in another process without "
                        "the caller's context; use ctxrelay.ProcessPoolExecutor",
                        covered=True,
                    )
                    return
                if receiver == MPPOOL and attr in _MP_METHODS:
                    yield Pending(
                        "CTX104",
                        node,
                        f"multiprocessing pool .{attr}() runs the task in a worker without the "
                        "caller's context; use ctxrelay.ProcessPoolExecutor or "
                        "ctxrelay.instrument()",
                        covered=True,
                    )
                    return
        if qualified is None:
            return
        last = _last(func) or ""
        thread_like = last in _CALL_NAMES or last[:1].isupper()
        kind = self.named_kind(module, func) if thread_like else None
        if kind == THREAD:
            yield from self._thread(module, call, qualified)
            return
        if qualified in _CELERY_APPS:
            yield Pending(
                "CTX201",
                node,
                "Celery app never given to ctxrelay: tasks run without the publisher's "
                "context; call ctxrelay.integrations.celery.install(app)",
                needs="celery",
            )
        elif qualified in _RQ_QUEUES:
            yield Pending(
                "CTX202",
                node,
                "RQ queue without ctxrelay's RelayJob/RelayWorker: jobs run without the "
                "enqueuer's context",
                needs="rq",
            )
        elif qualified.startswith("dramatiq.brokers.") and qualified.endswith("Broker"):
            yield Pending(
                "CTX203",
                node,
                "Dramatiq broker never given to ctxrelay: actors run without the sender's "
                "context; call ctxrelay.integrations.dramatiq.install(broker)",
                needs="dramatiq",
            )
        elif qualified in _REQUESTS_CALLS:
            yield Pending(
                "CTX301",
                node,
                f"{qualified}() sends without ctxrelay (a plain session per call): use a "
                "ctxrelay.integrations.requests.Session",
            )
        elif qualified in _REQUESTS_SESSIONS and not self._installed(module, call):
            yield Pending(
                "CTX301",
                node,
                "requests session never given to ctxrelay: use "
                "ctxrelay.integrations.requests.Session() or install(session)",
            )
        elif qualified in _HTTPX_CALLS:
            yield Pending(
                "CTX302",
                node,
                f"{qualified}() sends without ctxrelay's request hook: use a client given to "
                "ctxrelay.integrations.httpx.install()",
            )
        elif qualified in _HTTPX_CLIENTS and not self._installed(module, call):
            if not self._keyword_relays(
                module, node, "event_hooks", ("request_hook", "async_request_hook")
            ):
                yield Pending(
                    "CTX302",
                    node,
                    f"{qualified.rpartition('.')[2]} never given to ctxrelay: wrap it in "
                    "ctxrelay.integrations.httpx.install(...) or add its request_hook",
                )
        elif qualified in _AIOHTTP_CALLS:
            yield Pending(
                "CTX303",
                node,
                "aiohttp.request() sends without ctxrelay's trace config: use a ClientSession "
                "with trace_configs=[trace_config()]",
            )
        elif qualified in _AIOHTTP_SESSIONS and not self._keyword_relays(
            module, node, "trace_configs", ("trace_config",)
        ):
            yield Pending(
                "CTX303",
                node,
                "aiohttp ClientSession without ctxrelay's trace config: pass "
                "trace_configs=[ctxrelay.integrations.aiohttp.trace_config()]",
            )

    def _handoff(
        self, module: ModuleFacts, call: _Call, code: str, receiver: str, attr: str
    ) -> Iterator[Pending]:
        node = call.node
        fn = node.args[0] if node.args else _keyword(node, "fn")
        if fn is None:
            return
        if isinstance(fn, ast.Starred):
            return
        state, where = self.callable_state(module, call, fn)
        what = "ThreadPoolExecutor" if receiver == TPE else "Executor"
        if state == "relayed":
            return
        if state == "inner":
            yield Pending(
                "CTX105",
                where,
                f"copy_context() runs inside the callable handed to {what}.{attr}() (line "
                f"{node.lineno}): it copies the worker's context, not the caller's; copy at "
                "the hand-off",
                covered=True,
            )
        elif state == "shared":
            yield Pending(
                "CTX106",
                where,
                f"one copied Context handed to every task of this loop ({what}.{attr}()): "
                "tasks running at once raise RuntimeError; copy per task",
            )
        else:
            yield Pending(
                code,
                node,
                f"{what}.{attr}() runs the callable without the caller's context; use "
                "ctxrelay.ThreadPoolExecutor/ContextExecutor or submit ctx.run with "
                "ctx = copy_context() here",
                covered=True,
            )

    def _run_in_executor(self, module: ModuleFacts, call: _Call) -> Iterator[Pending]:
        node = call.node
        if len(node.args) < 2:
            return
        executor, fn = node.args[0], node.args[1]
        if isinstance(executor, ast.Constant) and executor.value is None:
            where = "the loop's default executor"
        else:
            kind = self.kind(module, call.scope, executor)
            if kind in (TPE, EXEC):
                where = "a plain executor"
            elif kind == PPE:
                where = "a process pool"
            else:
                return  # a ctxrelay executor, or one that cannot be seen
        if isinstance(fn, ast.Starred):
            return
        state, at = self.callable_state(module, call, fn)
        if state == "relayed":
            return
        if state == "inner":
            yield Pending(
                "CTX105",
                at,
                f"copy_context() runs inside the callable handed to run_in_executor() (line "
                f"{node.lineno}): it copies the worker's context; copy at the hand-off",
                covered=True,
            )
        elif state == "shared":
            yield Pending(
                "CTX106",
                at,
                "one copied Context handed to every run_in_executor() of this loop: tasks "
                "running at once raise RuntimeError; copy per task",
            )
        else:
            yield Pending(
                "CTX103",
                node,
                f"run_in_executor() on {where} runs the callable without the caller's "
                "context; use asyncio.to_thread, ctxrelay.wrap(fn) or a ctxrelay executor",
                covered=True,
            )

    def _thread(self, module: ModuleFacts, call: _Call, qualified: str) -> Iterator[Pending]:
        node = call.node
        short = qualified.rpartition(".")[2]
        if qualified in _THREADS:
            target = _keyword(node, "function" if short == "Timer" else "target")
            if target is None and len(node.args) >= 2:
                target = node.args[1]
        else:
            target = _keyword(node, "target")
            overrides_run = self._overrides_run(module, node.func)
            if overrides_run:
                target = None
        if target is not None:
            state, where = self.callable_state(module, call, target)
            if state == "relayed":
                return
            if state == "inner":
                yield Pending(
                    "CTX105",
                    where,
                    f"copy_context() runs inside the thread's target (line {node.lineno}): it "
                    "copies the new thread's empty context; copy before creating the thread",
                    covered=True,
                )
                return
            if state == "shared":
                yield Pending(
                    "CTX106",
                    where,
                    "one copied Context handed to every thread of this loop: threads running "
                    "at once raise RuntimeError; copy per thread",
                )
                return
        yield Pending(
            "CTX102",
            node,
            f"{short} runs without the caller's context; use ctxrelay.Thread/Timer or "
            "target=ctxrelay.wrap(fn) (a service thread: start it in ctxrelay.detached())",
            covered=True,
        )

    def _overrides_run(self, module: ModuleFacts, func: ast.expr) -> bool:
        name = (module.qualify(func) or "").rpartition(".")[2]
        return any("run" in info.methods for info in self.classes.get(name, ()))

    def _installed(self, module: ModuleFacts, call: _Call) -> bool:
        """Is this client constructed inside install(...), or later given to install()?"""
        target_text: str | None = None
        node = call.node
        for other in module.calls:
            name = module.qualify(other.node.func) or ""
            if not name.startswith("ctxrelay.integrations.") or not name.endswith(".install"):
                continue
            for arg in other.node.args[:1]:
                if arg is node:
                    return True
                if target_text is None:
                    target_text = self._bound_text(module, call) or "\0"
                if ast.unparse(arg) == target_text:
                    return True
        return False

    @staticmethod
    def _bound_text(module: ModuleFacts, call: _Call) -> str | None:
        node = call.node
        for scope in (call.scope, module.module_scope):
            for name, values in scope.assigns.items():
                if any(value is node for value, _ in values):
                    return name
        owner = call.scope.cls
        if owner is not None:
            for attr, attr_values in owner.attrs.items():
                if any(value is node for value, _ in attr_values):
                    return f"self.{attr}"
        return None

    @staticmethod
    def _keyword_relays(
        module: ModuleFacts, node: ast.Call, keyword: str, names: tuple[str, ...]
    ) -> bool:
        value = _keyword(node, keyword)
        if value is None:
            return False
        if not isinstance(value, ast.Dict | ast.List | ast.Tuple | ast.Set):
            return True  # built elsewhere: cannot be seen, benefit of the doubt
        for sub in ast.walk(value):
            if isinstance(sub, ast.Name | ast.Attribute):
                qualified = module.qualify(sub) or ""
                if qualified.startswith("ctxrelay.") or _last(sub) in names:
                    return True
        return False


def _merge(kinds: Iterable[str | None]) -> str | None:
    found: str | None = None
    for kind in kinds:
        if kind == RELAY:
            return RELAY
        if found is None and kind is not None:
            found = kind
    return found


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _last(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function body, not those of the functions defined in it."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.Return | ast.Yield]:
    """What a call of ``fn`` hands out: its returns, or what a generator yields."""
    for node in _own_nodes(fn):
        if isinstance(node, ast.Return | ast.Yield):
            yield node


def _inner_copy(module: ModuleFacts, body: ast.AST, owner: ast.AST) -> ast.AST | None:
    """A copy_context() that runs in the callable itself, to run work in: CTX105."""
    copied: set[str] = set()
    nodes = list(_own_nodes(owner)) if owner is body else list(ast.walk(body))
    for sub in nodes:
        if (
            isinstance(sub, ast.Assign)
            and isinstance(sub.value, ast.Call)
            and module.qualify(sub.value.func) in _COPY_CONTEXT
        ):
            copied.update(t.id for t in sub.targets if isinstance(t, ast.Name))
    for sub in nodes:
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr == "run"
        ):
            ctx = sub.func.value
            if isinstance(ctx, ast.Call) and module.qualify(ctx.func) in _COPY_CONTEXT:
                return ctx
            if isinstance(ctx, ast.Name) and ctx.id in copied:
                for assign in nodes:
                    if isinstance(assign, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == ctx.id for t in assign.targets
                    ):
                        return assign.value
    return None
