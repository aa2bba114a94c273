"""The lambda sweep: one run directory per value, shared stages computed once, failures kept."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.registry import register_module  # noqa: E402
from lvlmva.sweep import main, run_sweep  # noqa: E402


def _settings(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    cache = (tmp_path / "cache").as_posix()
    path.write_text(pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{cache}"\n', 1))
    return path


def test_sweep_reuses_shared_stages_and_tabulates(tmp_path, fresh_plugins, monkeypatch):
    register_module(pipeline_toys, "toys")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv(pipeline_toys.CALLS_FILE_ENV, str(calls))
    rows = run_sweep(_settings(tmp_path), [0.0, 0.5, 5.0], tmp_path / "sweep", [], key="aligner.shift")
    assert [r["lam"] for r in rows] == [0.0, 0.5, 5.0]
    made = calls.read_text().split()
    assert made.count("critic") == 1 and made.count("attribute") == 1  # computed once, copied
    assert made.count("align") == 6  # align + bound for each value
    for r in rows:
        assert 0.0 <= r["aligned/accuracy"] <= 1.0
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert table.count("\n") == 2 + 3
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows


def test_a_failing_value_is_recorded_and_the_rest_run(tmp_path, fresh_plugins, monkeypatch, capsys):
    register_module(pipeline_toys, "toys")
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "align")
    code = main([str(_settings(tmp_path)), "--key", "aligner.shift", "--lams", "0.1", "0.2", "--out", str(tmp_path / "s")])
    assert code == 1
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert table.count("failed (align: toy align was told to fail)") == 2


def test_bad_settings_exit_2_before_any_run(tmp_path, fresh_plugins, capsys):
    register_module(pipeline_toys, "toys")
    code = main([str(_settings(tmp_path)), "--key", "aligner.shfit", "--lams", "1", "--out", str(tmp_path / "s")])
    assert code == 2 and "aligner.shfit" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
