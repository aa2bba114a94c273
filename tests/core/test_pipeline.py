"""Pipeline runner: resume, invalidation by content, skipping, failures that keep the rest of
the run going, integrity of stored artifacts, named instances, plugin stages, a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.pipeline import (  # noqa: E402
    ConfigurationError,
    NotARunDirectory,
    Pipeline,
    PublishError,
    RunDirectory,
    RunDirectoryBusy,
    Stage,
    StageFailed,
    UndeclaredAccess,
    codecs,
    open_run,
)
from lvlmva.registry import PluginRegistry  # noqa: E402
from lvlmva.results import summary_lines  # noqa: E402
from lvlmva.settings import load_settings  # noqa: E402


def _registry() -> PluginRegistry:
    reg = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=reg)
    return reg


@pytest.fixture
def registry() -> PluginRegistry:
    return _registry()


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    cache = (tmp_path / "cache").as_posix()
    path.write_text(pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{cache}"\n', 1))
    return path


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.txt"
    monkeypatch.setenv(pipeline_toys.CALLS_FILE_ENV, str(path))
    return path


def _read_calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _roles(path: Path) -> list[str]:
    return [c for c in _read_calls(path) if not c.startswith("critic-sample-")]


def _run(settings_file: Path, run_dir: Path, registry: PluginRegistry, overrides=(), **kw):
    settings = load_settings(settings_file, overrides, environ={}, registry=registry)
    pipe = Pipeline(settings, run_dir, registry=registry, echo=kw.pop("echo", lambda _m: None), **kw)
    return pipe, pipe.run()


def _status(pipe: Pipeline) -> dict[str, str]:
    return {k: o.status for k, o in pipe.outcomes.items()}


def _accuracy(results: dict, model: str) -> float:
    return results["evaluations"]["toy"]["models"][model]["accuracy"]


def test_fresh_run_then_full_reuse(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    pipe, results = _run(settings_file, run_dir, registry)
    status = _status(pipe)
    assert status["train"] == "computed" and status["align"] == "computed"
    assert "mitigate" not in " ".join(status)  # no [mitigators.*] configured: no such stage
    assert list(results["models"]) == ["original", "aligned", "true_mask"]
    assert results["models"]["aligned"]["label"] == "aligned (toy critic)"
    assert results["models"]["true_mask"]["label"] == "true-mask reference"
    for name in ("settings.resolved.toml", "env.json", "results.json", "metrics.jsonl", "timings.json", ".lvlmva-run"):
        assert (run_dir / name).exists(), name
    env = json.loads((run_dir / "env.json").read_text())
    from importlib import metadata

    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["device"] == "cpu" and env["python"] == sys.version.split()[0]
    assert _roles(calls).count("critic") == 1

    calls.unlink()
    pipe2, results2 = _run(settings_file, run_dir, registry)
    assert set(_status(pipe2).values()) <= {"reused", "skipped"}
    assert _read_calls(calls) == []  # nothing recomputed, not even the data set
    assert {k: v for k, v in results2.items() if k != "timings"} == {k: v for k, v in results.items() if k != "timings"}


def test_changed_setting_recomputes_that_stage_and_what_reads_it(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["aligner.shift=0.5"])
    status = _status(pipe)
    assert status["train"] == status["critic"] == status["judge"] == status["masks"] == "reused"
    assert status["align"] == status["reference"] == status["evaluate.toy"] == status["results"] == "computed"
    assert "critic" not in _roles(calls)

    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["aligner.shift=0.5", "selection.n=10"])
    status = _status(pipe)
    assert status["train"] == "reused"
    assert status["select"] == status["critic"] == status["align"] == "computed"


def test_a_stage_that_recomputes_to_the_same_content_leaves_its_readers_alone(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    # an altered artifact is noticed by its hash, named, and the stage recomputed ...
    artifact = run_dir / "train" / "artifact.pt"
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))
    lines: list[str] = []
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, echo=lines.append)
    assert any("train/artifact.pt was changed after it was written" in line and "computing it again" in line for line in lines)
    status = _status(pipe)
    assert status["train"] == "computed"
    # ... to the same bytes (same seed, same machine), so nothing that reads it recomputes
    assert status["select"] == status["align"] == status["evaluate.toy"] == "reused"
    assert _roles(calls) == ["data"]


def test_truncated_and_missing_artifacts_are_recomputed(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    (run_dir / "critic" / "artifact.json").write_text("[")
    (run_dir / "render" / next(p.name for p in (run_dir / "render").glob("*.png"))).unlink()
    lines: list[str] = []
    pipe, _ = _run(settings_file, run_dir, registry, echo=lines.append)
    assert _status(pipe)["critic"] == _status(pipe)["render"] == "computed"
    assert any(line.strip().startswith("! critic") and "critic/artifact.json was changed" in line for line in lines)
    assert any(line.strip().startswith("! render") and "is missing" in line for line in lines)


def test_same_seed_same_numbers_and_seed_changes_them(tmp_path, settings_file, registry):
    _, a = _run(settings_file, tmp_path / "a", registry)
    _, b = _run(settings_file, tmp_path / "b", registry)
    assert a["evaluations"] == b["evaluations"]
    _, c = _run(settings_file, tmp_path / "c", registry, overrides=["run.seed=1"])
    assert c["evaluations"] != a["evaluations"]


def test_failed_verdicts_are_left_out_and_counted(tmp_path, settings_file, registry):
    _run(settings_file, tmp_path / "run", registry)
    chosen = open_run(tmp_path / "run").load("select").indices.tolist()
    _, results = _run(settings_file, tmp_path / "run2", registry, overrides=[f"judge.fail_ids=[{chosen[0]}, {chosen[3]}]"])
    alignment = results["alignment"]
    assert alignment["samples"] == 12 and alignment["failed"] == 2 and alignment["aligned_on"] == 10
    assert {f["sample_id"] for f in alignment["failures"]} == {chosen[0], chosen[3]}
    assert all(f["reason"] == "told to fail" for f in alignment["failures"])


def test_a_failing_stage_keeps_the_rest_of_the_run_going(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "critic")
    pipe = None
    with pytest.raises(StageFailed) as info:
        settings = load_settings(settings_file, ["mitigators.m.plugin=toy"], environ={}, registry=registry)
        pipe = Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None)
        pipe.run()
    assert info.value.stage == "critic" and "told to fail" in str(info.value)
    assert list(info.value.failures) == ["critic"]
    assert not (run_dir / "critic").exists()  # nothing half-written that could load
    status = _status(pipe)
    # stages that do not read the critic still ran and were kept; those that need it were not
    # run; those that only may read it ran without it, and results.json says what is missing
    assert status["reference"] == status["mitigate.m"] == "computed"
    assert status["judge"] == status["masks"] == status["align"] == "blocked"
    assert status["evaluate.toy"] == status["results"] == status["report"] == "computed"
    assert (run_dir / "reference" / "fingerprint.json").exists()
    published = json.loads((run_dir / "results.json").read_text())
    assert list(published["models"]) == ["original", "true_mask", "m"]
    assert published["failed"]["critic"] == "failed: toy critic was told to fail"
    assert published["failed"]["align"] == "could not run: needs masks, which could not run"
    # the full traceback is in the run directory, named by the failure
    error_file = run_dir / "logs" / "critic.error.txt"
    assert info.value.error_files == {"critic": error_file}
    text = error_file.read_text()
    assert "stage: critic" in text and "Traceback (most recent call last)" in text
    assert "pipeline_toys.py" in text and "RuntimeError: toy critic was told to fail" in text

    monkeypatch.delenv("LVLMVA_TOY_FAIL")
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["mitigators.m.plugin=toy"])
    status = _status(pipe)
    assert status["attribute"] == status["reference"] == status["mitigate.m"] == "reused"
    assert status["critic"] == status["align"] == "computed"
    assert "attribute" not in _roles(calls) and "mitigate" not in _roles(calls)
    assert not error_file.exists()  # answered by the stage that now finished


def test_partial_stage_directory_is_never_loaded(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    # A torn write: the artifact is there but the record is not.
    (run_dir / "align" / "fingerprint.json").unlink()
    pipe, _ = _run(settings_file, run_dir, registry)
    assert pipe.outcomes["align"].status == "computed"


def test_configuration_errors_before_work(tmp_path, registry):
    path = tmp_path / "bad.toml"
    path.write_text('[dataset]\nplugin = "toy"\n[model]\nplugin = "toy"\n[critic]\nplugin = "toy"\n')
    settings = load_settings(path, environ={}, registry=registry)
    with pytest.raises(ConfigurationError, match=r"\[critic\] is set but \[judge\] is not"):
        Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)
    assert not (tmp_path / "run").exists()


def test_checks_on_the_loaded_data_stop_before_training(tmp_path, settings_file, registry, calls):
    with pytest.raises(ConfigurationError, match="selection.n = 500, but the training split has only 96 samples"):
        _run(settings_file, tmp_path / "run", registry, overrides=["selection.n=500"])
    assert _roles(calls) == ["data"]  # loaded, checked, and nothing trained
    assert not (tmp_path / "run" / "train").exists()

    calls.unlink()
    overrides = ["dataset.groups=false", "mitigators.m.plugin=toy"]
    with pytest.raises(ConfigurationError, match=r"mitigator 'm' \(toy\) trains with group labels, which the loaded data set does not have"):
        _run(settings_file, tmp_path / "run2", registry, overrides=overrides)
    assert _roles(calls) == ["data"]


def test_stage_logs_are_replaced_when_a_stage_recomputes(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    _run(settings_file, run_dir, registry, overrides=["train.epochs=3"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x["epoch"] for x in lines if x.get("run_stage") == "train"]
    assert sorted(epochs) == [1, 2, 3]


RUNNER = """
import sys
sys.path.insert(0, {toys!r})
import pipeline_toys
from lvlmva.registry import register_module
register_module(pipeline_toys, "toys")
from lvlmva.cli import main
sys.exit(main(["compose", {settings!r}, "--out", {out!r}, "--quiet"]))
"""


def test_sigkill_mid_stage_then_resume(tmp_path, settings_file, calls):
    run_dir = tmp_path / "run"
    flag = tmp_path / "stalling"
    script = RUNNER.format(toys=str(Path(__file__).parent), settings=str(settings_file), out=str(run_dir))
    env = {**os.environ, "LVLMVA_TOY_STALL": "align", "LVLMVA_TOY_STALL_FLAG": str(flag)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert flag.exists(), "the run never reached the align stage"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run_dir / ".partial-align").exists() and not (run_dir / "align").exists()

    calls.unlink()
    env.pop("LVLMVA_TOY_STALL")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    made = _roles(calls)
    assert "critic" not in made and "attribute" not in made  # finished stages reused
    # the interrupted stage ran again, and so did the reference stage after it (same aligner)
    assert made.count("align") == 2
    assert (run_dir / "align" / "fingerprint.json").exists() and not (run_dir / ".partial-align").exists()
    # the resumed run ends where an uninterrupted one does
    resumed = json.loads((run_dir / "results.json").read_text())
    _, fresh = _run(settings_file, tmp_path / "fresh", _registry())
    assert resumed["evaluations"] == fresh["evaluations"] and resumed["models"] == fresh["models"]


def test_cli_exit_1_names_the_stage(tmp_path, settings_file):
    script = RUNNER.format(toys=str(Path(__file__).parent), settings=str(settings_file), out=str(tmp_path / "run"))
    env = {**os.environ, "LVLMVA_TOY_FAIL": "critic"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "lvlmva: stage 'critic' failed: RuntimeError: toy critic was told to fail" in done.stderr
    assert str(tmp_path / "run") in done.stderr and "Traceback" not in done.stderr


def test_unanswered_requests_leave_the_stage_unfinished_and_a_rerun_asks_only_them(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, tmp_path / "probe", registry)
    chosen = open_run(tmp_path / "probe").load("select").indices.tolist()
    monkeypatch.setenv("LVLMVA_TOY_UNREACHABLE", f"{chosen[1]},{chosen[5]}")
    calls.unlink()
    with pytest.raises(StageFailed) as info:
        _run(settings_file, run_dir, registry)
    assert str(info.value.cause).startswith("connection refused at http://toy: 2 of 12 critic requests failed")
    assert not (run_dir / "critic").exists()
    assert "2 of 12 critic requests failed" in json.loads((run_dir / "results.json").read_text())["failed"]["critic"]
    assert (run_dir / "reference").exists()  # the true-mask reference does not need the critic

    monkeypatch.delenv("LVLMVA_TOY_UNREACHABLE")
    calls.unlink()
    pipe, results = _run(settings_file, run_dir, registry)
    assert _status(pipe)["critic"] == "computed" and _status(pipe)["reference"] == "reused"
    assert results["alignment"]["failed"] == 0
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry)
    assert _read_calls(calls) == []  # a third run asks nothing


def test_published_files_never_go_stale(tmp_path, settings_file, registry, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    assert (run_dir / "results.json").exists() and (run_dir / "report.md").exists()
    # a failing run publishes its own results, naming the failure, never the run's before it
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "align")
    with pytest.raises(StageFailed):
        _run(settings_file, run_dir, registry, overrides=["report.enabled=true", "aligner.shift=0.3"])
    failed = json.loads((run_dir / "results.json").read_text())
    assert "aligned" not in failed["models"] and "told to fail" in failed["failed"]["align"]
    assert "aligner" in failed["settings"] and failed["settings"]["aligner"]["shift"] == 0.3
    assert "## Failed stages" in (run_dir / "report.md").read_text()
    monkeypatch.delenv("LVLMVA_TOY_FAIL")
    # deleted published files come back from the stored artifacts, with today's settings
    _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["settings"]["report"]["enabled"] is True
    _, again = _run(settings_file, run_dir, registry, overrides=["report.enabled=false"])
    assert not (run_dir / "report.md").exists()
    assert again["settings"]["report"]["enabled"] is False


def test_a_failure_while_publishing_is_a_clear_error(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    shutil.rmtree(run_dir / "figures")
    (run_dir / "figures").write_text("something in the way")
    with pytest.raises(PublishError, match=r"cannot publish the results into .*run: .*figures"):
        _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    (run_dir / "figures").unlink()
    (run_dir / "results.json").unlink()
    (run_dir / "results.json").mkdir()
    with pytest.raises(PublishError, match=r"cannot remove the results of the run before .*results.json"):
        _run(settings_file, run_dir, registry)


def test_refresh_recomputes_the_critic_and_every_stage_that_reads_a_changed_answer(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, refresh=True)
    status = _status(pipe)
    assert status["critic"] == status["judge"] == "computed" and status["train"] == "reused"
    assert _roles(calls).count("critic") == 1
    # the same answers again: what reads them is still valid
    assert status["masks"] == status["results"] == "reused"

    monkeypatch.setenv("LVLMVA_TOY_CRITIC_SALT", "on reflection ")
    pipe, results = _run(settings_file, run_dir, registry, refresh=True)
    status = _status(pipe)
    assert status["critic"] == "computed" and status["results"] == status["report"] == "computed"
    assert status["masks"] == "reused"  # the verdicts did not change, so neither did the masks
    critiques = open_run(run_dir).load("critic")
    assert all("on reflection" in c.text for c in critiques)


def test_logs_of_a_kept_artifact_survive_a_failed_recompute(tmp_path, settings_file, registry, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)

    def stages() -> list[str]:
        return [json.loads(x)["run_stage"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    before = stages()
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "critic")
    with pytest.raises(StageFailed):
        _run(settings_file, run_dir, registry, overrides=["train.epochs=3"])
    # train was recomputed (3 new lines replace 2 old ones) before the critic failed
    assert stages().count("train") == 3 and len(before) == 2


def test_numpy_metrics_store_and_reload(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _, first = _run(settings_file, run_dir, registry, overrides=["evaluators.toy.numpy_scalars=true"])
    pipe, second = _run(settings_file, run_dir, registry, overrides=["evaluators.toy.numpy_scalars=true"])
    assert pipe.outcomes["evaluate.toy"].status == "reused"
    assert first["evaluations"] == second["evaluations"] and isinstance(_accuracy(second, "original"), float)


def test_settings_that_change_nothing_do_not_recompute(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    overrides = ["masks.true_mask_reference=false"] + ([] if torch.cuda.is_available() else ["run.device=auto"])
    pipe, _ = _run(settings_file, run_dir, registry, overrides=overrides)
    status = _status(pipe)
    assert status["train"] == status["masks"] == status["align"] == "reused"
    assert status["reference"] == "skipped"


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    held = RunDirectory.claim(run_dir)
    with held.lock():
        with pytest.raises(RunDirectoryBusy, match="in use by another lvlmva run"):
            _run(settings_file, run_dir, registry)
    _run(settings_file, run_dir, registry)  # free again


def test_a_folder_that_is_not_ours_is_refused_and_left_as_it_was(tmp_path, settings_file, registry):
    mine = tmp_path / "mine"
    (mine / "align").mkdir(parents=True)
    (mine / "align" / "keep.txt").write_text("mine")
    with pytest.raises(NotARunDirectory, match="is not an lvlmva run directory"):
        _run(settings_file, mine, registry)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["align", "align/keep.txt"]


def test_files_get_the_permissions_of_the_umask(tmp_path, settings_file, registry):
    old = os.umask(0o027)
    try:
        _run(settings_file, tmp_path / "run", registry, overrides=["report.enabled=true"])
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    modes = {p.relative_to(tmp_path / "run").as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert "results.json" in modes and "report.md" in modes and "critic/artifact.json" in modes
    # written with write_atomic or torch.save alike: what a plain open() under umask 027 gives
    assert {m for m in modes.values()} == {0o640}, modes


# -- named instances --------------------------------------------------------------------------


def test_named_mitigators_compute_alone_and_label_their_models(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    overrides = ["mitigators.small.plugin=toy", "mitigators.small.shift=0.1", "mitigators.big.plugin=toy", "mitigators.big.shift=5.0"]
    pipe, results = _run(settings_file, run_dir, registry, overrides=overrides)
    assert _status(pipe)["mitigate.small"] == _status(pipe)["mitigate.big"] == "computed"
    assert (run_dir / "mitigate.small" / "artifact.pt").exists() and (run_dir / "mitigate.big" / "artifact.pt").exists()
    assert list(results["models"]) == ["original", "aligned", "true_mask", "small", "big"]
    assert results["models"]["big"] == {"label": "big (toy)", "stage": "mitigate.big"}
    scored = results["evaluations"]["toy"]["models"]
    assert set(scored) == {"original", "aligned", "true_mask", "small", "big"}
    lines = summary_lines(results)
    assert any(line.strip().startswith("big (toy)") and "accuracy=" in line for line in lines)
    assert results["settings"]["mitigators"]["big"] == {"plugin": "toy", "shift": 5.0}

    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=[*overrides[:3], "mitigators.big.shift=6.0"])
    status = _status(pipe)
    assert status["mitigate.big"] == "computed" and status["mitigate.small"] == "reused"
    assert status["align"] == status["train"] == "reused"
    assert status["evaluate.toy"] == status["results"] == "computed"
    assert _roles(calls).count("mitigate") == 1


def test_named_evaluators_each_score_every_model(tmp_path, settings_file, registry):
    _, results = _run(settings_file, tmp_path / "run", registry, overrides=["evaluators.second.plugin=toy"])
    assert set(results["evaluations"]) == {"toy", "second"}
    assert results["evaluations"]["toy"]["models"] == results["evaluations"]["second"]["models"]
    assert results["evaluations"]["second"]["metrics"][0]["key"] == "accuracy"
    # both report "accuracy": the summary tells them apart by instance name
    assert "toy.accuracy=" in summary_lines(results)[0] and "second.accuracy=" in summary_lines(results)[0]


# -- stages as units ----------------------------------------------------------------------------


def test_a_plugin_stage_between_judge_and_masks_is_what_masks_reads(tmp_path, settings_file, registry, calls):
    registry.add_stage(pipeline_toys.FLIP_STAGE, after="judge", options=pipeline_toys.FlipOptions)
    run_dir = tmp_path / "run"
    pipe, _ = _run(settings_file, run_dir, registry)
    names = [s.name for s in pipe.stages]
    # the flip reads the judge's verdicts and provides them under the same name: the overrides
    # stage (a person's review) works on the flipped verdicts, and masks read its result
    assert names.index("judge") + 1 == names.index("flip") == names.index("overrides") - 1 == names.index("masks") - 2
    unflipped = open_run(run_dir).load("masks")["masks"]
    assert _roles(calls).count("flip") == 1

    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=['flip.colors=["red"]'])
    status = _status(pipe)
    assert status["judge"] == "reused" and status["flip"] == status["masks"] == status["align"] == "computed"
    flipped = open_run(run_dir).load("masks")["masks"]
    # the toy critic calls the first cluster (red, top-left quadrant) spurious: flipping red
    # clears those pixels from every mask
    assert bool(unflipped[:, :4, :4].all()) and not bool(flipped[:, :4, :4].any())
    assert "flip" in load_settings(settings_file, environ={}, registry=registry).to_toml()


def test_a_stage_only_gets_what_it_declares(tmp_path, settings_file, registry):
    seen = {}

    def sneaky(call):
        seen["declared"] = call["judge"] is not None and call.option("masks.source") == "verdicts"
        for attempt in (lambda: call["train"], lambda: call.option("aligner"), lambda: call.plugin("critic")):
            try:
                attempt()
            except UndeclaredAccess as exc:
                seen.setdefault("refused", []).append(str(exc))
        return call["judge"]

    stage = Stage("sneaky", sneaky, inputs=("judge",), settings=("masks.source",), codec=codecs.VERDICTS)
    registry.add_stage(stage, before="masks")
    _run(settings_file, tmp_path / "run", registry)
    assert seen["declared"] is True
    assert [r.split(" but ")[0] for r in seen["refused"]] == [
        "stage 'sneaky' reads input 'train'",
        "stage 'sneaky' reads setting 'aligner'",
        "stage 'sneaky' uses plugin slot 'critic'",
    ]


def test_a_plugin_stage_with_an_anchor_the_run_lacks_is_refused(tmp_path, settings_file, registry):
    registry.add_stage(Stage("late", lambda call: {}, codec=codecs.JSON), after="nowhere")
    with pytest.raises(ConfigurationError, match="stage 'late' .* is to go after 'nowhere', which this run does not have"):
        _run(settings_file, tmp_path / "run", registry)


def test_preflight_problems_stop_the_run_before_any_work_unless_the_stage_is_reused(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(pipeline_toys.ToyCritic, "preflight", lambda self, samples: [f"toy critic: no key for {samples} samples"], raising=False)
    with pytest.raises(ConfigurationError, match="toy critic: no key for 12 samples"):
        _run(settings_file, run_dir, registry)
    assert _read_calls(calls) == [] and not run_dir.exists()

    monkeypatch.delattr(pipeline_toys.ToyCritic, "preflight")
    _run(settings_file, run_dir, registry)
    monkeypatch.setattr(pipeline_toys.ToyCritic, "preflight", lambda self, samples: ["toy critic: no key"], raising=False)
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["aligner.shift=0.2"])  # the critic is reused: no key needed
    assert _status(pipe)["critic"] == "reused"


def test_a_finished_run_reads_without_a_pipeline(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _, results = _run(settings_file, run_dir, registry)
    run = open_run(run_dir)
    assert run.results()["evaluations"] == results["evaluations"]
    records = run.records()
    assert {"train", "critic", "judge", "results"} <= set(records)
    verdicts = run.load("judge")
    assert len(verdicts) == 12 and all(v.ok for v in verdicts)
    model = run.load("train", build_model=lambda shape, classes: pipeline_toys.ToyNet())
    assert isinstance(model, pipeline_toys.ToyNet) and not model.training
    with pytest.raises(NotARunDirectory):
        open_run(tmp_path)


def test_adopt_copies_shared_stages_whose_fingerprints_match(tmp_path, settings_file, registry, calls):
    _run(settings_file, tmp_path / "a", registry)
    settings = load_settings(settings_file, ["aligner.shift=0.7"], environ={}, registry=registry)
    pipe = Pipeline(settings, tmp_path / "b", registry=registry, echo=lambda _m: None)
    copied = pipe.adopt(tmp_path / "a", ["train", "select", "attribute", "segment", "render", "critic", "align"])
    assert copied == ["train", "select", "attribute", "segment", "render", "critic"]  # align's settings differ
    calls.unlink()
    pipe.run()
    assert "critic" not in _roles(calls) and "align" in _roles(calls)


# -- what a review of the loop found ----------------------------------------------------------


def test_a_refresh_that_stops_unfinished_never_leaves_the_old_answers_to_be_reused(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    chosen = open_run(run_dir).load("select").indices.tolist()
    monkeypatch.setenv("LVLMVA_TOY_CRITIC_SALT", "fresh ")
    monkeypatch.setenv("LVLMVA_TOY_UNREACHABLE", str(chosen[0]))
    with pytest.raises(StageFailed):
        _run(settings_file, run_dir, registry, refresh=True)
    monkeypatch.delenv("LVLMVA_TOY_UNREACHABLE")
    pipe, _ = _run(settings_file, run_dir, registry)  # a plain run after the failed refresh
    assert _status(pipe)["critic"] == "computed"
    assert all("fresh" in c.text for c in open_run(run_dir).load("critic"))


def test_a_configuration_error_inside_a_stage_is_that_stages_failure(tmp_path, settings_file, registry):
    def strict(call):
        raise ConfigurationError("this stage does not like its settings")

    registry.add_stage(Stage("strict", strict, inputs=("judge",), codec=codecs.JSON), after="reference")
    settings = load_settings(settings_file, ["mitigators.m.plugin=toy"], environ={}, registry=registry)
    pipe = Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)
    with pytest.raises(StageFailed) as info:
        pipe.run()
    assert list(info.value.failures) == ["strict"]
    assert _status(pipe)["mitigate.m"] == _status(pipe)["results"] == "computed"


def test_a_plugin_stage_with_its_own_codec_is_reused_and_read_back(tmp_path, settings_file, registry, calls):
    class Text:
        name = "toy-text"

        def encode(self, value, folder):
            (folder / "note.txt").write_text(value)

        def decode(self, folder, ctx):
            return (folder / "note.txt").read_text()

    def note(call):
        pipeline_toys._count("note")
        return f"{len(call['judge'])} verdicts"

    registry.add_stage(Stage("note", note, inputs=("judge",), codec=Text()), after="judge")
    _run(settings_file, tmp_path / "run", registry)
    pipe, _ = _run(settings_file, tmp_path / "run", registry)
    assert _status(pipe)["note"] == "reused" and _roles(calls).count("note") == 1
    assert open_run(tmp_path / "run").load("note") == "12 verdicts"


def test_a_plugin_stage_recomputes_when_its_package_version_changes(tmp_path, settings_file, registry):
    registry._source = ("flip-plugin", "1.0", "flip")
    registry.add_stage(pipeline_toys.FLIP_STAGE, after="judge", options=pipeline_toys.FlipOptions)
    _run(settings_file, tmp_path / "run", registry)
    upgraded = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=upgraded)
    upgraded._source = ("flip-plugin", "1.1", "flip")
    upgraded.add_stage(pipeline_toys.FLIP_STAGE, after="judge", options=pipeline_toys.FlipOptions)
    pipe, _ = _run(settings_file, tmp_path / "run", upgraded)
    assert _status(pipe)["flip"] == "computed" and _status(pipe)["judge"] == "reused"


def test_true_masks_do_not_wait_for_a_failed_critic(tmp_path, settings_file, registry, monkeypatch):
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "critic")
    settings = load_settings(settings_file, ["masks.source=true"], environ={}, registry=registry)
    pipe = Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)
    with pytest.raises(StageFailed):
        pipe.run()
    status = _status(pipe)
    assert status["critic"] == "failed" and status["masks"] == status["align"] == status["evaluate.toy"] == "computed"
    assert status["judge"] == "blocked" and status["results"] == "computed"
    assert set(json.loads((tmp_path / "run" / "results.json").read_text())["failed"]) == {"critic", "judge", "verdicts"}


def test_a_data_check_that_stops_the_run_leaves_the_last_results_in_place(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    results, resolved = (run_dir / "results.json").read_bytes(), (run_dir / "settings.resolved.toml").read_bytes()
    with pytest.raises(ConfigurationError, match="selection.n = 500"):
        _run(settings_file, run_dir, registry, overrides=["selection.n=500"])
    assert (run_dir / "results.json").read_bytes() == results
    assert (run_dir / "settings.resolved.toml").read_bytes() == resolved


def test_reserved_and_malformed_stage_names_are_refused():
    for name in ("figures", "results.json", "Bad", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="must be a folder name"):
            Stage(name, lambda call: None, codec=codecs.JSON)


def test_a_folder_that_looks_like_an_old_run_is_not_taken_over(tmp_path, settings_file, registry):
    # a folder of the user's that happens to hold env.json (naming lvlmva) and
    # settings.resolved.toml beside their own report, figures and train/ folder
    old = tmp_path / "old"
    (old / "train").mkdir(parents=True)
    (old / "figures").mkdir()
    (old / "figures" / "plot.png").write_bytes(b"png")
    (old / "report.md").write_text("my notes")
    (old / "train" / "fingerprint.json").write_text('{"stage": "train", "fingerprint": "x"}')
    (old / "settings.resolved.toml").write_text("[run]\n")
    (old / "env.json").write_text(json.dumps({"packages": {"lvlmva": "0.1.0"}}))
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    with pytest.raises(NotARunDirectory) as info:
        _run(settings_file, old, registry)
    message = str(info.value)
    assert "older lvlmva" in message and ".lvlmva-run" in message and "adopt" in message
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before  # nothing touched
    assert (old / "report.md").read_text() == "my notes"
    # adopted as the message says: the run goes on there
    command = message.split("adopt it with: ")[1].split("   ")[0]
    subprocess.run(["bash", "-c", command], check=True)
    pipe, _ = _run(settings_file, old, registry)
    assert _status(pipe)["train"] == "computed"
    # an env.json that is not lvlmva's is simply a folder that is not ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "env.json").write_text(json.dumps({"packages": {"numpy": "2"}}))
    (other / "settings.resolved.toml").write_text("")
    with pytest.raises(NotARunDirectory, match="not an lvlmva run directory"):
        _run(settings_file, other, registry)


def test_a_claim_killed_while_writing_the_marker_leaves_a_folder_that_can_be_claimed(tmp_path):
    from lvlmva.pipeline import RunDirectory
    from lvlmva.pipeline.errors import NotARunDirectory

    # what a worker killed between write_atomic's temporary file and its rename leaves behind
    cut = tmp_path / "cell"
    cut.mkdir()
    (cut / "..lvlmva-run.0123456789ab.tmp").write_text('{"lvl')
    RunDirectory.claim(cut)
    assert (cut / ".lvlmva-run").is_file() and sorted(p.name for p in cut.iterdir()) == [".lvlmva-run"]
    # anything else is still a folder of the user's
    other = tmp_path / "other"
    other.mkdir()
    (other / "..lvlmva-run.0123456789ab.tmp").write_text("")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(NotARunDirectory, match="is not empty"):
        RunDirectory.claim(other)
    assert sorted(p.name for p in other.iterdir()) == ["..lvlmva-run.0123456789ab.tmp", "notes.txt"]


def test_a_training_role_that_reads_the_test_split_fails(tmp_path, settings_file):
    """Aligners and mitigators get the training and validation splits only; an evaluator the
    splits it declares. A plugin that reaches for the test split fails with a message that says
    which split and which role, and the stages that do not need it still run."""
    from lvlmva.records import SplitWithheld

    seen: dict[str, object] = {}

    class PeekingAligner(pipeline_toys.ToyAligner):
        def align(self, model, data, alignment, masks, ctx):
            seen["aligner val"] = len(data.val) if data.val is not None else None
            seen["aligner train"] = len(data.train)
            return data.test.images  # a shortcut to the test set

    class PeekingMitigator(pipeline_toys.ToyMitigator):
        def mitigate(self, original, trainer, data, ctx):
            seen["mitigator train"] = len(data.train)
            len(data.test)
            return original

    class ValEvaluator(pipeline_toys.ToyEvaluator):
        split = "val"

        def evaluate(self, model, data, ctx, attribute=None):
            seen["evaluator val"] = len(data.val)
            return {"accuracy": float(data.test.labels.float().mean())}

    registry = _registry()
    registry.add("aligner", "peek", PeekingAligner)
    registry.add("mitigator", "peek", PeekingMitigator)
    registry.add("evaluator", "val-peek", ValEvaluator)
    overrides = ["aligner.plugin=peek", "mitigators.m.plugin=peek", "evaluators.toy.plugin=val-peek", "dataset.val=8"]
    with pytest.raises(StageFailed) as info:
        _run(settings_file, tmp_path / "run", registry, overrides=overrides)
    failures = info.value.failures
    assert set(failures) >= {"align", "reference", "mitigate.m", "evaluate.toy"}
    for stage in ("align", "reference", "mitigate.m", "evaluate.toy"):
        assert isinstance(failures[stage], SplitWithheld), stage
    assert "the test split is not given to the aligner: a training role reads the training and validation splits only" in str(failures["align"])
    assert "mitigator 'm'" in str(failures["mitigate.m"])
    assert "evaluator 'toy', which declares split = 'val'" in str(failures["evaluate.toy"])
    # what they may read, they got
    assert seen["aligner train"] > 0 and seen["mitigator train"] > 0 and seen["evaluator val"] == 8


def test_a_mitigator_that_declares_oracle_test_selection_gets_the_test_split_and_is_labelled_an_upper_bound(
    tmp_path, settings_file
):
    from lvlmva.model_selection import UPPER_BOUND_MARK, selection_record
    from lvlmva.protocols import PluginOptions
    from lvlmva.records import TrainedModel

    seen: dict[str, int] = {}

    class Chooser(pipeline_toys.ToyMitigator):
        class Options(PluginOptions):
            selection: str = "worst-group"

        def mitigate(self, original, trainer, data, ctx):
            if self.options.selection == "oracle-test":
                seen[self.options.selection] = len(data.test)
            return TrainedModel(original, {"selection": selection_record(self.options.selection)})

    registry = _registry()
    registry.add("mitigator", "chooser", Chooser)
    overrides = [
        "mitigators.fair.plugin=chooser",
        "mitigators.peeking.plugin=chooser",
        "mitigators.peeking.selection=oracle-test",
        "report.enabled=true",
    ]
    _run(settings_file, tmp_path / "run", registry, overrides=overrides)
    assert seen["oracle-test"] > 0  # the test split was given, to that mitigator only
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["models"]["peeking"]["details"]["selection"]["upper_bound"] is True
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"peeking (chooser) {UPPER_BOUND_MARK}" in report
    assert "- fair (chooser): worst-group accuracy on the validation split" in report
    assert "TEST split: an upper bound" in report
    summary = "\n".join(summary_lines(results))
    assert UPPER_BOUND_MARK in summary


@pytest.mark.parametrize("needs_background", [True, False])
def test_an_attributor_gets_a_background_pool_only_when_it_declares_it_needs_one(tmp_path, settings_file, needs_background):
    pools: list[int] = []

    class Recording(pipeline_toys.ToyAttributor):
        def attribute(self, model, inputs, targets, reference_pool, ctx):
            pools.append(int(reference_pool.shape[0]))
            return super().attribute(model, inputs, targets, reference_pool, ctx)

    Recording.needs_background = needs_background
    registry = _registry()
    registry.add("attributor", "recording", Recording)
    _run(settings_file, tmp_path / "run", registry, overrides=["attributor.plugin=recording"])
    assert pools and set(pools) == ({96} if needs_background else {0})


def test_every_capability_flag_of_a_role_is_read_by_the_pipeline():
    """A flag a plugin declares and nothing reads would promise what does not happen."""
    from lvlmva.protocols import ROLES

    pipeline_dir = Path(__import__("lvlmva.pipeline", fromlist=["x"]).__file__).parent
    source = "\n".join(p.read_text() for p in pipeline_dir.glob("*.py"))
    for role, proto in ROLES.items():
        for name, annotation in proto.__annotations__.items():
            if "bool" in str(annotation):
                assert f'"{name}"' in source or f".{name}" in source, f"{role} flag {name} is read nowhere in lvlmva.pipeline"


def test_an_aligner_gets_the_relevant_regions_beside_the_spurious_ones(tmp_path, settings_file):
    """The masks stage keeps both polarities of the verdicts: the aligner's masks are the "no"
    clusters and ``alignment.relevant`` the "yes" ones (with the true masks: everything off them)."""
    seen: dict[str, tuple] = {}

    class Recording(pipeline_toys.ToyAligner):
        def align(self, model, data, alignment, masks, ctx):
            seen[ctx.stage] = (alignment.relevant.clone(), masks.clone())
            return super().align(model, data, alignment, masks, ctx)

    registry = _registry()
    registry.add("aligner", "recording", Recording)
    _run(settings_file, tmp_path / "run", registry, overrides=["aligner.plugin=recording"])
    relevant, masks = seen["align"]
    assert relevant.shape == masks.shape and relevant.dtype == torch.bool
    # the toy judge calls the top-left quadrant "no" and the rest "yes": the two tile the image
    assert torch.equal(relevant, ~masks) and bool(masks[:, :4, :4].all()) and not bool(masks[:, 4:, :].any())
    relevant, masks = seen["reference"]
    assert torch.equal(relevant, ~masks)


def test_the_summary_says_when_no_evaluator_is_configured():
    results = {
        "models": {"original": {"label": "original", "stage": "train"}},
        "evaluations": {},
        "settings": {"run": {"seed": 0}},
    }
    assert summary_lines(results)[-1] == (
        '  (no metrics: the settings name no evaluator; add [evaluators.standard] plugin = "standard")'
    )
    results["settings"]["evaluators"] = {"standard": {"plugin": "standard"}}  # configured, failed: said elsewhere
    assert not any("no metrics" in line for line in summary_lines(results))
