"""Study cells on the toy pipeline (fast): a cell's published results.json is used only as its
run published it (SHA-256 in cells.jsonl), a local worker that dies fails its own cell only, and
a failed cell leaves its traceback (secrets redacted) in the study's logs/."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.cli import EXIT_FAILED, EXIT_OK, main  # noqa: E402
from lvlmva.secrets import REDACTED  # noqa: E402

SECRET = "sk-cell-toy-4f9c2a"
KEY_ENV = "LVLMVA_CELL_TOY_KEY"

#: a mitigator that can kill its own process, fail with a secret in its message, or wait for
#: a file; a module of its own so that spawned study workers import it by name
CELL_TOYS = '''
import copy
import os
import signal
import time
from pathlib import Path

from pydantic import Field

from lvlmva.hookspecs import hookimpl
from lvlmva.protocols import PluginOptions
from lvlmva.secrets import register_secret


class CellToyOptions(PluginOptions):
    kill_on_seeds: list[int] = Field(default_factory=list, description="SIGKILL the process on these seeds")
    fail_on_seeds: list[int] = Field(default_factory=list, description="raise, naming the secret, on these seeds")
    key_env: str = Field("", description="variable holding a key, registered as a secret before failing")
    flag: str = Field("", description="written before a kill; the other seeds wait for it")


class CellToy:
    Options = CellToyOptions
    needs_groups = False
    needs_validation = False

    def __init__(self, options):
        self.options = options

    def mitigate(self, original, trainer, data, ctx):
        o = self.options
        if ctx.seed in o.kill_on_seeds:
            Path(o.flag).write_text("dying")
            os.kill(os.getpid(), signal.SIGKILL)
        if ctx.seed in o.fail_on_seeds:
            key = os.environ[o.key_env]
            register_secret(key)  # as a plugin registers the key it read
            raise RuntimeError(f"cell toy refused the key {key}")
        if o.flag:  # still running when the other worker dies
            deadline = time.monotonic() + 60
            while not Path(o.flag).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        return copy.deepcopy(original)


@hookimpl
def lvlmva_register(registry):
    registry.add("mitigator", "cell-toy", CellToy)
'''


@pytest.fixture
def toys(study_toy_plugins, monkeypatch):
    """The toy pipeline's plugins and the cell toy, importable here and in spawned workers."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    study_toy_plugins("study_cell_toys", CELL_TOYS)


def _settings(tmp_path: Path, seeds: list[int], **cell: object) -> Path:
    return pipeline_toys.toy_study(tmp_path, "cell", "cell-toy", seeds, **cell)


def _log(study: Path) -> list[dict]:
    return [json.loads(line) for line in (study / "cells.jsonl").read_text().splitlines()]


def _accuracy(study: Path) -> dict[tuple[int, str], float]:
    rows = csv.DictReader((study / "results.csv").read_text().splitlines())
    return {(int(r["seed"]), r["method"]): float(r["value"]) for r in rows if r["metric"] == "accuracy"}


# -- results.json is verified before it is used --------------------------------------------------


def test_a_hand_edited_results_json_is_computed_again_and_its_numbers_never_used(tmp_path, toys, capsys):
    settings, study = _settings(tmp_path, [0, 1]), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study)]
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    before = _accuracy(study)

    results = study / "cells" / "tiny" / "seed0" / "results.json"
    edited = json.loads(results.read_text())
    edited["evaluations"]["toy"]["models"]["original"]["accuracy"] = 0.123456
    results.write_text(json.dumps(edited, indent=2) + "\n")
    assert main(argv) == EXIT_OK
    err = capsys.readouterr().err
    assert "2 cells (1 data sets x 2 seeds), 1 finished, 1 to run" in err
    assert f"tiny seed 0: {results} was changed after the cell finished (SHA-256 differs): computing the cell again" in err
    assert 0.123456 not in _accuracy(study).values()
    assert _accuracy(study) == before  # the cell published again from its stages, all reused
    last = _log(study)[-1]
    assert (last["seed"], last["computed"]) == (0, [])
    assert json.loads(results.read_text())["evaluations"]["toy"]["models"]["original"]["accuracy"] != 0.123456
    assert all(isinstance(x.get("results_sha256"), str) and len(x["results_sha256"]) == 64 for x in _log(study))


def test_a_truncated_results_json_is_computed_again_not_a_traceback(tmp_path, toys, capsys):
    settings, study = _settings(tmp_path, [0]), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study)]
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    before = _accuracy(study)
    results = study / "cells" / "tiny" / "seed0" / "results.json"
    results.write_bytes(results.read_bytes()[:40])
    assert main(argv) == EXIT_OK
    err = capsys.readouterr().err
    assert f"{results} was changed after the cell finished (SHA-256 differs): computing the cell again" in err
    assert _accuracy(study) == before
    json.loads(results.read_text())  # whole again


def test_a_cell_without_a_recorded_sha256_is_computed_again(tmp_path, toys, capsys):
    """A study directory of a version that did not hash results.json: its cells are not trusted."""
    settings, study = _settings(tmp_path, [0]), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study)]
    assert main(argv) == EXIT_OK
    lines = [{k: v for k, v in x.items() if k != "results_sha256"} for x in _log(study)]
    (study / "cells.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    assert main(argv) == EXIT_OK
    err = capsys.readouterr().err
    results = study / "cells" / "tiny" / "seed0" / "results.json"
    assert f"tiny seed 0: {results} has no SHA-256 in the study's cells.jsonl: computing the cell again" in err
    assert "0 finished, 1 to run" in err
    assert isinstance(_log(study)[-1]["results_sha256"], str)
    # now recorded: the next run finds the cell finished
    assert main(argv) == EXIT_OK
    assert "1 finished, 0 to run" in capsys.readouterr().err


def test_a_results_json_changed_while_the_study_runs_is_not_used(tmp_path, toys, capsys, monkeypatch):
    from lvlmva.study import runner

    settings, study = _settings(tmp_path, [0]), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_OK
    capsys.readouterr()
    settings = _settings(tmp_path, [0, 1])
    seed0 = study / "cells" / "tiny" / "seed0" / "results.json"
    run_cell = runner.run_cell

    def and_edit_seed0(cell):  # seed 0 is finished when the study starts; edited while seed 1 runs
        status = run_cell(cell)
        edited = json.loads(seed0.read_text())
        edited["evaluations"]["toy"]["models"]["original"]["accuracy"] = 0.123456
        seed0.write_text(json.dumps(edited, indent=2) + "\n")
        return status

    monkeypatch.setattr(runner, "run_cell", and_edit_seed0)
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "1 finished, 1 to run" in err
    assert f"tiny seed 0: {seed0} was changed after the cell finished (SHA-256 differs): its numbers are not used" in err
    assert {seed for seed, _ in _accuracy(study)} == {1}
    assert "was changed after the cell finished" in (study / "table.md").read_text()


# -- a worker that dies ------------------------------------------------------------------------


def test_a_killed_worker_fails_its_own_cell_and_the_others_are_run(tmp_path, toys, capsys):
    flag = tmp_path / "seed1-dies"
    settings = _settings(tmp_path, [0, 1, 2], kill_on_seeds=[1], flag=str(flag))
    study = tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.workers=2"]) == EXIT_FAILED
    err = capsys.readouterr().err
    # seed 0 was running in the other worker (it waits for the flag), seed 2 was queued
    assert "a worker process died (killed by signal SIGKILL); new worker processes run the 2 cells left" in err
    assert "tiny seed 1: failed in 0.0 s (0 stages computed, 0 reused): the worker process running the cell died (killed by signal SIGKILL)" in err
    assert "BrokenProcessPool" not in err
    log = _log(study)
    assert sorted((x["seed"], x["status"]) for x in log) == [(0, "ok"), (1, "failed"), (2, "ok")]
    accuracy = _accuracy(study)
    assert {s for s, m in accuracy if m == "cell"} == {0, 2}
    assert "the worker process running the cell died (killed by signal SIGKILL)" in (study / "table.md").read_text()


# -- a failed cell's traceback -----------------------------------------------------------------


def test_a_failed_cell_writes_its_traceback_redacted_and_names_the_file(tmp_path, toys, capsys):
    settings = _settings(tmp_path, [0, 1], fail_on_seeds=[1], key_env=KEY_ENV)
    study = tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_FAILED
    err = capsys.readouterr().err
    error_file = study / "logs" / "tiny-seed1.error.txt"
    assert "[2/2] tiny seed 1: failed" in err and f"(traceback: {error_file}" in err
    assert "Traceback" not in err  # without --debug the echo names the file only
    text = error_file.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "stage 'mitigate.cell' failed:" in text and "in mitigate" in text
    assert f"RuntimeError: cell toy refused the key {REDACTED}" in text
    assert SECRET not in text and SECRET not in err
    assert SECRET not in (study / "cells.jsonl").read_text() and SECRET not in (study / "table.md").read_text()
    assert _log(study)[-1]["error_file"] == str(error_file)
    assert not (study / "logs" / "tiny-seed0.error.txt").exists()

    # the cell succeeds later: its old traceback is not left to mislead
    _settings(tmp_path, [0, 1])
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_OK
    assert not error_file.exists()


def test_a_worker_process_redacts_the_secrets_its_plugins_registered(tmp_path, toys, capsys, monkeypatch):
    """The key is registered in the worker only (this process never sees it as a secret): the
    traceback and the reason are redacted there."""
    from lvlmva.secrets import redact

    worker_only = "sk-worker-only-81d3e7"
    monkeypatch.setenv(KEY_ENV, worker_only)
    settings = _settings(tmp_path, [0, 1], fail_on_seeds=[0, 1], key_env=KEY_ENV)
    study = tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.workers=2"]) == EXIT_FAILED
    err = capsys.readouterr().err
    for seed in (0, 1):
        text = (study / "logs" / f"tiny-seed{seed}.error.txt").read_text()
        assert f"RuntimeError: cell toy refused the key {REDACTED}" in text and worker_only not in text
    assert worker_only not in err and worker_only not in (study / "cells.jsonl").read_text()
    assert redact(worker_only) == worker_only  # not registered here: redacted in the worker


def test_debug_echoes_the_traceback_and_stage_error_files_are_named(tmp_path, toys, monkeypatch):
    from lvlmva.pipeline import Pipeline, StageFailed
    from lvlmva.study.runner import run_study

    raised: list[StageFailed] = []
    run = Pipeline.run

    def keep(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except StageFailed as exc:
            if not getattr(exc, "error_files", None):  # until lvlmva.pipeline names them itself
                exc.error_files = {"mitigate.cell": self.run_dir / "logs" / "mitigate.cell.error.txt"}
            raised.append(exc)
            raise

    monkeypatch.setattr(Pipeline, "run", keep)
    settings = _settings(tmp_path, [0], fail_on_seeds=[0], key_env=KEY_ENV)
    lines: list[str] = []
    summary = run_study([settings], out=tmp_path / "study", echo=lines.append, debug=True)
    assert summary["failed"] == 1
    echo = "\n".join(lines)
    (exc,) = raised
    assert exc.error_files
    for stage, path in exc.error_files.items():
        assert f"stage {stage}: {path}" in echo
    assert "Traceback (most recent call last):" in echo and "in mitigate" in echo
    assert f"RuntimeError: cell toy refused the key {REDACTED}" in echo and SECRET not in echo
    record = _log(tmp_path / "study")[-1]
    assert record["stage_error_files"] == {k: str(v) for k, v in exc.error_files.items()}


def test_a_cell_that_cannot_start_writes_its_traceback(tmp_path, toys, capsys):
    from lvlmva.pipeline import RunDirectory

    settings, study = _settings(tmp_path, [0]), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study)]
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    # another setting: the cell runs again, and finds its run directory held by another process
    with RunDirectory(study / "cells" / "tiny" / "seed0").lock():
        assert main([*argv, "--set", "aligner.shift=0.02"]) == EXIT_FAILED
    err = capsys.readouterr().err
    error_file = study / "logs" / "tiny-seed0.error.txt"
    assert "is in use by another lvlmva run" in err and f"(traceback: {error_file})" in err
    assert "RunDirectoryBusy" in error_file.read_text() and "Traceback (most recent call last):" in error_file.read_text()
