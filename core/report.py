"""The run report: ``report.md`` with tables of the results and PNG figures beside it.

Sections: models x metrics (before / after alignment / true-mask bound, and any baseline),
verdict quality, alignment failures, LVLM usage and cost, timings, a grid of alignment samples
with their verdicts, attributions on test images per model, training curves, and a few critique
texts. Every part that a run lacks (no critic, no test attributions, no metrics log) is said to
be missing in the report rather than left out silently.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display)
and every file is written to a temporary name and then renamed, so that a reader never sees a
half-written report.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .atomic import write_atomic
from .records import Critique, RenderedSample, Verdicts
from .settings import ReportOptions

__all__ = ["write_report", "FIGURES_DIR", "MODEL_METRICS"]

#: Folder in the run directory that holds the report's figures.
FIGURES_DIR = "figures"

#: (results key, column title) of the model table, in order.
MODEL_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("aga", "AGA"),
    ("wga", "WGA"),
    ("proportion_weighted_accuracy", "Prop.-weighted acc."),
    ("alignment_score", "Alignment score"),
)

_MODEL_ORDER = ("original", "aligned", "true-mask bound")
_CRITIQUES_SHOWN = 3
_CRITIQUE_CHARS = 1200
_FAILURES_SHOWN = 10


def _save_figure(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software" metadata: the same figure gives the same bytes across matplotlib patches.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_atomic(path, buf.getvalue())


# -- formatting --------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out


def _ordered_models(models: Mapping[str, Any]) -> list[str]:
    first = [m for m in _MODEL_ORDER if m in models]
    return first + [m for m in models if m not in first]


# -- sections ----------------------------------------------------------------------------------


def _models_section(results: Mapping[str, Any]) -> list[str]:
    models = results.get("models") or {}
    out = ["## Models", ""]
    if not models:
        return out + ["No model was evaluated in this run.", ""]
    names = _ordered_models(models)
    out += _table(
        ["Model", *(title for _, title in MODEL_METRICS)],
        [[name, *(models[name].get(key) for key, _ in MODEL_METRICS)] for name in names],
    )
    out.append("")
    out.append(
        "AGA = mean of the per-group accuracies; WGA = the worst group's; the alignment score is "
        "the share of absolute attribution outside the true spurious feature."
    )
    if results.get("input_scale"):
        out.append(f"Inputs on the {results['input_scale']} scale.")
    groups: list[str] = []
    for name in names:
        for g in models[name].get("group_accuracy") or {}:
            if g not in groups:
                groups.append(g)
    if groups:
        out += ["", "Accuracy per group:", ""]
        out += _table(
            ["Model", *groups],
            [[n, *((models[n].get("group_accuracy") or {}).get(g) for g in groups)] for n in names],
        )
    return out + [""]


def _verdicts_section(results: Mapping[str, Any], verdicts: Sequence[Verdicts]) -> list[str]:
    out = ["## Verdicts", ""]
    metrics = results.get("verdicts")
    if not metrics and not verdicts:
        return out + [
            "No verdicts: this run had no critic and judge (masks came from elsewhere, e.g. the "
            "true masks).",
            "",
        ]
    if verdicts:
        ok = sum(v.ok for v in verdicts)
        out.append(f"{ok} of {len(verdicts)} samples got valid verdicts.")
        out.append("")
    if metrics:
        rows = [[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list))]
        out += _table(["Verdict metric", "Value"], rows)
        confusion = metrics.get("confusion")
        if isinstance(confusion, Mapping):
            out += [
                "",
                "Confusion matrix (positive = spurious; a 'no' verdict predicts spurious):",
                "",
            ]
            out += _table(
                ["", "judged no", "judged yes"],
                [
                    ["truly spurious", confusion.get("tp"), confusion.get("fn")],
                    ["truly relevant", confusion.get("fp"), confusion.get("tn")],
                ],
            )
    else:
        out.append("No verdict metrics: the data set has no true masks to score verdicts against.")
    return out + [""]


def _alignment_section(results: Mapping[str, Any]) -> list[str]:
    out = ["## Alignment", ""]
    info = results.get("alignment")
    if not info:
        return out + ["No alignment information in the results.", ""]
    failures = info.get("failures") or []
    out.append(
        f"Alignment samples: {_fmt(info.get('samples'))}; failed (left out of alignment): "
        f"{_fmt(info.get('failed', len(failures)))}."
    )
    if failures:
        out += [""]
        out += _table(
            ["Sample", "Stage", "Reason"],
            [
                [f.get("sample_id"), f.get("stage"), _truncate(str(f.get("reason")), 200)]
                for f in failures[:_FAILURES_SHOWN]
            ],
        )
        if len(failures) > _FAILURES_SHOWN:
            out.append(f"... and {len(failures) - _FAILURES_SHOWN} more.")
    return out + [""]


def _usage_section(results: Mapping[str, Any]) -> list[str]:
    out = ["## LVLM usage", ""]
    usage = results.get("usage")
    if not usage:
        return out + ["No LVLM usage recorded.", ""]
    cost = usage.get("cost_usd")
    rows = [
        ["requests", usage.get("requests")],
        ["cache hits", usage.get("cache_hits")],
        ["prompt tokens", usage.get("prompt_tokens")],
        ["completion tokens", usage.get("completion_tokens")],
        ["cost (USD)", None if cost is None else f"{float(cost):.4f}"],
    ]
    return out + _table(["Usage", "Value"], rows) + [""]


def _timings_section(results: Mapping[str, Any]) -> list[str]:
    out = ["## Timings", ""]
    timings = results.get("timings")
    if not timings:
        return out + ["No timings recorded.", ""]
    rows = [[stage, f"{float(sec):.1f}"] for stage, sec in timings.items()]
    rows.append(["total", f"{sum(float(s) for s in timings.values()):.1f}"])
    return out + _table(["Stage", "Seconds"], rows) + [""]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _verdict_line(v: Verdicts | None) -> str:
    if v is None:
        return "no verdicts"
    if v.relevant is None:
        return "verdicts failed"
    no = [c for c, r in zip(v.colors, v.relevant, strict=True) if not r]
    yes = [c for c, r in zip(v.colors, v.relevant, strict=True) if r]
    return f"no: {', '.join(no) or '–'}; yes: {', '.join(yes) or '–'}"


def _critiques_section(critiques: Sequence[Critique], verdicts: Sequence[Verdicts]) -> list[str]:
    out = ["## Critiques", ""]
    if not critiques:
        return out + ["No critiques: this run had no critic.", ""]
    by_id = {v.sample_id: v for v in verdicts}
    shown = critiques[:_CRITIQUES_SHOWN]
    out.append(
        f"The first {len(shown)} of {len(critiques)} critiques (texts cut at "
        f"{_CRITIQUE_CHARS} characters)."
    )
    for c in shown:
        v = by_id.get(c.sample_id)
        model = f" ({c.model})" if c.model else ""
        out += ["", f"### Sample {c.sample_id}{model}", ""]
        if c.label:
            out.append(f"Class: {c.label}. Colours: {', '.join(c.colors)}.")
            out.append("")
        body = c.text.strip() if c.text is not None else f"critic failed: {c.failure}"
        out += ["```text", _truncate(body, _CRITIQUE_CHARS).replace("```", "'''"), "```", ""]
        verdict = _verdict_line(v)
        if v is not None and v.failure:
            verdict += f" ({_truncate(v.failure, 300)})"
        out.append(f"Verdicts: {verdict}.")
    return out + [""]


# -- figures -----------------------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _samples_figure(
    rendered: Sequence[RenderedSample], verdicts: Sequence[Verdicts], limit: int, path: Path
) -> int:
    shown = list(rendered[:limit])
    if not shown:
        return 0
    by_id = {v.sample_id: v for v in verdicts}
    per_row = 1 if len(shown) <= 3 else 2
    rows = math.ceil(len(shown) / per_row)
    fig = Figure(figsize=(3 * 2.1 * per_row, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, 3 * per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for k, sample in enumerate(shown):
        r, c0 = divmod(k, per_row)
        row_axes = axes[r, 3 * c0 : 3 * c0 + 3]
        for ax, png, title in zip(
            row_axes, sample.images, ("original", "clusters", "overlay"), strict=True
        ):
            ax.imshow(_decode_png(png), interpolation="nearest")
            ax.set_title(title, fontsize=7)
        caption = "\n".join(
            textwrap.wrap(
                f"sample {sample.sample_id} — {_verdict_line(by_id.get(sample.sample_id))}", 60
            )
        )
        row_axes[1].text(
            0.5, -0.04, caption, transform=row_axes[1].transAxes, ha="center", va="top", fontsize=7
        )
    _save_figure(fig, path)
    return len(shown)


def _attributions_figure(
    test_images: torch.Tensor,
    test_labels: torch.Tensor | None,
    attributions: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    limit: int,
    path: Path,
) -> int:
    from .rendering import to_display

    n = min(limit, int(test_images.shape[0]))
    models = _ordered_models(attributions)
    if n == 0 or not models:
        return 0
    for name in models:
        a = attributions[name]
        if a.dim() != 4 or a.shape[0] < n or tuple(a.shape[2:]) != tuple(test_images.shape[2:]):
            raise ValueError(
                f"attributions of {name!r} have shape {tuple(a.shape)}; need [B,C,H,W] matching "
                f"the test images {tuple(test_images.shape)}"
            )
    shown = to_display(test_images[:n]).numpy()
    fig = Figure(figsize=(1.6 * n + 1.2, 1.7 * (len(models) + 1)), layout="constrained")
    axes = fig.subplots(len(models) + 1, n, squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(shown[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if test_labels is not None:
            k = int(test_labels[i])
            ax.set_title(class_names[k] if 0 <= k < len(class_names) else str(k), fontsize=7)
    axes[0, 0].set_ylabel("input", fontsize=8)
    image = None
    for r, name in enumerate(models, start=1):
        maps = attributions[name][:n].detach().float().cpu().sum(dim=1).numpy()
        for i in range(n):
            ax = axes[r, i]
            # Symmetric limits so that white is exactly zero and red/blue are comparable signs.
            lim = float(np.abs(maps[i]).max()) or 1.0
            image = ax.imshow(maps[i], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=axes[1:, :].ravel().tolist(), shrink=0.8, ticks=[])
        bar.set_label("− attribution + (per image)", fontsize=7)
    _save_figure(fig, path)
    return n


def _read_curves(run_dir: Path) -> tuple[dict[str, list[dict[str, float]]], list[str]]:
    """Per curve, the epoch records of ``metrics.jsonl``; plus notes on unreadable lines. A
    curve is the pipeline stage that logged it (``run_stage``: "train", "align", "bound") where
    known, else the record's own ``stage`` tag: the aligner logs as "align" in both the align
    and the bound stage, which are different curves."""
    path = run_dir / "metrics.jsonl"
    curves: dict[str, list[dict[str, float]]] = {}
    notes: list[str] = []
    if not path.exists():
        return curves, notes
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            notes.append(f"metrics.jsonl line {number} is not JSON ({exc.msg}); skipped.")
            continue
        if not isinstance(record, dict) or "epoch" not in record or "stage" not in record:
            continue  # other metric lines (evaluations, timings) are not curves
        curves.setdefault(str(record.get("run_stage") or record["stage"]), []).append(record)
    return curves, notes


def _curves_figure(curves: Mapping[str, list[dict[str, Any]]], path: Path) -> bool:
    if not curves:
        return False
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for tag, records in curves.items():
        records = sorted(records, key=lambda r: r["epoch"])
        epochs = [r["epoch"] for r in records]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "train_accuracy")):
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                ys = [math.nan if v is None else float(v) for v in values]
                ax.plot(epochs, ys, marker="o", markersize=3, label=tag)
    ax_loss.set_title("training loss", fontsize=9)
    ax_acc.set_title("training accuracy", fontsize=9)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_figure(fig, path)
    return True


# -- entry point -------------------------------------------------------------------------------


def write_report(
    run_dir: Path,
    results: dict,
    *,
    options: ReportOptions,
    rendered: Sequence[RenderedSample],
    verdicts: Sequence[Verdicts],
    critiques: Sequence[Critique],
    test_images: torch.Tensor | None,
    test_labels: torch.Tensor | None,
    attributions: dict[str, torch.Tensor],
    class_names: Sequence[str],
    out_dir: Path | None = None,
    title: str | None = None,
) -> Path:
    """Write ``report.md`` and its figures (``figures/*.png``) into ``out_dir`` (default
    ``run_dir``); return the report's path.

    - ``results``: the layout of ``results.json`` (``models``, ``verdicts``, ``alignment``,
      ``usage``, ``timings``, ...); missing parts are reported as missing.
    - ``rendered`` / ``verdicts`` / ``critiques``: the alignment samples' images, verdicts and
      critique texts (empty when the run had no critic).
    - ``test_images`` ``[B, C, H, W]`` with ``test_labels`` ``[B]`` and ``attributions`` mapping a
      model name (``"original"``, ``"aligned"``, ``"true-mask bound"``) to attributions of those
      images ``[B, C, H, W]``.
    - Training curves come from ``run_dir/metrics.jsonl`` (one line per epoch and stage tag).

    With ``options.enabled`` False nothing is written and the path is returned all the same.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    report_path = out_dir / "report.md"
    if not options.enabled:
        return report_path
    figures = out_dir / FIGURES_DIR
    name = title or (results.get("settings") or {}).get("run", {}).get("name") or run_dir.name
    lines = [f"# lvlmva report: {name}", ""]
    lines += _models_section(results)
    lines += _verdicts_section(results, verdicts)
    lines += _alignment_section(results)
    lines += _usage_section(results)
    lines += _timings_section(results)

    lines += ["## Alignment samples", ""]
    if options.samples == 0:
        lines += ["Not shown (report.samples = 0).", ""]
    elif not rendered:
        lines += ["No rendered alignment samples in this run.", ""]
    else:
        n = _samples_figure(rendered, verdicts, options.samples, figures / "alignment_samples.png")
        lines += [
            f"The first {n} of {len(rendered)} alignment samples: original, cluster map and "
            "overlay, with the colours judged spurious (no) and relevant (yes).",
            "",
            f"![alignment samples]({FIGURES_DIR}/alignment_samples.png)",
            "",
        ]

    lines += ["## Attributions on test images", ""]
    if options.test_images == 0:
        lines += ["Not shown (report.test_images = 0).", ""]
    elif test_images is None or not attributions:
        lines += ["No test attributions were computed in this run.", ""]
    else:
        n = _attributions_figure(
            test_images,
            test_labels,
            attributions,
            class_names,
            options.test_images,
            figures / "attributions.png",
        )
        lines += [
            f"{n} test images (top row) and each model's attribution for the true class "
            "(red positive, blue negative, limits symmetric per image).",
            "",
            f"![attributions]({FIGURES_DIR}/attributions.png)",
            "",
        ]

    lines += ["## Training curves", ""]
    curves, notes = _read_curves(run_dir)
    if _curves_figure(curves, figures / "training_curves.png"):
        tags = ", ".join(curves)
        lines += [
            f"Loss and training accuracy per epoch ({tags}).",
            "",
            f"![training curves]({FIGURES_DIR}/training_curves.png)",
            "",
        ]
    else:
        lines += ["No per-epoch training records in metrics.jsonl.", ""]
    lines += [*notes, ""] if notes else []

    lines += _critiques_section(critiques, verdicts)
    text = "\n".join(lines).rstrip() + "\n"
    write_atomic(report_path, text.encode("utf-8"))
    return report_path
