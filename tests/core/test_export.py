"""table.tex and ``lvlmva export``: the LaTeX table against table.md's numbers, bold on the best
mean per column, the significance mark where stats.json says significant, escaping, and that
it parses (with pdflatex where it is installed, always with the small parser below)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main
from lvlmva.export import ExportError, export, latex_escape
from lvlmva.protocols import Metric
from lvlmva.report import models_section
from lvlmva.study.outputs import CellResult, write_study_outputs

from .test_study_outputs import cells, table_rows

# -- a small parser of our own ----------------------------------------------------------------


def _balanced(text: str) -> bool:
    depth = 0
    for i, ch in enumerate(text):
        if i and text[i - 1] == "\\" and ch in "{}":
            continue  # \{ and \} are text
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _split_cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)&", row)]


def _width(cell: str) -> int:
    m = re.match(r"\\multicolumn\{(\d+)\}", cell)
    return int(m.group(1)) if m else 1


def parse_tabulars(tex: str) -> list[dict]:
    """Every tabular of ``tex``: its column count (from the spec), header, top lines and rows,
    each row a list of cells. Fails (assert) on anything a LaTeX run would reject here."""
    assert _balanced(tex), "unbalanced braces"
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}")
    out = []
    for m in re.finditer(r"\\begin\{tabular\}\{([lcr]+)\}\n(.*?)\\end\{tabular\}", tex, re.S):
        spec, body = m.group(1), m.group(2)
        lines = body.strip().splitlines()
        assert lines[0] == r"\toprule" and lines[-1] == r"\bottomrule", "booktabs rules missing"
        mid = lines.index(r"\midrule")
        head_lines, row_lines = lines[1:mid], lines[mid + 1 : -1]
        rows = []
        for line in head_lines + row_lines:
            assert r"\\" in line, f"row without \\\\: {line}"
            cells_text, rest = line.split(r"\\", 1)
            assert all(r.startswith(r"\cmidrule") for r in rest.split()), rest
            row = _split_cells(cells_text)
            assert sum(_width(c) for c in row) == len(spec), (
                f"{len(row)} cells, spec {spec}: {line}"
            )
            rows.append(row)
        out.append(
            {
                "columns": len(spec),
                "top": rows[: len(head_lines) - 1],
                "header": rows[len(head_lines) - 1],
                "rows": rows[len(head_lines) :],
            }
        )
    assert out, "no tabular"
    return out


def plain(cell: str) -> str:
    """A LaTeX cell as table.md writes it: no bold, no mark, ± and the dash as text."""
    cell = cell.replace("$^{*}$", "")
    cell = re.sub(r"\\textbf\{(.*?)\}", r"\1", cell)
    cell = cell.replace(r" $\pm$ ", " ± ").replace(r"$\uparrow$", "↑")
    return "–" if cell == "--" else re.sub(r"\\([_&%#$])", r"\1", cell)


def bold(cell: str) -> bool:
    return cell.startswith(r"\textbf{")


def marked(cell: str) -> bool:
    return cell.endswith("$^{*}$")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    write_study_outputs(cells(), out)
    return out


def _columns(out):
    """(data set, metric key) per value column, in the table's order."""
    data = json.loads((out / "results.json").read_text())
    return [(d, k) for d, info in data["datasets"].items() for k in info["shown"]]


# -- table.tex --------------------------------------------------------------------------------


def test_table_tex_has_table_md_numbers_bold_best_and_marks_where_stats_json_says(study):
    tex = (study / "table.tex").read_text()
    (table,) = parse_tabulars(tex)
    md = table_rows((study / "table.md").read_text())
    md_header = list(next(iter(md.values())))
    columns = _columns(study)
    assert table["columns"] == len(md_header) == 1 + len(columns)
    assert [plain(r[0]) for r in table["rows"]] == list(md)  # same methods, same order
    for row in table["rows"]:
        assert [plain(c) for c in row] == list(md[plain(row[0])].values())
    significant = {
        (c["dataset"], c["metric"], c["label"])
        for c in json.loads((study / "stats.json").read_text())["comparisons"]
        if c["significant"]
    }
    assert significant, "the fabricated study should have significant results"
    got_marks, got_bold = set(), set()
    for row in table["rows"]:
        for (dataset, key), cell in zip(columns, row[1:], strict=True):
            if marked(cell):
                got_marks.add((dataset, key, plain(row[0])))
            if bold(cell):
                got_bold.add((dataset, key, plain(row[0])))
    assert got_marks == significant
    # every shown metric here is higher-is-better: bold = the largest printed mean
    expected_bold = set()
    for j, (dataset, key) in enumerate(columns, start=1):
        means = {plain(r[0]): float(plain(r[j]).split()[0]) for r in table["rows"]}
        expected_bold |= {(dataset, key, m) for m, v in means.items() if v == max(means.values())}
    assert got_bold == expected_bold
    assert r"$^{*}$ Wilcoxon signed-rank test against original" in tex
    assert "Holm-corrected" in tex and r"\caption{Mean $\pm$ std" in tex
    assert "evaluator \\texttt{groups}, test split" in tex and "seeds 0, 1, 2, 3, 4, 5, 6" in tex


def _tiny_cells(per_method: dict[str, list[float]], metric: Metric, **extra) -> list[CellResult]:
    """One data set, seeds 0.., one evaluator with ``metric``; ``extra``: model key -> details."""
    seeds = len(next(iter(per_method.values())))
    out = []
    for seed in range(seeds):
        results = {
            "models": {
                m: {
                    "label": m,
                    "stage": f"model.{m}",
                    **({"details": extra[m]} if m in extra else {}),
                }
                for m in per_method
            },
            "evaluations": {
                "groups": {
                    "plugin": "standard",
                    "split": "test",
                    "metrics": [metric.to_dict()],
                    "models": {m: {metric.key: v[seed]} for m, v in per_method.items()},
                }
            },
        }
        out.append(CellResult("toy_set", seed, "ok", results))
    return out


def _first_table(out):
    (table,) = parse_tabulars((out / "table.tex").read_text())
    return table


def test_ties_are_all_bold_lower_is_better_picks_the_smallest_and_no_direction_no_bold(tmp_path):
    values = {"original": [0.30, 0.31, 0.32], "a_1": [0.20, 0.21, 0.22], "b": [0.22, 0.21, 0.20]}
    write_study_outputs(
        _tiny_cells(values, Metric("err", "Error", higher_is_better=False)),
        tmp_path / "low",
        metrics=("err",),
    )
    rows = _first_table(tmp_path / "low")["rows"]
    assert [bold(r[1]) for r in rows] == [False, True, True]  # a_1 and b tie at 0.2100
    assert rows[1][0] == r"a\_1"
    write_study_outputs(
        _tiny_cells(values, Metric("n", "Count", higher_is_better=None)),
        tmp_path / "none",
        metrics=("n",),
    )
    rows = _first_table(tmp_path / "none")["rows"]
    assert not any(bold(c) for r in rows for c in r)
    header = _first_table(tmp_path / "none")["header"]
    assert header[1] == "Count"  # no direction, no arrow


def test_labels_are_escaped_and_the_percent_format_too(tmp_path):
    label = "DFR_last & 50% #1 {x} ~y^"
    study_cells = _tiny_cells(
        {"original": [0.5, 0.6], "dfr": [0.7, 0.8]}, Metric("acc", "Acc_uracy", format=".1%")
    )
    for cell in study_cells:
        cell.results["models"]["dfr"]["label"] = label
    write_study_outputs(study_cells, tmp_path, metrics=("acc",))
    tex = (tmp_path / "table.tex").read_text()
    table = _first_table(tmp_path)
    assert (
        table["rows"][1][0]
        == latex_escape(label)
        == r"DFR\_last \& 50\% \#1 \{x\} \textasciitilde{}y\textasciicircum{}"
    )
    assert table["header"][1] == r"Acc\_uracy $\uparrow$"
    assert table["rows"][1][1] == r"\textbf{75.0\% $\pm$ 7.1\%}"
    assert "toy\\_set" in tex and "toy_set" not in tex.replace("tab:toy_set", "")


def test_selected_by_column_is_in_table_tex_when_table_md_has_it(tmp_path):
    selection = {
        "selection": {"rule": "worst-group", "criterion": "worst-group validation accuracy"}
    }
    study_cells = _tiny_cells(
        {"original": [0.5, 0.6], "dfr": [0.7, 0.8]}, Metric("acc", "Accuracy"), dfr=selection
    )
    write_study_outputs(study_cells, tmp_path, metrics=("acc",))
    assert "| Method | Selected by |" in (tmp_path / "table.md").read_text()
    table = _first_table(tmp_path)
    assert table["header"][:2] == ["Method", "Selected by"]
    assert [r[1] for r in table["rows"]] == ["--", "worst-group"]
    assert export(tmp_path, "markdown") == (tmp_path / "table.md").read_text()
    assert "worst-group" in export(tmp_path, "csv")


def test_a_study_tested_with_nothing_significant_says_so_under_the_table(tmp_path):
    write_study_outputs(cells(), tmp_path, alpha=1e-9)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["comparisons"] and not any(c["significant"] for c in stats["comparisons"])
    tex = (tmp_path / "table.tex").read_text()
    assert "$^{*}$" not in tex
    assert (
        "Wilcoxon signed-rank tests against original, paired by seed: no Holm-corrected p "
        r"$< 1e-09$, so no value is marked." in tex
    )


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_table_tex_compiles_with_pdflatex(study, tmp_path):
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{booktabs}\n"
        f"\\begin{{document}}\n\\input{{{(study / 'table.tex').as_posix()}}}\n\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]


# -- lvlmva export ----------------------------------------------------------------------------


def test_export_of_a_study_in_each_format(study, tmp_path, capsys):
    assert main(["export", str(study), "--format", "markdown"]) == EXIT_OK
    assert capsys.readouterr().out == (study / "table.md").read_text()
    out = tmp_path / "t.tex"
    assert main(["export", str(study), "--format", "latex", "--out", str(out)]) == EXIT_OK
    assert out.read_text() == (study / "table.tex").read_text()
    assert main(["export", str(study / "results.json"), "--format", "csv"]) == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["label"] for r in rows] == ["original", "LVLM-VA", "DFR", "JTT"]
    with open(study / "results.csv", newline="") as fh:
        long = [r for r in csv.DictReader(fh) if r["evaluator"] == "groups"]
    for row in rows:
        for dataset, key in _columns(study):
            values = [
                float(r["value"])
                for r in long
                if (r["dataset"], r["method"], r["metric"]) == (dataset, row["method"], key)
            ]
            assert float(row[f"{dataset} {key} mean"]) == pytest.approx(np.mean(values), abs=1e-15)
            assert float(row[f"{dataset} {key} std"]) == pytest.approx(
                np.std(values, ddof=1), abs=1e-15
            )
            assert int(row[f"{dataset} {key} n"]) == len(values)


def test_export_of_a_study_without_stats_json_recomputes_the_same_marks(study, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    (copy / "stats.json").unlink()
    assert export(copy, "latex").replace("tab:copy", "tab:X") == (
        study / "table.tex"
    ).read_text().replace(f"tab:{study.name}", "tab:X")


def test_export_of_a_compose_run_in_each_format(toy_registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "compose",
        str(toy_registered),
        "--out",
        str(run_dir),
        "--quiet",
        "--set",
        f"run.cache_dir={(tmp_path / 'cache').as_posix()!r}",
    ]
    assert main(args) == EXIT_OK
    capsys.readouterr()
    results = json.loads((run_dir / "results.json").read_text())
    assert main(["export", str(run_dir), "--format", "markdown"]) == EXIT_OK
    text = capsys.readouterr().out
    assert (
        text.startswith("## Models")
        and text == "\n".join(models_section(results)).rstrip("\n") + "\n"
    )
    assert main(["export", str(run_dir), "--format", "latex"]) == EXIT_OK
    tables = parse_tabulars(capsys.readouterr().out)
    assert len(tables) >= len(results["evaluations"])
    assert main(["export", str(run_dir), "--format", "csv"]) == EXIT_OK
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and {r["model"] for r in rows} <= set(results["models"])
    for r in rows:
        if r["value"] and not r["group"]:
            stored = results["evaluations"][r["evaluator"]]["models"][r["model"]][r["metric"]]
            assert float(r["value"]) == stored


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "no results.json: neither a study directory nor a finished compose run"),
        (lambda p: p / "missing", "no such folder"),
        (
            lambda p: (p / "results.json").write_text('{"x": 1}') and p,
            "not a results.json of lvlmva's",
        ),
        (
            lambda p: (p / "results.json").write_text("{not json") and p,
            "not a results.json of lvlmva's",
        ),
        (
            lambda p: (
                (p / "results.json").write_text(
                    json.dumps(
                        {
                            "baseline": "o",
                            "methods": {},
                            "datasets": {"d": {}},
                            "cells": [],
                            "rows": [],
                        }
                    )
                )
                and p
            ),
            "a study's results.json, but not as lvlmva writes it",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, make, message):
    target = make(tmp_path)
    assert main(["export", str(target), "--format", "latex"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("lvlmva: error: ") and message in err


def test_an_unknown_format_exits_2(study, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(study), "--format", "pdf"])
    assert exc.value.code == EXIT_BAD_INPUT
    assert "invalid choice: 'pdf'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown format 'pdf'"):
        export(study, "pdf")


def test_a_study_written_before_selected_by_was_stored_reads_it_from_its_cells(tmp_path):
    selection = {
        "selection": {"rule": "worst-group", "criterion": "worst-group validation accuracy"}
    }
    study_cells = _tiny_cells(
        {"original": [0.5, 0.6], "dfr": [0.7, 0.8]}, Metric("acc", "Accuracy"), dfr=selection
    )
    placed = []
    for cell in study_cells:
        run = tmp_path / "cells" / f"seed{cell.seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(cell.results))
        placed.append(CellResult(cell.dataset, cell.seed, "ok", cell.results, run_dir=str(run)))
    out = tmp_path / "study"
    write_study_outputs(placed, out, metrics=("acc",))
    data = json.loads((out / "results.json").read_text())
    del data["selected_by"]
    (out / "results.json").write_text(json.dumps(data))
    assert export(out, "markdown") == (out / "table.md").read_text()
