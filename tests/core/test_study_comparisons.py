"""Comparisons between methods besides the baseline (``[study] compare`` and ``comparisons``):
a family of pairs tested with the Wilcoxon signed-rank test and Holm-corrected over itself,
known answers on fabricated results, the pairs the families read from the settings, a study of
the branch models on the toy pipeline, and keys the settings do not produce refused before any
cell runs."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))

import pipeline_toys  # noqa: E402

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main  # noqa: E402
from lvlmva.protocols import Metric  # noqa: E402
from lvlmva.registry import PluginRegistry  # noqa: E402
from lvlmva.settings import load_settings  # noqa: E402
from lvlmva.study.outputs import (  # noqa: E402
    CellResult,
    ComparisonFamily,
    pairs_differing_in,
    write_study_outputs,
)

# -- known answers on fabricated results -------------------------------------------------------

#: per seed, the original's AGA; every other model is it plus a difference in thousandths
BASE = [0.512, 0.640, 0.571, 0.703, 0.598, 0.655, 0.619]
ONE = "aligned.one.x"
#: the three pairs' differences (method − other), thousandths: all positive, the smallest
#: negative, the two smallest negative. Exact two-sided p = 2 x (sign patterns with a negative
#: rank sum <= W) / 2^7: W = 0 ({}), W = 1 ({}, {1}), W = 3 ({}, {1}, {2}, {3}, {1, 2})
PAIR_DIFFS = {
    ("aligned.one.x", "aligned.two.x"): [1, 2, 3, 4, 5, 6, 7],
    ("aligned.one.y", "aligned.two.y"): [-1, 2, 3, 4, 5, 6, 7],
    ("aligned.one.z", "aligned.two.z"): [-1, -2, 3, 4, 5, 6, 7],
}
HAND_P = [2 * 1 / 128, 2 * 2 / 128, 2 * 5 / 128]  # 0.015625, 0.03125, 0.078125
HAND_W = [0, 1, 3]
#: Holm by hand: sorted p times 3, 2, 1, each at least the one before
HAND_HOLM = [3 * HAND_P[0], max(3 * HAND_P[0], 2 * HAND_P[1]), max(3 * HAND_P[0], 2 * HAND_P[1], HAND_P[2])]
LABELS = {
    "original": "original",
    "aligned.one.x": "aligned: one, x critic",
    "aligned.two.x": "aligned: two, x critic",
    "aligned.one.y": "aligned: one, y critic",
    "aligned.two.y": "aligned: two, y critic",
    "aligned.one.z": "aligned: one, z critic",
    "aligned.two.z": "aligned: two, z critic",
}


def _values(seed: int) -> dict[str, float]:
    """AGA of every model at ``seed``: the 'two' models sit at distinct offsets from the
    original, and each 'one' model is its 'two' partner plus the pair's difference."""
    base = BASE[seed]
    out = {"original": base}
    for i, ((one, two), diffs) in enumerate(PAIR_DIFFS.items()):
        out[two] = base + (10 * (i + 1) + seed) / 1000
        out[one] = out[two] + diffs[seed] / 1000
    return out


def _cell(seed: int, dataset: str = "d") -> CellResult:
    values = _values(seed)
    results = {
        "models": {k: {"label": LABELS[k], "stage": f"s.{k}"} for k in values},
        "evaluations": {
            "groups": {
                "plugin": "standard",
                "split": "test",
                "metrics": [Metric("aga", "AGA").to_dict()],
                "models": {k: {"aga": v} for k, v in values.items()},
            }
        },
    }
    return CellResult(dataset, seed, "ok", results)


def _family(name: str = "aligners", pairs=tuple(PAIR_DIFFS)) -> ComparisonFamily:
    return ComparisonFamily(name, f"the {name} family", {"d": list(pairs)})


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def test_the_hand_computed_p_values_are_scipys():
    for diffs, p, w in zip(PAIR_DIFFS.values(), HAND_P, HAND_W, strict=True):
        got = stats.wilcoxon(np.array(diffs) / 1000, zero_method="wilcox", alternative="two-sided")
        assert got.pvalue == pytest.approx(p, rel=1e-12) and got.statistic == w
    assert HAND_HOLM == pytest.approx([0.046875, 0.0625, 0.078125])


def test_a_family_of_three_pairs_is_tested_and_holm_corrected_over_itself(tmp_path):
    cells = [_cell(s) for s in range(7)]
    lone = ComparisonFamily("lone", "one pair alone", {"d": [("aligned.one.z", "aligned.two.z")]})
    summary = write_study_outputs(cells, tmp_path, metrics=("aga",), families=[_family(), lone])
    data = _stats(tmp_path)
    (family, single) = data["families"]
    assert family["name"] == "aligners" and family["description"] == "the aligners family"
    assert family["pairs"] == {"d": [list(p) for p in PAIR_DIFFS]}
    entries = family["comparisons"]
    assert [(e["method"], e["other"]) for e in entries] == list(PAIR_DIFFS)
    for e, diffs, p, w, holm in zip(entries, PAIR_DIFFS.values(), HAND_P, HAND_W, HAND_HOLM, strict=True):
        assert (e["family"], e["dataset"], e["metric"]) == ("aligners", "d", "aga")
        assert e["label"] == LABELS[e["method"]] and e["other_label"] == LABELS[e["other"]]
        assert e["n"] == e["n_nonzero"] == 7 and e["seeds"] == list(range(7))
        assert e["mean_difference"] == pytest.approx(np.mean(diffs) / 1000)
        assert e["statistic"] == w
        assert e["p"] == pytest.approx(p, rel=1e-12)
        assert e["p_holm"] == pytest.approx(holm, rel=1e-12)
        assert e["effect"] == "better"
    # the first survives Holm; the second's own p (0.031) is below 0.05 but its Holm p is not
    assert [e["significant"] for e in entries] == [True, False, False]
    assert entries[0]["verdict"] == "better than aligned: two, x critic (Holm p < 0.05)"
    assert entries[1]["verdict"] == "no significant difference at 0.05"
    # a family of its own is corrected over itself only: one pair, Holm p = p
    (alone,) = single["comparisons"]
    assert alone["p"] == pytest.approx(HAND_P[2]) and alone["p_holm"] == pytest.approx(HAND_P[2])
    # the baseline's tests are those of a study without families
    plain = tmp_path / "plain"
    write_study_outputs(cells, plain, metrics=("aga",))
    assert data["comparisons"] == _stats(plain)["comparisons"]
    assert _stats(plain)["families"] == []
    assert summary["families"] == {
        "aligners": {"comparisons": 3, "tested": 3, "significant": 1},
        "lone": {"comparisons": 1, "tested": 1, "significant": 0},
    }

    text = (tmp_path / "stats.md").read_text()
    assert "# Family aligners: the aligners family" in text
    assert "## aligners, d: AGA (groups, test split)" in text
    header = "| Method | compared with | n | n≠0 | mean diff. | effect | W | p | Holm p | verdict |"
    assert header in text
    assert (
        "| aligned: one, x critic | aligned: two, x critic | 7 | 7 | +0.0040 | better | 0 | 0.0156 "
        "| 0.0469 | better than aligned: two, x critic (Holm p < 0.05) |"
    ) in text
    assert (
        "| aligned: one, y critic | aligned: two, y critic | 7 | 7 | +0.0037 | better | 1 | 0.0312 "
        "| 0.0625 | no significant difference at 0.05 |"
    ) in text
    # the family's table follows the baseline's, which keeps its own layout
    assert text.index("## d: AGA (groups, test split)") < text.index("# Family aligners")
    assert "| Method | n | n≠0 | mean diff. | effect | W | p | Holm p | verdict |" in text


def test_without_correction_a_family_decides_on_each_p(tmp_path):
    write_study_outputs([_cell(s) for s in range(7)], tmp_path, metrics=("aga",), families=[_family()], correction="none")
    entries = _stats(tmp_path)["families"][0]["comparisons"]
    assert [e["significant"] for e in entries] == [True, True, False]
    assert [e["p_holm"] for e in entries] == pytest.approx(HAND_HOLM)  # shown for reference
    assert entries[1]["verdict"] == "better than aligned: two, y critic (p, uncorrected, < 0.05)"


def test_a_family_whose_holm_p_cannot_reach_alpha_says_so(tmp_path):
    six = [_cell(s) for s in range(6)]  # 6 pairs: smallest p 2/64, times 3 pairs >= 0.05
    write_study_outputs(six, tmp_path, metrics=("aga",), families=[_family()])
    family = _stats(tmp_path)["families"][0]
    assert family["holm_floor"] == [
        {"dataset": "d", "metric": "aga", "methods": 3, "n_nonzero": 6, "smallest_p": 2 / 64, "smallest_holm_p": 3 * 2 / 64}
    ]
    assert "No verdict of this family can reach significance here" in (tmp_path / "stats.md").read_text()


def test_a_pair_with_a_side_without_values_is_not_tested_and_not_counted_by_holm(tmp_path):
    cells = [_cell(s) for s in range(7)]
    pairs = [*PAIR_DIFFS, ("aligned.one.x", "aligned.gone")]
    write_study_outputs(cells, tmp_path, metrics=("aga",), families=[_family(pairs=pairs)])
    entries = _stats(tmp_path)["families"][0]["comparisons"]
    assert entries[-1]["other"] == "aligned.gone" and entries[-1]["other_label"] == "aligned.gone"
    assert entries[-1]["verdict"] == "not tested: no seed where both have a value"
    assert [e["p_holm"] for e in entries[:3]] == pytest.approx(HAND_HOLM)


def test_families_are_checked(tmp_path):
    cells = [_cell(s) for s in range(7)]
    with pytest.raises(ValueError, match="share a name"):
        write_study_outputs(cells, tmp_path, families=[_family(), _family()])
    with pytest.raises(ValueError, match="data sets without cells"):
        write_study_outputs(cells, tmp_path, families=[ComparisonFamily("f", "", {"elsewhere": [("a", "b")]})])
    with pytest.raises(ValueError, match="compared with itself"):
        ComparisonFamily("f", "", {"d": [("a", "a")]})


# -- which models a family pairs ----------------------------------------------------------------


def _parts(aligner: str, segmenter: str | None, critic: str | None) -> dict[str, str | None]:
    return {"aligner": aligner, "segmenter": segmenter, "critic": critic}


#: two aligners x two segmenters x two critics, in the pipeline's order (aligner, then branch)
GRID = {
    f"aligned.{a}.{s}.{c}": _parts(f"aligners.{a}", f"segmenters.{s}", f"critics.{c}")
    for a in ("rrr", "masked")
    for s in ("j5", "j9")
    for c in ("oracle", "gpt")
}


def test_each_family_pairs_the_models_that_differ_in_its_part_only():
    assert pairs_differing_in(GRID, "aligner") == [
        ("aligned.rrr.j5.oracle", "aligned.masked.j5.oracle"),
        ("aligned.rrr.j5.gpt", "aligned.masked.j5.gpt"),
        ("aligned.rrr.j9.oracle", "aligned.masked.j9.oracle"),
        ("aligned.rrr.j9.gpt", "aligned.masked.j9.gpt"),
    ]
    assert pairs_differing_in(GRID, "critic") == [
        ("aligned.rrr.j5.oracle", "aligned.rrr.j5.gpt"),
        ("aligned.rrr.j9.oracle", "aligned.rrr.j9.gpt"),
        ("aligned.masked.j5.oracle", "aligned.masked.j5.gpt"),
        ("aligned.masked.j9.oracle", "aligned.masked.j9.gpt"),
    ]
    assert pairs_differing_in(GRID, "segmenter") == [
        ("aligned.rrr.j5.oracle", "aligned.rrr.j9.oracle"),
        ("aligned.rrr.j5.gpt", "aligned.rrr.j9.gpt"),
        ("aligned.masked.j5.oracle", "aligned.masked.j9.oracle"),
        ("aligned.masked.j5.gpt", "aligned.masked.j9.gpt"),
    ]


def test_three_aligners_give_every_two_of_them_and_true_masks_pair_with_true_masks():
    parts = {
        "aligned.a.x": _parts("aligners.a", "segmenter", "critics.x"),
        "aligned.b.x": _parts("aligners.b", "segmenter", "critics.x"),
        "aligned.c.x": _parts("aligners.c", "segmenter", "critics.x"),
        "aligned.a.y": _parts("aligners.a", "segmenter", "critics.y"),
    }
    assert pairs_differing_in(parts, "aligner") == [
        ("aligned.a.x", "aligned.b.x"),
        ("aligned.a.x", "aligned.c.x"),
        ("aligned.b.x", "aligned.c.x"),
    ]
    assert pairs_differing_in(parts, "critic") == [("aligned.a.x", "aligned.a.y")]
    assert pairs_differing_in(parts, "segmenter") == []
    true_masks = {"aligned.a": _parts("aligners.a", None, None), "aligned.b": _parts("aligners.b", None, None)}
    assert pairs_differing_in(true_masks, "aligner") == [("aligned.a", "aligned.b")]
    assert pairs_differing_in(true_masks, "critic") == []
    with pytest.raises(ValueError, match="role"):
        pairs_differing_in(parts, "judge")


# -- the parts of a key, read from the settings ------------------------------------------------

AFTER_THE_BRANCHES = """

[aligners.one]
plugin = "nudge"
shift = 0.5

[aligners.two]
plugin = "nudge"
shift = 2.0

[evaluators.margin]
plugin = "margin"

[report]
enabled = false

[study]
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
metrics = ["margin"]
compare = ["aligners", "critics"]
comparisons = [["aligned.one.a.x", "true_mask.one"]]
"""

#: an aligner whose nudge grows with the masked pixels (fewer with the strict judge, which fails
#: the even sample ids) and a seeded draw, and an evaluator of the mean logit margin: aligners
#: and critics differ seed by seed. A module of its own, imported by name as a plugin.
NUDGE_TOYS = '''
import copy

import torch
from pydantic import Field

from lvlmva.hookspecs import hookimpl
from lvlmva.protocols import Metric, PluginOptions


class NudgeAligner:
    class Options(PluginOptions):
        shift: float = Field(1.0, description="size of the nudge")

    def __init__(self, options):
        self.options = options

    def align(self, model, data, alignment, masks, ctx):
        draw = float(torch.rand((), generator=ctx.generator("nudge")))
        new = copy.deepcopy(model)
        with torch.no_grad():
            new.head.bias[1] += self.options.shift * float(masks.float().sum()) / (12 * 64) * (1.0 + draw)
        return new


class MarginEvaluator:
    class Options(PluginOptions):
        pass

    metrics = (Metric("margin", "Margin"),)
    needs_groups = False
    needs_true_masks = False

    def __init__(self, options):
        self.options = options

    def evaluate(self, model, data, ctx, attribute=None):
        with torch.no_grad():
            logits = model(data.test.images)
        return {"margin": float((logits[:, 1] - logits[:, 0]).mean())}


@hookimpl
def lvlmva_register(registry):
    registry.add("aligner", "nudge", NudgeAligner)
    registry.add("evaluator", "margin", MarginEvaluator)
'''

BRANCH_LABELS = {
    "original": "original",
    "aligned.one.a.x": "aligned: one, x critic, a segmenter",
    "aligned.one.a.y": "aligned: one, y critic, a segmenter",
    "aligned.one.b.x": "aligned: one, x critic, b segmenter",
    "aligned.one.b.y": "aligned: one, y critic, b segmenter",
    "true_mask.one": "true-mask reference: one",
    "aligned.two.a.x": "aligned: two, x critic, a segmenter",
    "aligned.two.a.y": "aligned: two, y critic, a segmenter",
    "aligned.two.b.x": "aligned: two, x critic, b segmenter",
    "aligned.two.b.y": "aligned: two, y critic, b segmenter",
    "true_mask.two": "true-mask reference: two",
}


@pytest.fixture
def nudge_toys(study_toy_plugins):
    study_toy_plugins("study_nudge_toys", NUDGE_TOYS)


def _branches(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "branches.toml"
    from . import pipeline_toys

    text = pipeline_toys.toy_branches((tmp_path / "cache").as_posix(), list(range(0, 96, 2)), seed=None) + AFTER_THE_BRANCHES
    path.write_text(text + extra)
    return path


def _rows(study: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((study / "results.csv").read_text().splitlines()))


def test_the_parts_of_a_key_come_from_the_settings_not_its_dots(tmp_path):
    from lvlmva.study.runner import aligned_parts

    registry = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=registry)
    # this registry has the toy pipeline's aligner and evaluator, not the nudge toys
    toys = ["aligners.one.plugin=toy", "aligners.two.plugin=toy", "evaluators.margin.plugin=toy"]
    branches = load_settings(_branches(tmp_path), toys, environ={}, registry=registry)
    keys = [k for k in BRANCH_LABELS if k.startswith("aligned")]
    parts = aligned_parts(branches, [*keys, "original", "true_mask.one"])
    assert list(parts) == keys
    assert parts["aligned.two.b.y"] == {"aligner": "aligners.two", "segmenter": "segmenters.b", "critic": "critics.y"}
    # one segmenter section, named critics: "aligned.one.x" is aligner one with critic x
    one_segmenter = tmp_path / "one.toml"
    one_segmenter.write_text(
        pipeline_toys.TOY_SETTINGS.replace("[critic]\nplugin = \"toy\"\n\n[judge]", "[critics.x]\nplugin = \"toy\"\n\n[critics.y]\nplugin = \"toy\"\n\n[judge]")
        .replace("[aligner]\nplugin = \"toy\"", "[aligners.one]\nplugin = \"toy\"\n\n[aligners.a]\nplugin = \"toy\"")
    )  # fmt: skip
    settings = load_settings(one_segmenter, environ={}, registry=registry)
    parts = aligned_parts(settings, ["aligned.one.x", "aligned.one.y", "aligned.a.x", "aligned.a.y"])
    assert parts["aligned.a.x"] == {"aligner": "aligners.a", "segmenter": "segmenter", "critic": "critics.x"}
    assert pairs_differing_in(parts, "aligner") == [("aligned.one.x", "aligned.a.x"), ("aligned.one.y", "aligned.a.y")]
    # true masks: no branch, the aligners pair with each other
    settings = load_settings(one_segmenter, ["masks.source=true"], environ={}, registry=registry)
    parts = aligned_parts(settings, ["original", "aligned.one", "aligned.a"])
    assert parts == {"aligned.one": _parts("aligners.one", None, None), "aligned.a": _parts("aligners.a", None, None)}
    with pytest.raises(RuntimeError, match="aligned.one.zz"):
        aligned_parts(settings, ["aligned.one", "aligned.one.zz"])


# -- a study of the branches ---------------------------------------------------------------------


def test_a_study_of_branches_has_them_as_methods_and_tests_the_families(tmp_path, nudge_toys, capsys):
    settings, study = _branches(tmp_path), tmp_path / "study"
    assert main(["study", str(settings), "--out", str(study)]) == EXIT_OK
    capsys.readouterr()

    # every branch a method: a table row with its label, in the run's order after the baseline
    table = (study / "table.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == list(BRANCH_LABELS.values())
    cell = json.loads((study / "cells" / "branches" / "seed3" / "results.json").read_text())
    assert {k: v["label"] for k, v in cell["models"].items()} == BRANCH_LABELS
    values: dict[str, dict[int, float]] = {}
    for r in _rows(study):
        assert r["label"] == BRANCH_LABELS[r["method"]]
        values.setdefault(r["method"], {})[int(r["seed"])] = float(r["value"])
    assert list(values) == list(BRANCH_LABELS) and all(len(v) == 8 for v in values.values())
    assert values["aligned.two.b.y"][3] == cell["evaluations"]["margin"]["models"]["aligned.two.b.y"]["margin"]
    assert (study / "margin.png").stat().st_size > 1000

    data = json.loads((study / "stats.json").read_text())
    assert [m["method"] for m in data["comparisons"]] == list(BRANCH_LABELS)[1:]
    families = {f["name"]: f for f in data["families"]}
    assert list(families) == ["aligners", "critics", "comparisons"]
    want_pairs = {
        "aligners": [(f"aligned.one.{b}", f"aligned.two.{b}") for b in ("a.x", "a.y", "b.x", "b.y")],
        "critics": [(f"aligned.{a}.{s}.x", f"aligned.{a}.{s}.y") for a in ("one", "two") for s in ("a", "b")],
        "comparisons": [("aligned.one.a.x", "true_mask.one")],
    }
    for name, pairs in want_pairs.items():
        family = families[name]
        assert [(e["method"], e["other"]) for e in family["comparisons"]] == pairs
        for e in family["comparisons"]:  # scipy on results.csv's numbers, paired by seed
            d = np.round([values[e["method"]][s] - values[e["other"]][s] for s in range(8)], 12)
            assert d.all()  # the toys make each pair differ on every seed
            want = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
            assert e["p"] == pytest.approx(want.pvalue, rel=1e-12) and e["statistic"] == want.statistic
            assert e["mean_difference"] == pytest.approx(np.mean(d))
        ps = [e["p"] for e in family["comparisons"]]
        order = sorted(range(len(ps)), key=ps.__getitem__)
        running = 0.0
        for rank, i in enumerate(order):  # Holm by hand over this family alone
            running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
            assert family["comparisons"][i]["p_holm"] == pytest.approx(running)
    # aligner two nudges more on every seed; critic x keeps more masks than the strict judge's y
    assert all(e["effect"] == "worse" and e["significant"] for e in families["aligners"]["comparisons"])
    assert all(e["effect"] == "better" and e["significant"] for e in families["critics"]["comparisons"])

    text = (study / "stats.md").read_text()
    assert "# Family aligners: each aligner against each other on the same branch" in text
    assert "# Family critics: each critic/judge pair against each other with the same aligner and segmenter" in text
    assert "## aligners, branches: Margin (margin, test split)" in text
    first = families["aligners"]["comparisons"][0]
    assert (
        f"| aligned: one, x critic, a segmenter | aligned: two, x critic, a segmenter | 8 | 8 "
        f"| {first['mean_difference']:+.4f} | worse | 0 | {first['p']:.4f} | {first['p_holm']:.4f} "
        "| worse than aligned: two, x critic, a segmenter (Holm p < 0.05) |"
    ) in text


def test_a_branch_model_may_be_the_baseline(tmp_path, nudge_toys, capsys):
    settings, study = _branches(tmp_path), tmp_path / "study"
    argv = ["study", str(settings), "--out", str(study), "--set", "study.seeds=[0]", "--set", "study.compare=[]",
            "--set", "study.comparisons=[]", "--set", "study.baseline=aligned.two.b.y"]  # fmt: skip
    assert main(argv) == EXIT_OK
    capsys.readouterr()
    data = json.loads((study / "stats.json").read_text())
    assert data["baseline"] == "aligned.two.b.y" and data["families"] == []
    assert [c["method"] for c in data["comparisons"]][:2] == ["original", "aligned.one.a.x"]
    assert "| aligned: two, y critic, b segmenter |" in (study / "table.md").read_text().splitlines()[2]


# -- refused before any cell runs --------------------------------------------------------------


def test_an_unknown_key_in_a_comparison_stops_the_study_before_any_cell(tmp_path, nudge_toys, capsys):
    settings, study = _branches(tmp_path), tmp_path / "study"
    bad = 'study.comparisons=[["aligned.one.a.x", "aligned.three.a.x"]]'
    assert main(["study", str(settings), "--out", str(study), "--set", bad]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "study.comparisons names 'aligned.three.a.x', which is not a model these settings produce" in err
    assert "their models: " + ", ".join(BRANCH_LABELS) in err
    assert not (study / "cells").exists()
    # the baseline too is checked against the models these settings produce: a one-aligner
    # name is not one of a run with several
    assert main(["study", str(settings), "--out", str(study), "--set", "study.baseline=aligned"]) == EXIT_BAD_INPUT
    assert "study.baseline = 'aligned' is not a model of the study (original, aligned.one.a.x," in capsys.readouterr().err
    assert not (study / "cells").exists()


def test_a_family_with_nothing_to_pair_stops_the_study(tmp_path, nudge_toys, capsys):
    settings, study = _branches(tmp_path), tmp_path / "study"
    text = settings.read_text().replace('[critics.y]\nplugin = "toy"\njudge = "strict"\n', "")
    settings.write_text(re.sub(r"\[judges\.strict\]\n.*?\n\n", "", text, flags=re.S))  # one critic, one judge
    assert main(["study", str(settings), "--out", str(study), "--set", 'study.compare=["critics"]']) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "study.compare 'critics' finds no two aligned models that differ in their critic only" in err
    assert "critics: critics.x" in err
    assert not (study / "cells").exists()


def test_the_settings_refuse_malformed_comparisons():
    from lvlmva.options import StudyOptions

    for bad, message in (
        ({"comparisons": [["a", "a"]]}, "compares 'a' with itself"),
        ({"comparisons": [["a", "b"], ["b", "a"]]}, "lists the pair 'b', 'a' twice"),
        ({"comparisons": [["a"]]}, "comparisons.0.1"),
        ({"compare": ["critics", "critics"]}, "names a family twice: critics"),
        ({"compare": ["judges"]}, "'aligners', 'critics' or 'segmenters'"),
    ):
        with pytest.raises(ValueError, match=message):
            StudyOptions(**bad)
    assert StudyOptions(comparisons=[["a", "b"]]).comparisons == [("a", "b")]
