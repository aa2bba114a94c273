"""Several segmenters, critic/judge pairs and aligners in one run: the stages fan out over
them, every branch is a labelled model, the verdicts are reported per branch, and adding a
critic to a finished run recomputes only its branch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvlmva.pipeline import ConfigurationError, Pipeline
from lvlmva.registry import PluginRegistry
from lvlmva.settings import SettingsError, load_settings

from . import pipeline_toys

AFTER_THE_BRANCHES = """
[aligners.one]
plugin = "toy"
shift = 0.01

[aligners.two]
plugin = "toy"
shift = 0.05

[evaluators.toy]
plugin = "toy"

[report]
enabled = false
"""


@pytest.fixture
def registry() -> PluginRegistry:
    reg = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=reg)
    return reg


def _settings_file(tmp_path: Path, extra: str = "", fail_ids: list[int] | None = None) -> Path:
    path = tmp_path / "branches.toml"
    path.write_text(pipeline_toys.toy_branches((tmp_path / "cache").as_posix(), fail_ids or []) + AFTER_THE_BRANCHES + extra)
    return path


def _run(path: Path, run_dir: Path, registry: PluginRegistry, overrides=()) -> tuple[Pipeline, dict]:
    settings = load_settings(path, overrides, environ={}, registry=registry)
    pipe = Pipeline(settings, run_dir, registry=registry, echo=lambda _m: None)
    return pipe, pipe.run()


def _train_index_of_first_selected(run_dir: Path) -> int:
    from lvlmva.pipeline import open_run

    return int(open_run(run_dir).load("select").indices[0])


def test_every_branch_is_a_labelled_model_with_its_own_verdicts(tmp_path, registry):
    run_dir = tmp_path / "run"
    pipe, results = _run(_settings_file(tmp_path), run_dir, registry)
    names = [s.name for s in pipe.stages]
    for seg in ("a", "b"):
        assert f"segment.{seg}" in names and f"render.{seg}" in names
        for critic in ("x", "y"):
            for base in ("critic", "judge", "overrides", "masks"):
                assert f"{base}.{seg}.{critic}" in names
            for aligner in ("one", "two"):
                assert f"align.{aligner}.{seg}.{critic}" in names
    assert {"reference.one", "reference.two"} <= set(names)
    assert {o.status for o in pipe.outcomes.values()} <= {"computed", "skipped"}

    models = results["models"]
    assert len([m for m in models if m.startswith("aligned.")]) == 8
    assert models["aligned.two.b.y"]["label"] == "aligned: two, y critic, b segmenter"
    assert models["true_mask.one"]["label"] == "true-mask reference: one"
    # each aligner used its own options on each branch's masks: the models differ
    accuracy = results["evaluations"]["toy"]["models"]
    assert set(accuracy) == set(models)
    # verdicts per branch, with who made them
    assert set(results["branches"]) == {"a.x", "a.y", "b.x", "b.y"}
    branch = results["branches"]["b.y"]
    assert branch["segmenter"]["instance"] == "b" and branch["judge"] == "toy"
    assert branch["critic"]["label"] == "toy critic" and branch["verdicts"]["verdict_accuracy"] is not None
    assert "verdicts" not in results  # not at the top: which branch would it be?
    assert results["usage"]["requests"] == sum(b["usage"]["requests"] for b in results["branches"].values())
    # the overrides of a branch are its own file
    overrides = {s.name: s.watch for s in pipe.stages if s.name.startswith("overrides.")}
    assert overrides["overrides.b.y"] == ("review/b.y/overrides.json",)


def test_a_judge_failure_stays_in_its_branch(tmp_path, registry):
    run_dir = tmp_path / "run"
    # the strict judge fails every sample: y's branches have no masks; x's align
    path = _settings_file(tmp_path, fail_ids=list(range(400)))
    from lvlmva.pipeline import StageFailed

    with pytest.raises(StageFailed) as info:
        _run(path, run_dir, registry)
    failed = set(info.value.failures)
    assert failed == {f"align.{a}.{s}.y" for a in ("one", "two") for s in ("a", "b")}
    results = json.loads((run_dir / "results.json").read_text())
    assert "aligned.one.a.x" in results["models"] and "aligned.one.a.y" not in results["models"]
    assert results["branches"]["a.y"]["alignment"]["aligned_on"] == 0


def test_adding_a_critic_to_a_finished_run_recomputes_only_its_branch(tmp_path, registry):
    run_dir = tmp_path / "run"
    path = _settings_file(tmp_path)
    _run(path, run_dir, registry)
    path.write_text(path.read_text() + '\n[critics.z]\nplugin = "toy"\njudge = "lenient"\n')
    pipe, results = _run(path, run_dir, registry)
    status = {name: o.status for name, o in pipe.outcomes.items()}
    computed = {name for name, s in status.items() if s == "computed"}
    new_branch = {f"{base}.{seg}.z" for base in ("critic", "judge", "overrides", "masks") for seg in ("a", "b")}
    new_models = {f"align.{a}.{seg}.z" for a in ("one", "two") for seg in ("a", "b")}
    assert computed == new_branch | new_models | {"data", "evaluate.toy", "results", "report"}
    assert status["train"] == status["segment.a"] == status["critic.a.x"] == status["align.one.b.y"] == "reused"
    assert status["reference.one"] == "reused"
    assert set(results["branches"]) == {"a.x", "a.y", "b.x", "b.y", "a.z", "b.z"}


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[critic]\nplugin = "toy"\n', "[critic] and [critics.x] are both set"),
        ('[critics.w]\nplugin = "toy"\n', '[critics.w] needs judge = "<name>": the run has several judges'),
        ('[critics.w]\nplugin = "toy"\njudge = "nobody"\n', "critics.w.judge = 'nobody' names no [judges.nobody] table"),
        ('[judges.idle]\nplugin = "toy"\n', "[judges.idle] is the judge of no critic"),
    ],
)
def test_pairs_that_cannot_work_are_named_before_any_work(tmp_path, registry, extra, message):
    with pytest.raises(SettingsError) as info:
        load_settings(_settings_file(tmp_path, "\n" + extra), environ={}, registry=registry)
    assert message in str(info.value)


def test_a_critic_without_a_judge_in_a_fan_out_is_refused(tmp_path, registry):
    path = tmp_path / "one.toml"
    text = pipeline_toys.toy_branches((tmp_path / "cache").as_posix()) + AFTER_THE_BRANCHES
    text = text.replace('judge = "lenient"\n', "").replace('judge = "strict"\n', "")
    text = text.replace('[judges.lenient]\nplugin = "toy"\n', "").replace('[judges.strict]\nplugin = "toy"\nfail_ids = []\n', "")
    path.write_text(text)
    settings = load_settings(path, environ={}, registry=registry)
    with pytest.raises(ConfigurationError, match=r"\[critics.x\] is set but \[judge\] is not"):
        Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)


def test_the_report_compares_the_branches_and_the_summary_names_them(tmp_path, registry):
    from lvlmva.results import summary_lines

    run_dir = tmp_path / "run"
    path = _settings_file(tmp_path)
    path.write_text(path.read_text().replace("[report]\nenabled = false", "[report]\nsamples = 2\ntest_images = 2"))
    _pipe, results = _run(path, run_dir, registry)
    report = (run_dir / "report.md").read_text()
    assert "## Verdicts per branch" in report
    table = report.split("## Verdicts per branch")[1].split("## Branch")[0]
    assert "| `a.x` | `a.y` | `b.x` | `b.y` |" in table and "| verdict accuracy |" in table
    for key in ("a.x", "b.y"):
        assert f"## Branch `{key}`" in report and f"## Alignment samples (branch `{key}`)" in report
        assert (run_dir / "figures" / f"alignment_samples_{key.replace('.', '_')}.png").is_file()
    lines = summary_lines(results)
    assert any(line.startswith("  branch b.y: verdict accuracy") for line in lines)
    assert any("aligned: two, y critic, b segmenter" in line for line in lines)


def test_until_a_stage_that_fans_out_stops_after_its_last_instance(tmp_path, registry, capsys):
    from lvlmva.cli import EXIT_OK, main
    from lvlmva.registry import register_module

    path = _settings_file(tmp_path)
    settings = load_settings(path, environ={}, registry=registry)
    pipe = Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None, until="judge")
    assert pipe.until == "judge.b.y"
    assert pipe.skipped["align.one.a.x"] == "after --until judge.b.y"
    # the command line says so and points at the review
    register_module(pipeline_toys, "branch_toys")
    try:
        assert main(["compose", str(path), "--out", str(tmp_path / "run"), "--until", "judge"]) == EXIT_OK
    finally:
        from lvlmva.registry import reset_plugins

        reset_plugins()
    out = capsys.readouterr().out
    assert "stopped after judge (judge.b.y, the last of them)" in out and "lvlmva review" in out


def test_a_lambda_sweep_shares_every_branch_s_stages_before_alignment(tmp_path, registry):
    from lvlmva.sweep import _shared

    settings = load_settings(_settings_file(tmp_path), environ={}, registry=registry)
    shared = set(_shared(Pipeline(settings, tmp_path / "run", registry=registry, echo=lambda _m: None)))
    assert {"train", "segment.a", "render.b", "critic.a.x", "judge.b.y", "overrides.a.y", "masks.b.x"} <= shared
    assert not any(name.startswith(("align", "reference", "evaluate", "results")) for name in shared)
