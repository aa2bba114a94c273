"""How good must the critic be: test WGA against verdict accuracy per aligner, from a finished study.

    lvlmva study examples/critic_quality/decoy_mnist.toml examples/critic_quality/synthetic_skin.toml \\
        --out studies/critic_quality
    python examples/critic_quality/summarize.py studies/critic_quality [--figure critic_quality.png]

Each cell (data set x seed) of the study holds one original model, DFR, and every aligner aligned
once per critic (the oracle and the scripted critic at 14 settings of verdict accuracy and
false-alarm rate) and once with the true masks. This reads each cell's results.json and prints
markdown: per data set and aligner, the test WGA (mean ± std over the seeds) at each critic
setting (the nominal verdict accuracy and false-alarm rate, on the critics' truth: a cluster a
quarter on the spurious feature) with those the evaluator scored (its truth: any pixel), how many
seeds beat the original, and the smallest verdict accuracy at which the aligner beats the
original on every seed. The figure has one panel per data set and aligner: WGA against verdict
accuracy, a line per false-alarm rate, the original, DFR and the aligner's true-mask reference as
horizontal lines.

The verdicts are simulated (the scripted critic reads the true masks and errs at set rates). The
accuracies are those the seed's Table 1 measured for Critic & Judge pairs on knee samples; the
labels name those pairs only to say which level each point stands for.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

#: verdict accuracies of the seed's Table 1 and the Critic & Judge pair that reached each
TABLE1 = {1.0: "GPT-5", 0.88: "Llama-4-Scout", 0.87: "GPT-4o", 0.46: "Qwen3", 0.42: "GPT-4o-mini"}
FALSE_ALARMS = (0.0, 0.05, 0.15)
#: the order of the aligners in tables and panels (others after these, by name)
ORDER = ("rrr", "rbr", "rrr_gradcam", "hint", "cdep", "ce")


def aligner_order(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def critic_point(spec: dict[str, Any]) -> tuple[float, float]:
    """(nominal verdict accuracy, nominal false-alarm rate) of one critic's settings."""
    if spec["plugin"] == "oracle":
        return 1.0, 0.0
    if spec.get("miss_rate") is None and spec.get("false_alarm_rate") is None:
        raise ValueError(f"critic {spec}: set miss_rate and false_alarm_rate (one error_rate has no polarity)")
    return round(1.0 - (spec.get("miss_rate") or 0.0), 2), float(spec.get("false_alarm_rate") or 0.0)


def read_cells(root: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Every finished cell's results.json, by data set and seed."""
    cells: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted((root / "cells").glob("*/seed*/results.json")):
        results = json.loads(path.read_text(encoding="utf-8"))
        if results.get("failed"):
            continue  # a failed cell's numbers are partial: left out, as the study's table does
        cells[path.parent.parent.name][int(path.parent.name.removeprefix("seed"))] = results
    return cells


def rows(cells: dict[int, dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Per (aligner, critic): WGA per seed and the reached verdict rates; and the lines (original,
    dfr, true_mask.<aligner>) per seed."""
    per: dict[tuple[str, str], dict[str, Any]] = {}
    lines: dict[str, list[float]] = defaultdict(list)
    for seed, results in sorted(cells.items()):
        models = results["evaluations"]["standard"]["models"]
        critics = results["settings"]["critics"]
        for key, values in models.items():
            if not key.startswith("aligned."):
                lines[key].append(values["wga"])
                continue
            _, aligner, critic = key.split(".")
            accuracy, alarms = critic_point(critics[critic])
            row = per.setdefault((aligner, critic), {"aligner": aligner, "critic": critic, "accuracy": accuracy, "false_alarm": alarms, "wga": {}, "va": [], "fa": []})
            row["wga"][seed] = values["wga"]
            confusion = results["branches"][critic]["verdicts"]["confusion"]
            row["va"].append(results["branches"][critic]["verdicts"]["verdict_accuracy"])
            row["fa"].append(confusion["fp"] / max(1, confusion["fp"] + confusion["tn"]))
    originals = {seed: r["evaluations"]["standard"]["models"]["original"]["wga"] for seed, r in cells.items()}
    for row in per.values():
        row["beats"] = sum(row["wga"][s] > originals[s] for s in row["wga"])
        row["seeds"] = len(row["wga"])
    rank = {name: i for i, name in enumerate(aligner_order({r["aligner"] for r in per.values()}))}
    return sorted(per.values(), key=lambda r: (rank[r["aligner"]], -r["accuracy"], r["false_alarm"])), dict(lines)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def smallest_beating(table: list[dict[str, Any]], aligner: str, alarms: float) -> str:
    """The smallest nominal verdict accuracy at which ``aligner`` beats the original on every
    seed; the higher accuracies at which it does not are named after it."""
    points = [r for r in table if r["aligner"] == aligner and r["false_alarm"] == alarms]
    if not points:
        return "–"
    beating = sorted(r["accuracy"] for r in points if r["beats"] == r["seeds"])
    if not beating:
        return "none"
    lowest = beating[0]
    text = f"{lowest:.2f} ({TABLE1.get(lowest, '?')} level)"
    missed = sorted((r["accuracy"] for r in points if r["accuracy"] > lowest and r["beats"] < r["seeds"]), reverse=True)
    if missed:
        text += "; not at " + ", ".join(f"{a:.2f}" for a in missed)
    return text


def print_tables(name: str, cells: dict[int, dict[str, Any]], table: list[dict[str, Any]], lines: dict[str, list[float]]) -> None:
    seeds = sorted(cells)
    print(f"\n### {name}: test WGA, mean ± std over seeds {', '.join(map(str, seeds))}\n")
    print(f"original {mean_std(lines['original'])}" + (f"; DFR (group labels) {mean_std(lines['dfr'])}" if "dfr" in lines else ""))
    aligners = aligner_order({r["aligner"] for r in table})
    print("\n| aligner | verdict accuracy (level) | false alarms | evaluator's any-pixel truth: verdict acc. / false alarms | WGA | beats original | true-mask reference |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        reference = lines.get(f"true_mask.{row['aligner']}")
        label = "oracle" if row["critic"] == "oracle" else TABLE1.get(row["accuracy"], "")
        print(
            f"| {row['aligner']} | {row['accuracy']:.2f} ({label}) | {row['false_alarm']:.2f} | "
            f"{statistics.mean(row['va']):.3f} / {statistics.mean(row['fa']):.3f} | {mean_std(list(row['wga'].values()))} | "
            f"{row['beats']}/{row['seeds']} | {mean_std(reference) if reference else '–'} |"
        )
    print("\nSmallest verdict accuracy at which the aligner beats the original on every seed:\n")
    print("| aligner | " + " | ".join(f"false alarms {fa:.2f}" for fa in FALSE_ALARMS) + " |")
    print("|---|" + "---|" * len(FALSE_ALARMS))
    for aligner in aligners:
        print(f"| {aligner} | " + " | ".join(smallest_beating(table, aligner, fa) for fa in FALSE_ALARMS) + " |")


def draw(studies: dict[str, tuple[list[dict[str, Any]], dict[str, list[float]]]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(len({r["aligner"] for r in t}) for t, _ in studies.values())
    fig = Figure(figsize=(3.1 * columns, 3.0 * len(studies) + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(studies), columns, squeeze=False, sharey="row")
    colours = {0.0: "tab:blue", 0.05: "tab:orange", 0.15: "tab:red"}
    for r, (name, (table, lines)) in enumerate(studies.items()):
        aligners = aligner_order({row["aligner"] for row in table})
        short = name.removeprefix("critic_quality_")
        for c in range(columns):
            ax = grid[r][c]
            if c >= len(aligners):
                ax.set_axis_off()
                continue
            aligner = aligners[c]
            for alarms in FALSE_ALARMS:
                points = sorted((row for row in table if row["aligner"] == aligner and row["false_alarm"] == alarms), key=lambda row: row["accuracy"])
                if not points:
                    continue
                xs = [row["accuracy"] + 0.006 * (FALSE_ALARMS.index(alarms) - 1) for row in points]  # side by side
                ys = [statistics.mean(row["wga"].values()) for row in points]
                errs = [statistics.stdev(row["wga"].values()) if len(row["wga"]) > 1 else 0.0 for row in points]
                ax.errorbar(xs, ys, yerr=errs, marker="o", ms=3, capsize=2, color=colours[alarms], label=f"false alarms {alarms:.2f}")
            for key, style, label in (("original", ("black", "--"), "original"), ("dfr", ("tab:green", ":"), "DFR (group labels)"), (f"true_mask.{aligner}", ("tab:purple", "-."), "true-mask reference")):
                if key in lines:
                    ax.axhline(statistics.mean(lines[key]), color=style[0], linestyle=style[1], linewidth=1, label=label)
            ax.set_title(f"{short}: {aligner}", fontsize=9)
            ax.set_xticks(sorted(TABLE1), minor=True)
            ax.set_xticks([0.44, 0.875, 1.0], ["0.42 / 0.46\n4o-mini / Qwen3", "0.87 / 0.88\n4o / Llama-4", "1.0\nGPT-5"], fontsize=6)
            ax.set_xlim(0.38, 1.04)
            ax.tick_params(axis="y", labelsize=7)
            if c == 0:
                ax.set_ylabel("test WGA (mean ± std)", fontsize=8)
            ax.set_xlabel("verdict accuracy (simulated)", fontsize=7)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=6, fontsize=8)
    fig.suptitle("Scripted critic at the seed's Table 1 verdict accuracies (simulated verdicts, not those models)", fontsize=10)
    fig.savefig(out, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study folder (lvlmva study --out)")
    parser.add_argument("--figure", type=Path, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    found = read_cells(args.study)
    if not found:
        parser.error(f"{args.study}: no finished cell (cells/<data set>/seed<N>/results.json)")
    studies = {}
    for name, cells in sorted(found.items()):
        table, lines = rows(cells)
        print_tables(name, cells, table, lines)
        studies[name] = (table, lines)
    if args.figure:
        draw(studies, args.figure)
        print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
