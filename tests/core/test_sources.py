"""Fingerprints that follow the code: an edit of a plugin installed in editable mode (or loaded
through ``LVLMVA_PLUGINS``) recomputes the stages that use it and what reads them, nothing before;
a released install keeps its version as the fingerprint; ``--recompute`` forces stages."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main
from lvlmva.pipeline import Pipeline, stages
from lvlmva.pipeline.sources import SourceTracker, tracker
from lvlmva.registry import get_registry, reset_plugins
from lvlmva.settings import load_settings

from .conftest import TOY_PACKAGE, TOY_PROJECT, toy_metadata, write_distribution


def _install_toy(tmp_path: Path, editable: bool) -> tuple[Path, Path]:
    """The example plugin as a user has it: its source in a checkout, and a site folder with its
    metadata; ``editable`` adds the ``direct_url.json`` pip writes for ``pip install -e``."""
    checkout = tmp_path / "checkout"
    shutil.copytree(TOY_PROJECT / "src" / TOY_PACKAGE, checkout / "src" / TOY_PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    name, version, eps = toy_metadata()
    site = write_distribution(tmp_path / "site", name, version, eps)
    if editable:
        info = next(site.glob("*.dist-info"))
        (info / "direct_url.json").write_text(json.dumps({"url": checkout.as_uri(), "dir_info": {"editable": True}}))
    return site, checkout / "src" / TOY_PACKAGE


def _compose(site: Path, package: Path, run_dir: Path, tmp_path: Path, *extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLMVA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(package.parent)])
    result = subprocess.run(
        [sys.executable, "-m", "lvlmva.cli", "compose", str(TOY_PROJECT / "toy.toml"), "--out", str(run_dir),
         "--set", f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}", *extra],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stderr
    return _statuses(result.stderr)


def _statuses(text: str) -> dict[str, str]:
    """Stage -> computed | reused | skipped, from the stage lines a run prints."""
    words = {"+": "computed", "=": "reused", "-": "skipped"}
    return {m.group(2): words[m.group(1)] for m in re.finditer(r"^  ([+=-]) (\S+)", text, re.M)}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_an_edit_of_an_editable_plugin_recomputes_its_stage_and_what_reads_it(tmp_path):
    site, package = _install_toy(tmp_path, editable=True)
    run_dir = tmp_path / "run"
    first = _compose(site, package, run_dir, tmp_path)
    assert first["train"] == first["evaluate.accuracy"] == first["results"] == "computed"
    env = json.loads((run_dir / "env.json").read_text())["code_fingerprints"]
    evaluator = env["plugins"]["evaluators.accuracy"]
    assert evaluator["fingerprinted_by"] == "source" and evaluator["install"].startswith("editable")
    assert f"{TOY_PACKAGE}.evaluate" in evaluator["modules"]
    assert f"{TOY_PACKAGE}.stripes" not in evaluator["modules"]  # its own files, not the package's

    # the evaluator's code changes what it reports: its stage and the results are recomputed,
    # the data set and the model are not
    _edit(package / "evaluate.py", '"samples": len(split),', '"samples": len(split) * 1000,')
    second = _compose(site, package, run_dir, tmp_path)
    assert second["evaluate.accuracy"] == second["results"] == "computed"
    assert second["train"] == "reused"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["evaluations"]["accuracy"]["models"]["original"]["samples"] == 64 * 1000

    # an edit of the data set provider recomputes everything after the data set
    (package / "stripes.py").write_text((package / "stripes.py").read_text() + "\n#: an edit\nEDITED = True\n")
    third = _compose(site, package, run_dir, tmp_path)
    assert third["train"] == "computed"

    # nothing edited: everything reused
    fourth = _compose(site, package, run_dir, tmp_path)
    assert set(fourth.values()) <= {"reused", "skipped"}


def test_a_released_install_keeps_its_version_as_the_fingerprint(tmp_path):
    site, package = _install_toy(tmp_path, editable=False)
    run_dir = tmp_path / "run"
    _compose(site, package, run_dir, tmp_path)
    env = json.loads((run_dir / "env.json").read_text())["code_fingerprints"]
    assert env["plugins"]["evaluators.accuracy"]["fingerprinted_by"] == "version"
    assert "modules" not in env["plugins"]["evaluators.accuracy"]
    # the code under a released version cannot change: an edit is not looked for
    _edit(package / "evaluate.py", '"samples": len(split),', '"samples": len(split) * 1000,')
    again = _compose(site, package, run_dir, tmp_path)
    assert again["evaluate.accuracy"] == "reused"


@pytest.fixture
def lvlmva_plugins_module(tmp_path, monkeypatch, fresh_plugins):
    """An evaluator under development, loaded through ``LVLMVA_PLUGINS`` from a plain folder."""
    folder = tmp_path / "dev"
    folder.mkdir()
    (folder / "dev_eval_helpers.py").write_text("SCALE = 1\n")
    (folder / "dev_eval_plugin.py").write_text(
        "from lvlmva import hookimpl\n"
        "from lvlmva_toy.evaluate import AccuracyEvaluator\n"
        "import dev_eval_helpers\n\n"
        "class DevEvaluator(AccuracyEvaluator):\n"
        "    '''Accuracy, under development.'''\n\n"
        "@hookimpl\n"
        "def lvlmva_register(registry):\n"
        "    registry.add('evaluator', 'dev-eval', DevEvaluator)\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.syspath_prepend(str(TOY_PROJECT / "src"))
    monkeypatch.setenv("LVLMVA_PLUGINS", f"{TOY_PACKAGE}.plugin,dev_eval_plugin")
    reset_plugins()
    yield folder
    for name in ("dev_eval_plugin", "dev_eval_helpers"):
        sys.modules.pop(name, None)


def test_a_module_loaded_through_lvlmva_plugins_is_fingerprinted_by_its_source(lvlmva_plugins_module, tmp_path):
    registry = get_registry()
    assert registry.entry("evaluator", "dev-eval").distribution == "LVLMVA_PLUGINS"
    settings_file = TOY_PROJECT / "toy.toml"
    overrides = ["evaluators.accuracy.plugin=dev-eval", f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}"]

    def pipeline() -> Pipeline:
        registry = get_registry()
        settings = load_settings(settings_file, overrides, environ={}, registry=registry)
        return Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)

    first = pipeline()
    first.run()
    assert first._code.record()["plugins"]["evaluators.accuracy"]["fingerprinted_by"] == "source"
    assert {o.status for o in pipeline().plan()} <= {"reused", "skipped"}
    # a module it imports from its own folder is part of it too
    helpers = lvlmva_plugins_module / "dev_eval_helpers.py"
    helpers.write_text("SCALE = 2\n")
    os.utime(helpers, ns=(time.time_ns(), time.time_ns() + 10**9))
    # this process still runs the code it imported: its fingerprint is that code's
    assert {o.status for o in pipeline().plan()} <= {"reused", "skipped"}
    # a new process (here: the modules imported again) runs the edit, and recomputes for it
    for name in ("dev_eval_plugin", "dev_eval_helpers"):
        sys.modules.pop(name, None)
    reset_plugins()
    plan = {o.name: o.status for o in pipeline().plan()}
    assert plan["evaluate.accuracy"] == "pending" and plan["train"] == "reused"


def test_built_in_plugins_and_stages_hash_their_own_modules_not_the_whole_tree():
    track = tracker()
    track.begin()
    registry = get_registry()
    rrr = track.for_class(registry.get("aligner", "rrr"))
    dfr = track.for_class(registry.get("mitigator", "dfr"))
    assert rrr is not None and dfr is not None
    assert "lvlmva.plugins.aligners.rrr" in rrr.modules and "lvlmva.training" in rrr.modules
    assert not any("mitigators" in m for m in rrr.modules)  # editing DFR does not recompute RRR
    assert "lvlmva.plugins.mitigators.validation" in dfr.modules and "lvlmva.plugins.aligners.rrr" not in dfr.modules
    # a stage function: its own source and what it uses, not every function of its module
    train = track.for_function(stages._train)
    assert train is not None and "lvlmva.pipeline.stages:_train" in train.modules
    assert "lvlmva.training" in train.modules and "lvlmva.report" not in train.modules
    assert not any(m.startswith("lvlmva.pipeline.stages:_align") for m in train.modules)
    # released code (torch) is never read: its version counts
    assert track.for_class(torch.nn.Linear) is None
    assert "torch" not in " ".join(rrr.modules)


STAGE_MODULE = """\
import functools

LIMIT = 7


def helper():
    return 1


def other():
    return 2


@functools.cache
def cached():
    return 5


_TABLE = {"a": helper}


class Local:
    SCALE = 3

    def go(self):
        return 4


square = lambda x: x * x  # noqa: E731
cube = lambda x: x * x * x  # noqa: E731


def run(call):
    # a comment
    return helper() + LIMIT + cached() + _TABLE["a"]() + Local().go() + Local.SCALE + square(2) + cube(2)
"""


def _stage_hash(folder: Path, text: str) -> str:
    """The hash of ``run`` in a module of ``text``, imported fresh, as a new process would."""
    name = "stagemod_case"
    folder.mkdir()
    (folder / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(name)
        track = SourceTracker()
        track.add(folder / f"{name}.py")
        code = track.for_function(module.run)
        assert code is not None
        return code.sha256
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "old, new, changes",
    [
        ("    return 2\n", "    return 3\n", False),  # a function run does not call
        ("# a comment", "# another comment", False),  # text that compiles to the same code
        ("LIMIT = 7", "LIMIT = 8", True),  # a module constant it reads
        ("    return 1\n", "    return 10\n", True),  # a function it calls, directly and through a table
        ("    return 5\n", "    return 6\n", True),  # a cached helper (functools.cache wraps it)
        ("    SCALE = 3", "    SCALE = 4", True),  # a class attribute
        ("        return 4\n", "        return 5\n", True),  # a method of a class of the module
        ("lambda x: x * x  #", "lambda x: x * x + 0  #", True),  # one of two lambdas
        ("lambda x: x * x * x", "lambda x: x * x * x + 0", True),  # the other
    ],
)
def test_what_a_stage_function_edit_changes(tmp_path, old, new, changes):
    assert old in STAGE_MODULE
    before = _stage_hash(tmp_path / "a", STAGE_MODULE)
    after = _stage_hash(tmp_path / "b", STAGE_MODULE.replace(old, new))
    assert (before != after) == changes


def test_stage_hashes_do_not_depend_on_the_hash_seed(tmp_path):
    """Module-level lambdas share one name and sets iterate in hash order: neither may make a
    fingerprint differ between two processes."""
    (tmp_path / "seeded_stage.py").write_text(STAGE_MODULE + "\nNAMES = frozenset({'a', 'b', 'c', 'd'})\n\ndef run2(call):\n    return NAMES, {'x', 'y', 'z'}\n")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import seeded_stage\n"
        "from pathlib import Path\nfrom lvlmva.pipeline.sources import SourceTracker\n"
        "t = SourceTracker(); t.add(Path(sys.argv[1]) / 'seeded_stage.py')\n"
        "print(t.for_function(seeded_stage.run).sha256, t.for_function(seeded_stage.run2).sha256)\n"
    )
    outputs = set()
    for seed in ("0", "1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_recompute_forces_named_stages_and_what_reads_them(toy_registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["compose", str(toy_registered), "--out", str(run_dir), "--set", f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}"]
    assert main(base) == EXIT_OK
    capsys.readouterr()
    assert main([*base, "--recompute", "evaluate.accuracy"]) == EXIT_OK
    done = _statuses(capsys.readouterr().err)
    assert done["evaluate.accuracy"] == done["results"] == "computed"
    assert done["train"] == "reused"
    # the model again: everything that reads it, even though it comes out the same
    assert main([*base, "--recompute", "train"]) == EXIT_OK
    done = _statuses(capsys.readouterr().err)
    assert done["train"] == done["evaluate.accuracy"] == done["results"] == "computed"
    # names are checked before any work
    assert main([*base, "--recompute", "train,nosuch"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--recompute nosuch" in err and "its stages: data, train" in err
    assert main([*base, "--recompute", "critic"]) == EXIT_BAD_INPUT
    assert "does not run with these settings" in capsys.readouterr().err


def test_a_class_without_a_file_is_hashed_by_its_code(monkeypatch):
    """A plugin defined in a notebook (a module without a file) still changes its fingerprint
    when its code changes."""
    import types

    def define(body: str) -> type:
        module = types.ModuleType("notebook_cell")
        monkeypatch.setitem(sys.modules, "notebook_cell", module)
        exec(compile(f"class Cell:\n    FLAG = True\n    def evaluate(self):\n        return {body}\n", "<cell>", "exec"), module.__dict__)
        return module.Cell

    track = SourceTracker()
    first, same, other = track.for_class(define("1")), track.for_class(define("1")), track.for_class(define("2"))
    assert first is not None and first.sha256 == same.sha256 != other.sha256
