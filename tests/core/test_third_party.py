"""A separately installed third-party plugin (examples/third_party_plugin) is discovered
through its entry point metadata, listed with its distribution and version, and runs in
``lvlmva compose``; with autoloading off it is not loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from lvlmva.plugins.models.mlp import Mlp
from lvlmva.protocols import RunContext
from lvlmva.registry import get_registry, reset_plugins

REPO = Path(__file__).resolve().parents[2]
TOY_PROJECT = REPO / "examples" / "third_party_plugin"


def _env(site: Path, autoload: bool) -> dict[str, str]:
    """The environment of a user who installed the plugin into ``site``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LVLMVA_")}
    env["PYTHONPATH"] = str(site)
    if not autoload:
        env["LVLMVA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


def _lvlmva(args: list[str], site: Path, cwd: Path, autoload: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lvlmva.cli", *args],
        env=_env(site, autoload),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _row(output: str, name: str) -> str:
    rows = [line for line in output.splitlines() if f" {name} " in line]
    assert len(rows) == 1, f"{name!r} listed {len(rows)} times in:\n{output}"
    return rows[0]


@pytest.mark.parametrize("autoload", [True, False], ids=["autoload", "autoload-disabled"])
def test_plugins_command_lists_the_installed_plugin(toy_site, toy_meta, tmp_path, autoload):
    name, version, _ = toy_meta
    result = _lvlmva(["plugins"], toy_site, tmp_path, autoload)
    assert result.returncode == 0, result.stderr
    assert " decoy-mnist " in result.stdout  # built-ins are listed either way
    if autoload:
        for plugin, role in (("toy-stripes", "dataset"), ("toy-eval", "evaluator")):
            row = _row(result.stdout, plugin)
            assert role in row and f" {name} " in row and f" {version} " in row
        assert "horizontal vs vertical stripes" in _row(result.stdout, "toy-stripes")
    else:
        assert "toy-stripes" not in result.stdout
        assert name not in result.stdout


def test_installed_plugin_runs_in_compose(toy_site, tmp_path, monkeypatch, fresh_plugins):
    run_dir = tmp_path / "run"
    result = _lvlmva(
        ["compose", str(TOY_PROJECT / "toy.toml"), "--out", str(run_dir), "--quiet",
         "--set", f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}"],
        toy_site,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"results: {run_dir / 'results.json'}" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["evaluations"]["accuracy"]["models"]["original"]
    assert set(results["models"]) == {"original"}
    assert results["settings"]["dataset"]["plugin"] == "toy-stripes"
    assert results["settings"]["evaluators"]["accuracy"] == {"plugin": "toy-eval", "split": "test", "batch_size": 256}
    assert [m["key"] for m in results["evaluations"]["accuracy"]["metrics"]] == ["accuracy", "samples"]
    assert "original" in result.stdout and "accuracy=" in result.stdout  # the summary line
    resolved = tomllib.loads((run_dir / "settings.resolved.toml").read_text())
    assert resolved["dataset"]["plugin"] == "toy-stripes" and resolved["model"]["hidden"] == [16]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in epochs] == [("train", 1)]

    # Reference: the saved model on the same toy data, scored here.
    monkeypatch.syspath_prepend(str(TOY_PROJECT / "src"))
    from lvlmva_toy.stripes import StripesProvider

    ctx = RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path)
    data = StripesProvider(StripesProvider.Options()).load(ctx)
    model = Mlp(data.input_shape, data.num_classes, [16])
    state = torch.load(run_dir / "train" / "artifact.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    with torch.no_grad():
        accuracy = float((model.eval()(data.test.images).argmax(1) == data.test.labels).float().mean())
    assert metrics == {"accuracy": accuracy, "samples": 64}


def test_pip_install_of_the_example_project_is_discovered(tmp_path, toy_meta, monkeypatch, fresh_plugins):
    name, version, _ = toy_meta
    project = tmp_path / "project"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(TOY_PROJECT, project, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(project)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / f"{name.replace('-', '_')}-{version}.dist-info" / "entry_points.txt").exists()

    monkeypatch.syspath_prepend(str(target))
    monkeypatch.delenv("LVLMVA_DISABLE_PLUGIN_AUTOLOAD")
    reset_plugins()
    registry = get_registry()
    entry = registry.entry("dataset", "toy-stripes")
    assert (entry.distribution, entry.version, entry.source) == (name, version, "lvlmva_toy.plugin")
    cls = registry.get("dataset", "toy-stripes")
    assert Path(sys.modules[cls.__module__].__file__).is_relative_to(target)
    assert registry.entry("evaluator", "toy-eval").distribution == name


@pytest.mark.parametrize(
    "relative",
    ["pyproject.toml", "toy.toml", *(f"src/lvlmva_toy/{f}" for f in ("__init__.py", "plugin.py", "stripes.py", "evaluate.py"))],
)
def test_the_guide_shows_the_example_as_it_is(relative):
    guide = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert f"### {relative}\n\n```" in guide
    assert (TOY_PROJECT / relative).read_text() in guide, f"docs/plugins.md shows an outdated {relative}"
