"""lvlmva's modules import each other without cycles at module level.

The graph is read from the source with ``ast``, not by importing: an import inside a function
or under ``if TYPE_CHECKING:`` runs later or never, so it is left out; every other import
statement (in a class body, a ``try``, an ``if``) runs while the module loads. An edge goes to
the module an import names (``from . import hookspecs`` -> ``lvlmva.hookspecs``; ``from .
import __version__`` -> ``lvlmva``) and to the packages above it that are not above the
importer (importing ``lvlmva.pipeline.codecs`` from ``lvlmva.settings`` runs
``lvlmva/pipeline/__init__.py`` first). The importer's own packages are left out: Python
initialises them before the importer, and a package ``__init__`` that re-exports its modules
would otherwise be a cycle with each of them.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]

@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def source_modules(repo: Path = REPO, package_dir: dict[str, str] = PACKAGE_DIR) -> dict[str, Module]:
    """Every ``.py`` file under the mapped folders, by import name (a folder inside another
    mapping belongs to the longest one)."""
    found: dict[str, Module] = {}
    for root, folder in package_dir.items():
        for path in sorted((repo / folder).rglob("*.py")):
            parts = list(path.relative_to(repo / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join((root, *parts))
            owner = max((p for p in package_dir if name == p or name.startswith(p + ".")), key=len)
            if owner == root:
                found[name] = Module(name, path, is_package)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child.test):
            for stmt in child.orelse:
                yield from module_level_imports(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from module_level_imports(child)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """importer -> {imported module: line of the first import that loads it}."""
    roots = {name.split(".")[0] for name in modules}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [known(alias.name) for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                # ``from pkg import name``: the submodule pkg.name when there is one
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else known(source)
                    for alias in node.names
                ]
            for target in targets:
                if target is None or target.split(".")[0] not in roots:
                    continue
                for name in (target, *_ancestors(target)):
                    mine = module.name == name or module.name.startswith(name + ".")
                    if name in modules and (name == target or not mine):
                        edges.setdefault(name, node.lineno)
        edges.pop(module.name, None)
        graph[module.name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected component of more
    than one module, each starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    found = []
    for component in components:
        start = min(component)
        # shortest way back to start inside the component (breadth first)
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    found.append([*paths[v], start])
                    queue = []
                    break
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
    return sorted(found)


def describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Module], repo: Path = REPO) -> str:
    """``a (core/a.py:3 imports) -> b (core/b.py:7 imports) -> a``."""
    steps = [
        f"{a} ({modules[a].path.relative_to(repo)}:{graph[a][b]} imports)" for a, b in zip(cycle, cycle[1:], strict=False)
    ]
    return " -> ".join([*steps, cycle[-1]])


MODULES = source_modules()
GRAPH = import_graph(MODULES)


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles at module level:\n" + "\n".join(describe(c, GRAPH, MODULES) for c in found)


def test_the_graph_is_read_from_the_source():
    """Edges the package is known to have, of each kind: a plain module import, a submodule
    named by ``from . import``, a subpackage's ``__init__`` run by importing a module inside it,
    and one from a plugin into the core."""
    assert len(MODULES) > 50 and "lvlmva.plugins.critics.oracle" in MODULES and "lvlmva.datasets" in MODULES
    assert "lvlmva.registry" in GRAPH["lvlmva.settings"]
    assert "lvlmva.hookspecs" in GRAPH["lvlmva.registry"] and "lvlmva" not in GRAPH["lvlmva.registry"]
    assert {"lvlmva.pipeline", "lvlmva.pipeline.errors"} <= set(GRAPH["lvlmva.cli"])
    assert "lvlmva.masks" in GRAPH["lvlmva.plugins.critics.oracle"]
    # the importer's own package is not an edge of its own modules
    assert "lvlmva.pipeline" not in GRAPH["lvlmva.pipeline.rundir"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_is_found_and_named(tmp_path):
    _write(
        tmp_path,
        {
            "src/__init__.py": "from . import a\n",
            "src/a.py": "import json\nfrom .b import x\n",
            "src/b.py": "from .sub.c import y\nx = 1\n",
            "src/sub/__init__.py": "",
            "src/sub/c.py": "from ..a import z\n",
            # not cycles: inside a function, under TYPE_CHECKING, the importer's own package
            "src/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import q\n",
            "src/e.py": "def f():\n    from .d import r\nclass K:\n    from .sub import c\n",
        },
    )
    modules = source_modules(tmp_path, {"pkg": "src"})
    graph = import_graph(modules)
    assert graph["pkg.e"] == {"pkg.sub.c": 4, "pkg.sub": 4}
    assert graph["pkg.d"] == {}
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert describe(found[0], graph, modules, tmp_path) == (
        "pkg.a (src/a.py:2 imports) -> pkg.b (src/b.py:1 imports) -> pkg.sub.c (src/sub/c.py:1 imports) -> pkg.a"
    )


def test_importing_a_module_runs_the_packages_above_it(tmp_path):
    """``pkg.sub/__init__`` imports ``pkg.a``, which imports a module inside ``pkg.sub``: a cycle
    through the package's ``__init__``, though no import names ``pkg.sub`` itself."""
    _write(tmp_path, {"src/__init__.py": "", "src/a.py": "from .sub.c import y\n", "src/sub/__init__.py": "from .. import a\n", "src/sub/c.py": "y = 1\n"})
    modules = source_modules(tmp_path, {"pkg": "src"})
    assert cycles(import_graph(modules)) == [["pkg.a", "pkg.sub", "pkg.a"]]


def _reachable(start: str, graph: dict[str, dict[str, int]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_settings_schemas_import_neither_the_loader_nor_the_registry():
    """lvlmva.options holds the core sections' models: what takes options (training, selection,
    rendering) imports them without the loader or the plugin machinery."""
    reached = _reachable("lvlmva.options", GRAPH)
    assert not reached & {"lvlmva.settings", "lvlmva.registry", "lvlmva.hookspecs", "lvlmva.pipeline"}, sorted(reached)
    for user in ("lvlmva.rendering", "lvlmva.selection", "lvlmva.reference"):
        assert "lvlmva.options" in GRAPH[user] and "lvlmva.settings" not in GRAPH[user], user
