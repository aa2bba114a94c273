"""examples/critic_quality/summarize.py on a study folder written here: the critic points it reads
from each cell's settings, the verdict rates it reports from each branch's confusion, how many
seeds beat the original, the smallest verdict accuracy that beats it on every seed, and the figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "critic_quality" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("critic_quality_summarize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CRITICS = {
    "oracle": {"plugin": "oracle", "min_overlap": 1e-6},
    "acc088_fa05": {"plugin": "scripted", "miss_rate": 0.12, "false_alarm_rate": 0.05, "spread": 0.0},
    "acc042_fa05": {"plugin": "scripted", "miss_rate": 0.58, "false_alarm_rate": 0.05, "spread": 0.0},
}


def _cell(root: Path, seed: int, wga: dict[str, float], failed: bool = False) -> None:
    """A cell's results.json with the fields the script reads."""
    confusion = {"oracle": (10, 0, 40, 0), "acc088_fa05": (9, 2, 38, 1), "acc042_fa05": (4, 2, 38, 6)}
    results = {
        "settings": {"critics": CRITICS},
        "evaluations": {"standard": {"split": "test", "models": {key: {"wga": value} for key, value in wga.items()}}},
        "branches": {
            name: {"verdicts": {"verdict_accuracy": tp / (tp + fn), "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn}}}
            for name, (tp, fp, tn, fn) in confusion.items()
        },
    }
    if failed:
        results["failed"] = {"align.rrr.oracle": "stopped"}
    path = root / "cells" / "toy" / f"seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results), encoding="utf-8")


def _study(root: Path) -> None:
    # rrr beats the original on both seeds with the oracle and at 0.88, on one seed at 0.42
    _cell(root, 0, {"original": 0.30, "dfr": 0.6, "true_mask.rrr": 0.8, "aligned.rrr.oracle": 0.7, "aligned.rrr.acc088_fa05": 0.5, "aligned.rrr.acc042_fa05": 0.35})
    _cell(root, 1, {"original": 0.40, "dfr": 0.7, "true_mask.rrr": 0.9, "aligned.rrr.oracle": 0.8, "aligned.rrr.acc088_fa05": 0.6, "aligned.rrr.acc042_fa05": 0.30})
    _cell(root, 2, {"original": 0.9, "aligned.rrr.oracle": 0.0}, failed=True)  # left out


def test_the_table_reads_each_critic_point_and_counts_the_seeds_that_beat_the_original(tmp_path, summarize, capsys):
    _study(tmp_path)
    assert summarize.main([str(tmp_path), "--figure", str(tmp_path / "figure.png")]) == 0
    out = capsys.readouterr().out
    assert "over seeds 0, 1\n" in out  # the failed seed 2 is left out
    assert "original 0.350 ± 0.071; DFR (group labels) 0.650 ± 0.071" in out
    assert "| rrr | 1.00 (oracle) | 0.00 | 1.000 / 0.000 | 0.750 ± 0.071 | 2/2 | 0.850 ± 0.071 |" in out
    assert "| rrr | 0.88 (Llama-4-Scout) | 0.05 | 0.900 / 0.050 | 0.550 ± 0.071 | 2/2 | 0.850 ± 0.071 |" in out
    assert "| rrr | 0.42 (GPT-4o-mini) | 0.05 | 0.400 / 0.050 | 0.325 ± 0.035 | 1/2 | 0.850 ± 0.071 |" in out
    # at false alarms 0.05: 0.88 beats on every seed, 0.42 does not; the oracle's column is 0.00
    assert "| rrr | 1.00 (GPT-5 level) | 0.88 (Llama-4-Scout level) | – |" in out
    assert (tmp_path / "figure.png").stat().st_size > 10_000


def test_a_critic_with_one_error_rate_has_no_point_on_the_plot(summarize):
    with pytest.raises(ValueError, match="miss_rate and false_alarm_rate"):
        summarize.critic_point({"plugin": "scripted", "error_rate": 0.1})
    assert summarize.critic_point(CRITICS["acc042_fa05"]) == (0.42, 0.05)


def test_no_finished_cell_is_an_error(tmp_path, summarize):
    with pytest.raises(SystemExit) as stop:
        summarize.main([str(tmp_path)])
    assert stop.value.code == 2


def test_the_smallest_beating_accuracy_names_higher_ones_that_do_not_beat(summarize):
    def row(accuracy, beats):
        return {"aligner": "rrr", "false_alarm": 0.05, "accuracy": accuracy, "beats": beats, "seeds": 7}

    table = [row(1.0, 6), row(0.88, 7), row(0.87, 5), row(0.46, 7), row(0.42, 4)]
    assert summarize.smallest_beating(table, "rrr", 0.05) == "0.46 (Qwen3 level); not at 1.00, 0.87"
    assert summarize.smallest_beating(table, "rrr", 0.15) == "–"
    assert summarize.smallest_beating([row(1.0, 3)], "rrr", 0.05) == "none"
