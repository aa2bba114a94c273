"""Evaluators declare figures (lvlmva.Figure: a PNG in their stage folder and a caption) and
report.md shows each under that evaluator's tables, copied to a name that stays the same from
run to run (figures/evaluate.<instance>/<file>); a declared file that is missing is named. The
built-in evaluators declare theirs, and declaring figures never changes a number."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.protocols import Figure, Metric, RunContext  # noqa: E402
from lvlmva.registry import PluginRegistry  # noqa: E402
from lvlmva.report import evaluator_figures, models_section, write_report  # noqa: E402
from lvlmva.settings import ReportOptions, load_settings  # noqa: E402


def _png(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 80), colour).save(path)


def _results(figures: dict[str, list[dict]]) -> dict:
    models = {"original": {"label": "original", "stage": "train"}, "aligned": {"label": "aligned (rrr)", "stage": "align"}}
    evaluations = {}
    for name in ("groups", "corruptions"):
        evaluations[name] = {
            "plugin": "standard" if name == "groups" else "medmnist-c",
            "split": "test",
            "metrics": [Metric("accuracy", "Accuracy").to_dict()],
            "models": {"original": {"accuracy": 0.5}, "aligned": {"accuracy": 0.75}},
            **({"figures": figures[name]} if name in figures else {}),
        }
    return {"models": models, "evaluations": evaluations}


def _section(text: str, evaluator: str) -> str:
    """The lines of report.md's Models section that belong to ``evaluator``'s table."""
    start = text.index(f"Evaluator `{evaluator}`")
    ends = [i for i in (text.find("Evaluator `", start + 1), text.find("\n## ", start)) if i != -1]
    return text[start : min(ends)]


def _write(run_dir: Path, results: dict) -> str:
    path = write_report(
        run_dir, results, options=ReportOptions(), rendered=[], verdicts=[], critiques=[], test_images=None,
        test_labels=None, attributions={}, class_names=["a", "b"], out_dir=run_dir / "report",
    )  # fmt: skip
    return path.read_text(encoding="utf-8")


def test_declared_figures_are_linked_with_captions_under_their_evaluator(tmp_path):
    _png(tmp_path / "evaluate.groups" / "group_accuracy.png")
    _png(tmp_path / "evaluate.corruptions" / "drop_by_severity.png", (30, 30, 200))
    results = _results({
        "groups": [{"file": "evaluate.groups/group_accuracy.png", "caption": "Accuracy per group."}],
        "corruptions": [{"file": "evaluate.corruptions/drop_by_severity.png", "caption": "Drop per severity."}],
    })  # fmt: skip
    text = _write(tmp_path, results)
    groups, corruptions = _section(text, "groups"), _section(text, "corruptions")
    assert "![Accuracy per group.](figures/evaluate.groups/group_accuracy.png)" in groups
    assert "*Accuracy per group.*" in groups and "drop_by_severity" not in groups
    assert "![Drop per severity.](figures/evaluate.corruptions/drop_by_severity.png)" in corruptions
    assert "*Drop per severity.*" in corruptions
    # copied beside report.md under a name by evaluator instance and figure name
    copied = tmp_path / "report" / "figures" / "evaluate.groups" / "group_accuracy.png"
    assert copied.read_bytes() == (tmp_path / "evaluate.groups" / "group_accuracy.png").read_bytes()
    assert (tmp_path / "report" / "figures" / "evaluate.corruptions" / "drop_by_severity.png").is_file()


def test_a_declared_figure_whose_file_is_missing_is_named(tmp_path):
    _png(tmp_path / "evaluate.groups" / "here.png")
    results = _results({"groups": [
        {"file": "evaluate.groups/here.png", "caption": "Present."},
        {"file": "evaluate.groups/gone.png", "caption": "Never written."},
        {"file": "../outside.png", "caption": "Outside the run."},
    ]})  # fmt: skip
    _png(tmp_path.parent / "outside.png")
    section = _section(_write(tmp_path, results), "groups")
    assert "](figures/evaluate.groups/here.png)" in section
    assert "Figure `gone.png` (Never written.) is missing" in section and "evaluate.groups/gone.png" in section
    assert "Figure `outside.png` (Outside the run.) is missing" in section
    assert not (tmp_path / "report" / "figures" / "evaluate.groups" / "gone.png").exists()
    assert not (tmp_path / "report" / "outside.png").exists()


def test_figures_of_an_evaluator_without_a_table_still_show(tmp_path):
    results = _results({})
    results["evaluations"]["pictures"] = {"plugin": "p", "split": "test", "metrics": [], "models": {"original": {}},
                                          "figures": [{"file": "evaluate.pictures/a.png", "caption": "Only a figure."}]}  # fmt: skip
    _png(tmp_path / "evaluate.pictures" / "a.png")
    text = _write(tmp_path, results)
    assert "Evaluator `pictures`:" in text and "](figures/evaluate.pictures/a.png)" in text


def test_models_section_without_figures_is_as_before():
    results = _results({})
    assert models_section(results) == models_section(results, {})
    assert not any("figures/" in line for line in models_section(results))


# -- the evaluate stage's part -------------------------------------------------------------------------


def _ctx(tmp_path: Path) -> RunContext:
    stage = tmp_path / ".partial-evaluate.groups"
    stage.mkdir(parents=True)
    return RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=stage, cache_dir=tmp_path,
                      stage="evaluate.groups")  # fmt: skip


class _Declares:
    def __init__(self, *figures) -> None:
        self.declared = figures
        self.seen = None

    def figures(self, models, labels, ctx):
        self.seen = (models, labels)
        models["original"]["accuracy"] = 0.0  # a careless evaluator cannot change a result
        return list(self.declared)


def test_the_stage_records_figures_relative_to_the_run_directory(tmp_path):
    models = {"original": {"accuracy": 0.5}}
    evaluator = _Declares(Figure("a.png", "A."), Figure("sub/b.png", "B."))
    out = evaluator_figures(evaluator, models, {"original": "original f"}, _ctx(tmp_path), "evaluator 'groups'")
    assert out == [{"file": "evaluate.groups/a.png", "caption": "A."}, {"file": "evaluate.groups/sub/b.png", "caption": "B."}]
    assert evaluator.seen[1] == {"original": "original f"}
    assert models == {"original": {"accuracy": 0.5}}
    assert evaluator_figures(object(), models, {}, _ctx(tmp_path / "x"), "e") == []  # no figures method


@pytest.mark.parametrize(
    ("declared", "error"),
    [
        ((Figure("/tmp/a.png", "A."),), "inside the stage's folder"),
        ((Figure("../a.png", "A."),), "inside the stage's folder"),
        ((Figure("", "A."),), "inside the stage's folder"),
        ((Figure("a.png", "A."), Figure("a.png", "again")), "declared twice"),
        (({"file": "a.png", "caption": "A."},), "lvlmva.Figure"),
    ],
)
def test_bad_declarations_name_the_evaluator(tmp_path, declared, error):
    with pytest.raises((ValueError, TypeError), match=error) as info:
        evaluator_figures(_Declares(*declared), {"original": {}}, {}, _ctx(tmp_path), "evaluator 'groups' (standard)")
    assert "evaluator 'groups' (standard)" in str(info.value)


# -- in a run: the built-in evaluator declares its figure, and no number changes ---------------------


class FigureToyEvaluator(pipeline_toys.ToyEvaluator):
    """The toy evaluator, drawing one figure and declaring one it never writes."""

    def figures(self, models, labels, ctx):
        _png(ctx.stage_dir / "bars.png")
        return [Figure("bars.png", f"Bars of {', '.join(labels.values())}."), Figure("never.png", "Never drawn.")]


def _run(tmp_path: Path, name: str, with_figures: bool) -> tuple[Path, dict]:
    from lvlmva.pipeline import Pipeline

    registry = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=registry)
    registry.add("evaluator", "figtoy", FigureToyEvaluator if with_figures else pipeline_toys.ToyEvaluator)
    path = tmp_path / "toy.toml"
    settings = pipeline_toys.TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{(tmp_path / "cache").as_posix()}"\n', 1)
    settings = settings.replace("[report]\nenabled = false\n", "[evaluators.figs]\nplugin = \"figtoy\"\n\n[report]\ntest_images = 0\n")
    path.write_text(settings)
    run_dir = tmp_path / name
    Pipeline(load_settings(path, (), environ={}, registry=registry), run_dir, registry=registry, echo=lambda _m: None).run()
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_a_run_links_an_evaluators_figures_and_its_numbers_do_not_change(tmp_path):
    run_dir, results = _run(tmp_path, "with", with_figures=True)
    _, plain = _run(tmp_path, "without", with_figures=False)
    assert results["evaluations"]["figs"]["figures"] == [
        {"file": "evaluate.figs/bars.png", "caption": "Bars of original, aligned (toy critic), true-mask reference."},
        {"file": "evaluate.figs/never.png", "caption": "Never drawn."},
    ]
    assert "figures" not in plain["evaluations"]["figs"] and "figures" not in results["evaluations"]["toy"]
    for name in ("toy", "figs"):
        assert results["evaluations"][name]["models"] == plain["evaluations"][name]["models"]
    section = _section((run_dir / "report.md").read_text(encoding="utf-8"), "figs")
    assert "![Bars of original, aligned (toy critic), true-mask reference.](figures/evaluate.figs/bars.png)" in section
    assert "Figure `never.png` (Never drawn.) is missing" in section
    # published at the top of the run directory with the report
    assert (run_dir / "figures" / "evaluate.figs" / "bars.png").is_file()


# -- the built-in evaluators' figures -----------------------------------------------------------------


def _image(path: Path):
    import numpy as np

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels.min(axis=2) < 200).mean() > 0.01  # something drawn


def test_the_standard_evaluator_draws_group_accuracy(tmp_path):
    from lvlmva.plugins.evaluators.standard import StandardEvaluator, StandardEvaluatorOptions

    ctx = _ctx(tmp_path)
    models = {
        "original": {"accuracy": 0.8, "group_accuracy": {"7/decoy": 0.9, "7/none": 0.4, "1/decoy": None}},
        "aligned": {"accuracy": 0.85, "group_accuracy": {"7/decoy": 0.85, "7/none": 0.8, "1/decoy": None}},
    }
    out = evaluator_figures(StandardEvaluator(StandardEvaluatorOptions()), models, {"original": "f", "aligned": "aligned"}, ctx, "e")
    assert out == [{"file": "evaluate.groups/group_accuracy.png", "caption": out[0]["caption"]}]
    assert "worst group" in out[0]["caption"]
    _image(ctx.stage_dir / "group_accuracy.png")
    # without group labels there is nothing to draw
    assert evaluator_figures(StandardEvaluator(StandardEvaluatorOptions()), {"original": {"accuracy": 0.8}}, {}, _ctx(tmp_path / "b"), "e") == []


def test_the_medmnist_c_evaluator_draws_the_drop_per_severity(tmp_path):
    from lvlmva.plugins.evaluators.medmnist_c import MedmnistCEvaluator, MedmnistCOptions

    ctx = _ctx(tmp_path)
    evaluator = MedmnistCEvaluator(MedmnistCOptions(severities=[1, 3]))
    models = {
        "original": {"samples": 40, "drop_by_severity": {"a/s1": 0.1, "a/s3": 0.3, "b/s1": 0.0, "b/s3": 0.2}},
        "aligned": {"samples": 40, "drop_by_severity": {"a/s1": 0.05, "a/s3": 0.1, "b/s1": 0.0, "b/s3": 0.1}},
    }
    [figure] = evaluator_figures(evaluator, models, {"original": "f", "aligned": "aligned"}, ctx, "e")
    assert figure["file"] == "evaluate.groups/drop_by_severity.png"
    assert "mean over the 2 corruptions" in figure["caption"] and "40 test images" in figure["caption"]
    _image(ctx.stage_dir / "drop_by_severity.png")
    nothing = {"original": {"samples": 40, "drop_by_severity": {}}}
    assert evaluator_figures(evaluator, nothing, {}, _ctx(tmp_path / "b"), "e") == []
