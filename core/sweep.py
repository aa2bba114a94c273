"""Lambda sweep of an aligner: one run directory per lambda, a table and a plot.

```
python -m lvlmva.sweep examples/decoy_mnist.toml --lams 1 10 100 1e3 1e4 1e5 1e6 --out runs/sweep
```

Stages before alignment do not depend on lambda, so they are computed once (in the first run
directory) and copied into the others, where their fingerprints match and they are reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .pipeline import STAGES, Pipeline, StageFailed
from .settings import SettingsError, load_settings

SHARED_STAGES = ("train", "select", "attribute", "segment", "render", "critic", "judge", "masks")
METRICS = ("accuracy", "aga", "wga", "alignment_score")


def _copy_finished(src: Path, dst: Path, pipeline: Pipeline) -> None:
    for spec in STAGES:
        if spec.name not in SHARED_STAGES or not (src / spec.name).exists():
            continue
        marker = json.loads((src / spec.name / "fingerprint.json").read_text())
        if marker["fingerprint"] == pipeline.fingerprints[spec.name] and not (dst / spec.name).exists():
            shutil.copytree(src / spec.name, dst / spec.name)


def run_sweep(settings_path: Path, lams: list[float], out: Path, overrides: list[str], key: str = "aligner.lam") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    pipelines = [
        (lam, Pipeline(load_settings(settings_path, [*overrides, f"{key}={lam!r}", "report.enabled=false"]), out / f"lam_{lam!r}", echo=lambda msg: print(msg, file=sys.stderr)))
        for lam in lams
    ]  # every setting is checked before the first run starts
    if "evaluator" not in pipelines[0][1].settings.plugins:
        raise SettingsError("a sweep compares evaluations: configure [evaluator]")
    for lam, pipeline in pipelines:
        run_dir = pipeline.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if first is not None:
            _copy_finished(first, run_dir, pipeline)
        print(f"lambda = {lam:g}: {run_dir}", file=sys.stderr)
        row: dict[str, Any] = {"lam": lam}
        try:
            results = pipeline.run()
        except StageFailed as exc:  # recorded in the table; the other lambdas still run
            print(f"lambda = {lam:g}: {exc}", file=sys.stderr)
            row["failed"] = f"{exc.stage}: {exc.cause}"
            rows.append(row)
            continue
        first = first or run_dir
        for model, metrics in results["models"].items():
            for name in METRICS:
                if isinstance(metrics.get(name), float):
                    row[f"{model}/{name}"] = metrics[name]
        rows.append(row)
    write_sweep(rows, out)
    return rows


def write_sweep(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted({k for r in rows for k in r if k not in ("lam", "failed")})
    lines = ["| lambda | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c in r else "" for c in columns]
        if "failed" in r:
            cells = [f"failed ({r['failed']})"] + [""] * (len(columns) - 1)
        lines.append(f"| {r['lam']:g} | " + " | ".join(cells) + " |")
    write_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    write_atomic(out / "sweep.json", json.dumps(rows, indent=2))

    fig, ax = plt.subplots(figsize=(6, 4))
    lams = [r["lam"] for r in rows]
    for c in columns:
        if c.endswith("/accuracy"):
            ax.plot(lams, [r.get(c, float("nan")) for r in rows], marker="o", label=c.split("/")[0])
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel("accuracy on the decoy test set")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every value failed
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlmva.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", type=Path, nargs="?", default=Path("examples/decoy_mnist.toml"))
    parser.add_argument("--lams", type=float, nargs="+", default=[1, 10, 100, 1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--key", default="aligner.lam", help="the setting to sweep")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        rows = run_sweep(args.settings, args.lams, args.out, args.overrides, args.key)
    except SettingsError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "sweep.md").read_text())
    print(f"plot: {args.out / 'sweep.png'}")
    return 0 if rows and not any("failed" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
