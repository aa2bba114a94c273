"""A study's outputs from fabricated results.json dicts: 2 data sets x 7 seeds x 4 methods, one
failed cell (knee seed 3) and one method missing in one seed (JTT on skin seed 2). Every number
is checked against numpy/scipy computed from the fabricated values or from results.csv."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from lvlmva.protocols import Metric
from lvlmva.study.outputs import CSV_HEADER, CellResult, min_pairs, write_study_outputs

SEEDS = list(range(7))
DATASETS = ("knee", "skin")
LABELS = {"original": "original", "aligned": "LVLM-VA", "dfr": "DFR", "jtt": "JTT"}
GROUP_METRICS = [
    Metric("accuracy", "Accuracy"),
    Metric("aga", "AGA"),
    Metric("wga", "WGA", format=".3f"),
    Metric("alignment_score", "Alignment score"),
    Metric("group_accuracy", "Accuracy per group", summary=False),
]
SHIFTED_METRICS = [Metric("accuracy", "Accuracy (shifted)")]
FAILED_CELL = ("knee", 3)
FAILED_REASON = "align: CUDA out of memory"
MISSING = ("skin", 2, "jtt")
MISSING_REASON = "failed: JTT: the error set is empty"
SHOWN = ("aga", "wga", "accuracy")


def fabricate(dataset: str, seed: int) -> dict:
    """results.json of one cell, numbers on a 1/1000 grid (so that differences tie, as accuracy
    differences of finite test sets do). LVLM-VA beats original on every seed; DFR's WGA on
    skin equals original's (all differences zero)."""
    rng = np.random.default_rng([DATASETS.index(dataset), seed])
    base = {k: rng.integers(500, 800) / 1000 for k in ("accuracy", "aga", "wga")}
    values = {
        "original": dict(base),
        "aligned": {k: v + rng.integers(5, 40) / 1000 for k, v in base.items()},
        "dfr": {k: v + rng.integers(-30, 30) / 1000 for k, v in base.items()},
        "jtt": {k: v - rng.integers(0, 25) / 1000 for k, v in base.items()},
    }
    if dataset == "skin":
        values["dfr"]["wga"] = base["wga"]
    models = dict(LABELS)
    failed = {}
    if (dataset, seed) == MISSING[:2]:
        del models[MISSING[2]], values[MISSING[2]]
        failed["mitigate.jtt"] = MISSING_REASON
    if (dataset, seed) == FAILED_CELL:  # partial results: only original was evaluated
        models, values = {"original": "original"}, {"original": {k: 0.999 for k in base}}
        failed["align"] = "CUDA out of memory"
    group_values = {
        m: {**v, "alignment_score": None, "group_accuracy": {"g0": 0.5, "g1": None}}
        for m, v in values.items()
    }
    results = {
        "models": {k: {"label": label, "stage": f"model.{k}"} for k, label in models.items()},
        "evaluations": {
            "groups": {
                "plugin": "standard",
                "split": "test",
                "metrics": [m.to_dict() for m in GROUP_METRICS],
                "models": group_values,
            },
            "shifted": {
                "plugin": "standard",
                "split": "test_shifted",
                "metrics": [m.to_dict() for m in SHIFTED_METRICS],
                "models": {m: {"accuracy": v["accuracy"] - 0.1} for m, v in values.items()},
            },
        },
    }
    if failed:
        results["failed"] = failed
    return results


def cells() -> list[CellResult]:
    out = []
    for dataset in DATASETS:
        for seed in SEEDS:
            failed = (dataset, seed) == FAILED_CELL
            out.append(
                CellResult(
                    dataset,
                    seed,
                    "failed" if failed else "ok",
                    fabricate(dataset, seed),
                    reason=FAILED_REASON if failed else "",
                    seconds=12.5,
                    run_dir=f"runs/{dataset}/seed{seed}",
                )
            )
    return out


def expected(dataset: str, metric: str, method: str, evaluator: str = "groups") -> dict:
    """Seed -> value straight from the fabricated dicts, ok cells only."""
    out = {}
    for seed in SEEDS:
        if (dataset, seed) == FAILED_CELL:
            continue
        value = fabricate(dataset, seed)["evaluations"][evaluator]["models"].get(method, {})
        if metric in value:
            out[seed] = value[metric]
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    summary = write_study_outputs(cells(), out)
    return out, summary


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, [dict(zip(header, row, strict=True)) for row in reader]


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """Label -> column header -> cell text, from the markdown table at the top of table.md."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_csv_rows_are_exactly_the_numbers_in_the_results(study):
    out, summary = study
    header, rows = read_csv(out / "results.csv")
    assert tuple(header) == CSV_HEADER
    got = sorted(
        (
            r["dataset"],
            int(r["seed"]),
            r["method"],
            r["label"],
            r["evaluator"],
            r["split"],
            r["metric"],
            float(r["value"]),
        )
        for r in rows
    )
    want = []
    for cell in cells():
        if cell.status != "ok":
            continue
        for name, evaluation in cell.results["evaluations"].items():
            for method, values in evaluation["models"].items():
                for metric, value in values.items():
                    if isinstance(value, float):  # None and per-group mappings are not rows
                        want.append(
                            (
                                cell.dataset,
                                cell.seed,
                                method,
                                LABELS[method],
                                name,
                                evaluation["split"],
                                metric,
                                value,
                            )
                        )
    assert got == sorted(want)
    assert summary["rows"] == len(rows) == len(want)
    assert not any(float(r["value"]) == 0.999 for r in rows)  # the failed cell's partial values


def test_results_json_has_the_rows_cells_and_what_each_data_set_has(study):
    out, _ = study
    data = json.loads((out / "results.json").read_text())
    _, rows = read_csv(out / "results.csv")
    assert [(r["seed"], r["method"], r["value"]) for r in data["rows"]] == [
        (int(r["seed"]), r["method"], float(r["value"])) for r in rows
    ]
    failed = [c for c in data["cells"] if c["status"] == "failed"]
    assert [(c["dataset"], c["seed"], c["reason"]) for c in failed] == [
        (*FAILED_CELL, FAILED_REASON)
    ]
    assert failed[0]["run_dir"] == "runs/knee/seed3" and failed[0]["seconds"] == 12.5
    assert data["datasets"]["knee"]["seeds"] == SEEDS
    assert data["datasets"]["knee"]["ok_seeds"] == [s for s in SEEDS if s != FAILED_CELL[1]]
    assert data["datasets"]["skin"]["methods"] == list(LABELS)
    assert data["datasets"]["skin"]["shown"]["aga"]["evaluator"] == "groups"
    assert {(m["evaluator"], m["metric"]) for m in data["datasets"]["skin"]["metrics"]} == {
        ("groups", "accuracy"),
        ("groups", "aga"),
        ("groups", "wga"),
        ("shifted", "accuracy"),
    }


def test_table_cells_are_numpy_mean_and_std_formatted_as_declared(study):
    out, _ = study
    text = (out / "table.md").read_text()
    rows = table_rows(text)
    assert list(rows) == list(LABELS.values())  # baseline first, then the results' order
    header = text.splitlines()[0]
    titles_in_order = " | ".join(f"{d} {t}" for d in DATASETS for t in ("AGA", "WGA", "Accuracy"))
    assert header == f"| Method | {titles_in_order} |"  # data sets side by side, metrics as asked
    formats = {m.key: m.format for m in GROUP_METRICS}
    titles = {m.key: m.title for m in GROUP_METRICS}
    checked_counts = 0
    for dataset in DATASETS:
        for metric in SHOWN:
            for method, label in LABELS.items():
                values = list(expected(dataset, metric, method).values())
                spec = formats[metric]
                want = f"{np.mean(values):{spec}} ± {np.std(values, ddof=1):{spec}}"
                if len(values) != len(SEEDS):
                    want += f" ({len(values)})"
                    checked_counts += 1
                assert rows[label][f"{dataset} {titles[metric]}"] == want
    # knee: every method lost the failed seed; skin: JTT lost seed 2
    assert checked_counts == len(SHOWN) * (len(LABELS) + 1)
    assert rows["JTT"]["skin AGA"].endswith(" (6)") and not rows["DFR"]["skin AGA"].endswith(")")


def test_table_note_names_split_evaluator_seeds_and_every_failure(study):
    out, _ = study
    note = (out / "table.md").read_text().split("\n\n", 1)[1]
    assert "AGA = mean of group accuracies; accuracy = plain sample accuracy" in note
    assert "knee: evaluator groups, test split; seeds 0, 1, 2, 3, 4, 5, 6 (7)" in note
    assert f"knee seed 3: the cell failed: {FAILED_REASON}" in note
    assert "knee seed 3: align failed" not in note  # the cell's reason already says it
    assert f"skin seed 2: mitigate.jtt {MISSING_REASON}" in note
    assert "skin: JTT has no value in seed(s) 2" in note
    assert "shifted" not in note  # the table shows the first evaluator declaring accuracy


def test_stats_match_scipy_on_pairs_read_back_from_the_csv_and_holm_by_hand(study):
    out, _ = study
    _, rows = read_csv(out / "results.csv")
    data = json.loads((out / "stats.json").read_text())
    assert data["zero_method"] == "wilcox" and data["baseline"] == "original"
    by_seed: dict = {}
    for r in rows:
        if r["evaluator"] == "groups":
            key = (r["dataset"], r["metric"], r["method"])
            by_seed.setdefault(key, {})[int(r["seed"])] = float(r["value"])
    comparisons = data["comparisons"]
    assert {(c["dataset"], c["metric"]) for c in comparisons} == {
        (d, m) for d in DATASETS for m in SHOWN
    }
    for dataset in DATASETS:
        for metric in SHOWN:
            family = [c for c in comparisons if (c["dataset"], c["metric"]) == (dataset, metric)]
            assert [c["method"] for c in family] == ["aligned", "dfr", "jtt"]
            for c in family:
                method = by_seed[(dataset, metric, c["method"])]
                base = by_seed[(dataset, metric, "original")]
                seeds = sorted(set(method) & set(base))
                d = np.round(np.array([method[s] for s in seeds]) - [base[s] for s in seeds], 12)
                assert c["seeds"] == seeds and c["n"] == len(seeds)
                assert c["n_nonzero"] == np.count_nonzero(d)
                assert c["mean_difference"] == pytest.approx(np.mean(d))
                if not d.any():
                    assert c["p"] is None and c["not_tested"] == "every paired difference is zero"
                    continue
                if np.count_nonzero(d) < 6:  # 2/2^5 > 0.05: no outcome could be significant
                    assert c["p"] is None and "6 are needed" in c["not_tested"]
                    continue
                want = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
                assert c["p"] == pytest.approx(want.pvalue, rel=1e-12)
                assert c["statistic"] == pytest.approx(want.statistic)
                assert c["effect"] == ("better" if np.mean(d) > 0 else "worse")
            tested = [c for c in family if c["p"] is not None]
            order = sorted(range(len(tested)), key=lambda i: tested[i]["p"])
            running = 0.0
            for rank, i in enumerate(order):
                running = max(running, min(1.0, (len(tested) - rank) * tested[i]["p"]))
                assert tested[i]["p_holm"] == pytest.approx(running)
                assert tested[i]["significant"] == (running < 0.05)
    skin_dfr_wga = [
        c for c in comparisons if (c["dataset"], c["metric"], c["method"]) == ("skin", "wga", "dfr")
    ]
    assert skin_dfr_wga[0]["verdict"].startswith("not tested") and skin_dfr_wga[0]["p_holm"] is None
    # 7 seeds all in LVLM-VA's favour: the smallest exact p, 2/128, times Holm's 3
    skin_aga = [
        c
        for c in comparisons
        if (c["dataset"], c["metric"], c["method"]) == ("skin", "aga", "aligned")
    ]
    assert skin_aga[0]["p"] == pytest.approx(2 / 128) and skin_aga[0]["p_holm"] == pytest.approx(
        3 * 2 / 128
    )
    assert skin_aga[0]["verdict"] == "better than original (Holm p < 0.05)"
    knee = [c for c in comparisons if c["dataset"] == "knee"]
    assert all(c["n"] == 6 and not c["significant"] for c in knee)  # failed seed not counted


def test_stats_markdown_names_the_test_and_its_assumptions(study):
    out, _ = study
    text = (out / "stats.md").read_text()
    for phrase in (
        "Wilcoxon signed-rank",
        "paired",
        "symmetric",
        'zero_method="wilcox"',
        "2/128 = 0.0156",
        "Holm",
        "## skin: AGA (groups, test split)",
    ):
        assert phrase in text
    assert "| DFR | 7 | 0 |" in text and "every paired difference is zero" in text


def test_too_few_pairs_are_not_tested(tmp_path):
    assert min_pairs(0.05) == 6 and min_pairs(0.01) == 8  # 2/64 < 0.05 <= 2/32; 2/256 < 0.01
    few = [c for c in cells() if c.dataset == "skin" and c.seed < 5]
    write_study_outputs(few, tmp_path, metrics=("aga", "wga"))
    comparisons = json.loads((tmp_path / "stats.json").read_text())["comparisons"]
    aligned = [c for c in comparisons if c["method"] == "aligned"]
    assert aligned and all(c["p"] is None and c["n_nonzero"] == 5 for c in aligned)
    assert "6 are needed" in aligned[0]["not_tested"]


def test_figures_open_and_show_something(study):
    out, summary = study
    for metric in SHOWN:
        path = out / f"{metric}.png"
        assert summary["files"][f"{metric}.png"] == str(path)
        with Image.open(path) as im:
            assert im.format == "PNG"
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 2 * 300  # two panels side by side
        packed = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
        assert len(np.unique(packed)) > 50  # colours and antialiasing, not a flat fill
        assert (pixels.min(axis=2) < 200).mean() > 0.01  # drawn, not a blank canvas
    assert (out / "aga.png").read_bytes() != (out / "wga.png").read_bytes()
    assert not (out / "alignment_score.png").exists()  # not asked for


def test_outputs_are_reproducible(study, tmp_path):
    out, _ = study
    write_study_outputs(cells(), tmp_path, metrics=("aga",))
    assert (tmp_path / "aga.png").read_bytes() == (out / "aga.png").read_bytes()  # seeded jitter
    assert (tmp_path / "results.csv").read_bytes() == (out / "results.csv").read_bytes()


def test_method_order_baseline_first_then_results_then_evaluation_only_models(tmp_path):
    results = {
        "models": {
            "aligned": {"label": "LVLM-VA", "stage": "s"},
            "original": {"label": "orig", "stage": "s"},
        },
        "evaluations": {
            "groups": {
                "plugin": "standard",
                "split": "test",
                "metrics": [Metric("aga", "AGA").to_dict()],
                "models": {
                    "extra": {"aga": 0.1},
                    "aligned": {"aga": 0.3},
                    "original": {"aga": 0.2},
                },
            }
        },
    }
    cell = CellResult("d", 0, "ok", results, run_dir=tmp_path / "cell")  # a Path, as callers do
    summary = write_study_outputs([cell], tmp_path, metrics=("aga",))
    cells_json = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cells_json[0]["run_dir"] == str(tmp_path / "cell")
    assert summary["methods"] == ["original", "aligned", "extra"]
    rows = table_rows((tmp_path / "table.md").read_text())
    assert list(rows) == ["orig", "LVLM-VA", "extra"]
    assert rows["extra"]["d AGA"] == "0.1000"  # one seed: no std, and n equals the seed count


def test_named_evaluator_and_bad_input(tmp_path):
    summary = write_study_outputs(cells(), tmp_path, evaluator="shifted")
    assert summary["metrics"] == ["accuracy"]
    rows = table_rows((tmp_path / "table.md").read_text())
    values = list(expected("skin", "accuracy", "aligned", evaluator="shifted").values())
    assert rows["LVLM-VA"]["skin Accuracy (shifted)"] == (
        f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    )
    with pytest.raises(ValueError, match="evaluator 'nope'"):
        write_study_outputs(cells(), tmp_path, evaluator="nope")
    with pytest.raises(ValueError, match="two cells"):
        write_study_outputs([cells()[0], cells()[0]], tmp_path)
    with pytest.raises(ValueError, match="status"):
        CellResult("d", 0, "done", None)


def one_metric_cell(seed: int, values: dict) -> CellResult:
    results = {
        "models": {k: {"label": k, "stage": "s"} for k in values},
        "evaluations": {
            "groups": {
                "plugin": "standard",
                "split": "test",
                "metrics": [Metric("aga", "AGA").to_dict()],
                "models": {k: {"aga": v} for k, v in values.items()},
            }
        },
    }
    return CellResult("d", seed, "ok", results)


def test_round_off_does_not_split_tied_differences(tmp_path):
    base = [0.583, 0.607, 0.753, 0.87, 0.32, 0.386, 0.793]
    thousandths = [-30, 20, 20, -30, 30, 20, -20]  # |d| ties exactly, not in float subtraction
    study = [
        one_metric_cell(s, {"original": b, "aligned": b + k / 1000})
        for s, (b, k) in enumerate(zip(base, thousandths, strict=True))
    ]
    write_study_outputs(study, tmp_path, metrics=("aga",))
    (entry,) = json.loads((tmp_path / "stats.json").read_text())["comparisons"]
    exact = stats.wilcoxon(np.array(thousandths) / 1000, zero_method="wilcox")
    floats = [b + k / 1000 - b for b, k in zip(base, thousandths, strict=True)]
    assert entry["p"] == pytest.approx(exact.pvalue)
    assert entry["p"] != pytest.approx(stats.wilcoxon(floats, zero_method="wilcox").pvalue)


def test_uncorrected_tests_decide_on_p_and_holm_floor_is_stated(tmp_path):
    """``correction = "none"`` decides on each test's own p (as the paper reports them); with
    Holm, a table whose smallest reachable Holm p lies above alpha says so in stats.md."""
    summary = write_study_outputs(cells(), tmp_path / "holm", metrics=("aga",))
    holm = json.loads((tmp_path / "holm" / "stats.json").read_text())
    plain_summary = write_study_outputs(cells(), tmp_path / "none", metrics=("aga",), correction="none")
    plain = json.loads((tmp_path / "none" / "stats.json").read_text())
    assert summary["files"].keys() == plain_summary["files"].keys()
    assert holm["correction"] == "holm" and plain["correction"] == "none"
    for a, b in zip(holm["comparisons"], plain["comparisons"], strict=True):
        assert a["p"] == b["p"] and a["p_holm"] == b["p_holm"]
        assert b["significant"] == (b["p"] is not None and b["p"] < 0.05)
        assert a["significant"] == (a["p_holm"] is not None and a["p_holm"] < 0.05)
    floors = {(f["dataset"], f["metric"]): f for f in holm["holm_floor"]}
    for (dataset, metric), f in floors.items():
        tested = [c for c in holm["comparisons"] if (c["dataset"], c["metric"]) == (dataset, metric) and c["p"] is not None]
        assert f["methods"] == len(tested)
        assert f["smallest_holm_p"] == pytest.approx(min(1.0, len(tested) * 2.0 ** (1 - min(c["n_nonzero"] for c in tested))))
    text = (tmp_path / "holm" / "stats.md").read_text()
    assert ("No verdict can reach significance" in text) == any(f["smallest_holm_p"] >= 0.05 for f in floors.values())
    # Holm can only take verdicts away: what it keeps, the uncorrected tests keep too
    key = lambda c: (c["dataset"], c["metric"], c["method"])  # noqa: E731
    kept = {key(c) for c in holm["comparisons"] if c["significant"]}
    assert kept <= {key(c) for c in plain["comparisons"] if c["significant"]}
    assert any(c["significant"] for c in plain["comparisons"])
    assert "p, uncorrected, < 0.05" in (tmp_path / "none" / "stats.md").read_text()
    with pytest.raises(ValueError, match="correction"):
        write_study_outputs(cells(), tmp_path / "bad", metrics=("aga",), correction="bonferroni")


def test_two_methods_with_one_label_each_say_their_key(tmp_path):
    """Data sets that label two models alike (or a plugin's model labelled like another) would
    give two table rows one name: each row then names its key."""
    cells = [
        one_metric_cell(0, {"original": 0.5, "aligned.rrr.x": 0.6}),
        one_metric_cell(1, {"original": 0.5, "aligned.rrr.x": 0.7}),
    ]
    cells[1].results["models"]["half"] = {"label": "aligned.rrr.x", "stage": "s"}
    cells[1].results["evaluations"]["groups"]["models"]["half"] = {"aga": 0.4}
    write_study_outputs(cells, tmp_path, metrics=("aga",))
    assert list(table_rows((tmp_path / "table.md").read_text())) == [
        "original",
        "aligned.rrr.x [aligned.rrr.x]",
        "aligned.rrr.x [half]",
    ]


def test_long_labels_are_wrapped_under_the_figure_not_rotated():
    from lvlmva.study.outputs import TICK_CHARS, _tick_label

    assert _tick_label("aligned: rrr, oracle critic, J=5") == "aligned: rrr,\noracle critic,\nJ=5"
    assert _tick_label("original") == "original"
    assert _tick_label("half (toy-retrain)") == "half\n(toy-retrain)"
    long = "aligned: masked_input_gradients, oracle critic, fine segmenter"
    lines = _tick_label(long).splitlines()
    assert " ".join(lines) == long  # nothing lost, only line breaks
    assert [len(line) <= TICK_CHARS for line in lines] == [True, False, True, True]  # a long word stays whole


def test_the_table_says_which_rule_selected_each_method_and_marks_the_oracle(tmp_path):
    study = []
    for seed in SEEDS:
        results = fabricate("knee", seed)
        rules = {"dfr": "worst-group", "jtt": "oracle-test"}
        for key, rule in rules.items():
            upper = rule == "oracle-test"
            if key not in results["models"]:  # the failed cell
                continue
            results["models"][key]["details"] = {
                "selection": {"rule": rule, "criterion": "...", "split": "test" if upper else "val", "upper_bound": upper}
            }
        study.append(CellResult("knee", seed, "ok", results))
    write_study_outputs(study, tmp_path, metrics=("wga",))
    text = (tmp_path / "table.md").read_text()
    rows = table_rows(text)
    assert rows["DFR"]["Selected by"] == "worst-group"
    assert rows["original"]["Selected by"] == "\u2013"  # the table's dash: no value
    oracle = [label for label in rows if label.startswith("JTT")]
    assert oracle == ["JTT [oracle-test selection: upper bound]"]
    assert rows[oracle[0]]["Selected by"] == "oracle-test"
    assert "oracle-test = chosen on the test split, an upper bound" in text
    # without any selection record, the column is left out
    write_study_outputs(cells(), tmp_path / "plain", metrics=("wga",))
    assert "Selected by" not in (tmp_path / "plain" / "table.md").read_text()


def test_a_rerun_with_fewer_metrics_removes_the_figures_it_no_longer_makes(tmp_path):
    said: list[str] = []
    first = write_study_outputs(cells(), tmp_path, metrics=("aga", "wga"), echo=said.append)
    assert first["removed_figures"] == [] and said == []
    recorded = json.loads((tmp_path / "figures.json").read_text())["figures"]
    assert sorted(recorded) == ["aga.png", "wga.png"]
    (tmp_path / "mine.png").write_bytes(b"a user's figure")  # never the study's to remove
    (tmp_path / "notes.md").write_text("mine")

    second = write_study_outputs(cells(), tmp_path, metrics=("aga",), echo=said.append)
    assert not (tmp_path / "wga.png").exists()
    assert (tmp_path / "aga.png").exists()
    assert (tmp_path / "mine.png").read_bytes() == b"a user's figure"
    assert (tmp_path / "notes.md").read_text() == "mine"
    assert second["removed_figures"] == ["wga.png"]
    assert len(said) == 1 and "removed" in said[0] and "wga.png" in said[0]
    assert sorted(json.loads((tmp_path / "figures.json").read_text())["figures"]) == ["aga.png"]


def test_a_figure_changed_since_the_study_wrote_it_is_kept_and_said(tmp_path):
    write_study_outputs(cells(), tmp_path, metrics=("aga", "wga"))
    (tmp_path / "wga.png").write_bytes(b"edited by hand")
    said: list[str] = []
    summary = write_study_outputs(cells(), tmp_path, metrics=("aga",), echo=said.append)
    assert (tmp_path / "wga.png").read_bytes() == b"edited by hand"
    assert summary["removed_figures"] == [] and summary["kept_figures"] == ["wga.png"]
    assert "kept" in said[0] and "changed" in said[0]
    # forgotten: a third run leaves it alone and says nothing more
    said.clear()
    write_study_outputs(cells(), tmp_path, metrics=("aga",), echo=said.append)
    assert (tmp_path / "wga.png").exists() and said == []


def test_a_manifest_cannot_make_the_study_delete_outside_its_figures(tmp_path):
    import hashlib

    out = tmp_path / "study"
    out.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not the study's")
    (out / "keep.txt").write_text("x")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (outside, out / "keep.txt")}
    (out / "figures.json").write_text(json.dumps({"figures": {"../outside.png": digest["outside.png"], "keep.txt": digest["keep.txt"]}}))
    write_study_outputs(cells(), out, metrics=("aga",))
    assert outside.exists() and (out / "keep.txt").exists()
