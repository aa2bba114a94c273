"""Positive against absolute effect, paired by seed, from a finished effects study.

    lvlmva study examples/decoy_mnist_effects/*.toml --out studies/effects
    python examples/decoy_mnist_effects/compare_effects.py studies/effects

The study's own stats.md compares each method with the original inside one settings file; this
compares two files (one attributor's positive and absolute cells) seed by seed: verdict accuracy
(from each cell's results.json), the aligned model's accuracy and worst-group accuracy, with the
Wilcoxon signed-rank test. It prints the markdown tables docs/results.md shows.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy.stats import wilcoxon

ATTRIBUTORS = ("deeplift", "integrated_gradients", "gradient_shap", "grad_cam", "deeplift_cnn")
MEASURES = (("verdict accuracy", "va"), ("aligned accuracy", "accuracy"), ("aligned WGA", "wga"))


def cell(root: Path, name: str, seed: int) -> dict[str, float] | None:
    path = root / "cells" / name / f"seed{seed}" / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    aligned = results["evaluations"]["standard"]["models"]["aligned"]
    return {"va": (results.get("verdicts") or {}).get("verdict_accuracy"), "accuracy": aligned["accuracy"], "wga": aligned["wga"]}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else "–"


def main(root: Path, seeds: range = range(7)) -> None:
    print("| attributor | effect | seeds | " + " | ".join(m for m, _ in MEASURES) + " |")
    print("|---|---|---|" + "---|" * len(MEASURES))
    paired = []
    for attributor in ATTRIBUTORS:
        cells = {}
        for effect in ("positive", "absolute"):
            found = [cell(root, f"{attributor}_{effect}", s) for s in seeds]
            if not any(found):
                continue
            cells[effect] = found
            have = [c for c in found if c]
            values = [mean_std([c[k] for c in have if c[k] is not None]) for _, k in MEASURES]
            print(f"| {attributor} | {effect} | {len(have)} | " + " | ".join(values) + " |")
        if len(cells) == 2:
            pairs = [(a, b) for a, b in zip(cells["positive"], cells["absolute"], strict=True) if a and b]
            paired.append((attributor, pairs))
    print("\nAbsolute minus positive, paired by seed (Wilcoxon signed-rank, two-sided):\n")
    print("| attributor | " + " | ".join(m for m, _ in MEASURES) + " |")
    print("|---|" + "---|" * len(MEASURES))
    for attributor, pairs in paired:
        out = []
        for _, key in MEASURES:
            a = [p[0][key] for p in pairs]
            b = [p[1][key] for p in pairs]
            diff = [y - x for x, y in zip(a, b, strict=True)]
            p = wilcoxon(a, b).pvalue if any(diff) else float("nan")
            out.append(f"{statistics.mean(diff):+.3f}, {sum(d > 0 for d in diff)}/{len(diff)}, p = {p:.4g}")
        print(f"| {attributor} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
