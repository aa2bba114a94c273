"""Codecs that plugin stages bring: ``add_stage`` registers them (and refuses a second, different
codec under one name), and a finished run whose plugin stage was stored with the plugin's own
codec is read in a fresh process through the installed plugins."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva import hookimpl  # noqa: E402
from lvlmva.pipeline import Pipeline, Stage, codecs, open_run  # noqa: E402
from lvlmva.registry import PluginError, PluginRegistry, get_registry, register_module  # noqa: E402
from lvlmva.settings import load_settings  # noqa: E402

#: a third party's plugin module: a stage after the judge, stored with a codec of its own (one
#: text line per verdict), which no module of lvlmva knows
PLUGIN_SOURCE = '''
from pathlib import Path

from lvlmva import hookimpl
from lvlmva.pipeline import Stage


class VerdictLines:
    name = "verdict-lines"

    def encode(self, value, folder):
        (Path(folder) / "lines.txt").write_text("".join(line + "\\n" for line in value), encoding="utf-8")

    def decode(self, folder, ctx):
        return (Path(folder) / "lines.txt").read_text(encoding="utf-8").splitlines()


def _lines(call):
    return [f"{v.sample_id}: {v.relevant}" for v in call["judge"]]


LINES_STAGE = Stage("lines", _lines, inputs=("judge",), codec=VerdictLines())


@hookimpl
def lvlmva_register(registry):
    registry.add_stage(LINES_STAGE, after="judge")
'''
PLUGIN_MODULE = "verdict_lines_plugin"


class Text:
    name = "toy-text"

    def encode(self, value, folder):
        (folder / "note.txt").write_text(value)

    def decode(self, folder, ctx):
        return (folder / "note.txt").read_text()


class OtherText(Text):
    """Stores like Text under the same name, but is another class: another plugin's codec."""


def _stage(name: str, codec) -> Stage:
    return Stage(name, lambda call: "", inputs=("judge",), codec=codec)


def _registry(source: tuple[str, str, str] = ("note-dist", "1.0", "note_plugin")) -> PluginRegistry:
    registry = PluginRegistry()
    registry._source = source
    return registry


# -- add_stage ----------------------------------------------------------------------------------


def test_add_stage_registers_the_stages_own_codec():
    registry = _registry()
    text = Text()
    registry.add_stage(_stage("note", text), after="judge")
    assert registry.codec("toy-text") is text
    (entry,) = registry.codec_sources().values()
    assert (entry.name, entry.distribution, entry.source) == ("note", "note-dist", "note_plugin")
    assert registry.codec("json") is None and registry.codec("other") is None


def test_the_same_codec_under_two_stages_is_one_codec():
    registry = _registry()
    registry.add_stage(_stage("note", Text()), after="judge")
    registry.add_stage(_stage("second-note", Text()), after="note")  # an equal instance
    assert list(registry.codec_sources()) == ["toy-text"]
    assert registry.codec_sources()["toy-text"].name == "note"


def test_a_second_different_codec_under_one_name_is_refused_naming_both_plugins():
    registry = _registry()
    registry.add_stage(_stage("note", Text()), after="judge")
    registry._source = ("other-dist", "2.0", "other_plugin")
    with pytest.raises(PluginError) as info:
        registry.add_stage(_stage("other-note", OtherText()), after="judge")
    message = str(info.value)
    assert message.startswith("two different codecs named 'toy-text': ")
    assert "Text of note_plugin (note-dist 1.0) for stage 'note'" in message
    assert "OtherText of other_plugin (other-dist 2.0) for stage 'other-note'" in message
    # nothing of the refused stage stays
    assert [e.name for e in registry.stages()] == ["note"] and isinstance(registry.codec("toy-text"), Text)


def test_a_plugin_codec_may_not_take_the_name_of_lvlmvas_own():
    registry = _registry()

    class Json(Text):
        name = "json"

    with pytest.raises(PluginError, match="with a codec named 'json', the name of one of lvlmva's own codecs"):
        registry.add_stage(_stage("note", Json()), after="judge")
    # lvlmva's own codecs are used as they are, and are not a plugin's
    registry.add_stage(_stage("note", codecs.JSON), after="judge")
    registry.add_stage(_stage("verdicts-copy", codecs.VERDICTS), after="judge")
    assert registry.codec_sources() == {}


def test_a_codec_without_encode_or_decode_is_refused():
    class NoDecode:
        name = "half"

        def encode(self, value, folder):
            pass

    with pytest.raises(PluginError, match="adds stage 'note' with a codec that has no name, encode"):
        _registry().add_stage(_stage("note", NoDecode()), after="judge")


def test_a_refused_plugin_leaves_no_codec_behind(fresh_plugins):
    def register(registry):
        registry.add_stage(_stage("note", Text()), after="judge")
        registry.add_stage(_stage("other-note", OtherText()), after="judge")

    module = types.ModuleType("clashing_codecs")
    module.lvlmva_register = hookimpl(register)
    with pytest.raises(PluginError, match="two different codecs named 'toy-text'"):
        register_module(module, "clashing")
    assert get_registry().codec("toy-text") is None and "note" not in [e.name for e in get_registry().stages()]


# -- a finished run, read in a fresh process -----------------------------------------------------


@pytest.fixture
def finished_run(tmp_path, monkeypatch) -> tuple[Path, Path, list[str]]:
    """A run with the plugin's stage, made in this process: (run directory, the folder that
    holds the plugin module, the stage's lines as this process read them)."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)
    # the pipeline registers a plugin stage's codec for this process too: keep it to this test
    monkeypatch.setattr(codecs, "_BY_NAME", dict(codecs._BY_NAME))
    plugin = importlib.import_module(PLUGIN_MODULE)
    registry = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=registry)
    plugin.lvlmva_register(registry=registry)
    settings_file = tmp_path / "toy.toml"
    cache = (tmp_path / "cache").as_posix()
    settings_file.write_text(pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{cache}"\n', 1))
    settings = load_settings(settings_file, environ={}, registry=registry)
    run_dir = tmp_path / "run"
    Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None).run()
    assert json.loads((run_dir / "lines" / "fingerprint.json").read_text())["codec"] == "verdict-lines"
    lines = open_run(run_dir).load("lines", registry=registry)
    assert len(lines) == 12 and lines[0].startswith(f"{open_run(run_dir).load('judge')[0].sample_id}: ")
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE)
    return run_dir, plugin_dir, lines


def _fresh_load(run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import json, sys\n"
        "from lvlmva.pipeline import ArtifactError, open_run\n"
        f"run = open_run({str(run_dir)!r})\n"
        f"assert {PLUGIN_MODULE!r} not in sys.modules\n"
        "try:\n"
        "    lines = run.load('lines')\n"
        "except ArtifactError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))\n"
        "else:\n"
        f"    print(json.dumps({{'lines': lines, 'imported': {PLUGIN_MODULE!r} in sys.modules}}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def _env(plugin_dir: Path | None = None) -> dict[str, str]:
    """This process's environment, with the plugin module installed (``LVLMVA_PLUGINS`` and
    importable) when ``plugin_dir`` is given, and without it otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "LVLMVA_PLUGINS"}
    if plugin_dir is not None:
        env["LVLMVA_PLUGINS"] = PLUGIN_MODULE
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(plugin_dir), env.get("PYTHONPATH"))))
    return env


def test_a_fresh_process_reads_a_plugin_stage_through_the_installed_plugins(finished_run):
    run_dir, plugin_dir, lines = finished_run
    # installed here as LVLMVA_PLUGINS: the module is importable, and no one imports it but the
    # registry that open_run(...).load loads
    out = _fresh_load(run_dir, _env(plugin_dir))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"lines": lines, "imported": True}


def test_a_fresh_process_without_the_plugin_names_the_codec_and_the_stage(finished_run):
    run_dir, _, _ = finished_run
    out = _fresh_load(run_dir, _env())
    assert out.returncode == 0, out.stderr
    error = json.loads(out.stdout)["error"]
    assert error == (
        f"{run_dir / 'lines'}: stage 'lines' is stored with codec 'verdict-lines', which neither "
        "lvlmva nor an installed plugin provides (codecs of installed plugins' stages: none); "
        "install the plugin that added stage 'lines'"
    )
