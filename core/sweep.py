"""Lambda sweep of an aligner: one run directory per lambda, a table and a plot.

```
python -m lvlmva.sweep examples/decoy_mnist.toml --lams 1 10 100 1e3 1e4 1e5 1e6 --out runs/sweep
```

Stages before alignment (and the baselines) do not depend on lambda, so they are computed once
(in the first run directory) and copied into the others, where their fingerprints match and
they are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .pipeline import ArtifactError, Pipeline, PublishError, RunDirectory, StageFailed
from .results import iter_model_values, metric_columns
from .settings import SettingsError, load_settings

SHARED_STAGES = ("train", "select", "attribute", "segment", "render", "critic", "judge", "overrides", "masks")


def _shared(pipeline: Pipeline) -> list[str]:
    """The stages lambda cannot change: those before alignment, every branch's among them
    (``critic.j5.gpt4o``), and the baselines."""
    return [s.name for s in pipeline.stages if s.name.split(".")[0] in (*SHARED_STAGES, "mitigate")]


def _row_values(results: dict[str, Any]) -> dict[str, float]:
    """``model/metric`` -> value for every numeric summary metric (``model/evaluator.metric``
    when several evaluators report the same key)."""
    keys = [c.metric.key for c in metric_columns(results) if c.metric.summary]
    out = {}
    for model, column, value in iter_model_values(results):
        if not column.metric.summary or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            continue
        name = column.metric.key if keys.count(column.metric.key) == 1 else f"{column.evaluator}.{column.metric.key}"
        out[f"{model}/{name}"] = float(value)
    return out


def run_sweep(settings_path: Path, lams: list[float], out: Path, overrides: list[str], key: str = "aligner.lam") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    first: Path | None = None
    pipelines = [
        (lam, Pipeline(load_settings(settings_path, [*overrides, f"{key}={lam!r}", "report.enabled=false"]), out / f"lam_{lam!r}", echo=lambda msg: print(msg, file=sys.stderr)))
        for lam in lams
    ]  # every setting is checked before the first run starts
    if not pipelines[0][1].settings.instances("evaluator"):
        raise SettingsError("a sweep compares evaluations: configure [evaluators.<name>]")
    RunDirectory.check(out)  # the sweep's folder and every run directory in it are ours
    for _lam, pipeline in pipelines:
        RunDirectory.check(pipeline.run_dir)
    RunDirectory.claim(out)
    for lam, pipeline in pipelines:
        run_dir = pipeline.run_dir
        if first is not None:
            pipeline.adopt(first, _shared(pipeline))
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
        row.update(_row_values(results))
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
    except (PublishError, ArtifactError) as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 1
    print((args.out / "sweep.md").read_text())
    print(f"plot: {args.out / 'sweep.png'}")
    return 0 if rows and not any("failed" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
