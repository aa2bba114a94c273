"""Plugin discovery and the registry of factories.

Plugins are modules found through the entry point group ``lvlmva`` (the built-ins too, through
this project's own entry point). Each implements ``lvlmva_register(registry)`` and adds
``(role, name, factory)`` triples; the registry records which distribution supplied each one.

Environment:

- ``LVLMVA_DISABLE_PLUGINS=a,b``: block entry points named ``a`` and ``b``, or single plugins
  written as ``role:name`` (``critic:openai``).
- ``LVLMVA_DISABLE_PLUGIN_AUTOLOAD=1``: load only this project's own entry point (the test suite
  sets it so that whatever else is installed cannot change test results).
- ``LVLMVA_PLUGINS=module,other.module``: also load these importable modules as plugins, without
  an entry point (a plugin under development, or the toy plugins of ``lvlmva.testing``), as
  pytest's ``PYTEST_PLUGINS`` does.

Besides factories, a plugin may add pipeline stages: ``registry.add_stage(stage, after="judge")``
places a :class:`lvlmva.pipeline.Stage` relative to another stage, with an optional ``Options``
model for a settings section of the stage's name.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .protocols import ROLES, PluginOptions, check_capabilities

__all__ = [
    "PluginEntry",
    "StageEntry",
    "PluginRegistry",
    "PluginError",
    "get_plugin_manager",
    "get_registry",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "lvlmva"
OWN_DISTRIBUTION = "lvlmva"


class PluginError(Exception):
    """A plugin could not be registered or loaded; the message says which and why."""


@dataclass(frozen=True)
class PluginEntry:
    role: str
    name: str
    factory: type | str
    distribution: str
    version: str
    source: str  # the module that registered it

    @property
    def summary(self) -> str:
        """First line of the plugin class's docstring (imports a lazy factory)."""
        try:
            doc = inspect.getdoc(resolve_factory(self.factory)) or ""
        except PluginError as exc:
            return f"(cannot import: {exc})"
        return doc.strip().splitlines()[0] if doc.strip() else ""


@dataclass(frozen=True)
class StageEntry:
    """A pipeline stage added by a plugin, with where it goes and who added it."""

    stage: Any  # lvlmva.pipeline.Stage (not imported here: the pipeline imports the registry)
    after: str | None
    before: str | None
    options: type[PluginOptions] | None
    distribution: str
    version: str
    source: str

    @property
    def name(self) -> str:
        return str(self.stage.name)


def _origin(entry: StageEntry) -> str:
    """``my_plugin (my-dist 1.0)``: the module that added a stage and its distribution."""
    return f"{entry.source} ({' '.join(filter(None, (entry.distribution, entry.version)))})"


def _split_lazy(factory: str) -> tuple[str, str]:
    """``"package.module:Class"`` -> ``("package.module", "Class")``, or a PluginError."""
    module_name, sep, attr = factory.partition(":")
    parts = [*module_name.split("."), *attr.split(".")]
    if not sep or not all(part.isidentifier() for part in parts):
        raise PluginError(f"lazy factory {factory!r} must look like 'package.module:ClassName'")
    return module_name, attr


def resolve_factory(factory: type | str) -> type:
    """The class behind ``factory``: itself, or the ``"module:attr"`` string imported now."""
    if not isinstance(factory, str):
        return factory
    module_name, attr = _split_lazy(factory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r} for {factory!r}: {exc}") from exc
    except Exception as exc:  # a plugin module that breaks on import: name it, keep its error
        raise PluginError(
            f"importing {module_name!r} for {factory!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise PluginError(f"{module_name!r} has no attribute {attr!r} (factory {factory!r})") from exc
    return obj


class PluginRegistry:
    """Role -> name -> :class:`PluginEntry`. Passed to every ``lvlmva_register`` hook."""

    def __init__(self, blocked: Iterable[str] = ()) -> None:
        self._entries: dict[str, dict[str, PluginEntry]] = {role: {} for role in ROLES}
        self._blocked = set(blocked)
        self._source: tuple[str, str, str] = ("unknown", "", "")
        self._resolved: dict[tuple[str, str], type] = {}
        self._stages: dict[str, StageEntry] = {}
        self._codecs: dict[str, StageEntry] = {}  # codec name -> the stage that brought it

    # -- used by hooks ---------------------------------------------------------------------
    def add(self, role: str, name: str, factory: type | str) -> None:
        """Register ``factory`` (a class, or ``"module:attr"`` imported on first use) as plugin
        ``name`` of ``role``. A second plugin of the same role and name is an error that names
        both sources."""
        if role not in ROLES:
            raise PluginError(
                f"{self._source[2] or self._source[0]} registers {name!r} for unknown role {role!r}; "
                f"roles are: {', '.join(ROLES)}"
            )
        if not isinstance(factory, (str, type)):
            raise PluginError(f"factory for {role}:{name} must be a class or 'module:attr', got {factory!r}")
        if isinstance(factory, str):
            try:
                _split_lazy(factory)
            except PluginError as exc:
                raise PluginError(
                    f"{self._source[2] or self._source[0]} registers {role}:{name}: {exc}"
                ) from None
        if f"{role}:{name}" in self._blocked:
            return
        dist, version, module = self._source
        existing = self._entries[role].get(name)
        if existing is not None:
            raise PluginError(
                f"duplicate {role} plugin {name!r}: registered by {existing.source} "
                f"({existing.distribution} {existing.version}) and again by {module} ({dist} {version})"
            )
        self._entries[role][name] = PluginEntry(role, name, factory, dist, version, module)

    def add_stage(
        self,
        stage: Any,
        *,
        after: str | None = None,
        before: str | None = None,
        options: type[PluginOptions] | None = None,
    ) -> None:
        """Add a pipeline stage (a :class:`lvlmva.pipeline.Stage`) right after or right before
        the stage named ``after`` / ``before`` (exactly one). ``options``, when given, is the
        model of a settings section named like the stage (``[review]`` for a stage "review"),
        validated like a core section; the stage reads it by declaring the section.

        The stage's codec, when it is the plugin's own, is registered under its name
        (:meth:`codec`), so that ``open_run(path).load(stage)`` reads the artifact in a process
        that never imported the plugin; a name that lvlmva's own codecs or another stage's
        different codec already has is refused, naming both."""
        who = self._source[2] or self._source[0]
        name = getattr(stage, "name", None)
        if not isinstance(name, str) or not callable(getattr(stage, "run", None)):
            raise PluginError(f"{who} adds a stage that is not a lvlmva.pipeline.Stage: {stage!r}")
        if (after is None) == (before is None):
            raise PluginError(f"{who} adds stage {name!r}: give exactly one of after= or before=")
        if options is not None and not (isinstance(options, type) and issubclass(options, PluginOptions)):
            raise PluginError(f"{who} adds stage {name!r}: options must subclass lvlmva.PluginOptions")
        codec = getattr(stage, "codec", None)
        codec_name = getattr(codec, "name", None)
        if codec is not None and not (
            isinstance(codec_name, str) and codec_name
            and callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
        ):  # fmt: skip
            raise PluginError(
                f"{who} adds stage {name!r} with a codec that has no name, encode(value, folder) "
                f"and decode(folder, ctx): {codec!r}"
            )
        if f"stage:{name}" in self._blocked:
            return
        existing = self._stages.get(name)
        if existing is not None:
            raise PluginError(
                f"duplicate stage {name!r}: added by {existing.source} ({existing.distribution}) "
                f"and again by {who} ({self._source[0]})"
            )
        dist, version, module = self._source
        entry = StageEntry(stage, after, before, options, dist, version, module)
        plugin_codec = codec is not None and self._check_codec(codec, entry)
        self._stages[name] = entry
        if plugin_codec:
            self._codecs.setdefault(codec.name, entry)

    def _check_codec(self, codec: Any, entry: StageEntry) -> bool:
        """Whether ``codec`` is a plugin's own (not one of lvlmva's); refuses one named like
        lvlmva's own codecs or like another stage's different codec: a finished run records
        only the codec's name, and reading it back must find the codec that wrote it."""
        # not at import time: the pipeline imports this module
        from .pipeline.codecs import BUILTIN_CODECS, same_codec

        builtin = BUILTIN_CODECS.get(codec.name)
        if builtin is not None:
            if same_codec(builtin, codec):
                return False
            raise PluginError(
                f"{_origin(entry)} adds stage {entry.name!r} with a codec named {codec.name!r}, the "
                f"name of one of lvlmva's own codecs ({', '.join(BUILTIN_CODECS)}); give it another name"
            )
        first = self._codecs.get(codec.name)
        if first is not None and not same_codec(first.stage.codec, codec):
            raise PluginError(
                f"two different codecs named {codec.name!r}: {type(first.stage.codec).__qualname__} of "
                f"{_origin(first)} for stage {first.name!r}, and {type(codec).__qualname__} of "
                f"{_origin(entry)} for stage {entry.name!r}; one of them must rename its codec"
            )
        return True

    def codec(self, name: str) -> Any | None:
        """The codec named ``name`` that a plugin stage brought (``None`` when none did); lvlmva's
        own codecs are in :data:`lvlmva.pipeline.codecs.BUILTIN_CODECS`."""
        entry = self._codecs.get(name)
        return None if entry is None else entry.stage.codec

    def codec_sources(self) -> dict[str, StageEntry]:
        """Codec name -> the first stage that brought it (its plugin and distribution)."""
        return dict(self._codecs)

    def stages(self) -> list[StageEntry]:
        """Stages added by plugins, in the order they were added."""
        return list(self._stages.values())

    def stage_sections(self) -> dict[str, type[PluginOptions]]:
        """Settings sections of plugin stages: stage name -> Options model."""
        return {e.name: e.options for e in self._stages.values() if e.options is not None}

    # -- used by the pipeline ----------------------------------------------------------------
    def names(self, role: str) -> list[str]:
        """Registered plugin names of ``role``, sorted."""
        self._check_role(role)
        return sorted(self._entries[role])

    def entries(self, role: str | None = None) -> Iterator[PluginEntry]:
        """Every entry, or those of ``role``, in role then name order."""
        if role is not None:
            self._check_role(role)
        for r in ROLES if role is None else [role]:
            for name in sorted(self._entries[r]):
                yield self._entries[r][name]

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise PluginError(f"unknown role {role!r}; roles are: {', '.join(ROLES)}")

    def entry(self, role: str, name: str) -> PluginEntry:
        """The entry of plugin ``name`` of ``role`` (nothing is imported)."""
        self._check_role(role)
        try:
            return self._entries[role][name]
        except KeyError:
            known = ", ".join(self.names(role)) or "(none registered)"
            raise PluginError(f"unknown {role} plugin {name!r}; registered: {known}") from None

    def get(self, role: str, name: str) -> type:
        """The plugin class, imported on first use and checked against the role's protocol."""
        key = (role, name)
        if key not in self._resolved:
            entry = self.entry(role, name)
            cls = resolve_factory(entry.factory)
            if not isinstance(cls, type):
                raise PluginError(
                    f"{role} plugin {name!r} ({entry.factory!r} from {entry.distribution}) is a "
                    f"{type(cls).__name__}, not a class"
                )
            missing = check_capabilities(role, cls)
            if missing:
                raise PluginError(
                    f"{role} plugin {name!r} ({entry.factory!r} from {entry.distribution}) lacks "
                    f"{', '.join(sorted(missing))} required of a {role}"
                )
            options = cls.Options
            if not (isinstance(options, type) and issubclass(options, PluginOptions)):
                raise PluginError(
                    f"{role} plugin {name!r} ({entry.factory!r} from {entry.distribution}): "
                    f"Options must subclass lvlmva.PluginOptions, got {options!r}"
                )
            problems = contract_problems(role, cls)
            if problems:
                raise PluginError(
                    f"{role} plugin {name!r} ({entry.factory!r} from {entry.distribution} {entry.version}) does not "
                    f"fit the {role} protocol:\n" + "\n".join(f"  - {p}" for p in problems)
                )
            self._resolved[key] = cls
        return self._resolved[key]


#: methods any plugin may define, with how the pipeline calls them
_OPTIONAL_METHODS = {
    "preflight": "preflight(self, samples)",
    "check_data": "check_data(self, data)",
    "check_model": "check_model(self, model)",
    "finalize": "finalize(self, models)",
}


def _call_shape(proto_method: Any) -> tuple[list[str], list[str]]:
    """How the pipeline calls a protocol method: its required parameters positionally, its
    parameters with defaults by keyword (``evaluate(..., attribute=...)``)."""
    positional, keywords = [], []
    for param in list(inspect.signature(proto_method).parameters.values())[1:]:  # without self
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        (positional if param.default is param.empty else keywords).append(param.name)
    return positional, keywords


def _bind_problem(cls: type, name: str, positional: list[str], keywords: list[str]) -> str | None:
    """Why ``cls.name`` cannot be called as the pipeline calls it, or ``None``."""
    static = inspect.getattr_static(cls, name)
    method = getattr(cls, name)
    if not callable(method):
        return f"{name} is a {type(method).__name__}, not a method"
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to read, nothing to refuse
    placeholders = [object()] * len(positional)
    leading = [] if isinstance(static, (staticmethod, classmethod)) else [object()]
    try:
        sig.bind(*leading, *placeholders, **{k: None for k in keywords})
    except TypeError as exc:
        shown = ", ".join(["self", *positional, *(f"{k}=..." for k in keywords)])
        return f"{name}{sig} cannot be called as {name}({shown}): {exc}"
    return None


def contract_problems(role: str, cls: type) -> list[str]:
    """What keeps ``cls`` from being called as the pipeline calls a ``role`` plugin: its
    constructor (``cls(options)``), each protocol method's parameters, the optional methods it
    defines, and its capability flags (booleans). Empty when it fits."""
    proto = ROLES[role]
    problems = []
    try:
        init = inspect.signature(cls)
    except (TypeError, ValueError):
        init = None
    if init is not None:
        try:
            init.bind(object())
        except TypeError as exc:
            problems.append(f"__init__{init} cannot be called as {cls.__name__}(options): {exc}")
    for name, member in vars(proto).items():
        if name.startswith("_") or not inspect.isfunction(member) or not hasattr(cls, name):
            continue
        problem = _bind_problem(cls, name, *_call_shape(member))
        if problem:
            problems.append(problem)
    for name, shown in _OPTIONAL_METHODS.items():
        if hasattr(cls, name):
            args = shown[shown.index("(") + 1 : -1].split(", ")[1:]
            problem = _bind_problem(cls, name, args, [])
            if problem:
                problems.append(problem)
    for name, annotation in getattr(proto, "__annotations__", {}).items():
        if "bool" in str(annotation) and hasattr(cls, name):
            value = getattr(cls, name)
            if not isinstance(value, bool) and not isinstance(value, property):
                problems.append(f"capability flag {name} must be True or False, got {value!r}")
    return problems


class _Loaded:
    def __init__(self, pm: pluggy.PluginManager, registry: PluginRegistry) -> None:
        self.pm = pm
        self.registry = registry


_LOADED: _Loaded | None = None


def _blocked_names() -> set[str]:
    raw = os.environ.get("LVLMVA_DISABLE_PLUGINS", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _extra_modules() -> list[str]:
    raw = os.environ.get("LVLMVA_PLUGINS", "")
    return [part.strip() for part in raw.split(",") if part.strip()]


def _entry_points() -> list[tuple[metadata.EntryPoint, str, str]]:
    only_own = os.environ.get("LVLMVA_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
    found = []
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "unknown"
        if only_own and dist_name != OWN_DISTRIBUTION:
            continue
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            key = (dist_name, ep.name)
            if key in seen:  # the same distribution seen twice on sys.path
                continue
            seen.add(key)
            found.append((ep, dist_name, dist.version))
    return found


def get_plugin_manager() -> pluggy.PluginManager:
    return _load().pm


def get_registry() -> PluginRegistry:
    """The registry of every installed plugin (loaded once per process)."""
    return _load().registry


def reset_plugins() -> None:
    """Forget loaded plugins (tests; after installing a plugin in a running process)."""
    global _LOADED
    _LOADED = None
    importlib.invalidate_caches()


def _load() -> _Loaded:
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    blocked = _blocked_names()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origin: dict[int, tuple[str, str, str]] = {}
    for ep, dist_name, version in _entry_points():
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            raise PluginError(
                f"two entry points named {ep.name!r} in group {ENTRY_POINT_GROUP!r} "
                f"(the second from {dist_name} {version}); rename one"
            )
        try:
            plugin = ep.load()
        except Exception as exc:  # report which plugin broke, with its own error
            raise PluginError(f"cannot load plugin {ep.name!r} ({ep.value}) from {dist_name} {version}: {exc}") from exc
        pm.register(plugin, name=ep.name)
        origin[id(plugin)] = (dist_name, version, _module_name(plugin, ep.value))
    for module_name in _extra_modules():
        if module_name in blocked or pm.get_plugin(module_name) is not None:
            continue
        try:
            plugin = importlib.import_module(module_name)
        except Exception as exc:  # name the variable and the module, keep the module's error
            raise PluginError(f"LVLMVA_PLUGINS: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
        pm.register(plugin, name=module_name)
        origin[id(plugin)] = ("LVLMVA_PLUGINS", "", module_name)
    _check_pending(pm)
    registry = PluginRegistry(blocked)
    for impl in pm.hook.lvlmva_register.get_hookimpls():
        registry._source = origin.get(id(impl.plugin), ("unknown", "", _module_name(impl.plugin, impl.plugin_name)))
        impl.function(registry=registry)
    registry._source = ("unknown", "", "")
    _LOADED = _Loaded(pm, registry)
    return _LOADED


def _check_pending(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()`` as a :class:`PluginError` that names the unknown hook."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}; hooks are: {', '.join(sorted(n for n in dir(hookspecs) if n.startswith('lvlmva_')))}"
        ) from exc


def register_module(module: ModuleType | object, name: str, distribution: str = "local", version: str = "") -> None:
    """Register a plugin object in this process without an entry point (notebooks, tests).

    ``name`` is its plugin name: one listed in ``LVLMVA_DISABLE_PLUGINS`` is not registered. An
    object with a misspelled hook is refused (and left unregistered)."""
    loaded = _load()
    if name in _blocked_names():
        return
    loaded.pm.register(module, name=name)
    try:
        _check_pending(loaded.pm)
    except PluginError:
        loaded.pm.unregister(module)
        raise
    impl = getattr(module, "lvlmva_register", None)
    if impl is not None:
        registry = loaded.registry
        registry._source = (distribution, version, _module_name(module, name))
        before = {role: dict(entries) for role, entries in registry._entries.items()}
        stages_before = dict(registry._stages)
        codecs_before = dict(registry._codecs)
        try:
            impl(registry=registry)
        except PluginError:
            # a refused plugin leaves nothing behind: no hooks, and none of the entries it added
            # before the error (a retry would otherwise meet its own half as a duplicate)
            loaded.pm.unregister(module)
            registry._entries = before
            registry._stages = stages_before
            registry._codecs = codecs_before
            raise
        finally:
            registry._source = ("unknown", "", "")


def _module_name(plugin: object, fallback: str) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__ or fallback
