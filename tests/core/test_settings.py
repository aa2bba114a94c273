"""Settings composition: precedence of the sources, literal parsing, every error message with
its provenance, secrets, and the resolved TOML round trip. Plugin sections use a tiny registry
of test plugins so that these tests do not depend on the built-in plugins."""

from __future__ import annotations

import codecs
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

import lvlmva.options
import lvlmva.settings
from lvlmva.options import CORE_SECTIONS, TrainOptions
from lvlmva.protocols import ROLES, PluginOptions
from lvlmva.registry import PluginRegistry, get_registry
from lvlmva.settings import SettingsError, load_settings, parse_overrides


@pytest.mark.parametrize("name", lvlmva.options.__all__)
def test_the_loader_re_exports_the_schemas(name):
    """``from lvlmva.settings import TrainOptions`` (and the rest) keeps working for code written
    before the schemas had a module of their own: the same objects, not copies."""
    assert getattr(lvlmva.settings, name) is getattr(lvlmva.options, name)
    assert name in lvlmva.settings.__all__


class FakeCritic:
    """A critic with a few typed options."""

    class Options(PluginOptions):
        model: str = Field("small", description="Model name.")
        temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
        api_key_env: str = Field("FAKE_API_KEY", description="Variable holding the key.")
        sizes: list[int] = Field(default_factory=lambda: [1, 2], description="Some sizes.")

    needs_true_masks = False

    def __init__(self, options) -> None:
        self.options = options

    def critique(self, requests, ctx):
        return []


class OtherCritic(FakeCritic):
    """A second critic, so that listings have more than one name."""


class SlimCritic(FakeCritic):
    """A critic that takes only a model name."""

    class Options(PluginOptions):
        model: str = Field("slim", description="Model name.")


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    reg.add("critic", "fake", FakeCritic)
    reg.add("critic", "other", OtherCritic)
    return reg


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str, name: str = "settings.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def load(path, overrides=(), environ=None, registry=None):
    return load_settings(path, overrides, environ={} if environ is None else environ, registry=registry or PluginRegistry())


def error_of(path, overrides=(), environ=None, registry=None) -> str:
    with pytest.raises(SettingsError) as err:
        load(path, overrides, environ, registry)
    return str(err.value)


# -- precedence --------------------------------------------------------------------------------


def test_defaults_without_any_source():
    settings = load(None)
    assert settings.train == TrainOptions()
    assert settings.run.seed == 0 and settings.plugins == {}
    assert settings.run_name == "run"


@pytest.mark.parametrize(
    "file_value, env_value, set_value, expected",
    [
        (None, None, None, 3),  # defaults
        (7, None, None, 7),  # file > defaults
        (7, 8, None, 8),  # env > file
        (None, 8, None, 8),  # env > defaults
        (7, None, 9, 9),  # --set > file
        (None, 8, 9, 9),  # --set > env
        (7, 8, 9, 9),  # --set > env > file
    ],
)
def test_precedence_of_each_source(write, file_value, env_value, set_value, expected):
    # lr only in the file: a higher source replaces single keys, not whole sections
    text = "[train]\nlr = 0.5\n" + (f"epochs = {file_value}\n" if file_value is not None else "")
    environ = {"LVLMVA_TRAIN__EPOCHS": str(env_value)} if env_value is not None else {}
    overrides = [f"train.epochs={set_value}"] if set_value is not None else []
    settings = load(write(text), overrides, environ)
    assert settings.train.epochs == expected
    assert settings.train.lr == 0.5
    assert settings.train.batch_size == TrainOptions().batch_size


def test_precedence_in_a_plugin_section(write, registry):
    path = write('[critic]\nplugin = "fake"\nmodel = "from-file"\ntemperature = 0.5\n')
    assert load(path, registry=registry).plugins["critic"].options.model == "from-file"
    env = {"LVLMVA_CRITIC__MODEL": "from-env"}
    choice = load(path, environ=env, registry=registry).plugins["critic"]
    assert (choice.name, choice.options.model, choice.options.temperature) == ("fake", "from-env", 0.5)
    choice = load(path, ["critic.model=from-set", "critic.plugin=other"], env, registry).plugins["critic"]
    assert (choice.name, choice.options.model, choice.options.temperature) == ("other", "from-set", 0.5)
    assert isinstance(choice.options, OtherCritic.Options)


def test_switching_plugin_from_the_command_line_drops_the_old_plugins_keys(write, registry):
    registry.add("critic", "slim", SlimCritic)
    path = write('[critic]\nplugin = "fake"\nmodel = "m"\ntemperature = 0.5\nsizes = [3]\n')
    choice = load(path, ["critic.plugin=slim"], {}, registry).plugins["critic"]
    assert choice.name == "slim" and choice.options.model == "m"  # a key both take still applies
    env = {"LVLMVA_CRITIC__PLUGIN": "slim"}
    assert load(path, environ=env, registry=registry).plugins["critic"].name == "slim"
    # the file's own typo is still an error when the file's plugin is kept
    bad = write('[critic]\nplugin = "fake"\ntemperatur = 0.5\n', "bad.toml")
    assert "critic.temperatur" in error_of(bad, registry=registry)


def test_unknown_palette_colour_is_a_settings_error(write):
    message = error_of(write('[render]\npalette = ["red", "mauve"]\n'))
    assert "render.palette" in message and "mauve" in message and "allowed: red, blue" in message


def test_a_plugin_section_can_come_from_the_environment_alone(registry):
    settings = load(None, environ={"LVLMVA_CRITIC__PLUGIN": "fake"}, registry=registry)
    assert settings.plugins["critic"].options == FakeCritic.Options()


def test_other_lvlmva_variables_are_not_settings():
    env = {"LVLMVA_DISABLE_PLUGINS": "x", "LVLMVA_DISABLE_PLUGIN_AUTOLOAD": "1", "OTHER__X": "1"}
    assert load(None, environ=env).as_dict() == load(None).as_dict()


# -- literal parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("5", 5),
        ("1e-4", 1e-4),
        ("0.25", 0.25),
        ("true", True),
        ("[256, 128]", [256, 128]),
        ('["red", "blue"]', ["red", "blue"]),
        ("gpt-5", "gpt-5"),
        ('"42"', "42"),
        ("hello world", "hello world"),
        ("2024-05-01", "2024-05-01"),  # a TOML date is never an option value: stays text
        ("", ""),
    ],
)
def test_override_values_are_toml_literals(raw, expected):
    parsed = parse_overrides([f"section.key={raw}"])["section"]["key"]
    assert parsed == expected and type(parsed) is type(expected)


def test_env_and_set_values_reach_typed_options(registry):
    env = {
        "LVLMVA_TRAIN__LR": "1e-4",
        "LVLMVA_RENDER__PALETTE": '["red", "blue"]',
        "LVLMVA_RUN__DETERMINISTIC": "false",
        "LVLMVA_CRITIC__PLUGIN": "fake",
    }
    overrides = ["train.epochs=5", "critic.sizes=[4, 5, 6]", "run.name=my run", "critic.model=gpt-5"]
    settings = load(None, overrides, env, registry)
    assert settings.train.lr == 1e-4 and settings.train.epochs == 5
    assert settings.render.palette == ["red", "blue"]
    assert settings.run.deterministic is False
    assert settings.run_name == "my run"
    assert settings.plugins["critic"].options.sizes == [4, 5, 6]
    assert settings.plugins["critic"].options.model == "gpt-5"


def test_nested_keys_and_whitespace_in_overrides():
    assert parse_overrides([" train.epochs = 4 ", "a.b.c=1"]) == {"train": {"epochs": 4}, "a": {"b": {"c": 1}}}


# -- errors, each with its message ------------------------------------------------------------


def test_unknown_section_in_file(write):
    path = write("[trian]\nepochs = 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}: unknown section [trian]; did you mean 'train'? allowed sections: run, train")


def test_unknown_section_from_set_and_env():
    assert "--set trian: unknown section [trian]" in error_of(None, ["trian.epochs=1"])
    message = error_of(None, environ={"LVLMVA_TRIAN__EPOCHS": "1"})
    assert message.startswith("environment LVLMVA_TRIAN__EPOCHS: unknown section [trian]")


def test_unknown_key_in_a_core_section(write):
    path = write("[train]\nepohcs = 3\n")
    message = error_of(path)
    assert message == (
        f"{path}: train.epohcs = 3: unknown key; did you mean 'epochs'? "
        f"allowed keys: {', '.join(sorted(TrainOptions.model_fields))}"
    )


def test_unknown_key_in_a_plugin_section(write, registry):
    path = write('[critic]\nplugin = "fake"\nmodle = "gpt-5"\n')
    message = error_of(path, registry=registry)
    assert message == (
        f"{path}: critic.modle = 'gpt-5': unknown key (critic plugin 'fake'); "
        "did you mean 'model'? allowed keys: plugin, api_key_env, model, sizes, temperature"
    )


def test_a_misspelt_key_or_section_names_the_nearest_allowed_ones(write, registry):
    path = write('[critic]\nplugin = "fake"\ntemprature = 0.2\n')
    assert "did you mean 'temperature'? allowed keys:" in error_of(path, registry=registry)
    path = write('[critic]\nplugin = "fake"\nxyzzy = 1\n')
    assert "did you mean" not in error_of(path, registry=registry)  # nothing close: no guess
    assert "unknown section [trian]; did you mean 'train'? allowed sections:" in error_of(None, ["trian.epochs=1"])
    message = error_of(None, environ={"LVLMVA_MITIGATRS__X__PLUGIN": "erm"})
    assert "unknown section [mitigatrs]; did you mean 'mitigators'?" in message


def test_wrong_type_names_what_is_allowed(write):
    path = write('[train]\nepochs = "many"\n')
    message = error_of(path)
    assert f"{path}: train.epochs = 'many':" in message
    assert "valid integer" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("epochs = -1", "train.epochs = -1: Input should be greater than or equal to 0; allowed: >= 0"),
        ("lr = 0", "train.lr = 0: Input should be greater than 0; allowed: > 0.0"),
        ('resident = "sometimes"', "train.resident = 'sometimes': Input should be 'auto', 'always' or 'never'"),
    ],
)
def test_bounds_and_choices_name_what_is_allowed(write, line, expected):
    path = write(f"[train]\n{line}\n")
    assert error_of(path) == f"{path}: {expected}"


def test_bounds_in_a_plugin_section(write, registry):
    path = write('[critic]\nplugin = "fake"\ntemperature = 5\n')
    message = error_of(path, registry=registry)
    assert message == f"{path}: critic.temperature = 5: Input should be less than or equal to 2 (critic plugin 'fake'); allowed: <= 2.0"


def test_unknown_plugin_lists_registered_names(write, registry):
    path = write('[critic]\nplugin = "gpt"\n')
    message = error_of(path, registry=registry)
    assert message == f"{path}: critic.plugin = 'gpt': unknown critic plugin 'gpt'; registered: fake, other"


def test_missing_plugin_key(write, registry):
    path = write('[critic]\nmodel = "x"\n')
    assert error_of(path, registry=registry) == f'{path}: [critic] needs plugin = "name"; registered: fake, other'


def test_section_that_is_not_a_table(write):
    path = write("train = 5\n")
    assert error_of(path) == f"{path}: [train] must be a table of settings, not a int"
    # a value pasted where a table belongs is not echoed: it may be a key
    path = write('critic = "sk-secret-123"\n')
    err = error_of(path)
    assert "[critic] must be a table of settings, not a str" in err and "sk-secret" not in err


def test_invalid_toml(write):
    path = write("[train\nepochs = 1\n")
    assert error_of(path).startswith(f"{path}: not valid TOML:")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: no such settings file"


def test_every_problem_is_reported_at_once(write, registry):
    path = write('[train]\nepochs = -1\n[selection]\nn = 0\n[critic]\nplugin = "gpt"\n')
    lines = error_of(path, registry=registry).splitlines()
    assert [line.split(":")[1].strip().split(" ")[0] for line in lines] == ["train.epochs", "selection.n", "critic.plugin"]


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "token", "password"])
def test_secret_in_file_is_refused_without_echoing_it(write, registry, key):
    path = write(f'[critic]\nplugin = "fake"\n{key} = "sk-very-secret"\n')
    message = error_of(path, registry=registry)
    assert message.startswith(f"{path}: critic.{key}: secrets are read from the environment only")
    assert "api_key_env" in message
    assert "sk-very-secret" not in message


def test_secret_from_set_or_settings_env_is_refused(registry):
    message = error_of(None, ["critic.api_key=sk-very-secret"], registry=registry)
    assert message.startswith("--set: critic.api_key: secrets are read from the environment only")
    # a secret given as a setting would be written into settings.resolved.toml
    message = error_of(None, environ={"LVLMVA_CRITIC__API_KEY": "sk-very-secret"}, registry=registry)
    assert message.startswith("environment: critic.api_key: secrets")
    assert "sk-very-secret" not in message


def test_set_without_equals_sign():
    assert error_of(None, ["train.epochs"]) == "--set 'train.epochs': expected section.key=value"


@pytest.mark.parametrize("item", ["epochs=3", ".epochs=3", "train.=3"])
def test_set_without_a_section(item):
    assert error_of(None, [item]) == f"--set {item!r}: {item.split('=')[0]!r} must be 'section.key' (e.g. train.epochs)"


def test_bad_device_spelling():
    message = error_of(None, ["run.device=gpu"])
    assert message.startswith("--set run.device: run.device = 'gpu': Value error, 'gpu' is not a torch device")
    assert load(None, ["run.device=cuda:1"]).run.device == "cuda:1"  # CUDA presence is checked at run time


# -- provenance -------------------------------------------------------------------------------


def test_bad_value_from_env_names_the_variable(write):
    path = write("[train]\nepochs = 2\n")
    message = error_of(path, environ={"LVLMVA_TRAIN__EPOCHS": "-1"})
    assert message.startswith("environment LVLMVA_TRAIN__EPOCHS: train.epochs = -1:")


def test_bad_value_from_set_names_set(write):
    path = write("[train]\nepochs = 2\n")
    message = error_of(path, ["train.epochs=-1"], {"LVLMVA_TRAIN__EPOCHS": "4"})
    assert message.startswith("--set train.epochs: train.epochs = -1:")


def test_bad_file_value_overridden_by_a_good_one_is_fine(write):
    path = write("[train]\nepochs = -1\n")
    assert load(path, ["train.epochs=2"]).train.epochs == 2


def test_unknown_key_from_env_in_a_plugin_section(registry):
    env = {"LVLMVA_CRITIC__PLUGIN": "fake", "LVLMVA_CRITIC__MODLE": "x"}
    message = error_of(None, environ=env, registry=registry)
    assert message.startswith("environment LVLMVA_CRITIC__MODLE: critic.modle = 'x': unknown key")


# -- resolved settings ------------------------------------------------------------------------


def test_to_toml_round_trip(write, registry, tmp_path):
    path = write(
        '[run]\nname = "exp"\nseed = 3\n[train]\nepochs = 1\n[critic]\nplugin = "fake"\nsizes = [7]\n'
    )
    settings = load(path, ["critic.temperature=1.5", "render.palette=[\"red\", \"blue\"]"], {"LVLMVA_SELECTION__N": "9"}, registry)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(settings.to_toml())
    again = load(resolved, registry=registry)
    assert again.as_dict() == settings.as_dict()
    assert set(again.as_dict()) == {*CORE_SECTIONS, "critic"}
    assert again.plugins["critic"].options.temperature == 1.5
    assert again.selection.n == 9 and again.run.seed == 3


def test_run_name_defaults_to_the_file_stem(write):
    assert load(write("", "my-experiment.toml")).run_name == "my-experiment"


def test_text_that_parses_as_another_type_is_kept_for_string_options(registry):
    # "true" is a TOML bool, but masks.source = "true" is a string choice; 2024 a run name
    settings = load(None, ["masks.source=true", "run.name=2024", "critic.plugin=fake", "critic.model=5"], registry=registry)
    assert (settings.masks.source, settings.run.name) == ("true", "2024")
    assert settings.plugins["critic"].options.model == "5"
    assert load(None, environ={"LVLMVA_MASKS__SOURCE": "true"}).masks.source == "true"
    # numbers stay numbers where numbers are asked for, and bad text is still an error
    assert load(None, ["train.epochs=4"]).train.epochs == 4
    assert "--set train.epochs: train.epochs = 'four'" in error_of(None, ["train.epochs=four"])
    # a file's value is TOML already: no second guess
    with pytest.raises(SettingsError, match="masks.source = True"):
        load_settings(None, {"masks": {"source": True}}, environ={}, registry=registry)


# -- named instances -------------------------------------------------------------------------


class FakeMitigator:
    """A mitigator with one option."""

    class Options(PluginOptions):
        upweight: float = Field(20.0, description="How much.")
        lr: float = Field(1e-3, description="Learning rate.")

    needs_groups = False
    needs_validation = False

    def __init__(self, options) -> None:
        self.options = options

    def mitigate(self, original, trainer, data, ctx):
        return original


class SlimMitigator(FakeMitigator):
    """A mitigator without upweight."""

    class Options(PluginOptions):
        lr: float = Field(1e-3, description="Learning rate.")


@pytest.fixture
def mitigators(registry) -> PluginRegistry:
    registry.add("mitigator", "jtt", FakeMitigator)
    registry.add("mitigator", "dfr", FakeMitigator)
    registry.add("mitigator", "slim", SlimMitigator)
    return registry


TWO = '[mitigators.jtt]\nplugin = "jtt"\nupweight = 50.0\n[mitigators.dfr]\nplugin = "dfr"\n'


def test_named_instances_from_the_file_set_and_environment(write, mitigators):
    path = write(TWO)
    settings = load(path, registry=mitigators)
    assert list(settings.instances("mitigator")) == ["jtt", "dfr"]
    assert settings.plugins["mitigators.jtt"].options.upweight == 50.0
    assert settings.plugins["mitigators.jtt"].instance == "jtt"
    env = {"LVLMVA_MITIGATORS__JTT__UPWEIGHT": "70", "LVLMVA_MITIGATORS__DFR__LR": "0.5"}
    settings = load(path, ["mitigators.jtt.upweight=90"], env, mitigators)
    assert settings.plugins["mitigators.jtt"].options.upweight == 90.0  # --set > environment
    assert settings.plugins["mitigators.dfr"].options.lr == 0.5
    assert settings.plugins["mitigators.dfr"].options.upweight == 20.0  # one instance's keys stay its own
    # a new instance from the command line alone
    settings = load(path, ["mitigators.extra.plugin=jtt"], registry=mitigators)
    assert list(settings.instances("mitigator")) == ["jtt", "dfr", "extra"]
    assert settings.as_dict()["mitigators"]["jtt"] == {"plugin": "jtt", "upweight": 50.0, "lr": 1e-3}


def test_errors_in_an_instance_name_the_dotted_key_and_its_source(write, mitigators):
    path = write(TWO)
    err = error_of(path, environ={"LVLMVA_MITIGATORS__JTT__UPWEIGHTT": "1"}, registry=mitigators)
    assert err.startswith("environment LVLMVA_MITIGATORS__JTT__UPWEIGHTT: mitigators.jtt.upweightt = 1: unknown key")
    assert "allowed keys: plugin, lr, upweight" in err
    err = error_of(path, ["mitigators.dfr.plugin=nope"], registry=mitigators)
    assert "--set mitigators.dfr.plugin: mitigators.dfr.plugin = 'nope': unknown mitigator plugin 'nope'" in err


def test_switching_an_instances_plugin_drops_the_old_plugins_keys(write, mitigators):
    settings = load(write(TWO), ["mitigators.jtt.plugin=slim"], registry=mitigators)
    assert settings.plugins["mitigators.jtt"].name == "slim"
    assert settings.plugins["mitigators.dfr"].name == "dfr"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[mitigators.JTT]\nplugin = "jtt"\n', "[mitigators.JTT]: an instance name is lower-case letters"),
        ('[mitigators.original]\nplugin = "jtt"\n', "'original' names one of the run's own models"),
        ("[mitigators]\njtt = 3\n", "mitigators.jtt must be a table with plugin"),
        ("[mitigators.jtt]\nupweight = 3.0\n", "[mitigators.jtt] needs plugin = \"name\"; registered: dfr, jtt, slim"),
    ],
)
def test_bad_instances(write, mitigators, text, message):
    assert message in error_of(write(text), registry=mitigators)


def test_the_old_singular_sections_say_how_to_write_them_now(write, mitigators):
    err = error_of(write('[mitigator]\nplugin = "jtt"\nupweight = 50.0\n'), registry=mitigators)
    assert "[mitigator] is written [mitigators.<name>] now, one table per named instance; replace it with:" in err
    assert '[mitigators.jtt]\n    plugin = "jtt"\n    upweight = 50.0' in err
    err = error_of(None, environ={"LVLMVA_EVALUATOR__PLUGIN": "x"}, registry=mitigators)
    assert "[evaluator] is written [evaluators.<name>] now" in err


def test_a_renamed_key_says_its_new_name(write):
    assert error_of(write("[masks]\ntrue_mask_bound = false\n")).endswith(
        "masks.true_mask_bound was renamed: write masks.true_mask_reference"
    )


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", ".", " "])
def test_a_run_name_is_one_folder_name(write, name):
    assert "must be one folder name" in error_of(write(f'[run]\nname = "{name}"\n'))


def test_a_settings_file_that_is_not_utf8_is_named(write, tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    assert error_of(path) == f"{path}: not UTF-8 text (byte 17 is 0xe9); save the settings file as UTF-8"
    assert error_of(tmp_path) == f"{tmp_path}: is a folder, not a settings file"


def test_a_redacted_options_value_is_not_echoed(write, registry):
    class Keyed(FakeCritic):
        class Options(PluginOptions):
            api_key_env: str = Field("X", pattern=r"^[A-Z_]+$", json_schema_extra={"redact_errors": True})

    registry.add("critic", "keyed", Keyed)
    err = error_of(write('[critic]\nplugin = "keyed"\napi_key_env = "sk-secret-value"\n'), registry=registry)
    assert "critic.api_key_env = <hidden>" in err and "sk-secret-value" not in err


# -- numbers: finite, and never a boolean ----------------------------------------------------


class NumberCritic(FakeCritic):
    """A critic with numbers inside a union, a list and a table."""

    class Options(PluginOptions):
        lam: float | tuple[float, ...] = Field(1.0, description="One weight or a grid.")
        weights: dict[str, float] = Field(default_factory=dict, description="Weights by name.")
        channels: Literal[1, 3] = Field(1, description="Channels.")
        flag: bool = Field(False, description="A switch.")


@pytest.fixture
def numbers(registry) -> PluginRegistry:
    registry.add("critic", "numbers", NumberCritic)
    return registry


@pytest.mark.parametrize("text", ["inf", "+inf", "-inf", "nan"])
@pytest.mark.parametrize("key, allowed", [("lr", "> 0"), ("weight_decay", ">= 0")])
def test_a_non_finite_float_in_a_file_is_refused(write, text, key, allowed):
    path = write(f"[train]\n{key} = {text}\n")
    shown = repr(float(text))
    assert error_of(path) == f"{path}: train.{key} = {shown}: Input should be a finite number; allowed: a finite number {allowed}"


def test_a_non_finite_float_from_set_or_the_environment_is_refused(write):
    path = write("[train]\nlr = 0.1\n")
    assert error_of(path, ["train.lr=inf"]) == "--set train.lr: train.lr = inf: Input should be a finite number; allowed: a finite number > 0"
    assert error_of(path, environ={"LVLMVA_TRAIN__LR": "nan"}) == (
        "environment LVLMVA_TRAIN__LR: train.lr = nan: Input should be a finite number; allowed: a finite number > 0"
    )
    assert error_of(None, ["render.overlay_alpha=-inf"]).endswith("allowed: a finite number >= 0 and <= 1")


def test_a_non_finite_float_in_a_plugin_section_is_refused(write, numbers):
    path = write('[critic]\nplugin = "fake"\ntemperature = inf\n')
    assert error_of(path, registry=numbers) == (
        f"{path}: critic.temperature = inf: Input should be a finite number (critic plugin 'fake'); allowed: a finite number >= 0 and <= 2"
    )
    # inside a union, a grid and a table; the union's branch names stay out of the key, and
    # the branch that only says "not a tuple" is left out
    message = error_of(None, ["critic.plugin=numbers", "critic.lam=inf"], registry=numbers)
    assert message == "--set critic.lam: critic.lam = inf: Input should be a finite number (critic plugin 'numbers')"
    message = error_of(None, ["critic.plugin=numbers", "critic.lam=[1, nan]"], registry=numbers)
    assert message == "--set critic.lam: critic.lam.1 = nan: Input should be a finite number (critic plugin 'numbers')"
    path = write('[critic]\nplugin = "numbers"\n[critic.weights]\na = 1.0\nb = -inf\n', "table.toml")
    assert error_of(path, registry=numbers) == (
        f"{path}: critic.weights.b = -inf: Input should be a finite number (critic plugin 'numbers')"
    )
    # finite values still load
    options = load(None, ["critic.plugin=numbers", "critic.lam=[1, 1e300]"], registry=numbers).plugins["critic"].options
    assert options.lam == (1.0, 1e300)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("epochs = true", "train.epochs = True: a boolean is not a number; allowed: an integer >= 0"),
        ("batch_size = false", "train.batch_size = False: a boolean is not a number; allowed: an integer >= 1"),
        ("lr = true", "train.lr = True: a boolean is not a number; allowed: a number > 0"),
    ],
)
def test_a_boolean_for_a_number_in_a_file_is_refused(write, line, expected):
    path = write(f"[train]\n{line}\n")
    assert error_of(path) == f"{path}: {expected}"


def test_a_boolean_for_a_number_from_set_or_the_environment_is_refused():
    expected = "train.epochs = True: a boolean is not a number; allowed: an integer >= 0"
    assert error_of(None, ["train.epochs=true"]) == f"--set train.epochs: {expected}"
    assert error_of(None, environ={"LVLMVA_TRAIN__EPOCHS": "true"}) == f"environment LVLMVA_TRAIN__EPOCHS: {expected}"
    # a list item names the list's source and its index
    assert error_of(None, ["study.seeds=[0, true]"]) == (
        "--set study.seeds: study.seeds.1 = True: a boolean is not a number; allowed: an integer"
    )
    assert error_of(None, environ={"LVLMVA_STUDY__SEEDS": "[false]"}).startswith("environment LVLMVA_STUDY__SEEDS: study.seeds.0 = False")


def test_a_boolean_for_a_number_in_a_plugin_section_is_refused(write, numbers):
    path = write('[critic]\nplugin = "numbers"\nlam = true\nchannels = true\nweights = {a = false}\n')
    assert error_of(path, registry=numbers).splitlines() == [
        f"{path}: critic.lam = True: a boolean is not a number (critic plugin 'numbers')",
        f"{path}: critic.weights.a = False: a boolean is not a number (critic plugin 'numbers')",
        f"{path}: critic.channels = True: a boolean is not a number (critic plugin 'numbers'); allowed: 1 or 3",
    ]
    assert "critic.sizes.1 = True: a boolean is not a number" in error_of(None, ["critic.plugin=fake", "critic.sizes=[1, true]"], registry=numbers)
    # booleans still go where booleans are asked for, numbers where numbers are
    options = load(write('[critic]\nplugin = "numbers"\nflag = true\nlam = 2\nchannels = 3\n'), registry=numbers).plugins["critic"].options
    assert (options.flag, options.lam, options.channels) == (True, 2.0, 3)


#: float options where infinity means "no limit": (section, plugin, key)
INFINITY_MEANS_NO_LIMIT = {
    ("critic", "openai", "timeout_s"),
    ("critic", "openai", "backoff_max_s"),
    ("critic", "openai", "max_cost_usd"),
    ("judge", "openai", "timeout_s"),
    ("judge", "openai", "backoff_max_s"),
    ("judge", "openai", "max_cost_usd"),
}

_NONE = object()


def _holding(annotation: Any, leaves: tuple[type, ...], value: Any) -> Any:
    """A value of type ``annotation`` with ``value`` where a ``leaves`` type (or a number
    literal) goes, or ``_NONE`` when the type holds none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in leaves:
        return value
    if origin is Literal:
        numbers = any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        return value if int in leaves and numbers else _NONE
    if origin is typing.Annotated:
        return _holding(args[0], leaves, value)
    if origin in (typing.Union, types.UnionType):
        return next((v for a in args if (v := _holding(a, leaves, value)) is not _NONE), _NONE)
    if origin in (list, tuple, set, frozenset):
        inner = _holding(args[0], leaves, value) if args else _NONE
        return _NONE if inner is _NONE else [inner]
    if origin is dict:
        inner = _holding(args[1], leaves, value)
        return _NONE if inner is _NONE else {"k": inner}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            inner = _holding(field.annotation, leaves, value)
            if inner is not _NONE:
                return {name: inner}
    return _NONE


def _every_options_model() -> list[tuple[str, str, type[BaseModel]]]:
    """(section, plugin, Options) of every core section and every built-in plugin."""
    registry = get_registry()
    out = [(section, "", model) for section, model in {**CORE_SECTIONS, **registry.stage_sections()}.items()]
    for role in ROLES:
        for name in registry.names(role):
            out.append((role, name, registry.get(role, name).Options))
    return out


def _refused(model: type[BaseModel], key: str, value: Any) -> bool:
    try:
        model.model_validate({key: value})
    except ValidationError as exc:
        return any(err["loc"][:1] == (key,) for err in exc.errors())
    return False


def test_every_float_option_refuses_non_finite_values_unless_it_means_no_limit():
    checked, wrong = set(), []
    for section, plugin, model in _every_options_model():
        for key, field in model.model_fields.items():
            for bad in (math.inf, -math.inf, math.nan):
                value = _holding(field.annotation, (float,), bad)
                if value is _NONE:
                    continue
                checked.add((section, plugin, key))
                exception = (section, plugin, key) in INFINITY_MEANS_NO_LIMIT and bad == math.inf
                if _refused(model, key, value) == exception:
                    wrong.append(f"{section} {plugin} {key} = {value!r}: {'refused' if exception else 'accepted'}")
    assert wrong == []
    assert INFINITY_MEANS_NO_LIMIT <= checked
    assert {("train", "", "lr"), ("train", "", "weight_decay"), ("aligner", "rrr", "lam")} <= checked


def test_every_number_option_refuses_a_boolean():
    checked, wrong = set(), []
    for section, plugin, model in _every_options_model():
        for key, field in model.model_fields.items():
            value = _holding(field.annotation, (int, float), True)
            if value is _NONE:
                continue
            checked.add((section, plugin, key))
            if not _refused(model, key, value):
                wrong.append(f"{section} {plugin} {key} = {value!r}: accepted")
    assert wrong == []
    assert {("train", "", "epochs"), ("study", "", "seeds"), ("dataset", "knee-folder", "channels")} <= checked


def test_infinity_means_no_limit_where_an_option_says_so(write):
    path = write('[critic]\nplugin = "openai"\ntimeout_s = inf\nbackoff_max_s = inf\nmax_cost_usd = 5.0\n')
    settings = load_settings(path, ["critic.max_cost_usd=inf"], environ={})
    options = settings.plugins["critic"].options
    assert (options.timeout_s, options.backoff_max_s, options.max_cost_usd) == (math.inf, math.inf, math.inf)
    # the resolved settings keep it
    again = write(settings.to_toml(), "resolved.toml")
    assert load_settings(again, environ={}).plugins["critic"].options.timeout_s == math.inf
    # nan and -inf are still refused there, by the bounds
    for key, value, words in (("timeout_s", "nan", "greater than 0"), ("backoff_max_s", "-inf", "greater than or equal to 0"), ("max_cost_usd", "nan", "greater than or equal to 0")):
        with pytest.raises(SettingsError, match=rf"--set critic.{key}: critic.{key} = {value}: Input should be {words}"):
            load_settings(path, [f"critic.{key}={value}"], environ={})


# -- file encoding ----------------------------------------------------------------------------


def test_a_utf8_file_with_a_byte_order_mark_loads(tmp_path):
    # what Windows Notepad saves as "UTF-8" (with BOM), Windows line ends included
    path = tmp_path / "notepad.toml"
    path.write_bytes(codecs.BOM_UTF8 + '[run]\r\nname = "café"\r\n[train]\r\nepochs = 2\r\n'.encode())
    settings = load(path)
    assert (settings.run.name, settings.train.epochs) == ("café", 2)
    # only one mark is taken away: a second one is text, and an error
    path.write_bytes(codecs.BOM_UTF8 * 2 + b"[train]\nepochs = 2\n")
    assert error_of(path).startswith(f"{path}: not valid TOML: Invalid statement (at line 1, column 1)")
    # bytes that are not UTF-8 after the mark are named by their place in the file
    path.write_bytes(codecs.BOM_UTF8 + '[run]\nname = "café"\n'.encode("latin-1"))
    assert error_of(path) == f"{path}: not UTF-8 text (byte 20 is 0xe9); save the settings file as UTF-8"


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_file_in_another_unicode_encoding_is_named(tmp_path, encoding, name):
    path = tmp_path / "unicode.toml"
    text = "[train]\nepochs = 2\n"
    path.write_bytes(text.encode(encoding) if encoding != "utf-16-be" else codecs.BOM_UTF16_BE + text.encode(encoding))
    assert error_of(path) == f"{path}: {name} text (it starts with a {name} byte order mark); save the settings file as UTF-8"
