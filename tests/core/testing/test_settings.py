"""Tests of lvlmva.testing.settings: the small DecoyMNIST settings text and its overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lvlmva.plugins import lvlmva_register as register_builtins
from lvlmva.registry import PluginRegistry
from lvlmva.settings import load_settings
from lvlmva.testing.settings import DECOY_MNIST_TABLES, decoy_mnist_settings, toml_text


def test_the_defaults_with_the_cache_after_the_device():
    tables = tomllib.loads(decoy_mnist_settings(Path("/tmp/x") / "cache"))
    assert tables["run"] == {"seed": 0, "device": "cpu", "cache_dir": "/tmp/x/cache"}
    assert {k: v for k, v in tables.items() if k != "run"} == {k: v for k, v in DECOY_MNIST_TABLES.items() if k != "run"}
    assert list(tables) == list(DECOY_MNIST_TABLES)


def test_overrides_merge_key_by_key_and_none_removes():
    text = decoy_mnist_settings(
        "c",
        run={"seed": None, "name": "n"},
        aligner={"lam": [10.0, 100.0]},
        evaluators={"standard": {"alignment_score_samples": 8}},
        report=None,
        mitigators={"half": {"plugin": "toy-retrain", "fail_on_seeds": []}},
        study={"seeds": [0, 1]},
    )
    tables = tomllib.loads(text)
    assert tables["run"] == {"device": "cpu", "cache_dir": "c", "name": "n"}
    assert tables["aligner"] == {"plugin": "rrr", "epochs": 1, "max_steps_per_epoch": 2, "lam": [10.0, 100.0]}
    assert tables["evaluators"] == {"standard": {"plugin": "standard", "alignment_score_samples": 8}}
    assert "report" not in tables and list(tables)[-2:] == ["mitigators", "study"]
    assert text.endswith('[mitigators.half]\nplugin = "toy-retrain"\nfail_on_seeds = []\n\n[study]\nseeds = [0, 1]\n')
    assert DECOY_MNIST_TABLES["aligner"] == {"plugin": "rrr", "epochs": 1, "max_steps_per_epoch": 2}  # left as it was


def test_a_table_given_as_text_is_written_in_its_place():
    text = decoy_mnist_settings("c", critic='\n[critic]\nplugin = "scripted"\nsamples = 3\n')
    assert '[segmenter]\nplugin = "ppeps-wgm"\nnum_clusters = 4\n\n[critic]\nplugin = "scripted"\nsamples = 3\n\n[judge]' in text
    assert tomllib.loads(text)["critic"] == {"plugin": "scripted", "samples": 3}


def test_values_are_written_as_toml():
    text = toml_text({"t": {"s": 'a "b"\\ \x7f é', "p": Path("a/b"), "f": 0.3, "b": True, "l": [1, 2.5, "x"]}, "no": None})
    assert tomllib.loads(text) == {"t": {"s": 'a "b"\\ \x7f é', "p": "a/b", "f": 0.3, "b": True, "l": [1, 2.5, "x"]}}
    with pytest.raises(TypeError, match="no TOML value for dict"):
        toml_text({"t": {"l": [{"a": 1}]}})


def test_the_text_loads_as_settings_with_the_builtin_plugins(tmp_path: Path):
    registry = PluginRegistry()
    register_builtins(registry=registry)
    path = tmp_path / "s.toml"
    path.write_text(decoy_mnist_settings(tmp_path / "cache", train={"epochs": 2}))
    settings = load_settings(path, environ={}, registry=registry)
    assert settings.train.epochs == 2 and settings.plugins["dataset"].name == "decoy-mnist"
