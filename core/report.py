"""The run report: ``report.md`` with tables of the results and PNG figures beside it.

Sections: one table of models x metrics per evaluator (drawn from the metrics each evaluator
declares), verdict quality with the critic that produced it, alignment failures, LVLM usage and
cost, timings, a grid of alignment samples with their verdicts, attributions on test images per
model, training curves, and a few critique texts. Every part that a run lacks (no critic, no test attributions, no metrics log) is said to
be missing in the report rather than left out silently.

Evaluators declare their own figures (:class:`lvlmva.protocols.Figure`: a PNG in the evaluate
stage's folder and a caption); the report copies each to ``figures/evaluate.<instance>/<file>``
and shows it with its caption under that evaluator's tables, or names it as missing.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display)
and every file is written to a temporary name and then renamed, so that a reader never sees a
half-written report.
"""

from __future__ import annotations

import copy
import io
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .atomic import write_atomic
from .protocols import Figure as DeclaredFigure
from .records import Critique, RenderedSample, Verdicts
from .results import (
    ORACLE_NOTE,
    MetricColumn,
    metric_columns,
    model_labels,
    selection_lines,
    verdict_results,
)
from .secrets import redact
from .settings import ReportOptions

if TYPE_CHECKING:
    from .pipeline.stage import StageCall
    from .protocols import RunContext

__all__ = [
    "write_report",
    "report_stage",
    "read_training_curves",
    "TrainingCurve",
    "FIGURES_DIR",
    "EvaluatorTable",
    "evaluator_tables",
    "models_section",
    "save_figure",
    "evaluator_figures",
    "EvaluatorFigure",
    "collect_evaluator_figures",
]

#: Folder in the run directory that holds the report's figures.
FIGURES_DIR = "figures"
_CRITIQUES_SHOWN = 3
_CRITIQUE_CHARS = 1200
_FAILURES_SHOWN = 10


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib ``Figure`` (made with the object API, no pyplot) as a PNG at ``path``,
    atomically and with the same bytes for the same figure (no "Software" metadata, which
    would differ across matplotlib patches): for an evaluator's declared figures too."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    write_atomic(Path(path), buf.getvalue())


_save_figure = save_figure


# -- an evaluator's declared figures ---------------------------------------------------------------


def evaluator_figures(
    evaluator: Any, models: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str], ctx: RunContext, who: str
) -> list[dict[str, str]]:
    """The evaluate stage's part: the figures ``evaluator.figures(models, labels, ctx)``
    declares (none when it has no such method), as ``{"file", "caption"}`` with ``file``
    relative to the run directory (``evaluate.<instance>/<file>``), for results.json.
    A declaration that is not a :class:`~lvlmva.protocols.Figure` with a relative path inside
    the stage folder, or that repeats a file, raises ``ValueError`` naming ``who``. A declared
    file that does not exist is kept: the report names it as missing."""
    draw = getattr(evaluator, "figures", None)
    if not callable(draw):
        return []
    # a copy: whatever the figures do, the values in results.json stay as evaluated
    declared = draw(copy.deepcopy(dict(models)), dict(labels), ctx)
    out: list[dict[str, str]] = []
    stage = ctx.stage or ctx.stage_dir.name
    for figure in declared or ():
        if not isinstance(figure, DeclaredFigure):
            raise TypeError(f"{who}: figures() returned {figure!r}; declare each as lvlmva.Figure(file, caption)")
        path = Path(figure.file)
        if not figure.file or path.is_absolute() or ".." in path.parts or path.as_posix() in (".", ""):
            raise ValueError(f"{who}: figure file {figure.file!r} must be a path inside the stage's folder (ctx.stage_dir), relative to it")
        if not isinstance(figure.caption, str):
            raise TypeError(f"{who}: the caption of figure {figure.file!r} is {type(figure.caption).__name__}, not text")
        file = f"{stage}/{path.as_posix()}"
        if any(f["file"] == file for f in out):
            raise ValueError(f"{who}: figure file {figure.file!r} is declared twice")
        out.append({"file": file, "caption": figure.caption})
    return out


@dataclass(frozen=True)
class EvaluatorFigure:
    """One declared figure as the report shows it: ``link`` (the path under the report's
    folder; ``None`` when the file is missing), ``caption``, and ``file`` as declared
    (relative to the run directory)."""

    file: str
    caption: str
    link: str | None


def collect_evaluator_figures(results: Mapping[str, Any], run_dir: Path, figures: Path) -> dict[str, list[EvaluatorFigure]]:
    """Evaluator instance -> its declared figures, each copied from ``run_dir/<file>`` to
    ``figures/<file>`` (the name stays the same from run to run: the evaluate stage's folder
    and the evaluator's file name); a file that is missing, or is not a regular file inside
    ``run_dir``, gets ``link=None``."""
    root = Path(run_dir).resolve()
    out: dict[str, list[EvaluatorFigure]] = {}
    for instance, evaluation in (results.get("evaluations") or {}).items():
        for declared in evaluation.get("figures") or ():
            file, caption = str(declared.get("file", "")), str(declared.get("caption", ""))
            source = run_dir / file
            link = None
            inside = ".." not in Path(file).parts and not Path(file).is_absolute()
            if inside and source.is_file() and not source.is_symlink() and source.resolve().is_relative_to(root):
                write_atomic(figures / file, source.read_bytes())
                link = f"{FIGURES_DIR}/{file}"
            out.setdefault(instance, []).append(EvaluatorFigure(file, caption, link))
    return out


def _figure_lines(shown: Sequence[EvaluatorFigure]) -> list[str]:
    out: list[str] = []
    for figure in shown:
        caption = figure.caption.strip() or Path(figure.file).name
        if figure.link is None:
            out += ["", f"Figure `{Path(figure.file).name}` ({_truncate(caption, 200)}) is missing: the evaluator declared "
                    f"{figure.file} but it is not in the run directory."]  # fmt: skip
        else:
            caption = " ".join(caption.split())
            alt = caption.replace("[", "(").replace("]", ")")
            out += ["", f"![{_truncate(alt, 120)}]({figure.link})", "", f"*{caption}*"]
    return out


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


# -- sections ----------------------------------------------------------------------------------


def _arrow(higher_is_better: bool | None) -> str:
    return "" if higher_is_better is None else (" ↑" if higher_is_better else " ↓")


@dataclass(frozen=True)
class EvaluatorTable:
    """One evaluator instance's models x metrics, as report.md's "Models" section shows it:
    ``scalar`` columns (those some model has a number for), ``mapped`` metrics whose values are
    mappings (per-group accuracies: column, their keys, model -> mapping), ``missing`` what the
    evaluator could not compute."""

    evaluator: str
    plugin: str
    split: str
    models: list[str]
    labels: dict[str, str]
    scalar: list[MetricColumn]
    values: dict[str, dict[str, Any]]
    mapped: list[tuple[MetricColumn, list[str], dict[str, Mapping[str, Any]]]]
    missing: dict[str, str]


def evaluator_tables(results: Mapping[str, Any]) -> list[EvaluatorTable]:
    """One table per evaluator instance of a run's results.json, in its order."""
    labels = model_labels(results)
    columns = metric_columns(results)
    if not labels:
        return []
    out = []
    for evaluator in dict.fromkeys(c.evaluator for c in columns):
        mine = [c for c in columns if c.evaluator == evaluator]
        evaluation = results["evaluations"][evaluator]
        scored = [m for m in labels if m in (evaluation.get("models") or {})]
        values = {c.metric.key: c.values(results) for c in mine}
        scalar = [c for c in mine if not any(isinstance(v, Mapping) for v in values[c.metric.key].values())]
        # a column no model has a value for (no true masks: no alignment score) is left out
        scalar = [c for c in scalar if any(v is not None for v in values[c.metric.key].values())]
        mapped = []
        for c in mine:
            if c in scalar:
                continue
            tables = {m: v for m, v in values[c.metric.key].items() if isinstance(v, Mapping)}
            if not tables:
                continue
            keys: list[str] = []
            for table in tables.values():
                keys += [k for k in table if k not in keys]
            mapped.append((c, keys, tables))
        missing: dict[str, str] = {}
        for m in scored:  # what an evaluator could not compute (a corruption that cannot run)
            missing.update(evaluation["models"][m].get("not_computed") or {})
        out.append(
            EvaluatorTable(
                evaluator, str(evaluation.get("plugin", "?")), mine[0].split, scored, labels, scalar, values, mapped, missing
            )
        )
    return out


def models_section(results: Mapping[str, Any], figures: Mapping[str, Sequence[EvaluatorFigure]] | None = None) -> list[str]:
    """One table per evaluator instance, with the columns its metric declarations name; a
    metric whose values are mappings (per-group accuracies) gets a table of its own; then the
    evaluator's declared ``figures`` (instance -> :class:`EvaluatorFigure`), each with its
    caption, or named as missing."""
    figures = figures or {}
    out = ["## Models", ""]
    tables = evaluator_tables(results)
    # figures of an evaluator without a table (it declares no metric with a value) still show
    untabled = [(name, shown) for name, shown in figures.items() if shown and name not in {t.evaluator for t in tables}]
    if not tables and not untabled:
        return out + ["No model was evaluated in this run.", ""]
    for t in tables:
        named = f"`{t.evaluator}`" if t.plugin == t.evaluator else f"`{t.evaluator}` ({t.plugin})"
        out.append(f"Evaluator {named}, on the {t.split} split:")
        out.append("")
        header = ["Model", *(c.metric.title + _arrow(c.metric.higher_is_better) for c in t.scalar)]
        rows = [[t.labels[m], *(c.metric.format_value(t.values[c.metric.key].get(m)) for c in t.scalar)] for m in t.models]
        out += _table(header, rows)
        legend = [f"{c.metric.title} = {c.metric.description}" for c in t.scalar if c.metric.description]
        if legend:
            out += ["", "; ".join(legend) + "."]
        for c, keys, per_model in t.mapped:
            out += ["", f"{c.metric.title}:", ""]
            out += _table(
                ["Model", *keys],
                [[t.labels[m], *(c.metric.format_value(per_model[m].get(k)) for k in keys)] for m in t.models if m in per_model],
            )
        if t.missing:
            out += ["", "Not computed (reported by the evaluator, never counted as a result): "
                    + "; ".join(f"{k}: {v}" for k, v in t.missing.items()) + "."]  # fmt: skip
        out += _figure_lines(figures.get(t.evaluator, ()))
        out.append("")
    for name, shown in untabled:
        out += [f"Evaluator `{name}`:", *_figure_lines(shown), ""]
    chosen_by = selection_lines(results)
    if chosen_by:
        out += ["How each model's epoch or hyperparameters were chosen (its `selection` rule):", ""]
        out += [f"- {line}" for line in chosen_by] + [""]
    notes = []
    if results.get("input_scale"):
        notes.append(f"Inputs on the {results['input_scale']} scale.")
    norm = results.get("normalization")
    if norm:
        fmt = ", ".join
        notes.append(
            f"Pixels stored as {norm['storage']}, scaled by {norm['scale']:.6g} and normalised per channel "
            f"with mean ({fmt(f'{v:.4f}' for v in norm['mean'])}) and std ({fmt(f'{v:.4f}' for v in norm['std'])})."
        )
    machine = results.get("machine") or {}
    if machine:
        notes.append(
            f"Computed on {machine.get('platform', '?')} ({machine.get('processor', '?')}), device "
            f"{machine.get('device', '?')}, {machine.get('torch_threads', '?')} torch threads: the "
            "same settings and seed give the same numbers on the same machine; other machines "
            "differ in the last digits, so compare methods as mean ± std over seeds."
        )
    return out + notes + [""]


def _verdicts_section(results: Mapping[str, Any], verdicts: Sequence[Verdicts]) -> list[str]:
    out = ["## Verdicts", ""]
    metrics = verdict_results(results)
    critic = results.get("critic") or {}
    if critic:
        note = f" (it {critic.get('note') or ORACLE_NOTE})" if critic.get("reads_true_masks") else ""
        out += [f"Verdicts from the {critic.get('label', 'critic')}{note} and the judge.", ""]
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
        rows = [[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list)) and k not in ("critic", "note")]
        out += _table(["Verdict metric", "Value"], rows)
        if "truth_min_pixels" in metrics:
            pixels = metrics["truth_min_pixels"]
            out += [
                "",
                f"Scored against the true masks: a cluster is truly spurious (its right verdict is "
                f"\"no\") when at least {_fmt(pixels)} of its pixels lie on the true mask "
                f"(truth_min_pixels, a pixel count; not the critic option min_overlap, a share).",
            ]
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


def _branches_table(results: Mapping[str, Any]) -> list[str]:
    """The verdicts of every segmenter x critic pair side by side, one column each (the
    layout of the paper's tables comparing critics and cluster counts)."""
    branches = results.get("branches") or {}
    if not branches:
        return []
    keys = list(branches)

    def row(name: str, get: Any) -> list[Any]:
        return [name, *(get(branches[k]) for k in keys)]

    def metric(block: Mapping[str, Any], key: str) -> Any:
        return verdict_results(block).get(key)

    def cost(block: Mapping[str, Any]) -> Any:
        value = (block.get("usage") or {}).get("cost_usd")
        return None if value is None else f"{float(value):.4f}"

    rows = [
        row("segmenter", lambda b: (b.get("segmenter") or {}).get("label")),
        row("critic", lambda b: (b.get("critic") or {}).get("label", "no critic")),
        row("judge", lambda b: b.get("judge")),
        row("verdict accuracy", lambda b: metric(b, "verdict_accuracy")),
        row("cluster accuracy", lambda b: metric(b, "cluster_accuracy")),
        row("samples with verdicts", lambda b: metric(b, "judged_samples")),
        row("samples failed", lambda b: (b.get("alignment") or {}).get("failed")),
        row("LVLM requests", lambda b: (b.get("usage") or {}).get("requests")),
        row("cost (USD)", cost),
    ]
    out = ["## Verdicts per branch", ""]
    out.append(
        "Each segmenter x critic/judge pair of this run on the same alignment samples; its "
        "verdicts made its own masks, and every aligner was aligned with each branch's masks."
    )
    notes = {(b.get("critic") or {}).get("label"): (b.get("critic") or {}).get("note") for b in branches.values()}
    for label, note in notes.items():
        if note:
            out.append(f"The {label} {note}.")
    return [*out, "", *_table(["", *(f"`{k}`" for k in keys)], rows), ""]


def _review_section(results: Mapping[str, Any]) -> list[str]:
    review = results.get("review")
    if not review:
        return []
    out = ["## Review", ""]
    if not review.get("overrides"):
        return out + ["No verdict was changed by a person (`lvlmva review RUN_DIR` opens the review page).", ""]
    out.append(
        f"A person decided {review['overrides']} verdicts of {review.get('samples', 0)} samples "
        f"(review/overrides.json); {review.get('changed', 0)} of them differ from the judge's. Masks, "
        "alignment and evaluation use them."
    )
    before, after = review.get("before"), review.get("after")
    if before and after:
        out += ["", *_table(
            ["", "judge alone", "after review"],
            [
                ["verdict accuracy", before.get("verdict_accuracy"), after.get("verdict_accuracy")],
                ["cluster accuracy", before.get("cluster_accuracy"), after.get("cluster_accuracy")],
                ["samples with verdicts", before.get("judged_samples"), after.get("judged_samples")],
            ],
        )]  # fmt: skip
    return out + [""]


def _uncertainty_section(results: Mapping[str, Any], path: Path) -> list[str]:
    info = results.get("uncertainty")
    if not info:
        return []
    out = ["## Critic uncertainty", ""]
    k = info.get("answers_per_sample")
    share = info.get("share_of_errors_in_top")
    out.append(
        f"The critic answered each sample {k} times; a sample's uncertainty is the share of its votes "
        f"that disagree with the majority. Of {info.get('errors')} verdict errors (against the true "
        f"masks) over {info.get('samples')} samples, {info.get('errors_in_top')} lie in the "
        f"{info.get('top_samples')} most uncertain samples (the top {info.get('top_share', 0.1):.0%})"
        + (f": {share:.0%} of the errors." if isinstance(share, float) else ".")
    )
    rows = info.get("per_sample") or []
    if rows:
        u = np.array([r["uncertainty"] for r in rows], dtype=float)
        e = np.array([r["errors"] for r in rows], dtype=float)
        fig = Figure(figsize=(9, 3.2))
        left, right = fig.subplots(1, 2)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(e))
        left.scatter(u, e + jitter, s=12, alpha=0.6)
        left.set_xlabel("uncertainty (share of disagreeing votes)")
        left.set_ylabel("wrong verdicts in the sample")
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        levels = np.unique(u)
        right.bar([f"{x:.2f}" for x in levels], [e[u == x].mean() for x in levels])
        right.set_xlabel("uncertainty")
        right.set_ylabel("mean wrong verdicts per sample")
        for ax in (left, right):
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        _save_figure(fig, path)
        out += ["", f"![verdict errors against uncertainty]({FIGURES_DIR}/{path.name})"]
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
    batched = batch_priced(results.get("settings") or {})
    rows = [
        ["requests", usage.get("requests")],
        ["cache hits", usage.get("cache_hits")],
        ["prompt tokens", usage.get("prompt_tokens")],
        ["completion tokens", usage.get("completion_tokens")],
        ["cost (USD)", None if cost is None else f"{float(cost):.4f}"],
    ]
    notes = []
    if batched:
        notes = [
            f"Answers of {', '.join(batched)} are priced at Batch API prices "
            "(`prices` x `batch_price_factor`): they went through OpenAI's Batch API (`api = \"batch\"`).",
            "",
        ]
    return out + _table(["Usage", "Value"], rows) + [""] + notes


def batch_priced(settings: Mapping[str, Any]) -> list[str]:
    """The LVLM slots of a run's settings that ask through a batch API (``api = "batch"``):
    their costs are at batch prices."""
    found = []
    for role in ("critic", "judge"):
        single = settings.get(role)
        if isinstance(single, Mapping) and single.get("api") == "batch":
            found.append(role)
        for name, block in (settings.get(f"{role}s") or {}).items():
            if isinstance(block, Mapping) and block.get("api") == "batch":
                found.append(f"{role}s.{name}")
    return found


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
    critiques = [c for c in critiques if c.draw == 0]  # the first answer of each sample
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
    labels: Mapping[str, str] | None = None,
) -> int:
    from .rendering import to_display

    n = min(limit, int(test_images.shape[0]))
    labels = labels or {}
    models = list(attributions)
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
        axes[r, 0].set_ylabel("\n".join(textwrap.wrap(labels.get(name, name), 18)), fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=axes[1:, :].ravel().tolist(), shrink=0.8, ticks=[])
        bar.set_label("− attribution + (per image)", fontsize=7)
    _save_figure(fig, path)
    return n


#: Keys of a per-epoch record that are neither the loss, the training accuracy nor a loss term.
_RECORD_KEYS = frozenset({"stage", "epoch", "steps", "seconds", "run_stage", "run_attempt"})
#: The series every training loop logs; the other numbers of a record are named loss terms.
_LOSS, _ACCURACY = "loss", "train_accuracy"


@dataclass(frozen=True)
class TrainingCurve:
    """One fit's per-epoch records of ``metrics.jsonl``.

    - ``stage``: the pipeline stage that logged it (``run_stage``: "train", "align", "reference",
      "mitigate.jtt") where known, else the record's own ``stage`` tag; ``tag``: that tag (an
      aligner logs as "align" in both the align and the reference stage; a mitigator's fits
      have tags of their own).
    - ``point``: the loss parameters of a grid point (an aligner's grid logs them in every
      epoch record; they are the keys its records share with its ``<tag>-select`` lines);
      empty for a fit without a grid.
    - ``epochs`` and ``series``: per epoch, ``"loss"``, ``"train_accuracy"`` (where logged) and
      every named loss term (NaN where a record lacks one); ``terms``: the names of the loss
      terms besides the total, as the aligner named them (RRR: ``ce``, ``penalty``).
    """

    stage: str
    tag: str
    point: dict[str, Any]
    epochs: list[int]
    series: dict[str, list[float]]
    terms: tuple[str, ...]
    label: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_training_curves(run_dir: Path) -> tuple[list[TrainingCurve], list[str]]:
    """The training curves of ``run_dir/metrics.jsonl`` (one per fit, in the order first
    logged), and notes on unreadable lines. Lines without ``epoch`` and ``stage`` (evaluations,
    a grid's selection lines) are not curves."""
    path = Path(run_dir) / "metrics.jsonl"
    notes: list[str] = []
    if not path.exists():
        return [], notes
    records: list[dict[str, Any]] = []
    select_keys: dict[tuple[str, str], set[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            notes.append(f"metrics.jsonl line {number} is not JSON ({exc.msg}); skipped.")
            continue
        if not isinstance(record, dict) or "stage" not in record:
            continue
        tag = str(record["stage"])
        if "epoch" in record:
            records.append(record)
        elif tag.endswith("-select"):
            curve = str(record.get("run_stage") or tag.removesuffix("-select"))
            select_keys.setdefault((curve, tag.removesuffix("-select")), set()).update(record)

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    points: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        curve, tag = str(record.get("run_stage") or record["stage"]), str(record["stage"])
        shared = select_keys.get((curve, tag), set()) & set(record)
        point = {k: record[k] for k in record if k in shared and k not in _RECORD_KEYS}
        key = (curve, tag, json.dumps(point, sort_keys=True, default=str))
        groups.setdefault(key, []).append(record)
        points[key] = point
    tags_per_curve: dict[str, set[str]] = {}
    for curve, tag, _point in groups:
        tags_per_curve.setdefault(curve, set()).add(tag)

    curves = []
    for key, group in groups.items():
        curve, tag, _ = key
        point = points[key]
        group = sorted(group, key=lambda r: r["epoch"])
        names: list[str] = []
        for record in group:
            for k, v in record.items():
                if k not in _RECORD_KEYS and k not in point and k not in names and _is_number(v):
                    names.append(k)
        series = {
            name: [float(r[name]) if _is_number(r.get(name)) else math.nan for r in group]
            for name in names
        }
        label = curve if len(tags_per_curve[curve]) == 1 else f"{curve} ({tag})"
        label = ", ".join([label, *(f"{k} {_point_value(v)}" for k, v in point.items())])
        terms = tuple(n for n in names if n not in (_LOSS, _ACCURACY))
        curves.append(
            TrainingCurve(curve, tag, point, [r["epoch"] for r in group], series, terms, label)
        )
    return curves, notes


def _point_value(value: Any) -> str:
    return f"{value:g}" if _is_number(value) else str(value)


def _curves_figure(curves: Sequence[TrainingCurve], path: Path) -> bool:
    """Loss and training accuracy per epoch, and a third panel with the named loss terms of
    the curves that have them (an aligner's: RRR's ce and penalty); log scale where every term
    value drawn is positive, since the terms' scales differ by orders of magnitude."""
    if not curves:
        return False
    with_terms = [c for c in curves if c.terms]
    fig = Figure(figsize=(13.5 if with_terms else 9, 3.2), layout="constrained")
    axes = fig.subplots(1, 3 if with_terms else 2)
    ax_loss, ax_acc = axes[0], axes[1]
    # One colour per curve in every panel; in the terms panel one line style per term.
    colours = {curve.label: f"C{index % 10}" for index, curve in enumerate(curves)}
    for curve in curves:
        for ax, key in ((ax_loss, _LOSS), (ax_acc, _ACCURACY)):
            ys = curve.series.get(key)
            if ys is not None and any(not math.isnan(v) for v in ys):
                style = {"color": colours[curve.label], "marker": "o", "markersize": 3}
                ax.plot(curve.epochs, ys, label=curve.label, **style)
    ax_loss.set_title("training loss", fontsize=9)
    ax_acc.set_title("training accuracy", fontsize=9)
    if with_terms:
        ax_terms = axes[2]
        drawn: list[float] = []
        for curve in with_terms:
            for index, term in enumerate(curve.terms):
                ys = curve.series[term]
                style = {"color": colours[curve.label], "marker": "o", "markersize": 3}
                linestyle = ("-", "--", ":", "-.")[index % 4]
                ax_terms.plot(
                    curve.epochs, ys, linestyle=linestyle, label=f"{curve.label}: {term}", **style
                )
                drawn += [v for v in ys if not math.isnan(v)]
        if drawn and all(v > 0 and math.isfinite(v) for v in drawn):
            ax_terms.set_yscale("log")
        ax_terms.set_title("loss terms", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_figure(fig, path)
    return True


def _curves_text(curves: Sequence[TrainingCurve]) -> str:
    stages = ", ".join(dict.fromkeys(c.stage for c in curves))
    text = f"Loss and training accuracy per epoch ({stages})."
    terms: dict[str, list[str]] = {}
    for curve in curves:
        names = terms.setdefault(curve.stage, [])
        names += [t for t in curve.terms if t not in names]
    named = "; ".join(f"{stage}: {', '.join(names)}" for stage, names in terms.items() if names)
    if named:
        text += f" The loss terms the aligners name, per epoch (third panel): {named}."
    return text


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
    branches: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``report.md`` and its figures (``figures/*.png``) into ``out_dir`` (default
    ``run_dir``); return the report's path.

    - ``results``: the layout of ``results.json`` (``models``, ``verdicts``, ``alignment``,
      ``usage``, ``timings``, ...); missing parts are reported as missing.
    - ``rendered`` / ``verdicts`` / ``critiques``: the alignment samples' images, verdicts and
      critique texts (empty when the run had no critic).
    - ``test_images`` ``[B, C, H, W]`` with ``test_labels`` ``[B]`` and ``attributions`` mapping a
      model key (``"original"``, ``"aligned"``, ``"true_mask"``, a mitigator's name) to
      attributions of those images ``[B, C, H, W]``; rows are labelled with ``results["models"]``.
    - Training curves come from ``run_dir/metrics.jsonl`` (one line per epoch and stage tag).
    - ``branches``: for a run with several segmenters or critics, one mapping per branch
      (``key``, ``rendered``, ``verdicts``, ``critiques``): a table compares them and each gets
      its verdicts, review, alignment, samples and critiques.

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
    failed = results.get("failed") or {}
    if failed:
        lines += ["## Failed stages", "", "This run could not compute everything; what is below was computed without:", ""]
        lines += [f"- `{stage}`: {_truncate(str(reason), 300)}" for stage, reason in failed.items()]
        lines += [""]
    lines += models_section(results, collect_evaluator_figures(results, run_dir, figures))
    per_branch = [(b["key"], (results.get("branches") or {}).get(b["key"]) or {}, b) for b in branches or []]
    if not per_branch:
        per_branch = [("", results, {"rendered": rendered, "verdicts": verdicts, "critiques": critiques})]
    lines += _branches_table(results)
    for key, block, parts in per_branch:
        suffix = f"_{key.replace('.', '_')}" if key else ""
        branch_lines = [
            *_verdicts_section(block, parts["verdicts"]),
            *_review_section(block),
            *_uncertainty_section(block, figures / f"uncertainty{suffix}.png"),
            *_alignment_section(block),
        ]
        if key:  # one level down, under the branch's own heading
            branch_lines = [f"## Branch `{key}`", "", *(f"#{line}" if line.startswith("## ") else line for line in branch_lines)]
        lines += branch_lines
    lines += _usage_section(results)
    lines += _timings_section(results)

    for key, _block, parts in per_branch:
        shown = parts["rendered"]
        lines += ["## Alignment samples" + (f" (branch `{key}`)" if key else ""), ""]
        if options.samples == 0:
            lines += ["Not shown (report.samples = 0).", ""]
        elif not shown:
            lines += ["No rendered alignment samples in this run.", ""]
        else:
            name = f"alignment_samples{'_' + key.replace('.', '_') if key else ''}.png"
            n = _samples_figure(shown, parts["verdicts"], options.samples, figures / name)
            lines += [
                f"The first {n} of {len(shown)} alignment samples: original, cluster map and "
                "overlay, with the colours judged spurious (no) and relevant (yes).",
                "",
                f"![alignment samples]({FIGURES_DIR}/{name})",
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
            model_labels(results),
        )
        lines += [
            f"{n} test images (top row) and each model's attribution for the true class "
            "(red positive, blue negative, limits symmetric per image).",
            "",
            f"![attributions]({FIGURES_DIR}/attributions.png)",
            "",
        ]

    lines += ["## Training curves", ""]
    curves, notes = read_training_curves(run_dir)
    if _curves_figure(curves, figures / "training_curves.png"):
        lines += [
            _curves_text(curves),
            "",
            f"![training curves]({FIGURES_DIR}/training_curves.png)",
            "",
        ]
    else:
        lines += ["No per-epoch training records in metrics.jsonl.", ""]
    lines += [*notes, ""] if notes else []

    for key, _block, parts in per_branch:
        section = _critiques_section(parts["critiques"], parts["verdicts"])
        if key and section:
            section[0] = f"{section[0]} (branch `{key}`)"
        lines += section
    text = "\n".join(lines).rstrip() + "\n"
    write_atomic(report_path, redact(text).encode("utf-8"))  # failure texts may quote a secret
    return report_path


def report_stage(call: StageCall, inputs: Sequence[str], branches: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The report stage: attributions of a few test images per model, then :func:`write_report`
    into the stage's folder (published at the top of the run directory when the run ends).
    ``inputs`` are the stages whose computing times the timings table shows; ``branches`` what
    it reads of each segmenter x critic pair (:func:`lvlmva.pipeline.stages.branch_inputs`)."""
    options: ReportOptions = call.option("report")
    if not options.enabled:
        return {"written": False}
    data = call["data"]
    n = min(options.test_images, len(data.test))
    pick = torch.randperm(len(data.test), generator=call.ctx.generator("report-test-images"))[:n]
    images, labels = data.test.inputs[pick], data.test.labels[pick]
    attributions: dict[str, torch.Tensor] = {}
    attributor = call.plugin("attributor")
    if attributor is not None and n > 0:
        from .pipeline.stages import reference_pool

        pool = reference_pool(attributor, data)
        for key, model in call.models().items():
            attributions[key] = attributor.attribute(model, images, labels, pool, call.ctx).detach().cpu()
    timings = {}
    for name in inputs:
        info = call.info(name)
        if info is not None and info.seconds is not None:
            timings[info.stage] = info.seconds
    parts = []
    for branch in branches:
        names = branch["names"]
        parts.append({
            "key": branch["key"],
            "rendered": call[names["render"]] or [],
            "verdicts": call[names["verdicts"]] or call[names["judge"]] or [],
            "critiques": call[names["critic"]] or [],
        })  # fmt: skip
    single = parts[0] if len(parts) == 1 and parts[0]["key"] == "" else None
    path = write_report(
        call.ctx.run_dir,
        {**call["results"], "timings": timings},
        options=options,
        rendered=single["rendered"] if single else [],
        verdicts=single["verdicts"] if single else [],
        critiques=single["critiques"] if single else [],
        branches=None if single or not parts else parts,
        test_images=data.test.display(pick),
        test_labels=labels,
        attributions=attributions,
        class_names=data.class_names,
        out_dir=call.ctx.stage_dir,
        title=call.ctx.run_dir.name,
    )
    return {"written": path.exists()}
