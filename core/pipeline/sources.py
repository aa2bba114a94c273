"""Fingerprints of code that can change without a version bump.

A stage's fingerprint names each plugin's distribution and version. That is enough for a
released wheel, whose code cannot change under the same version, but not for code a researcher
edits: an editable or path install (``pip install -e .``, ``pip install ./my-plugin``), a module
loaded through ``LVLMVA_PLUGINS`` or registered in-process, and lvlmva itself in a checkout. For
those, the fingerprint also takes a hash of the code the plugin or stage runs, so that an edit
recomputes the stages that use it and what reads them, and nothing else.

What is hashed:

- for a plugin class: the source files of the modules that define it and its base classes, and
  of every module those import (statically, anywhere in the file, function-local imports
  included; ``if TYPE_CHECKING:`` blocks left out, they run nothing), followed as long as the
  imported module is itself source-tracked. ``from package import name`` follows ``name`` to
  the module that defines it rather than taking a package ``__init__`` that only re-exports; an
  ``__init__`` that runs code of its own is part of every module under it.
- for a stage's run function: the compiled code of the function (not its text: a comment or a
  blank line changes nothing), of the functions and classes of its module it uses, the values of
  the module's constants it reads, and the files of the modules it uses and imports. Built-in
  stages share one module; editing the report stage must not retrain the model. A global it
  reads that is neither code nor a plain constant (a table of functions) takes the whole file
  of its module.
- the code this process runs: a module's file is read once it is imported and then kept, so an
  edit made while a study runs is not stored under the new code's fingerprint by cells that
  still run the old one (a new process, or ``importlib.reload``, reads the edit).

Code from a released install (a wheel from an index, a VCS checkout at a recorded commit, an
archive) is not read: its version (and commit) stands for it, as before.
"""

from __future__ import annotations

import ast
import dis
import functools
import hashlib
import importlib.machinery
import json
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

__all__ = ["CodeHash", "CodeFingerprints", "SourceTracker", "install_description", "tracker", "reset_tracker"]


@dataclass(frozen=True)
class CodeHash:
    """The hash of the source a plugin or stage depends on, and what went into it."""

    sha256: str
    modules: tuple[str, ...]  # module names (functions as ``module:qualname``), sorted

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "modules": list(self.modules)}


@dataclass(frozen=True)
class _Install:
    kind: str  # editable | path | vcs | archive | index | local
    detail: str  # where from: a folder, a URL with its commit, ...
    roots: tuple[Path, ...] = ()  # folders whose modules are source-tracked
    files: frozenset[Path] = frozenset()  # single files that are source-tracked

    @property
    def tracked(self) -> bool:
        return self.kind in ("editable", "path", "local")


def _file_url_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path)).resolve()


def _direct_url(name: str) -> tuple[metadata.Distribution | None, dict[str, Any] | None]:
    """The installed distribution ``name`` and its ``direct_url.json`` (PEP 610), if any. A
    source checkout may hold a stale ``*.egg-info`` that shadows the installed metadata when
    Python runs from that folder: the record that says how it was installed wins."""
    found = None
    for dist in metadata.distributions(name=name):
        found = found or dist
        try:
            text = dist.read_text("direct_url.json")
        except OSError:
            text = None
        if text:
            try:
                return dist, json.loads(text)
            except ValueError:
                continue
    return found, None


@cache
def _distribution_install(name: str) -> _Install:
    """How an installed distribution came to be installed: a released one has no
    ``direct_url.json``."""
    dist, info = _direct_url(name)
    if dist is None:
        return _Install("local", "not an installed distribution")
    if info is None:
        return _Install("index", f"{name} {dist.version}")
    url = str(info.get("url", ""))
    if "dir_info" in info:
        root = _file_url_path(url)
        if info["dir_info"].get("editable"):
            return _Install("editable", url, roots=(root,) if root else ())
        # a copy of a local folder: the files it installed are what runs
        files = frozenset(
            Path(str(dist.locate_file(f))).resolve() for f in (dist.files or []) if str(f).endswith(".py")
        )
        return _Install("path", url, files=files)
    if "vcs_info" in info:
        vcs = info["vcs_info"]
        return _Install("vcs", f"{url}@{vcs.get('commit_id', '')}")
    if "archive_info" in info:
        hashes = info["archive_info"].get("hashes") or {}
        digest = hashes.get("sha256") or info["archive_info"].get("hash", "")
        return _Install("archive", f"{url} {digest}".strip())
    return _Install("index", url)


def install_description(distribution: str) -> str:
    """How a plugin's distribution is installed, in words (for env.json and messages)."""
    inst = _distribution_install(distribution)
    return f"{inst.kind} ({inst.detail})" if inst.detail else inst.kind


def _library_folders() -> tuple[Path, ...]:
    """Folders that hold installed or standard-library code, never source-tracked by a root."""
    out = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            out.add(Path(sysconfig.get_paths()[key]).resolve())
        except KeyError:
            continue
    return tuple(out)


def _is_library_path(path: Path, libraries: Iterable[Path]) -> bool:
    parts = set(path.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path.is_relative_to(lib) for lib in libraries)


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_imports(nodes: Iterable[ast.AST]) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement under ``nodes``, except those in ``if TYPE_CHECKING:`` blocks."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if _is_type_checking(node):
            yield from _walk_imports(node.orelse)  # type: ignore[attr-defined]
            continue
        yield from _walk_imports(ast.iter_child_nodes(node))


def _runs_code(body: list[ast.stmt]) -> bool:
    """Whether a package ``__init__`` runs code of its own when a module under it is imported:
    more than imports, re-exports, definitions (a function it defines runs only when called, and
    whoever calls it imports it) and names of itself."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or _is_type_checking(node):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else None
        if targets is not None and all(isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__") for t in targets):
            continue  # __all__, __version__
        return True
    return False


class _ModuleInfo:
    """A source module as the tracker sees it: its file's hash and the imports it names."""

    def __init__(self, name: str, path: Path, text: bytes) -> None:
        self.name = name
        self.path = path
        self.sha256 = hashlib.sha256(text).hexdigest()
        self.is_package = path.name == "__init__.py"
        self.package = name if self.is_package else name.rpartition(".")[0]
        #: (module, names) pairs: ``import a.b`` -> ("a.b", ()), ``from .x import y`` -> ("pkg.x", ("y",))
        self.imports: list[tuple[str, tuple[str, ...]]] = []
        #: name -> (module, attribute) for names a package re-exports (``from .t import Trainer``)
        self.reexports: dict[str, tuple[str, str]] = {}
        #: names defined in the module itself (functions, classes, assignments)
        self.own_names: set[str] = set()
        #: a package ``__init__`` that runs code of its own (not only imports)
        self.runs_code = False
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError:
            return  # hashed all the same; importing it fails loudly elsewhere
        top = set(map(id, tree.body))
        for node in _walk_imports(tree.body):
            if isinstance(node, ast.Import):
                self.imports += [(alias.name, ()) for alias in node.names]
                continue
            base = _absolute(node.module or "", node.level, self.package)
            if base is None or base == "__future__":
                continue
            self.imports.append((base, tuple(alias.name for alias in node.names)))
            if id(node) in top:
                for alias in node.names:
                    self.reexports[alias.asname or alias.name] = (base, alias.name)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.own_names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        self.own_names.add(target.id)
        self.runs_code = self.is_package and _runs_code(tree.body)


def _absolute(module: str, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


# -- compiled code, hashed without its line numbers ---------------------------------------------

_LITERALS = (int, float, complex, str, bytes, bool, type(None), type(Ellipsis))


def _literal(value: Any) -> str | None:
    """A deterministic text of a plain constant (frozensets sorted: their order follows the
    hash seed), or ``None`` for anything else."""
    if isinstance(value, _LITERALS):
        return repr(value)
    if isinstance(value, (tuple, list)):
        parts = [_literal(v) for v in value]
        return None if None in parts else f"{type(value).__name__}({', '.join(parts)})"  # type: ignore[arg-type]
    if isinstance(value, (frozenset, set)):
        parts = [_literal(v) for v in value]
        return None if None in parts else f"{type(value).__name__}({', '.join(sorted(parts))})"  # type: ignore[arg-type]
    return None


@functools.lru_cache(maxsize=4096)
def _code_digest(code: types.CodeType) -> str:
    """SHA-256 of what a code object does: its bytecode, names, constants (nested code by its own
    digest), arguments and flags; not its file name or line numbers."""
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts.append("code:" + _code_digest(const))
        else:
            consts.append(_literal(const) or f"{type(const).__name__}:{const!r}")
    blob = json.dumps(
        [code.co_name, code.co_code.hex(), consts, code.co_names, code.co_varnames, code.co_freevars,
         code.co_cellvars, code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _global_names(code: types.CodeType) -> list[str]:
    return sorted({ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")})


def _imports_in(code: types.CodeType, package: str) -> list[tuple[str, tuple[str, ...]]]:
    """The import statements inside a function's body, as (absolute module, names): each
    ``IMPORT_NAME`` follows the loads of its level and its from-list."""
    out = []
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.opname != "IMPORT_NAME" or i < 2:
            continue
        level, fromlist = instructions[i - 2].argval, instructions[i - 1].argval
        if not isinstance(level, int) or not (fromlist is None or isinstance(fromlist, tuple)):
            continue
        absolute = _absolute(ins.argval, level, package)
        if absolute is not None:
            out.append((absolute, tuple(fromlist or ())))
    return out


def _unwrap(fn: Any) -> Any:
    """The function behind a bound method, a static or class method, a ``functools.partial``, a
    ``functools.wraps`` wrapper (``cache``, ``lru_cache``) or a property's getter."""
    for _ in range(20):
        if isinstance(fn, (staticmethod, classmethod, types.MethodType)):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, property) and fn.fget is not None:
            fn = fn.fget
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            return fn
    return fn


class SourceTracker:
    """Hashes the code that plugins and stages depend on, for code that can change without a
    version bump. One per process (:func:`tracker`)."""

    def __init__(self) -> None:
        self._libraries = _library_folders()
        self._added: tuple[Path, ...] = ()  # folders or files of in-process plugin modules
        self._roots: tuple[Path, ...] | None = None
        self._files: frozenset[Path] = frozenset()
        self._parsed: dict[Path, tuple[tuple[int, int], _ModuleInfo]] = {}
        #: module name -> (its spec object, the info read once it was imported)
        self._loaded: dict[str, tuple[Any, _ModuleInfo]] = {}
        self._spec_cache: dict[str, importlib.machinery.ModuleSpec | None] = {}
        self._session: dict[str, _ModuleInfo | None] = {}

    def begin(self) -> None:
        """Start a new look (a run's fingerprints are one): modules are found again and files
        not imported yet are checked for changes once per look, not once per import naming them."""
        self._session = {}
        self._spec_cache = {}

    # -- what is tracked ---------------------------------------------------------------------
    def _tracked_areas(self) -> tuple[tuple[Path, ...], frozenset[Path]]:
        if self._roots is None:
            roots, files = [], set()
            names = set()
            for dist in metadata.distributions():
                try:
                    recorded = dist.read_text("direct_url.json")
                except OSError:
                    recorded = None
                if recorded:  # only these can be source-tracked; reading every METADATA is slow
                    names.add(dist.metadata["Name"])
            for name in sorted(names - {None}):
                inst = _distribution_install(name)
                roots += inst.roots
                files |= inst.files
            self._roots, self._files = tuple(roots), frozenset(files)
        return self._roots, self._files

    def add(self, path: Path) -> None:
        """Track the module file or folder ``path`` too, wherever it lies: a module loaded
        through ``LVLMVA_PLUGINS`` or registered in-process is a plugin under development, even
        when it sits in site-packages."""
        path = Path(path).resolve()
        if path not in self._added:
            self._added = (*self._added, path)
            self._session = {}

    def is_tracked(self, path: Path) -> bool:
        roots, files = self._tracked_areas()
        if path in files or any(path == a or path.is_relative_to(a) for a in self._added):
            return True
        if _is_library_path(path, self._libraries):
            return False
        return any(path.is_relative_to(root) for root in roots)

    # -- modules ----------------------------------------------------------------------------
    def _spec(self, name: str) -> importlib.machinery.ModuleSpec | None:
        """The spec of module ``name``, found without importing anything (a parent package is
        not imported to read its ``__path__``: resolving an import must not run the code of a
        heavy optional dependency)."""
        if name in self._spec_cache:
            return self._spec_cache[name]
        spec = None
        module = sys.modules.get(name)
        if module is not None:
            spec = getattr(module, "__spec__", None)
        else:
            parent, _, _ = name.rpartition(".")
            path = None
            if parent:
                parent_spec = self._spec(parent)
                path = parent_spec.submodule_search_locations if parent_spec is not None else None
            if not parent or path is not None:
                for finder in sys.meta_path:
                    find = getattr(finder, "find_spec", None)
                    if find is None:
                        continue
                    try:
                        spec = find(name, path)
                    except (ImportError, ValueError, AttributeError, TypeError):
                        spec = None
                    if spec is not None:
                        break
        self._spec_cache[name] = spec
        return spec

    def _module_file(self, name: str) -> Path | None:
        spec = self._spec(name)
        origin = getattr(spec, "origin", None) if spec is not None else None
        if origin and origin.endswith(".py"):
            return Path(origin).resolve()
        return None

    def _info(self, name: str) -> _ModuleInfo | None:
        """The parsed module ``name`` when it is source-tracked, else ``None``."""
        if name not in self._session:
            self._session[name] = self._read(name)
        return self._session[name]

    def _read(self, name: str) -> _ModuleInfo | None:
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None) if module is not None else None
        loaded = self._loaded.get(name)
        if loaded is not None and spec is not None and loaded[0] is spec:
            return loaded[1]  # the code this process runs, as it was read once imported
        path = self._module_file(name)
        if path is None or not self.is_tracked(path):
            return None
        try:
            st = path.stat()
            key = (st.st_size, st.st_mtime_ns)
            cached = self._parsed.get(path)
            if cached is not None and cached[0] == key:
                info = cached[1]
            else:
                info = _ModuleInfo(name, path, path.read_bytes())
                self._parsed[path] = (key, info)
        except OSError:
            return None
        if spec is not None:
            self._loaded[name] = (spec, info)
        return info

    def _is_module(self, name: str) -> bool:
        return self._spec(name) is not None

    def _targets(self, module: str, names: tuple[str, ...]) -> list[str]:
        """The source-tracked modules an import statement makes the importer depend on
        (nothing for an import of released code, which is not even resolved)."""
        top = module.split(".")[0]
        top_spec = self._spec(top)
        if top_spec is None or (top_spec.origin and self._info(top) is None):
            return []  # released code (torch, sklearn): its version counts; it is not even resolved
        if not names:
            return [module]
        out = []
        for name in names:
            if name == "*":
                out.append(module)
                continue
            sub = f"{module}.{name}"
            if self._is_module(sub):
                out.append(sub)
                continue
            out.append(self._defining_module(module, name))
        return out

    def _defining_module(self, module: str, name: str, depth: int = 0) -> str:
        """Where ``name`` imported from ``module`` is defined: through a package's re-exports to
        the module that holds it; the package itself when it defines the name."""
        info = self._info(module)
        if info is None or not info.is_package or depth > 10 or name in info.own_names:
            return module
        source = info.reexports.get(name)
        if source is None:
            return module
        base, attr = source
        if self._is_module(f"{base}.{attr}"):
            return f"{base}.{attr}"
        return self._defining_module(base, attr, depth + 1)

    def _parents(self, name: str) -> list[str]:
        """The packages above ``name`` whose ``__init__`` runs code of its own (importing
        ``name`` runs it)."""
        parts = name.split(".")
        out = []
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            info = self._info(parent)
            if info is not None and info.runs_code:
                out.append(parent)
        return out

    def module_closure(self, names: Iterable[str]) -> dict[str, str]:
        """Module name -> SHA-256 of its file, for the source-tracked modules ``names`` and every
        source-tracked module they import, transitively."""
        out: dict[str, str] = {}
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in out:
                continue
            info = self._info(name)
            if info is None:
                continue
            out[name] = info.sha256
            todo += self._parents(name)
            for module, imported in info.imports:
                for target in self._targets(module, imported):
                    if target not in out and target != name:
                        todo.append(target)
        return out

    # -- what the pipeline asks -------------------------------------------------------------
    def _in_process(self, module: str) -> bool:
        """Code with no file to read (``__main__`` of a notebook, a module made in memory): it
        is hashed by its compiled code."""
        if module in sys.builtin_module_names:
            return False  # builtins, sys: part of Python
        mod = sys.modules.get(module)
        return mod is not None and (module == "__main__" or not getattr(mod, "__file__", None))

    def for_class(self, cls: type) -> CodeHash | None:
        """The code a plugin class depends on, or ``None`` when it comes from a released
        install (its version stands for it)."""
        found = self.for_class_modules(cls)
        if any(self._in_process(c.__module__) for c in cls.__mro__):
            hashes: dict[str, set[str]] = {}
            self._class(cls, hashes, [], set(), walk=True)
            found.update({k: "+".join(sorted(v)) for k, v in hashes.items()})
        return _code_hash(found)

    def for_class_modules(self, cls: type) -> dict[str, str]:
        modules = [c.__module__ for c in cls.__mro__ if c.__module__ not in ("builtins", "typing")]
        return self.module_closure(modules)

    def for_function(self, fn: Callable[..., Any]) -> CodeHash | None:
        """The code a stage's run function depends on (see the module docstring), or ``None``
        when it comes from a released install."""
        return _code_hash(self.function_parts(fn))

    def function_parts(self, fn: Callable[..., Any]) -> dict[str, str]:
        hashes: dict[str, set[str]] = {}
        modules: list[str] = []
        self._function(fn, hashes, modules, set())
        found = self.module_closure(modules)
        found.update({k: "+".join(sorted(v)) for k, v in hashes.items()})
        return found

    def _tracked_code(self, module: str) -> bool:
        return self._in_process(module) or self._info(module) is not None

    def _function(self, fn: Any, hashes: dict[str, set[str]], modules: list[str], seen: set[int]) -> None:
        fn = _unwrap(fn)
        if isinstance(fn, type) or not isinstance(fn, types.FunctionType):
            cls = fn if isinstance(fn, type) else type(fn)  # a callable object: its class
            self._class(cls, hashes, modules, seen, walk=self._in_process(cls.__module__))
            return
        if id(fn) in seen:
            return
        seen.add(id(fn))
        module = fn.__module__
        if not self._tracked_code(module):
            return  # released code: its distribution's version counts
        hashes.setdefault(f"{module}:{fn.__qualname__}", set()).add(_code_digest(fn.__code__))
        for default in [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]:
            self._value(default, module, f"{fn.__qualname__}(default)", hashes, modules, seen)
        package = fn.__globals__.get("__package__") or module.rpartition(".")[0]
        for code in _code_objects(fn.__code__):
            for name in _global_names(code):
                if name in fn.__globals__:
                    self._value(fn.__globals__[name], module, name, hashes, modules, seen)
            for absolute, names in _imports_in(code, package):
                modules += self._targets(absolute, names)
        for var, cell in sorted(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False), key=lambda x: x[0]):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self._value(value, module, f"{fn.__qualname__}.{var}", hashes, modules, seen)

    def _value(self, value: Any, module: str, name: str, hashes: dict[str, set[str]], modules: list[str], seen: set[int]) -> None:
        """What a name a function reads adds: code is followed, a plain constant of a tracked
        module is hashed by its value, anything else of one by its module's file."""
        if isinstance(value, types.ModuleType):
            modules.append(value.__name__)
            return
        unwrapped = _unwrap(value)
        if isinstance(unwrapped, (types.FunctionType, type)):
            owner = unwrapped.__module__
            if isinstance(unwrapped, type):
                self._class(unwrapped, hashes, modules, seen, walk=owner == module or self._in_process(owner))
            elif owner == module or self._in_process(owner):
                self._function(unwrapped, hashes, modules, seen)
            else:
                modules.append(owner)
            return
        literal = _literal(value)
        if literal is not None:
            hashes.setdefault(f"{module}:{name}=", set()).add(literal)
            return
        if isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) <= 1000 and id(value) not in seen:
            seen.add(id(value))  # a container: what it holds (a table of functions: those functions)
            items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
            for key, item in items:
                if key is not None:
                    self._value(key, module, f"{name}[key]", hashes, modules, seen)
                self._value(item, module, f"{name}[]", hashes, modules, seen)
            return
        owner = getattr(type(value), "__module__", "")
        if self._tracked_code(owner):
            modules.append(owner)  # data of a tracked class (a Stage, a settings section): its class's code
            return
        info = self._info(module)
        if info is not None:  # a table of functions, a compiled pattern: the module's own file
            hashes.setdefault(module, set()).add(info.sha256)
        elif self._in_process(module):  # no file to fall back on: the value as it prints
            text = repr(value)
            if " at 0x" not in text:  # an address would make every process differ
                hashes.setdefault(f"{module}:{name}=", set()).add(text)

    def _class(self, cls: type, hashes: dict[str, set[str]], modules: list[str], seen: set[int], walk: bool) -> None:
        """A class a function uses: walked member by member when it belongs to the function's
        own module (or has no file), else its module's file and imports."""
        if id(cls) in seen:
            return
        seen.add(id(cls))
        module = cls.__module__
        if not walk:
            modules.append(module)
            return
        for base in cls.__mro__[1:]:
            if base.__module__ not in ("builtins", "typing"):
                self._value(base, module, f"{cls.__qualname__}(base)", hashes, modules, seen)
        for attr, value in sorted(vars(cls).items()):
            code_like = isinstance(_unwrap(value), (types.FunctionType, type))
            if attr.startswith("__") and attr.endswith("__") and not code_like:
                continue  # __dict__, __module__, __doc__, __qualname__, __annotations__, ...
            self._value(value, module, f"{cls.__qualname__}.{attr}", hashes, modules, seen)


def _code_hash(found: dict[str, str]) -> CodeHash | None:
    if not found:
        return None
    blob = json.dumps(found, sort_keys=True)
    return CodeHash(hashlib.sha256(blob.encode()).hexdigest(), tuple(sorted(found)))


_TRACKER: SourceTracker | None = None


def tracker() -> SourceTracker:
    """The process's tracker (installed distributions are read once)."""
    global _TRACKER
    if _TRACKER is None:
        _TRACKER = SourceTracker()
    return _TRACKER


def reset_tracker() -> None:
    """Forget what was read (after installing or uninstalling a distribution in-process)."""
    global _TRACKER
    _TRACKER = None
    _distribution_install.cache_clear()


class CodeFingerprints:
    """The code hashes of one run: per plugin slot and per stage, computed once each."""

    def __init__(self, settings: Any, registry: Any) -> None:
        self._settings = settings
        self._registry = registry
        self._tracker = tracker()
        self._tracker.begin()
        self._plugins: dict[str, CodeHash | None] = {}
        self._stages: dict[str, CodeHash | None] = {}
        # every in-process module's folder is known before anything is hashed, so that the
        # first run of a process hashes what later ones do
        for choice in settings.plugins.values():
            entry = registry.entry(choice.role, choice.name)
            self._track_local(entry.distribution, registry.get(choice.role, choice.name).__module__)
        for added in registry.stages():
            run = _unwrap(added.stage.run)
            self._track_local(added.distribution, getattr(run, "__module__", None) or type(run).__module__)

    def release(self, role: str, name: str) -> str:
        """What stands for a plugin's code when it is released: its distribution and version,
        and for a VCS or archive install the commit or the archive's hash too."""
        entry = self._registry.entry(role, name)
        inst = _distribution_install(entry.distribution)
        base = f"{entry.distribution} {entry.version}"
        return f"{base} {inst.detail}" if inst.kind in ("vcs", "archive") else base

    def _track_local(self, distribution: str, module: str) -> None:
        """A module registered in-process or through ``LVLMVA_PLUGINS`` has no install record:
        its top-level package (or file) is tracked wherever it lies."""
        if _distribution_install(distribution).kind != "local":
            return
        top = self._tracker._module_file(module.split(".")[0])
        if top is not None:
            package = top.parent if top.name == "__init__.py" else top
            self._tracker.add(package)
            # and the modules beside it that it imports (helpers in the same folder), unless
            # that folder is an installation's
            if not _is_library_path(package.parent, self._tracker._libraries):
                self._tracker.add(package.parent)

    def plugin(self, slot: str) -> CodeHash | None:
        if slot not in self._plugins:
            choice = self._settings.plugins[slot]
            self._plugins[slot] = self._tracker.for_class(self._registry.get(choice.role, choice.name))
        return self._plugins[slot]

    def stage(self, stage: Any) -> CodeHash | None:
        if stage.name not in self._stages:
            found = self._tracker.function_parts(stage.run)
            if stage.codec is not None:
                found.update(self._tracker.for_class_modules(type(stage.codec)))
            self._stages[stage.name] = _code_hash(found)
        return self._stages[stage.name]

    def record(self) -> dict[str, Any]:
        """For env.json: which plugins (and stages) were fingerprinted by their source, with
        the modules that went into each hash, and which by their version."""
        plugins = {}
        for slot, choice in self._settings.plugins.items():
            entry = self._registry.entry(choice.role, choice.name)
            code = self.plugin(slot)
            plugins[slot] = {
                "plugin": choice.name,
                "distribution": entry.distribution,
                "version": entry.version,
                "install": install_description(entry.distribution),
                "fingerprinted_by": "source" if code is not None else "version",
                **(code.to_json() if code is not None else {}),
            }
        stages = {name: code.to_json() for name, code in self._stages.items() if code is not None}
        return {"plugins": plugins, "stages": stages}
