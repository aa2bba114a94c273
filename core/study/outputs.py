"""A study's outputs, from the results.json of every (data set, seed) cell: the long table of
numbers (results.csv, results.json), the seed's Table 3 layout (table.md; table.tex for a paper,
written by lvlmva.export), Wilcoxon signed-rank tests of each method against the baseline and of
the pairs of each declared family of comparisons (stats.json, stats.md) and one figure per metric
(``<metric>.png``). ``figures.json`` records the figures a study wrote, with their hashes: when the
study is written again and no longer makes one of them (its metrics changed), that file is removed,
unless it was changed since (a user's file in the folder is never removed).

Only cells that finished ("ok") contribute numbers. A failed cell's partial results are left out,
so that no mean mixes in a seed whose run stopped half-way; failed cells, failed stages and
methods missing from a seed are listed with their reasons under the table instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import scipy
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import write_atomic
from ..metrics import holm_adjusted, wilcoxon_signed_rank
from ..protocols import Metric
from ..results import iter_model_values, metric_columns, model_labels

__all__ = [
    "CellResult",
    "ComparisonFamily",
    "FAMILY_ROLES",
    "pairs_differing_in",
    "write_study_outputs",
    "CSV_HEADER",
    "min_pairs",
]

CSV_HEADER = ("dataset", "seed", "method", "label", "evaluator", "split", "metric", "value")
DASH = "–"
AGA_NOTE = "AGA = mean of group accuracies; accuracy = plain sample accuracy"
#: zero differences carry no sign, so they are dropped (Wilcoxon's rule, as in lvlmva.metrics)
ZERO_METHOD = "wilcox"
#: differences are rounded before ranking so that float round-off does not split true ties
DIFFERENCE_DECIMALS = 12
#: the study folder's record of the figures it wrote (name -> SHA-256 of the bytes written)
FIGURES_MANIFEST = "figures.json"


@dataclass(frozen=True)
class CellResult:
    """One (data set, seed) cell of a study. ``results`` is its parsed results.json; a failed
    cell may have one too, with partial results and a ``failed`` section."""

    dataset: str
    seed: int
    status: str
    results: dict[str, Any] | None
    reason: str = ""
    seconds: float | None = None
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.status not in ("ok", "failed"):
            raise ValueError(f"cell status must be 'ok' or 'failed', got {self.status!r}")


@dataclass(frozen=True)
class ComparisonFamily:
    """Pairs of methods compared with each other besides the baseline, Holm-corrected over
    this family alone, per data set and metric. ``pairs``: data set -> (method, other) pairs;
    each test is on method − other, paired by seed."""

    name: str
    description: str
    pairs: Mapping[str, Sequence[tuple[str, str]]]

    def __post_init__(self) -> None:
        for dataset, pairs in self.pairs.items():
            for first, second in pairs:
                if first == second:
                    raise ValueError(
                        f"family {self.name!r}, {dataset}: {first!r} compared with itself"
                    )


#: ``[study] compare`` family -> the part of an aligned model in which its pairs differ
FAMILY_ROLES = {"aligners": "aligner", "critics": "critic", "segmenters": "segmenter"}
FAMILY_DESCRIPTIONS = {
    "aligners": "each aligner against each other on the same branch (same segmenter and critic, "
    "or both on true masks)",
    "critics": "each critic/judge pair against each other with the same aligner and segmenter",
    "segmenters": "each segmenter against each other with the same aligner and critic",
}


def pairs_differing_in(
    parts: Mapping[str, Mapping[str, str | None]], role: str
) -> list[tuple[str, str]]:
    """The pairs of models that differ in ``role`` only. ``parts``: model key -> its
    ``aligner``, ``segmenter`` and ``critic`` (``None`` for a model aligned on true masks, which
    has neither), in the order of the run. Models that agree on the other two parts form a
    group; every two of a group are a pair, in the run's order (earlier first)."""
    if role not in FAMILY_ROLES.values():
        raise ValueError(f"role must be one of {sorted(FAMILY_ROLES.values())}, got {role!r}")
    others = [r for r in ("aligner", "segmenter", "critic") if r != role]
    groups: dict[tuple[str | None, ...], list[str]] = {}
    for key, part in parts.items():
        groups.setdefault(tuple(part[r] for r in others), []).append(key)
    pairs = []
    for keys in groups.values():
        for first, second in itertools.combinations(keys, 2):
            if parts[first][role] != parts[second][role]:
                pairs.append((first, second))
    return pairs


@dataclass(frozen=True)
class _Shown:
    """The evaluator whose value of a metric a data set's table, tests and figure show."""

    evaluator: str
    split: str
    metric: Metric


def min_pairs(alpha: float) -> int:
    """Fewest non-zero paired differences for which a two-sided exact Wilcoxon p can be below
    ``alpha``: with n pairs the smallest p is 2 / 2**n (every difference of the same sign)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n = 1
    while 2.0 ** (1 - n) >= alpha:
        n += 1
    return n


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Real) -> int | float:
    """A JSON number (numpy scalars become int or float, so they print as numbers)."""
    return int(value) if isinstance(value, Integral) else float(value)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; nan for one value), computed with numpy so that a reader who
    checks a table cell with numpy gets the same last digit (lvlmva.metrics.mean_std sums in
    torch, which can round a mean that lies on a rounding boundary the other way)."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def _seed_list(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in seeds)


# -- gathering -------------------------------------------------------------------------------


def _check_cells(cells: Sequence[CellResult]) -> None:
    seen = set()
    for cell in cells:
        if (cell.dataset, cell.seed) in seen:
            raise ValueError(f"two cells for data set {cell.dataset!r}, seed {cell.seed}")
        seen.add((cell.dataset, cell.seed))


def _ordered_cells(cells: Sequence[CellResult]) -> tuple[list[str], list[CellResult]]:
    """Data sets in the order they first appear, cells by data set then seed."""
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    rank = {d: i for i, d in enumerate(datasets)}
    return datasets, sorted(cells, key=lambda c: (rank[c.dataset], c.seed))


def _methods(cells: Sequence[CellResult], baseline: str) -> dict[str, str]:
    """Method key -> label: the baseline, the runs' models in their results' order, then models
    that only appear in evaluations."""
    labels: dict[str, str] = {}
    published = [c.results for c in cells if c.status == "ok" and c.results]
    for results in published:
        for key, label in model_labels(results).items():
            labels.setdefault(key, label)
    for results in published:
        for model, _, _ in iter_model_values(results):
            labels.setdefault(model, model)
    if baseline in labels:
        labels = {baseline: labels[baseline], **labels}
    # two methods with one label (data sets that label differently) would share a table row's
    # name: each says its key
    taken = list(labels.values())
    return {k: f"{v} [{k}]" if taken.count(v) > 1 else v for k, v in labels.items()}


def _rows(cells: Sequence[CellResult], methods: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per numeric scalar metric value of every ok cell, every evaluator."""
    order = {m: i for i, m in enumerate(methods)}
    rows = []
    for cell in cells:
        if cell.status != "ok" or not cell.results:
            continue
        cell_rows = [
            {
                "dataset": cell.dataset,
                "seed": cell.seed,
                "method": model,
                "label": methods[model],
                "evaluator": column.evaluator,
                "split": column.split,
                "metric": column.metric.key,
                "value": _plain(value),
            }
            for model, column, value in iter_model_values(cell.results)
            if _number(value)
        ]
        rows.extend(sorted(cell_rows, key=lambda r: order[r["method"]]))
    return rows


def _shown_metrics(
    cells: Sequence[CellResult], metrics: Sequence[str], evaluator: str | None
) -> dict[str, _Shown]:
    """Metric key -> what a data set shows for it: the named evaluator's, else the first
    evaluator (in the results' order) that declares the key."""
    shown: dict[str, _Shown] = {}
    for cell in cells:
        if cell.status != "ok" or not cell.results:
            continue
        for column in metric_columns(cell.results):
            key = column.metric.key
            if key in metrics and key not in shown:
                if evaluator is None or column.evaluator == evaluator:
                    shown[key] = _Shown(column.evaluator, column.split, column.metric)
    return {k: shown[k] for k in metrics if k in shown}


def _values(
    rows: Sequence[Mapping[str, Any]], dataset: str, shown: Mapping[str, _Shown]
) -> dict[str, dict[str, dict[int, float]]]:
    """Metric key -> method -> seed -> value, of the evaluator shown for that metric."""
    out: dict[str, dict[str, dict[int, float]]] = {key: {} for key in shown}
    for row in rows:
        what = shown.get(row["metric"])
        if row["dataset"] == dataset and what is not None and row["evaluator"] == what.evaluator:
            out[row["metric"]].setdefault(row["method"], {})[row["seed"]] = row["value"]
    return out


# -- the table -------------------------------------------------------------------------------


def _cell_text(values: Sequence[float], metric: Metric, seeds: int) -> str:
    """``mean ± std`` (ddof=1), with ``(n)`` when not every seed of the data set has a value."""
    if not values:
        return DASH
    mean, std = _mean_std(values)
    text = metric.format_value(mean)
    if len(values) > 1:
        text += f" ± {metric.format_value(std)}"
    if len(values) != seeds:
        text += f" ({len(values)})"
    return text


def _problems(
    dataset: str,
    cells: Sequence[CellResult],
    methods: Mapping[str, str],
    values: Mapping[str, Mapping[str, Mapping[int, float]]],
) -> list[str]:
    """Failed cells, failed stages and methods without a value in some ok seed, with reasons."""
    lines = []
    ok_seeds = [c.seed for c in cells if c.status == "ok"]
    for cell in cells:
        stages = (cell.results or {}).get("failed") or {}
        if cell.status == "failed":
            lines.append(
                f"{dataset} seed {cell.seed}: the cell failed: {cell.reason or 'no reason given'}"
            )
        elif not cell.results:
            lines.append(f"{dataset} seed {cell.seed}: finished without results")
        for stage, reason in stages.items():
            if cell.status == "failed" and str(reason) in cell.reason:
                continue  # already said by the cell's own reason
            lines.append(f"{dataset} seed {cell.seed}: {stage} {reason}")
    for method, label in methods.items():
        seeds_with = {s for per_method in values.values() for s in per_method.get(method, {})}
        if not seeds_with:
            continue
        missing = [s for s in ok_seeds if s not in seeds_with]
        if missing:
            lines.append(f"{dataset}: {label} has no value in seed(s) {_seed_list(missing)}")
    return lines


def _selection_rules(cells: Sequence[CellResult]) -> dict[str, str]:
    """Method key -> the selection rule(s) that chose its models in the ok cells (from
    ``details.selection`` in each run's results), for the table's "Selected by" column."""
    found: dict[str, list[str]] = {}
    for cell in cells:
        if cell.status != "ok" or not cell.results:
            continue
        for key, info in (cell.results.get("models") or {}).items():
            selection = (info.get("details") or {}).get("selection") if isinstance(info, Mapping) else None
            if isinstance(selection, Mapping) and selection.get("rule"):
                rules = found.setdefault(key, [])
                if selection["rule"] not in rules:
                    rules.append(str(selection["rule"]))
    return {k: ", ".join(v) for k, v in found.items()}


def _table(
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    rules: Mapping[str, str] | None = None,
) -> str:
    rules = rules or {}
    header = ["Method"] + (["Selected by"] if rules else [])
    for dataset in datasets:
        header += [f"{dataset} {s.metric.title}" for s in by_dataset[dataset]["shown"].values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, label in methods.items():
        cells = [label] + ([rules.get(method, DASH)] if rules else [])
        for dataset in datasets:
            info = by_dataset[dataset]
            for key, what in info["shown"].items():
                seed_values = info["values"][key].get(method, {})
                cells.append(
                    _cell_text(list(seed_values.values()), what.metric, len(info["seeds"]))
                )
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "Mean ± std (sample std, ddof=1) over the seeds where the method has a value. "
        "A count in parentheses means fewer seeds than the data set ran (a failed cell or a "
        f"missing method, listed below); without one, every seed counts. {DASH}: no value.",
        AGA_NOTE + ".",
    ]
    if rules:
        notes.append(
            "Selected by: the rule that chose each method's epoch or hyperparameters "
            "(worst-group = worst-group validation accuracy, needs validation group labels; "
            "worst-class = lowest per-class validation accuracy and average = validation "
            "accuracy, no group labels; oracle-test = chosen on the test split, an upper bound). "
            f"{DASH}: nothing was chosen (a model trained once, as configured)."
        )
    for dataset in datasets:
        info = by_dataset[dataset]
        sources = sorted({(s.evaluator, s.split) for s in info["shown"].values()})
        where = "; ".join(f"evaluator {e}, {split} split" for e, split in sources) or "no metric"
        notes.append(
            f"{dataset}: {where}; seeds {_seed_list(info['seeds'])} ({len(info['seeds'])})."
        )
    problems = [p for d in datasets for p in by_dataset[d]["problems"]]
    if problems:
        notes.append("Failed or missing:")
        notes += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# -- statistics ------------------------------------------------------------------------------


def _direction(difference: float, higher_is_better: bool | None) -> str:
    if difference == 0:
        return "same"
    if higher_is_better is None:
        return "higher" if difference > 0 else "lower"
    return "better" if (difference > 0) == higher_is_better else "worse"


def _compare(values: Mapping[int, float], base: Mapping[int, float], need: int) -> dict[str, Any]:
    """One method against the baseline, paired by seed; ``p`` is None when the test is not
    possible (too few non-zero differences, or none)."""
    seeds = sorted(set(values) & set(base))
    diffs = np.round(
        np.array([values[s] for s in seeds], dtype=float) - [base[s] for s in seeds],
        DIFFERENCE_DECIMALS,
    )
    nonzero = diffs[diffs != 0]
    out: dict[str, Any] = {
        "seeds": seeds,
        "n": len(seeds),
        "n_nonzero": int(nonzero.size),
        "mean_difference": float(diffs.mean()) if seeds else None,
        "statistic": None,
        "p": None,
        "p_method": None,
        "not_tested": "",
    }
    if not seeds:
        out["not_tested"] = "no seed where both have a value"
    elif nonzero.size == 0:
        out["not_tested"] = "every paired difference is zero"
    elif nonzero.size < need:
        out["not_tested"] = (
            f"{nonzero.size} non-zero paired difference(s); {need} are needed before a "
            "two-sided p can fall below alpha"
        )
    else:
        test = wilcoxon_signed_rank(diffs, np.zeros_like(diffs))
        ties = np.unique(np.abs(nonzero)).size < nonzero.size
        out["statistic"], out["p"] = test["statistic"], test["p_value"]
        out["p_method"] = "exact" if not (ties or nonzero.size < diffs.size) else "ties or zeros"
    return out


def _decide(family: list[dict[str, Any]], alpha: float, correction: str, against: str) -> None:
    """Holm over the comparisons of ``family`` that could be tested (an untestable one has no p
    to rank, and counting it would only make the others stricter for no information), then
    each one's significance and verdict. ``against``: the entry key naming the other side."""
    tested = [e for e in family if e["p"] is not None]
    adjusted_p = holm_adjusted([e["p"] for e in tested]) if tested else []
    for entry, adjusted in zip(tested, adjusted_p, strict=True):
        entry["p_holm"] = adjusted
    for entry in family:
        entry.setdefault("p_holm", None)
        decisive = entry["p_holm"] if correction == "holm" else entry["p"]
        entry["significant"] = decisive is not None and decisive < alpha
        entry["verdict"] = _verdict(entry, alpha, correction, entry[against])


def _entry(
    dataset: str,
    key: str,
    what: _Shown,
    sides: Mapping[str, str],
    values: Mapping[int, float],
    other: Mapping[int, float],
    need: int,
) -> dict[str, Any]:
    """One test of ``values`` against ``other``; ``sides`` names the two (keys and labels)."""
    entry = {
        "dataset": dataset,
        "metric": key,
        "title": what.metric.title,
        "evaluator": what.evaluator,
        "split": what.split,
        **sides,
        **_compare(values, other, need),
    }
    entry["effect"] = (
        None
        if entry["mean_difference"] is None
        else _direction(entry["mean_difference"], what.metric.higher_is_better)
    )
    return entry


def _statistics(
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    baseline: str,
    alpha: float,
    correction: str = "holm",
) -> list[dict[str, Any]]:
    need = min_pairs(alpha)
    comparisons = []
    for dataset in datasets:
        info = by_dataset[dataset]
        for key, what in info["shown"].items():
            per_method = info["values"][key]
            base = per_method.get(baseline, {})
            family = []
            for method, label in methods.items():
                if method == baseline or method not in per_method:
                    continue
                sides = {
                    "method": method,
                    "label": label,
                    "baseline": baseline,
                    "baseline_label": methods.get(baseline, baseline),
                }
                family.append(_entry(dataset, key, what, sides, per_method[method], base, need))
            _decide(family, alpha, correction, "baseline_label")
            comparisons += family
    return comparisons


def _family_statistics(
    family: ComparisonFamily,
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    alpha: float,
    correction: str = "holm",
) -> list[dict[str, Any]]:
    """The pairs of one family, per data set and metric, Holm-corrected over the family's
    tested pairs there. A pair is reported when at least one side has values (a side without
    any is "not tested"); a pair neither side of which has a value of the metric is left out."""
    need = min_pairs(alpha)
    comparisons = []
    for dataset in datasets:
        info = by_dataset[dataset]
        pairs = family.pairs.get(dataset, ())
        for key, what in info["shown"].items():
            per_method = info["values"][key]
            entries = []
            for method, other in pairs:
                if method not in per_method and other not in per_method:
                    continue
                sides = {
                    "family": family.name,
                    "method": method,
                    "label": methods.get(method, method),
                    "other": other,
                    "other_label": methods.get(other, other),
                }
                values, against = per_method.get(method, {}), per_method.get(other, {})
                entries.append(_entry(dataset, key, what, sides, values, against, need))
            _decide(entries, alpha, correction, "other_label")
            comparisons += entries
    return comparisons


def _verdict(entry: Mapping[str, Any], alpha: float, correction: str, against: str) -> str:
    if entry["p"] is None:
        return f"not tested: {entry['not_tested']}"
    which = "Holm p" if correction == "holm" else "p, uncorrected,"
    if entry["significant"]:
        return f"{entry['effect']} than {against} ({which} < {alpha:g})"
    return f"no significant difference at {alpha:g}"


def holm_floor(comparisons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per data set and metric, the smallest Holm-adjusted p the tested methods could reach:
    m x (smallest p for the fewest non-zero differences among them), m = methods tested."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for entry in comparisons:
        if entry["p"] is not None:
            groups.setdefault((entry["dataset"], entry["metric"]), []).append(entry)
    out = []
    for (dataset, metric), entries in groups.items():
        fewest = min(int(e["n_nonzero"]) for e in entries)
        out.append(
            {
                "dataset": dataset,
                "metric": metric,
                "methods": len(entries),
                "n_nonzero": fewest,
                "smallest_p": 2.0 ** (1 - fewest),
                "smallest_holm_p": min(1.0, len(entries) * 2.0 ** (1 - fewest)),
            }
        )
    return out


def _stats_description(alpha: float, correction: str = "holm") -> dict[str, Any]:
    return {
        "test": "scipy.stats.wilcoxon, two-sided, each method against the baseline and each "
        "pair of a family against each other, paired by seed",
        "scipy": scipy.__version__,
        "zero_method": ZERO_METHOD,
        "zero_method_why": "a zero difference says nothing about direction, so it is dropped "
        "(Wilcoxon's rule); n_nonzero is the sample size the test uses",
        "method": "auto",
        "method_why": "exact null distribution when the differences have no ties or zeros; "
        "with ties or zeros SciPy >= 1.15 enumerates all 2^n sign flips for n <= 13 "
        "(p_method says which case applied)",
        "difference_decimals": DIFFERENCE_DECIMALS,
        "min_pairs": min_pairs(alpha),
        "correction": correction,
        "correction_why": "Holm step-down over the methods tested against the baseline, and "
        "separately over each family's pairs tested, per data set and metric"
        if correction == "holm"
        else "none: each method's test stands alone (as the paper reports them); with several "
        "methods the chance of at least one false positive exceeds alpha",
        "alpha": alpha,
    }


def _fmt(value: float | None, spec: str) -> str:
    return DASH if value is None else format(value, spec)


def _stats_markdown(
    comparisons: Sequence[Mapping[str, Any]],
    baseline: str,
    alpha: float,
    correction: str = "holm",
    families: Sequence[Mapping[str, Any]] = (),
) -> str:
    need = min_pairs(alpha)
    if correction == "holm":
        decide = (
            f"- Holm's step-down correction over the methods tested per data set and metric; a "
            f"verdict needs Holm p < {alpha:g}."
        )
        floors = [f for f in holm_floor(comparisons) if f["smallest_holm_p"] >= alpha]
        if floors:
            worst = max(floors, key=lambda f: f["smallest_holm_p"])
            decide += (
                f" **No verdict can reach significance here:** with {worst['methods']} methods "
                f"and {worst['n_nonzero']} non-zero differences the smallest Holm p is "
                f"{worst['methods']} x 2/2^{worst['n_nonzero']} = {worst['smallest_holm_p']:.4f}"
                f" ≥ {alpha:g} (for {len(floors)} data set x metric table(s)). Run more seeds, "
                "compare fewer methods, or read the uncorrected p (`[study] correction = "
                '"none"` decides on it, as the paper does).'
            )
    else:
        decide = (
            f'- No correction for several methods (`correction = "none"`): a verdict needs '
            f"p < {alpha:g} on its own test; Holm p is shown for reference."
        )
    lines = [
        "# Significance against the baseline",
        "",
        f"Each method against `{baseline}`, per data set and metric, paired by seed (only seeds "
        "where both have a value): the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, "
        f"SciPy {scipy.__version__}), two-sided.",
        "",
        "- Assumes paired samples, pairs independent of each other (one per seed), and "
        "differences distributed symmetrically about their median; it tests whether that "
        "median is zero. It does not assume normal differences.",
        f'- `zero_method="{ZERO_METHOD}"`: a seed where the two are equal says nothing about '
        "direction and is dropped; n counts the pairs, n≠0 the non-zero differences the test "
        "uses.",
        '- `method="auto"`: the exact null distribution when the differences have no ties or '
        "zeros; with ties or zeros SciPy ≥ 1.15 enumerates all 2^n sign flips for n ≤ 13. "
        f"Differences are rounded to {DIFFERENCE_DECIMALS} decimals first so that float "
        "round-off does not split ties.",
        "- With n non-zero differences the smallest two-sided p is 2/2^n: with 7 seeds "
        f"2/128 = 0.0156. Below {need} non-zero differences no outcome can reach "
        f"p < {alpha:g}, so no test is reported.",
        decide,
        "- Effect: sign of the mean difference (method − baseline), read with the metric's "
        "direction.",
        "",
    ]
    groups = _by_dataset_and_metric(comparisons)
    for entries in groups.values():
        lines += [f"## {_heading(entries[0])}", "", *_test_table(entries, paired=False), ""]
    if not groups:
        lines.append(f"No method has values to compare with `{baseline}`.")
    for family in families:
        lines += ["", *_family_markdown(family, alpha, correction)]
    return "\n".join(lines)


def _by_dataset_and_metric(
    comparisons: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for entry in comparisons:
        groups.setdefault((entry["dataset"], entry["metric"]), []).append(entry)
    return groups


def _heading(entry: Mapping[str, Any]) -> str:
    return f"{entry['dataset']}: {entry['title']} ({entry['evaluator']}, {entry['split']} split)"


def _test_table(entries: Sequence[Mapping[str, Any]], paired: bool) -> list[str]:
    """The tests of one data set and metric; ``paired``: a family's, with the other side."""
    head = "| Method | compared with " if paired else "| Method "
    lines = [
        head + "| n | n≠0 | mean diff. | effect | W | p | Holm p | verdict |",
        "|---" * (10 if paired else 9) + "|",
    ]
    for e in entries:
        other = f"| {e['other_label']} " if paired else ""
        lines.append(
            f"| {e['label']} {other}| {e['n']} | {e['n_nonzero']} "
            f"| {_fmt(e['mean_difference'], '+.4f')} | {e['effect'] or DASH} "
            f"| {_fmt(e['statistic'], 'g')} | {_fmt(e['p'], '.4f')} "
            f"| {_fmt(e['p_holm'], '.4f')} | {e['verdict']} |"
        )
    return lines


def _family_markdown(family: Mapping[str, Any], alpha: float, correction: str) -> list[str]:
    pairs = family["pairs"]
    counts = sorted({len(p) for p in pairs.values()})
    lines = [
        f"# Family {family['name']}: {family['description']}",
        "",
        f"{' or '.join(str(c) for c in counts) or 'No'} pair(s) per data set, each method against "
        "the one it is compared with, paired by seed and tested as above (mean diff.: method − "
        "compared with).",
    ]
    if correction == "holm":
        lines[-1] += (
            " Holm's correction runs over this family's pairs tested per data set and metric, "
            f"not over the baseline's tests or other families'; a verdict needs Holm p < {alpha:g}."
        )
        floors = [f for f in family["holm_floor"] if f["smallest_holm_p"] >= alpha]
        if floors:
            worst = max(floors, key=lambda f: f["smallest_holm_p"])
            lines[-1] += (
                f" **No verdict of this family can reach significance here:** with "
                f"{worst['methods']} pairs and {worst['n_nonzero']} non-zero differences the "
                f"smallest Holm p is {worst['methods']} x 2/2^{worst['n_nonzero']} = "
                f"{worst['smallest_holm_p']:.4f} ≥ {alpha:g} (for {len(floors)} data set x "
                "metric table(s))."
            )
    else:
        lines[-1] += f" Uncorrected: a verdict needs p < {alpha:g} on its own test."
    lines.append("")
    groups = _by_dataset_and_metric(family["comparisons"])
    for entries in groups.values():
        lines += [
            f"## {family['name']}, {_heading(entries[0])}",
            "",
            *_test_table(entries, paired=True),
            "",
        ]
    if not groups:
        lines += ["No pair of this family has values to compare.", ""]
    return lines


# -- figures ---------------------------------------------------------------------------------

#: tick labels: wrapped at this many characters, in this font size (points), whose characters
#: are about this wide (inches; DejaVu Sans averages ~0.55 em)
TICK_CHARS = 16
TICK_FONT = 8
TICK_INCHES_PER_CHAR = 0.55 * TICK_FONT / 72


def _tick_label(label: str) -> str:
    """``label`` on lines of at most TICK_CHARS characters where it can be: broken after its
    commas first (one part of a branch label a line), then at spaces; a longer word stays whole."""
    parts = label.split(", ")
    lines: list[str] = []
    for i, part in enumerate(parts):
        piece = part + ("," if i < len(parts) - 1 else "")
        if lines and len(lines[-1]) + 1 + len(piece) <= TICK_CHARS:
            lines[-1] += " " + piece
        else:
            wrapped = textwrap.wrap(
                piece, TICK_CHARS, break_long_words=False, break_on_hyphens=False
            )
            lines += wrapped or [piece]
    return "\n".join(lines)


def _figure(
    key: str,
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    path: Path,
) -> bool:
    """Every seed as a point per method (jittered, seeded), mean ± std as an error bar; one
    panel per data set that shows ``key``. False when no data set has a value of it."""
    panels = [d for d in datasets if by_dataset[d]["values"].get(key)]
    if not panels:
        return False
    rng = np.random.default_rng(0)
    # labels wrapped, horizontal, each method as wide as its longest line: branch labels
    # ("aligned: rrr, oracle critic, J=5") never overlap their neighbours
    ticks = [_tick_label(label) for label in methods.values()]
    longest = max((len(line) for tick in ticks for line in tick.splitlines()), default=0)
    per_method = max(0.8, TICK_INCHES_PER_CHAR * longest + 0.2)
    width = max(3.2, per_method * len(methods) + 1.0)
    fig = Figure(figsize=(width * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, dataset in zip(axes, panels, strict=True):
        info = by_dataset[dataset]
        per_method = info["values"][key]
        for i, method in enumerate(methods):
            seed_values = list(per_method.get(method, {}).values())
            if not seed_values:
                continue
            jitter = rng.uniform(-0.15, 0.15, size=len(seed_values))
            ax.scatter(i + jitter, seed_values, s=16, alpha=0.7, color=f"C{i % 10}", zorder=2)
            mean, std = _mean_std(seed_values)
            ax.errorbar(
                [i],
                [mean],
                yerr=[0.0 if math.isnan(std) else std],
                fmt="_",
                markersize=20,
                capsize=5,
                color="black",
                zorder=3,
            )
        ax.set_xticks(range(len(methods)), ticks, fontsize=TICK_FONT, linespacing=1.1)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(dataset, fontsize=9)
        ax.set_ylabel(info["shown"][key].metric.title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("one point per seed; bar: mean ± std", fontsize=8)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" metadata: the same figure gives the same bytes across matplotlib patches.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_atomic(path, buf.getvalue())
    return True


# -- writing ---------------------------------------------------------------------------------


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        # repr of a float is the shortest text that reads back as the same float
        writer.writerow([repr(row[k]) if k == "value" else row[k] for k in CSV_HEADER])
    return buf.getvalue()


def _figure_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def write_study_outputs(
    cells: Iterable[CellResult],
    out_dir: Path | str,
    *,
    metrics: Sequence[str] = ("aga", "wga", "accuracy"),
    evaluator: str | None = None,
    baseline: str = "original",
    alpha: float = 0.05,
    correction: str = "holm",
    families: Sequence[ComparisonFamily] = (),
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write results.csv, results.json, table.md, table.tex, stats.json, stats.md and one PNG per
    metric into ``out_dir``, each atomically.

    The PNGs written are recorded in ``figures.json`` (name and SHA-256); a figure recorded there
    by an earlier call that this one does not make (a metric no longer shown) is removed, when
    its bytes are still the ones written: a file the study did not write, or one changed since,
    is kept. ``echo`` is told of every removal and of every figure kept for being changed; the
    summary lists them under ``removed_figures`` and ``kept_figures``.

    results.csv/json hold every numeric metric of every evaluator of the ok cells; the table,
    the tests and the figures show ``metrics`` of ``evaluator`` (default: per metric, the first
    evaluator declaring it). Every method is tested against ``baseline``, and the pairs of each
    of ``families`` against each other, each family corrected over itself. Returns the paths
    written and counts.
    """
    cells = list(cells)
    _check_cells(cells)
    datasets, cells = _ordered_cells(cells)
    names = [f.name for f in families]
    if len(set(names)) != len(names):
        raise ValueError(f"two comparison families share a name: {names}")
    for family in families:
        unknown = [d for d in family.pairs if d not in datasets]
        if unknown:
            raise ValueError(f"family {family.name!r} names data sets without cells: {unknown}")
    out_dir = Path(out_dir)
    methods = _methods(cells, baseline)
    rows = _rows(cells, methods)
    if evaluator is not None and cells and not _shown_metrics(cells, metrics, evaluator):
        published = [c for c in cells if c.status == "ok" and c.results]
        if published:
            raise ValueError(f"no ok cell has evaluator {evaluator!r} with any of {list(metrics)}")

    by_dataset: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        mine = [c for c in cells if c.dataset == dataset]
        shown = _shown_metrics(mine, metrics, evaluator)
        values = _values(rows, dataset, shown)
        by_dataset[dataset] = {
            "seeds": [c.seed for c in mine],
            "shown": shown,
            "values": values,
            "problems": _problems(dataset, mine, methods, values),
        }
    if correction not in ("holm", "none"):
        raise ValueError(f'correction must be "holm" or "none", got {correction!r}')
    comparisons = _statistics(datasets, by_dataset, methods, baseline, alpha, correction)
    family_stats = []
    for family in families:
        tests = _family_statistics(family, datasets, by_dataset, methods, alpha, correction)
        family_stats.append(
            {
                "name": family.name,
                "description": family.description,
                "pairs": {d: [list(p) for p in family.pairs.get(d, ())] for d in datasets},
                "holm_floor": holm_floor(tests),
                "comparisons": tests,
            }
        )

    files: dict[str, str] = {}

    def write(name: str, text: str) -> None:
        write_atomic(out_dir / name, text)
        files[name] = str(out_dir / name)

    rules = _selection_rules(cells)
    write("results.csv", _csv_text(rows))
    write(
        "results.json",
        json.dumps(
            _results_json(cells, rows, datasets, by_dataset, methods, baseline, rules), indent=2
        )
        + "\n",
    )
    write("table.md", _table(datasets, by_dataset, methods, rules))
    # lvlmva.export reads these outputs back (lvlmva export), so it is imported here, not above
    from ..export import study_latex

    write(
        "table.tex",
        study_latex(
            datasets,
            by_dataset,
            methods,
            rules,
            comparisons,
            baseline=baseline,
            alpha=alpha,
            correction=correction,
            name=out_dir.resolve().name,
        ),
    )
    stats = {
        **_stats_description(alpha, correction),
        "holm_floor": holm_floor(comparisons),
        "baseline": baseline,
        "comparisons": comparisons,
        "families": family_stats,
    }
    write("stats.json", json.dumps(stats, indent=2) + "\n")
    write("stats.md", _stats_markdown(comparisons, baseline, alpha, correction, family_stats))
    shown_keys = list(dict.fromkeys(k for d in datasets for k in by_dataset[d]["shown"]))
    before = _read_manifest(out_dir / FIGURES_MANIFEST)
    drawn: dict[str, str] = {}
    for key in shown_keys:
        name = _figure_name(key)
        if _figure(key, datasets, by_dataset, methods, out_dir / name):
            files[name] = str(out_dir / name)
            drawn[name] = _sha256(out_dir / name)
    removed, kept = _remove_stale_figures(out_dir, before, drawn, echo)
    write_atomic(out_dir / FIGURES_MANIFEST, json.dumps({"figures": drawn}, indent=2) + "\n")
    files[FIGURES_MANIFEST] = str(out_dir / FIGURES_MANIFEST)
    return {
        "out_dir": str(out_dir),
        "files": files,
        "datasets": len(datasets),
        "cells": len(cells),
        "failed_cells": sum(c.status == "failed" for c in cells),
        "rows": len(rows),
        "methods": list(methods),
        "metrics": shown_keys,
        "removed_figures": removed,
        "kept_figures": kept,
        "comparisons": len(comparisons),
        "tested": sum(c["p"] is not None for c in comparisons),
        "significant": sum(c["significant"] for c in comparisons),
        "families": {
            f["name"]: {
                "comparisons": len(f["comparisons"]),
                "tested": sum(c["p"] is not None for c in f["comparisons"]),
                "significant": sum(c["significant"] for c in f["comparisons"]),
            }
            for f in family_stats
        },
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(path: Path) -> dict[str, str]:
    """Name -> SHA-256 of the figures an earlier call wrote (empty when there is no readable
    record: nothing is then removed)."""
    try:
        figures = json.loads(path.read_text(encoding="utf-8")).get("figures")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(figures, dict):
        return {}
    # a name is a plain file name of this folder, as _figure_name makes it: a record edited to
    # point elsewhere cannot make the study delete anything outside it
    return {n: h for n, h in figures.items() if isinstance(n, str) and isinstance(h, str) and n == Path(n).name and n.endswith(".png")}


def _remove_stale_figures(
    out_dir: Path, before: Mapping[str, str], drawn: Mapping[str, str], echo: Callable[[str], None] | None
) -> tuple[list[str], list[str]]:
    """Remove the figures recorded in ``before`` that were not drawn now, when their bytes are
    still those recorded; returns (removed, kept because changed or unreadable)."""
    removed, kept = [], []
    for name, digest in before.items():
        path = out_dir / name
        if name in drawn or not path.is_file() or path.is_symlink():
            continue
        try:
            same = _sha256(path) == digest
        except OSError:
            same = False
        if not same:
            kept.append(name)
            if echo is not None:
                echo(f"  kept {path}: a figure this study no longer makes, but changed since it wrote it")
            continue
        path.unlink(missing_ok=True)
        removed.append(name)
        if echo is not None:
            echo(f"  removed {path}: a figure of an earlier run of this study that it no longer makes")
    return removed, kept


def _results_json(
    cells: Sequence[CellResult],
    rows: Sequence[Mapping[str, Any]],
    datasets: Sequence[str],
    by_dataset: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, str],
    baseline: str,
    rules: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    per_dataset = {}
    for dataset in datasets:
        info = by_dataset[dataset]
        mine = [r for r in rows if r["dataset"] == dataset]
        per_dataset[dataset] = {
            "seeds": info["seeds"],
            "ok_seeds": sorted(
                {c.seed for c in cells if c.dataset == dataset and c.status == "ok"}
            ),
            "methods": [m for m in methods if any(r["method"] == m for r in mine)],
            "metrics": [
                {"evaluator": e, "split": split, "metric": m}
                for e, split, m in dict.fromkeys(
                    (r["evaluator"], r["split"], r["metric"]) for r in mine
                )
            ],
            "shown": {
                key: {"evaluator": s.evaluator, "split": s.split, **s.metric.to_dict()}
                for key, s in info["shown"].items()
            },
            "problems": info["problems"],
        }
    return {
        "baseline": baseline,
        "methods": dict(methods),
        # method -> the selection rule(s) that chose it: table.md's "Selected by" column
        "selected_by": dict(rules or {}),
        "datasets": per_dataset,
        "cells": [
            {
                "dataset": c.dataset,
                "seed": c.seed,
                "status": c.status,
                "reason": c.reason,
                "seconds": c.seconds,
                "run_dir": str(c.run_dir),  # a Path from a caller, too
                "failed": dict((c.results or {}).get("failed") or {}),
            }
            for c in cells
        ],
        "rows": list(rows),
    }
