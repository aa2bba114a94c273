"""Pipeline runner: resume, invalidation, skipping, failures, atomic artifacts, a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.pipeline import ConfigurationError, Pipeline, StageFailed  # noqa: E402
from lvlmva.registry import PluginRegistry  # noqa: E402
from lvlmva.settings import load_settings  # noqa: E402


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=reg)
    return reg


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


def _run(settings_file: Path, run_dir: Path, registry: PluginRegistry, overrides=(), **kw):
    settings = load_settings(settings_file, overrides, environ={}, registry=registry)
    pipe = Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None, **kw)
    return pipe, pipe.run()


def test_fresh_run_then_full_reuse(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    pipe, results = _run(settings_file, run_dir, registry)
    status = {k: o.status for k, o in pipe.outcomes.items()}
    assert status["train"] == "computed" and status["align"] == "computed"
    assert status["mitigate"] == "skipped" and "no [mitigator]" in pipe.outcomes["mitigate"].reason
    assert set(results["models"]) == {"original", "aligned", "true-mask bound"}
    for name in ("settings.resolved.toml", "env.json", "results.json", "metrics.jsonl", "timings.json"):
        assert (run_dir / name).exists(), name
    env = json.loads((run_dir / "env.json").read_text())
    from importlib import metadata

    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["device"] == "cpu" and env["python"] == sys.version.split()[0]
    first_calls = _read_calls(calls)
    assert first_calls.count("critic") == 1

    calls.unlink()
    pipe2, results2 = _run(settings_file, run_dir, registry)
    assert {o.status for o in pipe2.outcomes.values()} <= {"reused", "skipped"}
    assert _read_calls(calls) == []  # nothing recomputed, not even the data set
    assert results2 == results


def test_changed_setting_recomputes_that_stage_and_later(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["aligner.shift=0.5"])
    status = {k: o.status for k, o in pipe.outcomes.items()}
    assert status["train"] == status["critic"] == status["judge"] == "reused"
    assert status["align"] == status["bound"] == status["evaluate"] == "computed"
    assert "critic" not in _read_calls(calls)

    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["aligner.shift=0.5", "selection.n=10"])
    status = {k: o.status for k, o in pipe.outcomes.items()}
    assert status["train"] == "reused"
    assert status["select"] == status["critic"] == status["align"] == "computed"


def test_same_seed_same_numbers_and_seed_changes_them(tmp_path, settings_file, registry):
    _, a = _run(settings_file, tmp_path / "a", registry)
    _, b = _run(settings_file, tmp_path / "b", registry)
    assert a["models"] == b["models"]
    _, c = _run(settings_file, tmp_path / "c", registry, overrides=["run.seed=1"])
    assert c["models"] != a["models"]


def test_failed_verdicts_are_left_out_and_counted(tmp_path, settings_file, registry):
    pipe, _ = _run(settings_file, tmp_path / "run", registry)
    chosen = pipe.get("select").indices.tolist()
    _, results = _run(settings_file, tmp_path / "run2", registry, overrides=[f"judge.fail_ids=[{chosen[0]}, {chosen[3]}]"])
    alignment = results["alignment"]
    assert alignment["samples"] == 12 and alignment["failed"] == 2 and alignment["aligned_on"] == 10
    assert {f["sample_id"] for f in alignment["failures"]} == {chosen[0], chosen[3]}
    assert all(f["reason"] == "told to fail" for f in alignment["failures"])


def test_failing_stage_names_itself_and_resume_reuses_earlier_stages(tmp_path, settings_file, registry, calls, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "align")
    with pytest.raises(StageFailed) as info:
        _run(settings_file, run_dir, registry)
    assert info.value.stage == "align" and "told to fail" in str(info.value)
    assert not (run_dir / "align").exists()  # nothing half-written that could load
    assert (run_dir / "judge" / "fingerprint.json").exists()

    monkeypatch.delenv("LVLMVA_TOY_FAIL")
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry)
    status = {k: o.status for k, o in pipe.outcomes.items()}
    assert status["critic"] == "reused" and status["align"] == "computed"
    assert "critic" not in _read_calls(calls)


def test_partial_stage_directory_is_never_loaded(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    # A torn write: the artifact is there but the fingerprint marker is not.
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


def test_stage_logs_are_replaced_when_a_stage_recomputes(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    _run(settings_file, run_dir, registry, overrides=["train.epochs=3"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x["epoch"] for x in lines if x.get("run_stage") == "train"]
    assert sorted(epochs) == sorted(set(epochs)) and len(epochs) == 3


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
    made = _read_calls(calls)
    assert "critic" not in made and "attribute" not in made  # finished stages reused
    # the interrupted stage ran again, and so did the bound stage after it (same aligner)
    assert made.count("align") == 2
    assert (run_dir / "align" / "fingerprint.json").exists() and not (run_dir / ".partial-align").exists()
    assert json.loads((run_dir / "results.json").read_text())["models"]["aligned"]["accuracy"] >= 0


def test_cli_exit_1_names_the_stage(tmp_path, settings_file, monkeypatch):
    script = RUNNER.format(toys=str(Path(__file__).parent), settings=str(settings_file), out=str(tmp_path / "run"))
    env = {**os.environ, "LVLMVA_TOY_FAIL": "critic"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "stage 'critic' failed" in done.stderr and str(tmp_path / "run") in done.stderr


def test_published_files_never_go_stale(tmp_path, settings_file, registry, monkeypatch):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    assert (run_dir / "results.json").exists() and (run_dir / "report.md").exists()
    # a failing run leaves no results.json or report.md from the run before it
    monkeypatch.setenv("LVLMVA_TOY_FAIL", "align")
    with pytest.raises(StageFailed):
        _run(settings_file, run_dir, registry, overrides=["report.enabled=true", "aligner.shift=0.3"])
    assert not (run_dir / "results.json").exists() and not (run_dir / "report.md").exists()
    monkeypatch.delenv("LVLMVA_TOY_FAIL")
    # deleted published files come back from the stored artifacts, with today's settings
    _run(settings_file, run_dir, registry, overrides=["report.enabled=true"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["settings"]["report"]["enabled"] is True
    _, again = _run(settings_file, run_dir, registry, overrides=["report.enabled=false"])
    assert not (run_dir / "report.md").exists()
    assert again["settings"]["report"]["enabled"] is False


def test_refresh_asks_the_critic_and_judge_again(tmp_path, settings_file, registry, calls):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    calls.unlink()
    pipe, _ = _run(settings_file, run_dir, registry, refresh=True)
    assert pipe.outcomes["critic"].status == pipe.outcomes["judge"].status == "computed"
    assert pipe.outcomes["train"].status == "reused"
    assert _read_calls(calls).count("critic") == 1


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
    _, first = _run(settings_file, run_dir, registry, overrides=["evaluator.numpy_scalars=true"])
    pipe, second = _run(settings_file, run_dir, registry, overrides=["evaluator.numpy_scalars=true"])
    assert pipe.outcomes["evaluate"].status == "reused"
    assert first["models"] == second["models"] and isinstance(second["models"]["original"]["accuracy"], float)


def test_settings_that_change_nothing_do_not_recompute(tmp_path, settings_file, registry):
    run_dir = tmp_path / "run"
    _run(settings_file, run_dir, registry)
    pipe, _ = _run(settings_file, run_dir, registry, overrides=["masks.true_mask_bound=false", "run.device=auto"] if not torch.cuda.is_available() else ["masks.true_mask_bound=false"])
    status = {k: o.status for k, o in pipe.outcomes.items()}
    assert status["train"] == status["masks"] == status["align"] == "reused"
    assert status["bound"] == "skipped"


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, settings_file, registry):
    from lvlmva.pipeline import RunDirectoryBusy, _RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = _RunLock(run_dir)
    try:
        with pytest.raises(RunDirectoryBusy, match="in use by another lvlmva run"):
            _run(settings_file, run_dir, registry)
    finally:
        held.release()
    _run(settings_file, run_dir, registry)  # free again
