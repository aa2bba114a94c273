"""Studies on SLURM through submitit (``[study] executor = "slurm"``), tried with submitit's local
executor on this machine: the same results as the local executor, a rerun that reuses every
cell, a job that dies failing its own cell only, and the sbatch options a SLURM cluster would
receive (read from submitit's own submission file, with a stand-in ``srun`` on PATH)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main  # noqa: E402
from lvlmva.options import StudyOptions  # noqa: E402
from lvlmva.settings import SettingsError, load_settings  # noqa: E402

submitit = pytest.importorskip("submitit")

from lvlmva.study.runner import submitit_executor, submitit_parameters  # noqa: E402

#: a mitigator that kills its own process on some seeds (a job SLURM kills: time, memory); a
#: module of its own so that submitit's job processes import it by name
JOB_TOYS = """
import copy
import os
import signal

from pydantic import Field

from lvlmva.hookspecs import hookimpl
from lvlmva.protocols import PluginOptions


class JobToyOptions(PluginOptions):
    kill_on_seeds: list[int] = Field(default_factory=list, description="SIGKILL the process on these seeds")


class JobToy:
    Options = JobToyOptions
    needs_groups = False
    needs_validation = False

    def __init__(self, options):
        self.options = options

    def mitigate(self, original, trainer, data, ctx):
        if ctx.seed in self.options.kill_on_seeds:
            os.kill(os.getpid(), signal.SIGKILL)
        return copy.deepcopy(original)


@hookimpl
def lvlmva_register(registry):
    registry.add("mitigator", "job-toy", JobToy)
"""


@pytest.fixture
def toys(study_toy_plugins):
    """The toy pipeline's plugins and the job toy, importable here and in submitit's jobs."""
    study_toy_plugins("study_job_toys", JOB_TOYS)


def _settings(tmp_path: Path, kill: list[int] | None = None) -> Path:
    return pipeline_toys.toy_study(tmp_path, "job", "job-toy", [0, 1], kill_on_seeds=kill or [])


def _log(study: Path) -> list[dict]:
    return [json.loads(line) for line in (study / "cells.jsonl").read_text().splitlines()]


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("timings", "machine")}


SLURM_LOCAL = ["--set", "study.executor=slurm", "--set", "study.slurm_cluster=local"]


def test_a_study_through_submitits_local_executor_equals_the_local_one_and_resumes(tmp_path, toys, capsys):
    settings, here, jobs = _settings(tmp_path), tmp_path / "here", tmp_path / "jobs"
    assert main(["study", str(settings), "--out", str(here)]) == EXIT_OK
    assert main(["study", str(settings), "--out", str(jobs), *SLURM_LOCAL]) == EXIT_OK
    err = capsys.readouterr().err
    assert "2 cells (1 data sets x 2 seeds), 0 finished, 2 to run (slurm through submitit, local)" in err
    assert "submitted 2 cells to local as jobs " in err and f"submitit's logs: {jobs / 'logs' / 'submitit'}" in err
    assert sorted((x["seed"], x["status"]) for x in _log(jobs)) == [(0, "ok"), (1, "ok")]
    # each cell ran in a job of its own, whose files submitit keeps in the study's logs
    assert len(list((jobs / "logs" / "submitit").glob("*_result.pkl"))) == 2
    for seed in (0, 1):
        a = json.loads((here / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        b = json.loads((jobs / "cells" / "tiny" / f"seed{seed}" / "results.json").read_text())
        assert _strip(a) == _strip(b)
    assert (here / "table.md").read_text() == (jobs / "table.md").read_text()
    assert (here / "results.csv").read_text() == (jobs / "results.csv").read_text()

    # run again: every cell is finished, nothing is submitted or computed
    before = _log(jobs)
    assert main(["study", str(settings), "--out", str(jobs), *SLURM_LOCAL]) == EXIT_OK
    err = capsys.readouterr().err
    assert "2 finished, 0 to run" in err and "submitted" not in err
    assert _log(jobs) == before
    assert len(list((jobs / "logs" / "submitit").glob("*_result.pkl"))) == 2


def test_a_job_that_dies_fails_its_own_cell_and_the_other_finishes(tmp_path, toys, capsys, monkeypatch):
    # submitit waits 15 s for the result of a job that ended without one (a slow network file
    # system); this machine's is not
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)
    settings, study = _settings(tmp_path, kill=[1]), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), *SLURM_LOCAL]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "tiny seed 0: ok" in err
    assert "tiny seed 1: failed in 0.0 s (0 stages computed, 0 reused): job " in err
    assert "ended without the cell's status: UncompletedJobError: " in err and "has not produced any output" in err
    log = {x["seed"]: x for x in _log(study)}
    assert log[0]["status"] == "ok" and log[1]["status"] == "failed" and log[1]["published"] is False
    assert "log: " + str(study / "logs" / "submitit") in log[1]["reason"]
    # submitit's whole text (the job's output) is the cell's traceback file, as for a local cell
    assert "has not produced any output" in Path(log[1]["error_file"]).read_text()
    table = (study / "table.md").read_text()
    assert "ended without the cell's status" in table
    cells = json.loads((study / "study.json").read_text())["cells"]
    assert [(c["seed"], c["status"]) for c in cells] == [(0, "ok"), (1, "failed")]


def test_without_submitit_the_study_stops_with_exit_2_naming_the_extra(tmp_path, toys, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    settings, study = _settings(tmp_path), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), *SLURM_LOCAL]) == EXIT_BAD_INPUT
    assert 'study.executor = "slurm" needs submitit: pip install "lvlmva[slurm]"' in capsys.readouterr().err
    assert not study.exists()


def test_a_cluster_without_srun_stops_with_exit_2_and_no_cell_runs(tmp_path, toys, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    settings, study = _settings(tmp_path), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study), "--set", "study.executor=slurm"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert 'study.slurm_cluster = "slurm" cannot submit from this machine' in err and 'slurm_cluster = "local"' in err
    assert not (study / "cells.jsonl").exists()


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """An ``srun`` on PATH: submitit's SLURM executor is then made, and writes sbatch files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))


def test_the_sbatch_options_a_slurm_cluster_receives(tmp_path, fake_srun):
    study = StudyOptions(
        executor="slurm", threads=2, slurm_partition="gpu", slurm_time_min=90, slurm_cpus=4, slurm_gpus=1,
        slurm_mem_gb=16, slurm_account="lab", slurm_qos="high", slurm_array_parallelism=3,
        slurm_parameters={"constraint": "a100", "mail-type": "END", "exclusive": ""}, slurm_setup=["module load cuda"],
    )  # fmt: skip
    assert submitit_parameters(study, tmp_path / "s") == {
        "name": "lvlmva-s", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 4,
        "gpus_per_node": 1, "mem_gb": 16.0, "slurm_partition": "gpu", "slurm_account": "lab", "slurm_qos": "high",
        "slurm_array_parallelism": 3, "slurm_additional_parameters": {"constraint": "a100", "mail-type": "END", "exclusive": True},
        "slurm_setup": ["module load cuda"],
    }  # fmt: skip
    executor = submitit_executor(study, tmp_path / "s")
    assert executor.cluster == "slurm"
    assert Path(executor.folder) == tmp_path / "s" / "logs" / "submitit"
    sbatch = executor._executor._make_submission_file_text("CMD", "0").splitlines()
    for line in ("--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-node=1", "--mem=16GB", "--account=lab",
                 "--qos=high", "--constraint=a100", "--mail-type=END", "--exclusive", "--job-name=lvlmva-s", "--nodes=1", "--ntasks-per-node=1"):  # fmt: skip
        assert f"#SBATCH {line}" in sbatch, line
    assert "module load cuda" in sbatch
    assert executor._executor.parameters["array_parallelism"] == 3

    # defaults: CPUs = the study's threads, the rest left to the cluster
    plain = StudyOptions(executor="slurm", threads=3, slurm_logs=tmp_path / "elsewhere")
    executor = submitit_executor(plain, tmp_path / "s")
    assert Path(executor.folder) == tmp_path / "elsewhere"
    sbatch = executor._executor._make_submission_file_text("CMD", "0")
    assert "#SBATCH --cpus-per-task=3" in sbatch and "#SBATCH --time=60" in sbatch
    assert "--partition" not in sbatch and "--mem" not in sbatch and "--gpus" not in sbatch and "--account" not in sbatch


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.slurm_time_min=0", "greater than 0"),
        ("study.slurm_gpus=-1", "greater than or equal to 0"),
        ("study.slurm_mem_gb=0", "greater than 0"),
        ("study.slurm_cluster=debug", "'slurm' or 'local'"),
        ("study.slurm_cpus=1", "slurm_cpus = 1 is fewer than threads = 2"),
        ('study.slurm_parameters={partition = "x", cpus_per_task = 2}', "'cpus_per_task' (use slurm_cpus), 'partition' (use slurm_partition)"),
    ],
)
def test_slurm_settings_that_cannot_work_are_refused(tmp_path, toys, override, message):
    settings = _settings(tmp_path)
    with pytest.raises(SettingsError, match=None) as caught:
        load_settings(settings, ["study.executor=slurm", "study.threads=2", override])
    assert message in str(caught.value)
