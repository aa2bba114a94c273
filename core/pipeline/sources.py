"""Fingerprints of code that can change without a version bump.

A stage's fingerprint names each plugin's distribution and version. That is enough for a
released wheel, whose code cannot change under the same version, but not for code a researcher
edits: an editable or path install (``pip install -e .``, ``pip install ./my-plugin``), a module
loaded through ``LVLMVA_PLUGINS`` or registered in-process, and lvlmva itself in a checkout. For
those, the fingerprint also takes a hash of the source files the plugin's code comes from, so
that an edit recomputes the stages that use it and what reads them, and nothing else.

What "the files it comes from" means:

- for a plugin class: the modules that define it and its base classes, and every module those
  import (statically, anywhere in the file, local imports included), followed as long as the
  imported module is itself source-tracked. ``from package import name`` follows ``name`` to the
  module that defines it rather than taking the package's whole ``__init__`` (a facade that
  re-exports everything would otherwise tie every plugin to every module).
- for a stage's run function: the function's own source, the functions of its module it calls
  (recursively), and the modules of the names it uses and imports. Built-in stages share one
  module; editing the report stage must not retrain the model.

Code from a released install (a wheel from an index, a VCS checkout at a recorded commit, an
archive) is not read: its version (and commit) stands for it, as before.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import importlib.machinery
import inspect
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

__all__ = ["CodeHash", "SourceTracker", "install_description"]


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


class _ModuleInfo:
    """A parsed source module: its file's hash, and the imports it names."""

    def __init__(self, name: str, path: Path, text: bytes) -> None:
        self.name = name
        self.path = path
        self.sha256 = hashlib.sha256(text).hexdigest()
        self.is_package = path.name == "__init__.py"
        self.package = name if self.is_package else name.rpartition(".")[0]
        try:
            self.tree: ast.Module | None = ast.parse(text, filename=str(path))
        except SyntaxError:
            self.tree = None  # hashed all the same; an import of it fails loudly elsewhere
        #: (module, names) pairs: ``import a.b`` -> ("a.b", ()), ``from .x import y`` -> ("pkg.x", ("y",))
        self.imports: list[tuple[str, tuple[str, ...]]] = []
        #: name -> (module, attribute) for names a package re-exports (``from .t import Trainer``)
        self.reexports: dict[str, tuple[str, str]] = {}
        #: names defined in the module itself (functions, classes, assignments)
        self.own_names: set[str] = set()
        if self.tree is None:
            return
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                self.imports += [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module or "", node.level, self.package)
                if base is None:
                    continue
                self.imports.append((base, tuple(alias.name for alias in node.names)))
                if node in self.tree.body:
                    for alias in node.names:
                        self.reexports[alias.asname or alias.name] = (base, alias.name)
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.own_names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name):
                        self.own_names.add(target.id)


def _absolute(module: str, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


class SourceTracker:
    """Hashes the source that plugins and stages depend on, for code that can change without
    a version bump. One per process is enough (:func:`tracker`); files are re-read only when
    their size or modification time changes."""

    def __init__(self) -> None:
        self._libraries = _library_folders()
        self._added: tuple[Path, ...] = ()  # folders or files of in-process plugin modules
        self._roots: tuple[Path, ...] | None = None
        self._files: frozenset[Path] = frozenset()
        self._parsed: dict[Path, tuple[tuple[int, int], _ModuleInfo]] = {}
        self._spec_cache: dict[str, importlib.machinery.ModuleSpec | None] = {}
        self._session: dict[str, _ModuleInfo | None] = {}

    def begin(self) -> None:
        """Start a new look at the files: each module's file is checked for changes once per
        look (a run's fingerprints are one look), not once per import that names it."""
        self._session = {}

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
        """Track the module file or package folder ``path`` too, wherever it lies: a module
        loaded through ``LVLMVA_PLUGINS`` or registered in-process is a plugin under
        development, even when it sits in site-packages."""
        path = Path(path).resolve()
        if path not in self._added:
            self._added = (*self._added, path)

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
        path = self._module_file(name)
        if path is None or not self.is_tracked(path):
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        info = _ModuleInfo(name, path, path.read_bytes())
        self._parsed[path] = (key, info)
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
            for module, imported in info.imports:
                for target in self._targets(module, imported):
                    if target not in out and (not info.is_package or target != name):
                        todo.append(target)
        return out

    # -- what the pipeline asks -------------------------------------------------------------
    def for_class(self, cls: type) -> CodeHash | None:
        """The source a plugin class depends on, or ``None`` when its code comes from a
        released install (its version stands for it)."""
        modules = [c.__module__ for c in cls.__mro__ if c.__module__ not in ("builtins", "typing")]
        return _code_hash(self.module_closure(modules))

    def for_function(self, fn: Callable[..., Any]) -> CodeHash | None:
        """The source a stage's run function depends on (see the module docstring), or
        ``None`` when it comes from a released install."""
        found: dict[str, str] = {}
        self._function(fn, found, set())
        return _code_hash(found)

    def _function(self, fn: Any, found: dict[str, str], seen: set[int]) -> None:
        fn = getattr(fn, "__func__", fn)  # bound methods
        while hasattr(fn, "func") and not isinstance(fn, types.FunctionType):  # functools.partial
            fn = fn.func
        if isinstance(fn, type):
            found.update(self.for_class_modules(fn))
            return
        if not isinstance(fn, types.FunctionType):
            found.update(self.for_class_modules(type(fn)))  # a callable object: its class
            return
        if id(fn) in seen:
            return
        seen.add(id(fn))
        module = fn.__module__
        if self._info(module) is None:
            return  # released code: its distribution's version counts
        try:
            text = inspect.getsource(fn)
        except (OSError, TypeError):
            text = fn.__code__.co_code.hex()
        found[f"{module}:{fn.__qualname__}"] = hashlib.sha256(text.encode()).hexdigest()
        package = fn.__globals__.get("__package__") or module.rpartition(".")[0]
        modules: list[str] = []
        for code in _code_objects(fn.__code__):
            for name in _global_names(code):
                value = fn.__globals__.get(name)
                self._value(value, module, modules, found, seen)
            for absolute, names in _imports_in(code, package):
                modules += self._targets(absolute, names)
        for cell in fn.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            self._value(value, module, modules, found, seen)
        found.update(self.module_closure(modules))

    def _value(self, value: Any, module: str, modules: list[str], found: dict[str, str], seen: set[int]) -> None:
        if isinstance(value, types.ModuleType):
            modules.append(value.__name__)
        elif isinstance(value, types.FunctionType):
            if value.__module__ == module:
                self._function(value, found, seen)
            else:
                modules.append(value.__module__)
        elif isinstance(value, type):
            if value.__module__ == module:
                # a class of the stage's own module: its methods, as functions
                for attr in vars(value).values():
                    if isinstance(attr, (types.FunctionType, staticmethod, classmethod)):
                        self._function(getattr(attr, "__func__", attr), found, seen)
            else:
                modules.append(value.__module__)

    def for_class_modules(self, cls: type) -> dict[str, str]:
        modules = [c.__module__ for c in cls.__mro__ if c.__module__ not in ("builtins", "typing")]
        return self.module_closure(modules)


def _code_hash(found: dict[str, str]) -> CodeHash | None:
    if not found:
        return None
    blob = json.dumps(found, sort_keys=True)
    return CodeHash(hashlib.sha256(blob.encode()).hexdigest(), tuple(sorted(found)))


def _code_objects(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _global_names(code: types.CodeType) -> set[str]:
    return {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}


def _imports_in(code: types.CodeType, package: str) -> list[tuple[str, tuple[str, ...]]]:
    """The import statements inside a function's body, as (absolute module, names): each
    ``IMPORT_NAME`` follows the two constants of its level and its from-list."""
    out = []
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        if ins.opname != "IMPORT_NAME" or i < 2:
            continue
        level, fromlist = instructions[i - 2], instructions[i - 1]
        if level.opname != "LOAD_CONST" or fromlist.opname != "LOAD_CONST":
            continue
        absolute = _absolute(ins.argval, int(level.argval or 0), package)
        if absolute is not None:
            out.append((absolute, tuple(fromlist.argval or ())))
    return out


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
            entry = self._registry.entry(choice.role, choice.name)
            cls = self._registry.get(choice.role, choice.name)
            self._track_local(entry.distribution, cls.__module__)
            self._plugins[slot] = self._tracker.for_class(cls)
        return self._plugins[slot]

    def stage(self, stage: Any) -> CodeHash | None:
        if stage.name not in self._stages:
            added = next((e for e in self._registry.stages() if e.stage is stage), None)
            if added is not None:
                self._track_local(added.distribution, getattr(stage.run, "__module__", None) or type(stage.run).__module__)
            found: dict[str, str] = {}
            self._tracker._function(stage.run, found, set())
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
