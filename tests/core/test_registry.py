"""The plugin registry: registration rules, lazy factories, capability checks, blocking,
hook validation and where each plugin came from."""

from __future__ import annotations

import sys
import types
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from lvlmva import hookimpl
from lvlmva.plugins import BUILTINS
from lvlmva.protocols import ROLES, PluginOptions
from lvlmva.registry import (
    PluginError,
    PluginRegistry,
    get_plugin_manager,
    get_registry,
    register_module,
    reset_plugins,
)


class GoodCritic:
    """A critic with everything the protocol asks for."""

    class Options(PluginOptions):
        pass

    needs_true_masks = False

    def __init__(self, options) -> None:
        self.options = options

    def critique(self, requests, ctx):
        return []


class HalfCritic:
    """Lacks the critique method and a capability flag."""

    class Options(PluginOptions):
        pass



class PlainOptionsCritic(GoodCritic):
    """Options is not a PluginOptions model."""

    class Options:
        pass


def _plugin_module(name: str, register) -> types.ModuleType:
    """A module object whose ``lvlmva_register`` hook calls ``register(registry)``."""
    module = types.ModuleType(name)

    @hookimpl
    def lvlmva_register(registry):
        register(registry)

    module.lvlmva_register = lvlmva_register
    return module


@pytest.fixture
def lazy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writes a uniquely named module into tmp_path (on sys.path); returns its name."""
    made: list[str] = []

    def make(body: str) -> str:
        name = f"lvlmva_lazy_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(body)
        made.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield make
    for name in made:
        sys.modules.pop(name, None)


LAZY_CRITIC = '''
from lvlmva.protocols import PluginOptions


class LazyCritic:
    """Imported only when used."""

    class Options(PluginOptions):
        pass

    needs_true_masks = False

    def __init__(self, options):
        self.options = options

    def critique(self, requests, ctx):
        return []
'''


# -- add / get --------------------------------------------------------------------------------


def test_class_factory_is_registered_and_returned():
    reg = PluginRegistry()
    reg.add("critic", "good", GoodCritic)
    assert reg.names("critic") == ["good"]
    assert reg.get("critic", "good") is GoodCritic
    assert [e.name for e in reg.entries("critic")] == ["good"]
    assert reg.names("judge") == []


def test_lazy_factory_is_imported_only_on_get(lazy_module):
    name = lazy_module(LAZY_CRITIC)
    reg = PluginRegistry()
    reg.add("critic", "lazy", f"{name}:LazyCritic")
    assert reg.names("critic") == ["lazy"]
    assert reg.entry("critic", "lazy").factory == f"{name}:LazyCritic"
    assert name not in sys.modules  # registering and listing import nothing
    cls = reg.get("critic", "lazy")
    assert name in sys.modules
    assert cls is sys.modules[name].LazyCritic
    assert reg.get("critic", "lazy") is cls  # resolved once


@pytest.mark.parametrize("factory", ["no_colon", "module:", ":Class", "a b:Class", "pkg.:Class", "m:C-D"])
def test_malformed_lazy_string_is_refused_when_added(factory):
    reg = PluginRegistry()
    with pytest.raises(PluginError, match=r"must look like 'package\.module:ClassName'") as err:
        reg.add("critic", "bad", factory)
    assert repr(factory) in str(err.value)
    assert "critic:bad" in str(err.value)


def test_factory_of_wrong_type_is_refused():
    with pytest.raises(PluginError, match="must be a class or 'module:attr', got 42"):
        PluginRegistry().add("critic", "bad", 42)


def test_missing_module_is_a_clear_error():
    reg = PluginRegistry()
    reg.add("critic", "gone", "lvlmva_no_such_module_anywhere:Critic")
    with pytest.raises(PluginError, match="cannot import 'lvlmva_no_such_module_anywhere'"):
        reg.get("critic", "gone")


def test_missing_attribute_is_a_clear_error(lazy_module):
    name = lazy_module(LAZY_CRITIC)
    reg = PluginRegistry()
    reg.add("critic", "typo", f"{name}:LazyCrtic")
    with pytest.raises(PluginError, match=f"'{name}' has no attribute 'LazyCrtic'"):
        reg.get("critic", "typo")


def test_module_failing_on_import_is_named_with_its_error(lazy_module):
    name = lazy_module("raise RuntimeError('broken at import')\n")
    reg = PluginRegistry()
    reg.add("critic", "broken", f"{name}:Critic")
    with pytest.raises(PluginError, match=f"importing '{name}'.*RuntimeError: broken at import"):
        reg.get("critic", "broken")
    # the listing shows the problem instead of crashing
    assert "broken at import" in reg.entry("critic", "broken").summary


def test_duplicate_name_is_refused_naming_both_sources(fresh_plugins):
    def add_dup(registry):
        registry.add("critic", "dup", GoodCritic)

    register_module(_plugin_module("first_plugin", add_dup), "first", "dist-one", "1.0")
    with pytest.raises(PluginError) as err:
        register_module(_plugin_module("second_plugin", add_dup), "second", "dist-two", "2.0")
    message = str(err.value)
    assert "duplicate critic plugin 'dup'" in message
    assert "first_plugin (dist-one 1.0)" in message
    assert "second_plugin (dist-two 2.0)" in message
    assert get_plugin_manager().get_plugin("second") is None  # refused plugins leave no hooks


def test_duplicate_of_a_builtin_names_the_builtin(fresh_plugins):
    module = _plugin_module("shadowing", lambda r: r.add("critic", "oracle", GoodCritic))
    with pytest.raises(PluginError, match=r"lvlmva\.plugins \(lvlmva .*\) and again by shadowing"):
        register_module(module, "shadow")


def test_same_name_in_different_roles_is_fine():
    reg = PluginRegistry()
    reg.add("critic", "openai", GoodCritic)
    reg.add("judge", "openai", "somewhere.else:Judge")
    assert reg.names("critic") == reg.names("judge") == ["openai"]


def test_class_missing_protocol_members_is_refused_with_their_names():
    reg = PluginRegistry()
    reg.add("critic", "half", HalfCritic)
    with pytest.raises(PluginError, match="lacks critique, needs_true_masks required of a critic"):
        reg.get("critic", "half")


def test_options_must_be_plugin_options():
    reg = PluginRegistry()
    reg.add("critic", "plain", PlainOptionsCritic)
    with pytest.raises(PluginError, match="Options must subclass lvlmva.PluginOptions"):
        reg.get("critic", "plain")


def test_lazy_factory_that_is_not_a_class_is_refused():
    reg = PluginRegistry()
    reg.add("critic", "function", "json:dumps")
    with pytest.raises(PluginError, match="is a function, not a class"):
        reg.get("critic", "function")


def test_unknown_role():
    reg = PluginRegistry()
    expected = "unknown role 'critc'; roles are: " + ", ".join(ROLES)
    with pytest.raises(PluginError, match=expected):
        reg.add("critc", "x", GoodCritic)
    for call in (lambda: reg.get("critc", "x"), lambda: reg.names("critc"), lambda: list(reg.entries("critc"))):
        with pytest.raises(PluginError, match="unknown role 'critc'"):
            call()


def test_unknown_plugin_lists_registered_names():
    reg = PluginRegistry()
    reg.add("critic", "good", GoodCritic)
    reg.add("critic", "other", GoodCritic)
    with pytest.raises(PluginError, match="unknown critic plugin 'nope'; registered: good, other"):
        reg.get("critic", "nope")
    with pytest.raises(PluginError, match=r"unknown judge plugin 'x'; registered: \(none registered\)"):
        reg.get("judge", "x")


# -- loading through entry points -------------------------------------------------------------


def test_builtins_record_their_distribution_and_version(fresh_plugins):
    version = metadata.version("lvlmva")
    registry = get_registry()
    for role, plugins in BUILTINS.items():
        assert set(plugins) <= set(registry.names(role))
        for name, factory in plugins.items():
            entry = registry.entry(role, name)
            assert (entry.distribution, entry.version, entry.source) == ("lvlmva", version, "lvlmva.plugins")
            assert entry.factory == factory  # still a lazy string: nothing imported


def test_blocking_an_entry_point_name(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LVLMVA_DISABLE_PLUGINS", "lvlmva")
    reset_plugins()
    assert get_plugin_manager().is_blocked("lvlmva")
    assert all(get_registry().names(role) == [] for role in ROLES)


def test_blocking_single_plugins(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LVLMVA_DISABLE_PLUGINS", " critic:openai , judge:rules")
    reset_plugins()
    registry = get_registry()
    assert "openai" not in registry.names("critic")
    assert "oracle" in registry.names("critic")
    assert "rules" not in registry.names("judge")
    assert "openai" in registry.names("judge")
    with pytest.raises(PluginError, match="unknown critic plugin 'openai'"):
        registry.get("critic", "openai")


def test_misspelled_hook_is_caught_by_check_pending(fresh_plugins):
    typo = types.ModuleType("typo_plugin")

    @hookimpl
    def lvlmva_regster(registry):
        registry.add("critic", "never", GoodCritic)

    typo.lvlmva_regster = lvlmva_regster
    with pytest.raises(PluginError, match="unknown hook 'lvlmva_regster'.*hooks are: .*lvlmva_register"):
        register_module(typo, "typo")
    assert get_plugin_manager().get_plugin("typo") is None
    assert "never" not in get_registry().names("critic")


def test_misspelled_hook_in_an_installed_plugin_stops_loading(
    fresh_plugins, tmp_path, monkeypatch, make_distribution
):
    package = tmp_path / "src" / "lvlmva_typo_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from lvlmva import hookimpl\n\n\n@hookimpl\ndef lvlmva_regster(registry):\n    pass\n"
    )
    site = make_distribution(tmp_path / "site", "lvlmva-typo", "0.3", {"typo": "lvlmva_typo_plugin"}, package)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("LVLMVA_DISABLE_PLUGIN_AUTOLOAD")
    reset_plugins()
    try:
        with pytest.raises(PluginError, match="unknown hook 'lvlmva_regster'"):
            get_registry()
    finally:
        sys.modules.pop("lvlmva_typo_plugin", None)


def test_entry_point_that_fails_to_load_is_named(fresh_plugins, tmp_path, monkeypatch, make_distribution):
    site = make_distribution(tmp_path / "site", "lvlmva-gone", "1.2", {"gone": "lvlmva_gone_module"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("LVLMVA_DISABLE_PLUGIN_AUTOLOAD")
    reset_plugins()
    with pytest.raises(PluginError, match=r"cannot load plugin 'gone' \(lvlmva_gone_module\) from lvlmva-gone 1\.2"):
        get_registry()


def test_register_module_records_its_distribution(fresh_plugins):
    module = _plugin_module("my_notebook_plugins", lambda r: r.add("critic", "mine", GoodCritic))
    register_module(module, "mine", distribution="my-dist", version="9.9")
    entry = get_registry().entry("critic", "mine")
    assert (entry.distribution, entry.version, entry.source) == ("my-dist", "9.9", "my_notebook_plugins")
    assert get_registry().get("critic", "mine") is GoodCritic
    assert get_plugin_manager().get_plugin("mine") is module


def test_register_module_defaults_to_a_local_distribution(fresh_plugins):
    register_module(_plugin_module("local_plugins", lambda r: r.add("judge", "local", "x.y:Judge")), "local")
    assert get_registry().entry("judge", "local").distribution == "local"


def test_register_module_respects_the_block_list(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LVLMVA_DISABLE_PLUGINS", "blocked-one")
    reset_plugins()
    register_module(_plugin_module("blocked_plugins", lambda r: r.add("critic", "blocked", GoodCritic)), "blocked-one")
    assert "blocked" not in get_registry().names("critic")
    assert get_plugin_manager().get_plugin("blocked-one") is None


def test_a_refused_module_leaves_no_entries_behind(fresh_plugins):
    def register(r):
        r.add("critic", "half-first", GoodCritic)
        r.add("critic", "oracle", GoodCritic)  # clashes with the built-in: refused

    module = _plugin_module("half_plugins", register)
    with pytest.raises(PluginError, match="duplicate critic plugin 'oracle'"):
        register_module(module, "half")
    assert "half-first" not in get_registry().names("critic")
    assert get_plugin_manager().get_plugin("half") is None
    # fixed, it registers cleanly instead of meeting its own first half as a duplicate
    fixed = _plugin_module("half_plugins_fixed", lambda r: r.add("critic", "half-first", GoodCritic))
    register_module(fixed, "half")
    assert "half-first" in get_registry().names("critic")


def test_a_run_with_the_openai_critic_never_imports_transformers():
    import subprocess

    examples = Path(__file__).resolve().parents[2] / "examples"
    code = (
        "import sys\n"
        "from lvlmva.settings import load_settings\n"
        "from lvlmva.pipeline import Pipeline\n"
        f"s = load_settings({str(examples / 'decoy_mnist_openai.toml')!r}, environ={{}})\n"
        "import os; os.environ['OPENAI_API_KEY'] = 'sk-test-not-a-real-key'\n"
        "p = Pipeline(s, 'unused', echo=lambda m: None)\n"
        "for role in s.plugins: p.plugin(role)\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- LVLMVA_PLUGINS and plugin stages ------------------------------------------------------------


def test_modules_named_in_lvlmva_plugins_are_loaded_as_plugins(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LVLMVA_PLUGINS", " lvlmva.testing.toy_plugins ,")
    registry = get_registry()
    entry = registry.entry("mitigator", "toy-retrain")
    assert (entry.distribution, entry.source) == ("LVLMVA_PLUGINS", "lvlmva.testing.toy_plugins")
    assert registry.get("mitigator", "toy-upweight").needs_groups is True


def test_a_module_in_lvlmva_plugins_that_cannot_be_imported_is_named(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LVLMVA_PLUGINS", "no_such_module_here")
    with pytest.raises(PluginError, match="LVLMVA_PLUGINS: cannot import 'no_such_module_here': ModuleNotFoundError"):
        get_registry()


def _stage(name: str):
    from lvlmva.pipeline import Stage, codecs

    return Stage(name, lambda call: {}, codec=codecs.JSON)


def test_added_stages_are_checked_and_recorded():
    registry = PluginRegistry()
    registry._source = ("my-dist", "1.0", "my_plugin")
    registry.add_stage(_stage("second-look"), after="judge", options=PluginOptions)
    (entry,) = registry.stages()
    assert (entry.name, entry.after, entry.before, entry.distribution) == ("second-look", "judge", None, "my-dist")
    assert registry.stage_sections() == {"second-look": PluginOptions}
    with pytest.raises(PluginError, match="duplicate stage 'second-look': added by my_plugin"):
        registry.add_stage(_stage("second-look"), before="masks")
    with pytest.raises(PluginError, match="give exactly one of after= or before="):
        registry.add_stage(_stage("other"), after="judge", before="masks")
    with pytest.raises(PluginError, match="is not a lvlmva.pipeline.Stage"):
        registry.add_stage(object(), after="judge")
    with pytest.raises(PluginError, match="options must subclass lvlmva.PluginOptions"):
        registry.add_stage(_stage("third"), after="judge", options=dict)
    blocked = PluginRegistry(blocked={"stage:second-look"})
    blocked.add_stage(_stage("second-look"), after="judge")
    assert blocked.stages() == []
