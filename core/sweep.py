"""Lambda sweep of an aligner: one run directory per lambda, a table and a plot.

```
lvlmva sweep examples/decoy_mnist.toml --lams 1 10 100 1e3 1e4 1e5 1e6 --out runs/sweep
```

(``python -m lvlmva.sweep`` is the same command; there SETTINGS defaults to
examples/decoy_mnist.toml.)

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
from .registry import PluginError
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


DEFAULT_LAMS = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
DEFAULT_SETTINGS = Path("examples/decoy_mnist.toml")


def add_arguments(parser: argparse.ArgumentParser, *, settings_required: bool = True) -> None:
    """The sweep's arguments, shared by ``lvlmva sweep`` and ``python -m lvlmva.sweep`` (where
    SETTINGS may be left out, as ``nox -s sweep`` does)."""
    if settings_required:
        parser.add_argument("settings", type=Path, metavar="SETTINGS", help="a TOML settings file with an aligner and evaluators")
    else:
        parser.add_argument(
            "settings", type=Path, nargs="?", default=DEFAULT_SETTINGS, metavar="SETTINGS",
            help=f"a TOML settings file with an aligner and evaluators (default: {DEFAULT_SETTINGS})",
        )
    parser.add_argument(
        "--lams", type=float, nargs="+", default=list(DEFAULT_LAMS), metavar="LAMBDA",
        help="the values to run, one run directory each (default: " + " ".join(f"{v:g}" for v in DEFAULT_LAMS) + ")",
    )
    parser.add_argument(
        "--key", default="aligner.lam", metavar="SECTION.KEY",
        help="the setting the values go to (default: aligner.lam; e.g. aligners.rbr.lam for a named instance)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/sweep"), metavar="DIR",
        help="the sweep's folder: DIR/lam_VALUE per value, sweep.md, sweep.json and sweep.png (default: runs/sweep)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting in every run (repeatable); VALUE is a TOML literal or a bare string",
    )


def _check_lams(lams: list[float]) -> None:
    bad = [v for v in lams if not math.isfinite(v)]
    if bad:
        raise SettingsError(f"--lams: every value must be a finite number, got {', '.join(map(str, bad))}")
    repeated = sorted({v for v in lams if lams.count(v) > 1})
    if repeated:
        raise SettingsError(f"--lams: each value once (one run directory each), repeated: {', '.join(f'{v:g}' for v in repeated)}")


def run(args: argparse.Namespace, prog: str = "lvlmva sweep") -> int:
    """Run a sweep from parsed :func:`add_arguments`; the exit code (0 every value ran, 1 a
    value failed or the folder could not be written, 2 bad input before any run, 130
    interrupted)."""
    try:
        _check_lams(args.lams)
        rows = run_sweep(args.settings, args.lams, args.out, args.overrides, args.key)
    except (SettingsError, PluginError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (PublishError, ArtifactError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished stages are kept, run again to resume: {args.out}", file=sys.stderr)
        return 130
    print((args.out / "sweep.md").read_text())
    print(f"plot: {args.out / 'sweep.png'}")
    return 0 if rows and not any("failed" in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlmva.sweep", description=__doc__.split("\n\n")[0])
    add_arguments(parser, settings_required=False)
    return run(parser.parse_args(argv), prog="sweep")


if __name__ == "__main__":
    sys.exit(main())
