"""Tables of a finished study or compose run in LaTeX, CSV or markdown (``lvlmva export``).

A study's table is re-derived from what the study wrote (results.json's rows, the metrics it
showed, stats.json's verdicts), never by running anything again; its markdown is table.md's
text. A run's tables are report.md's "Models" tables, one per evaluator.

LaTeX tables use booktabs (``\\usepackage{booktabs}``): cells are ``mean $\\pm$ std`` in each
metric's declared format, the best mean per column in bold (by the metric's declared direction;
every mean that prints the same as the best is bold too; a metric with no direction has none),
and ``$^{*}$`` where the Wilcoxon test against the baseline is significant after the study's
correction.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .protocols import Metric
from .report import evaluator_tables, models_section

__all__ = ["FORMATS", "ExportError", "export", "latex_escape", "study_latex"]

FORMATS = ("latex", "csv", "markdown")
#: the mark of a significant difference from the baseline, and its note under the table
SIGNIFICANT_MARK = "$^{*}$"


class ExportError(ValueError):
    """The input cannot be exported (not a study or run directory, not our results.json)."""


# -- LaTeX -----------------------------------------------------------------------------------

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    # characters our labels and notes use that pdflatex cannot typeset as text
    "–": "--",
    "—": "---",
    "±": r"$\pm$",
    "≠": r"$\neq$",
    "×": r"$\times$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def latex_escape(text: Any) -> str:
    """``text`` as LaTeX text: the ten special characters and a few symbols escaped."""
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group(0)], str(text))


def _label_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", name).strip("-") or "table"


def _best(means: Mapping[str, float], metric: Metric) -> set[str]:
    """The keys whose mean prints the same as the best mean (ties all best); none when the
    metric declares no direction or nothing has a value."""
    if metric.higher_is_better is None or not means:
        return set()
    pick = max if metric.higher_is_better else min
    best = metric.format_value(pick(means.values()))
    return {k for k, v in means.items() if metric.format_value(v) == best}


def _booktabs(
    spec: str, header: Sequence[str], rows: Sequence[Sequence[str]], top: str = ""
) -> list[str]:
    """A tabular with booktabs rules; ``top``: header lines above ``header`` (already LaTeX)."""
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if top:
        lines.append(top)
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in rows]
    return lines + [r"\bottomrule", r"\end{tabular}"]


def _arrow(metric: Metric) -> str:
    return (
        ""
        if metric.higher_is_better is None
        else (r" $\uparrow$" if metric.higher_is_better else r" $\downarrow$")
    )


# -- a study's table -------------------------------------------------------------------------


def _study_columns(
    datasets: Sequence[str], by_dataset: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, Any]]:
    """(data set, metric key, shown) per column, in table.md's order."""
    return [(d, key, what) for d in datasets for key, what in by_dataset[d]["shown"].items()]


def _column_stats(
    by_dataset: Mapping[str, Mapping[str, Any]], dataset: str, key: str, methods: Mapping[str, str]
) -> dict[str, tuple[float, float, int]]:
    """Method -> (mean, std, n) of one column, for the methods with a value."""
    from .study.outputs import _mean_std

    per_method = by_dataset[dataset]["values"][key]
    out = {}
    for method in methods:
        values = list(per_method.get(method, {}).values())
        if values:
            out[method] = (*_mean_std(values), len(values))
    return out


def study_latex(
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    rules: Mapping[str, str],
    comparisons: Sequence[Mapping[str, Any]],
    *,
    baseline: str,
    alpha: float,
    correction: str,
    name: str = "study",
) -> str:
    """table.md's table as a booktabs LaTeX table (the same rows, columns and numbers)."""
    from .study.outputs import AGA_NOTE, _seed_list

    columns = _study_columns(datasets, by_dataset)
    significant = {
        (c["dataset"], c["metric"], c["method"]) for c in comparisons if c.get("significant")
    }
    lead = ["Method"] + (["Selected by"] if rules else [])
    top = [""] * len(lead)
    rules_under = []
    at = len(lead) + 1
    for dataset in datasets:
        width = len(by_dataset[dataset]["shown"])
        if width:
            top.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(dataset)}}}")
            rules_under.append(rf"\cmidrule(lr){{{at}-{at + width - 1}}}")
            at += width
    header = [
        *lead,
        *(latex_escape(what.metric.title) + _arrow(what.metric) for _, _, what in columns),
    ]
    stats = {(d, k): _column_stats(by_dataset, d, k, methods) for d, k, _ in columns}
    best = {
        (d, k): _best({m: s[0] for m, s in stats[(d, k)].items()}, what.metric)
        for d, k, what in columns
    }
    rows = []
    marked = partial = False
    for method, label in methods.items():
        row = [latex_escape(label)] + ([latex_escape(rules.get(method, "–"))] if rules else [])
        for dataset, key, what in columns:
            got = stats[(dataset, key)].get(method)
            if got is None:
                row.append("--")
                continue
            mean, std, n = got
            text = latex_escape(what.metric.format_value(mean))
            if n > 1:
                text += r" $\pm$ " + latex_escape(what.metric.format_value(std))
            if method in best[(dataset, key)]:
                text = rf"\textbf{{{text}}}"
            if n != len(by_dataset[dataset]["seeds"]):
                text += f" ({n})"
                partial = True
            if (dataset, key, method) in significant:
                text += SIGNIFICANT_MARK
                marked = True
            row.append(text)
        rows.append(row)
    spec = "l" * len(lead) + "c" * len(columns)
    top_line = " & ".join(top) + r" \\ " + " ".join(rules_under) if columns else ""

    where = []
    for dataset in datasets:
        info = by_dataset[dataset]
        sources = sorted({(s.evaluator, s.split) for s in info["shown"].values()})
        shown = "; ".join(
            rf"evaluator \texttt{{{latex_escape(e)}}}, {latex_escape(split)} split"
            for e, split in sources
        )
        where.append(
            f"{latex_escape(dataset)}: seeds {_seed_list(info['seeds'])}"
            + (f", {shown}" if shown else "")
        )
    caption = (
        r"Mean $\pm$ std (sample std) over seeds (" + "; ".join(where) + "). "
        r"Bold: the best mean per column."
    )
    notes = []
    which = "Holm-corrected p" if correction == "holm" else "p (uncorrected)"
    against = latex_escape(methods.get(baseline, baseline))
    if marked:
        notes.append(
            rf"{SIGNIFICANT_MARK} Wilcoxon signed-rank test against {against}, "
            rf"paired by seed: {which} $< {alpha:g}$."
        )
    elif comparisons:  # tested, nothing significant: say so, so that no mark is not read as untested
        notes.append(
            rf"Wilcoxon signed-rank tests against {against}, paired by seed: no {which} "
            rf"$< {alpha:g}$, so no value is marked."
        )
    if partial:
        notes.append(
            "A count in parentheses: fewer seeds than the data set ran (a failed cell or a missing method)."
        )
    notes.append(latex_escape(AGA_NOTE) + ".")
    problems = [p for d in datasets for p in by_dataset[d]["problems"]]
    if problems:
        notes.append("Failed or missing: " + "; ".join(latex_escape(p) for p in problems) + ".")
    lines = [
        r"% lvlmva study table; needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\label{{tab:{_label_key(name)}}}",
        *_booktabs(spec, header, rows, top_line),
    ]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize"] + [n + r"\par" for n in notes] + ["}"]
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def study_csv(
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    rules: Mapping[str, str],
) -> str:
    """One row per method, table.md's columns as mean, std and n at full precision."""
    columns = _study_columns(datasets, by_dataset)
    header = ["method", "label"] + (["selected_by"] if rules else [])
    for dataset, key, _ in columns:
        header += [f"{dataset} {key} {part}" for part in ("mean", "std", "n")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    stats = {(d, k): _column_stats(by_dataset, d, k, methods) for d, k, _ in columns}
    for method, label in methods.items():
        row: list[Any] = [method, label] + ([rules.get(method, "")] if rules else [])
        for dataset, key, _ in columns:
            got = stats[(dataset, key)].get(method)
            if got is None:
                row += ["", "", 0]
            else:
                mean, std, n = got
                row += [repr(mean), "" if math.isnan(std) else repr(std), n]
        writer.writerow(row)
    return buf.getvalue()


def _is_study(data: Any) -> bool:
    return isinstance(data, dict) and all(
        k in data for k in ("baseline", "methods", "datasets", "cells", "rows")
    )


def _is_run(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("models"), dict)
        and isinstance(data.get("evaluations"), dict)
    )


def _study_parts(directory: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """What write_study_outputs computed, back from a study's results.json and stats.json."""
    from .study.outputs import _Shown, _statistics, _values

    try:
        methods = dict(data["methods"])
        datasets = list(data["datasets"])
        by_dataset = {}
        for dataset in datasets:
            info = data["datasets"][dataset]
            shown = {
                key: _Shown(
                    s["evaluator"],
                    s["split"],
                    Metric.from_dict(
                        {k: v for k, v in s.items() if k not in ("evaluator", "split")}
                    ),
                )
                for key, s in info["shown"].items()
            }
            by_dataset[dataset] = {
                "seeds": list(info["seeds"]),
                "shown": shown,
                "values": _values(data["rows"], dataset, shown),
                "problems": list(info.get("problems", [])),
            }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(
            f"{directory / 'results.json'}: a study's results.json, but not as lvlmva writes it ({exc!r})"
        ) from exc
    stats_path = directory / "stats.json"
    stats: dict[str, Any] = {}
    if stats_path.is_file():
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{stats_path}: cannot read it: {exc}") from exc
    baseline = str(stats.get("baseline", data["baseline"]))
    alpha = float(stats.get("alpha", 0.05))
    correction = str(stats.get("correction", "holm"))
    comparisons = stats.get("comparisons")
    if comparisons is None:  # no stats.json: the same tests, computed from the stored rows
        comparisons = _statistics(datasets, by_dataset, methods, baseline, alpha, correction)
    return {
        "datasets": datasets,
        "by_dataset": by_dataset,
        "methods": methods,
        "rules": _selected_by(data),
        "comparisons": comparisons,
        "baseline": baseline,
        "alpha": alpha,
        "correction": correction,
    }


def _selected_by(data: Mapping[str, Any]) -> dict[str, str]:
    """table.md's "Selected by" column: stored in results.json; a study written before it was
    has it from its cells' own results.json, where they are still there."""
    from .study.outputs import CellResult, _selection_rules

    if "selected_by" in data:
        return dict(data["selected_by"] or {})
    cells = []
    for cell in data["cells"]:
        try:
            results = json.loads(
                (Path(cell["run_dir"]) / "results.json").read_text(encoding="utf-8")
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if cell.get("status") == "ok" and isinstance(results, dict):
            cells.append(CellResult(cell["dataset"], cell["seed"], "ok", results))
    return _selection_rules(cells)


def _export_study(directory: Path, data: Mapping[str, Any], fmt: str) -> str:
    from .study.outputs import _table

    p = _study_parts(directory, data)
    if fmt == "markdown":
        return _table(p["datasets"], p["by_dataset"], p["methods"], p["rules"])
    if fmt == "csv":
        return study_csv(p["datasets"], p["by_dataset"], p["methods"], p["rules"])
    return study_latex(
        p["datasets"], p["by_dataset"], p["methods"], p["rules"], p["comparisons"],
        baseline=p["baseline"], alpha=p["alpha"], correction=p["correction"], name=directory.resolve().name,
    )  # fmt: skip


# -- a run's tables --------------------------------------------------------------------------


def _run_latex(results: Mapping[str, Any], name: str) -> str:
    parts = [r"% lvlmva run tables; need \usepackage{booktabs}"]
    for i, table in enumerate(evaluator_tables(results)):
        named = (
            table.evaluator
            if table.plugin == table.evaluator
            else f"{table.evaluator} ({table.plugin})"
        )
        header = ["Model", *(latex_escape(c.metric.title) + _arrow(c.metric) for c in table.scalar)]
        best = {
            c.metric.key: _best(
                {
                    m: v
                    for m, v in table.values[c.metric.key].items()
                    if _number(v) and m in table.models
                },
                c.metric,
            )
            for c in table.scalar
        }
        rows = []
        for m in table.models:
            row = [latex_escape(table.labels[m])]
            for c in table.scalar:
                text = latex_escape(c.metric.format_value(table.values[c.metric.key].get(m)))
                row.append(rf"\textbf{{{text}}}" if m in best[c.metric.key] else text)
            rows.append(row)
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{Evaluator \texttt{{{latex_escape(named)}}}, on the {latex_escape(table.split)} split. Bold: the best value per column.}}",
            rf"\label{{tab:{_label_key(name)}-{_label_key(table.evaluator)}}}",
            *_booktabs("l" + "c" * len(table.scalar), header, rows),
        ]
        for column, keys, per_model in table.mapped:
            lines += [
                r"\par\medskip",
                latex_escape(column.metric.title) + r":\par\smallskip",
                *_booktabs(
                    "l" + "c" * len(keys),
                    ["Model", *(latex_escape(k) for k in keys)],
                    [[latex_escape(table.labels[m]), *(latex_escape(column.metric.format_value(per_model[m].get(k))) for k in keys)]
                     for m in table.models if m in per_model],
                ),
            ]  # fmt: skip
        lines.append(r"\end{table}")
        parts += ([""] if i else []) + lines
    if len(parts) == 1:
        parts.append("% no model was evaluated in this run")
    return "\n".join(parts) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_csv(results: Mapping[str, Any]) -> str:
    """One row per evaluator, model and metric (a per-group metric: one row per group)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["evaluator", "plugin", "split", "model", "label", "metric", "group", "value"])
    for table in evaluator_tables(results):
        head = [table.evaluator, table.plugin, table.split]
        for m in table.models:
            for c in table.scalar:
                value = table.values[c.metric.key].get(m)
                writer.writerow(
                    [
                        *head,
                        m,
                        table.labels[m],
                        c.metric.key,
                        "",
                        repr(value) if _number(value) else "",
                    ]
                )
            for column, keys, per_model in table.mapped:
                for k in keys:
                    value = per_model.get(m, {}).get(k)
                    writer.writerow(
                        [
                            *head,
                            m,
                            table.labels[m],
                            column.metric.key,
                            k,
                            repr(value) if _number(value) else "",
                        ]
                    )
    return buf.getvalue()


def _export_run(directory: Path, results: Mapping[str, Any], fmt: str) -> str:
    if fmt == "markdown":
        return "\n".join(models_section(results)).rstrip("\n") + "\n"
    if fmt == "csv":
        return _run_csv(results)
    return _run_latex(results, directory.resolve().name)


# -- entry -----------------------------------------------------------------------------------


def export(path: Path | str, fmt: str) -> str:
    """The tables of the study or finished compose run at ``path`` (its folder or its
    results.json) as ``fmt`` text; raises :class:`ExportError` on anything else."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if not path.is_dir():
        raise ExportError(
            f"{path}: no such folder (give a study directory or a finished compose run directory)"
        )
    results_path = path / "results.json"
    if not results_path.is_file():
        raise ExportError(
            f"{path}: no results.json: neither a study directory nor a finished compose run "
            "(a run publishes results.json when its last stage finishes)"
        )
    try:
        data = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{results_path}: not a results.json of lvlmva's: {exc}") from exc
    if _is_study(data):
        return _export_study(path, data, fmt)
    if _is_run(data):
        try:
            return _export_run(path, data, fmt)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ExportError(
                f"{results_path}: a run's results.json, but not as lvlmva writes it ({exc!r})"
            ) from exc
    raise ExportError(
        f"{results_path}: not a results.json of lvlmva's (a study's has baseline, methods, "
        "datasets, cells and rows; a run's has models and evaluations)"
    )
