"""results.json: how the results stage assembles it, and how every table reads it.

Layout (each part present when the run has it)::

    models       key -> {"label", "stage", "details"?}  the run's models: original, aligned, ...
    failed       input -> reason, for stages of this run that failed or could not run
    evaluations  instance -> {"plugin", "split", "metrics": [declarations], "models": {key: values}}
    critic       {"label", "plugin", "reads_true_masks"}
    verdicts     verdict accuracy and friends (where true masks exist), with the critic named;
                 truth_min_pixels: the pixels on the true mask that make a cluster truly
                 spurious (an older results.json calls it min_overlap: read with verdict_results)
    alignment    samples, how many were aligned on, the failures with their stage and reason
    usage        LVLM tokens, requests, cache hits, cost
    machine      where the numbers were computed
    settings, timings   added when the results are published

Tables (CLI summary, report, sweeps) are drawn from the evaluators' metric declarations stored
with their values, so a new evaluator's metrics appear without touching any table code.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .model_selection import UPPER_BOUND_MARK, is_upper_bound
from .protocols import Metric
from .records import Critique, SpuriousDataset, Verdicts, total_usage

if TYPE_CHECKING:
    from .pipeline.stage import Stage, StageCall

__all__ = [
    "check_evaluation",
    "assemble_results",
    "MetricColumn",
    "metric_columns",
    "model_labels",
    "selection_lines",
    "summary_lines",
    "verdict_results",
    "machine_info",
    "ORACLE_NOTE",
]

#: what tables say about verdicts from a critic that reads the true masks
ORACLE_NOTE = "reads the true masks: an upper-bound stand-in for an LVLM critic, not an LVLM"


def check_evaluation(plugin: str, model: str, values: Any, declared: Sequence[Metric]) -> None:
    """An evaluator's result for one model must be a dict whose declared metrics are numbers,
    ``None`` or mappings of names to numbers (or ``None``); raises ``ValueError`` naming the key."""
    if not isinstance(values, Mapping):
        raise TypeError(f"evaluator {plugin!r} returned {type(values).__name__} for model {model!r}, not a dict")
    keys = [m.key for m in declared]
    if len(set(keys)) != len(keys):
        raise ValueError(f"evaluator {plugin!r} declares a metric key twice: {keys}")

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) or hasattr(v, "dtype")

    for metric in declared:
        value = values.get(metric.key)
        ok = number(value) or (isinstance(value, Mapping) and all(number(v) for v in value.values()))
        if not ok:
            raise ValueError(
                f"evaluator {plugin!r}, model {model!r}: metric {metric.key!r} is {value!r}; "
                "a metric is a number, None or a mapping of names to numbers"
            )


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where numbers are computed: platform, processor, device, torch's thread count."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def assemble_results(
    call: StageCall, branches: Sequence[Mapping[str, Any]], model_stages: Sequence[Stage], evaluate_stages: Sequence[Stage]
) -> dict[str, Any]:
    """The results stage: labels of the models, every evaluation, verdict quality, alignment
    failures and LVLM usage, from the artifacts the stage declared. A run with one segmenter and
    one critic writes its verdicts at the top (``verdicts``, ``review``, ``alignment``, ...);
    a run with several writes one block per branch under ``branches`` (same keys, plus the
    branch's segmenter, critic and judge) and the total ``usage``."""
    data: SpuriousDataset = call["data"]
    norm = data.train.normalization
    out: dict[str, Any] = {
        "models": {},
        "evaluations": {},
        "input_scale": data.input_scale,
        # how stored pixels became model inputs (None: the stored float32 values are the inputs)
        "normalization": None if norm is None else {"storage": str(data.train.images.dtype).removeprefix("torch."), **norm.to_dict()},
    }
    for stage in model_stages:
        info = call.info(stage.provides)
        if info is not None:
            entry: dict[str, Any] = {"label": info.label, "stage": info.stage}
            if info.details:
                entry["details"] = dict(info.details)
            out["models"][info.model] = entry
    failed = call.failed_inputs()
    if failed:
        # what this run could not compute, so that no reader mistakes a missing model for one
        # that was never asked for
        out["failed"] = {name: reason for name, reason in failed.items()}
    for stage in evaluate_stages:
        evaluation = call[stage.provides]
        if evaluation is not None:
            out["evaluations"][stage.name.partition(".")[2]] = evaluation
    blocks = {b["key"]: _branch_results(call, b, data) for b in branches}
    if len(branches) == 1 and branches[0]["key"] == "":
        block = blocks[""]
        out.update({k: v for k, v in block.items() if k not in ("usage_records", "segmenter", "judge")})
        out["usage"] = total_usage(block["usage_records"]).to_state()
    else:
        everything = []
        out["branches"] = {}
        for key, block in blocks.items():
            everything += block.pop("usage_records")
            out["branches"][key] = block
        out["usage"] = total_usage(everything).to_state()
    out["machine"] = machine_info(call.ctx.device)
    return out


def _branch_results(call: StageCall, branch: Mapping[str, Any], data: SpuriousDataset) -> dict[str, Any]:
    """One segmenter x critic pair's block: its critic, the review of its verdicts, their
    quality against the true masks, the critic's uncertainty, alignment failures, usage."""
    names = branch["names"]
    slot = branch["critic_slot"]
    out: dict[str, Any] = {"segmenter": branch["segmenter"], "judge": branch["judge"]}
    critic = branch["critic"]
    oracle = call.flag(slot, "needs_true_masks")
    # what a critic that reads the true masks is (the oracle: an upper bound; the scripted
    # critic: a simulation with chosen mistakes); never an LVLM
    note = str(getattr(call.plugin_class(slot), "truth_note", ORACLE_NOTE)) if oracle else ""
    if call.configured(slot):
        out["critic"] = {"label": critic, "reads_true_masks": oracle, **({"note": note} if note else {})}

    critiques: list[Critique] = call[names["critic"]] or []
    judged: list[Verdicts] | None = call[names["judge"]]
    # what masks were made from: the judge's verdicts with a person's overrides applied
    verdicts: list[Verdicts] | None = call[names["verdicts"]] if call[names["verdicts"]] is not None else judged
    reviewed = [v for v in verdicts or [] if v.sources]
    if verdicts is not None:
        out["review"] = review_summary(verdicts)
        if reviewed:
            out["review"]["samples_reviewed"] = [v.sample_id for v in reviewed]
    if verdicts is not None and data.train.spurious_masks is not None:
        from .metrics import verdict_metrics

        chosen = call["select"]
        truth = data.train.spurious_masks[chosen.indices]
        labels = call[names["segment"]].labels
        out["verdicts"] = {
            **verdict_metrics(labels, verdicts, truth),
            "critic": critic + (" + person's review" if reviewed else ""),
            "note": note,
        }
        if reviewed and judged is not None:
            # the same measures of the judge's verdicts alone: what the review changed
            before = verdict_metrics(labels, judged, truth)
            out["review"]["before"] = {k: before[k] for k in ("verdict_accuracy", "cluster_accuracy", "confusion", "judged_samples")}
            out["review"]["after"] = {k: out["verdicts"][k] for k in ("verdict_accuracy", "cluster_accuracy", "confusion", "judged_samples")}
        # the critic's own uncertainty against the judge's verdicts: a person's corrections
        # must not take errors out of what measures the critic
        uncertain = uncertainty_summary(labels, judged if judged is not None else verdicts, truth)
        if uncertain is not None:
            out["uncertainty"] = uncertain
    masks = call[names["masks"]]
    if masks is not None:
        # One failure per sample: a critique that failed is reported with the critic's reason,
        # not the judge's "no critique to judge".
        by_sample = {f["sample_id"]: f for f in masks["failures"]}
        answers: dict[int, list[Critique]] = {}
        for c in critiques:
            answers.setdefault(c.sample_id, []).append(c)
        for sid, group in answers.items():
            # a sample that failed because its critic did (every answer), not because the judge
            # could not read the answers or their votes tied: the critic's reason
            if sid in by_sample and all(c.failure is not None for c in group):
                by_sample[sid] = {"sample_id": sid, "stage": "critic", "reason": group[0].failure}
        ok = masks["ok"]
        out["alignment"] = {
            "samples": int(ok.numel()),
            "aligned_on": int(ok.sum()),
            "failed": int((~ok).sum()),
            "failures": sorted(by_sample.values(), key=lambda f: f["sample_id"]),
            "mask_source": call.option("masks.source"),
            "mean_mask_pixels": float(masks["masks"][ok].float().sum(dim=(1, 2)).mean()) if bool(ok.any()) else 0.0,
        }
        ignored = {v.sample_id: list(v.ignored_colors) for v in verdicts or [] if v.ignored_colors}
        if ignored:
            out["alignment"]["ignored_colors"] = ignored
    records = [*critiques, *(verdicts or [])]
    out["usage"] = total_usage(records).to_state()
    out["usage_records"] = records
    return out


def review_summary(verdicts: Sequence[Verdicts]) -> dict[str, Any]:
    """How many verdicts a person decided, and how many of those differ from the judge's."""
    overridden = changed = 0
    for v in verdicts:
        for j, source in enumerate(v.sources):
            if source != "person":
                continue
            overridden += 1
            judge = None if v.judge_relevant is None else v.judge_relevant[j]
            changed += int(judge is None or v.relevant is None or judge != v.relevant[j])
    return {"overrides": overridden, "changed": changed, "samples": sum(1 for v in verdicts if v.sources)}


#: the share of most uncertain samples whose verdict errors results.json counts
UNCERTAIN_SHARE = 0.10


def verdict_errors(labels: torch.Tensor, verdicts: Sequence[Verdicts], truth: torch.Tensor) -> list[int | None]:
    """Per sample, how many of its clusters' verdicts are wrong against the true masks (a
    cluster with any pixel on the true mask should be "no"); ``None`` for a failed sample."""
    from .masks import cluster_overlap

    out: list[int | None] = []
    for i, v in enumerate(verdicts):
        if v.relevant is None:
            out.append(None)
            continue
        sizes, on = cluster_overlap(labels[i : i + 1].long(), truth[i : i + 1].bool(), len(v.colors))
        wrong = 0
        for j, relevant in enumerate(v.relevant):
            if int(sizes[0, j]) == 0:
                continue
            wrong += int(relevant == (int(on[0, j]) > 0))
        out.append(wrong)
    return out


def uncertainty_summary(labels: torch.Tensor, verdicts: Sequence[Verdicts], truth: torch.Tensor) -> dict[str, Any] | None:
    """Where the verdict errors lie against the samples' uncertainty (several critic answers
    per sample); ``None`` when the critic answered once."""
    if not any(v.votes for v in verdicts):
        return None
    errors = verdict_errors(labels, verdicts, truth)
    rows = [(v.uncertainty, e, v.sample_id, row) for row, (v, e) in enumerate(zip(verdicts, errors, strict=True)) if e is not None]
    # most uncertain first; equal uncertainty in the run's order (what the review page shows)
    rows.sort(key=lambda r: (-r[0], r[3]))
    top = max(1, math.ceil(UNCERTAIN_SHARE * len(rows))) if rows else 0
    total = sum(r[1] for r in rows)
    in_top = sum(r[1] for r in rows[:top])
    return {
        "samples": len(rows),
        "answers_per_sample": max(len(v.votes) for v in verdicts),
        "errors": total,
        "top_share": UNCERTAIN_SHARE,
        "top_samples": top,
        "errors_in_top": in_top,
        "share_of_errors_in_top": (in_top / total) if total else None,
        "per_sample": [{"sample_id": r[2], "uncertainty": r[0], "errors": r[1]} for r in rows],
    }


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricColumn:
    """One declared metric of one evaluator instance, as a table column."""

    evaluator: str
    metric: Metric
    split: str

    def values(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """Model key -> this metric's value."""
        evaluation = (results.get("evaluations") or {}).get(self.evaluator) or {}
        return {model: v.get(self.metric.key) for model, v in (evaluation.get("models") or {}).items()}


def metric_columns(results: Mapping[str, Any]) -> list[MetricColumn]:
    """Every declared metric of every evaluation, in declaration order."""
    out = []
    for name, evaluation in (results.get("evaluations") or {}).items():
        for decl in evaluation.get("metrics") or []:
            out.append(MetricColumn(name, Metric.from_dict(decl), str(evaluation.get("split", "test"))))
    return out


def model_labels(results: Mapping[str, Any]) -> dict[str, str]:
    """Model key -> the label tables show, in the run's order. A model the test split chose
    (``selection = "oracle-test"``) carries :data:`~lvlmva.model_selection.UPPER_BOUND_MARK`."""
    labels = {}
    for key, info in (results.get("models") or {}).items():
        label = str(info.get("label") or key)
        if is_upper_bound(info.get("details")) and UPPER_BOUND_MARK not in label:
            label = f"{label} {UPPER_BOUND_MARK}"
        labels[key] = label
    return labels


def selection_lines(results: Mapping[str, Any]) -> list[str]:
    """One line per model chosen by a rule: ``label: criterion (selection = 'rule')``."""
    labels = model_labels(results)
    out = []
    for key, info in (results.get("models") or {}).items():
        selection = (info.get("details") or {}).get("selection")
        if isinstance(selection, Mapping) and selection.get("rule"):
            out.append(f"{labels[key]}: {selection.get('criterion')} (selection = {selection['rule']!r})")
    return out


#: verdict keys an older results.json carries under another name -> the name they have now
_FORMER_VERDICT_KEYS = {"min_overlap": "truth_min_pixels"}


def verdict_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results["verdicts"]`` under the key names this version writes (empty when the run has
    none): ``truth_min_pixels`` was ``min_overlap`` before the critic option of that name (a
    share of pixels, not a count) made the two easy to confuse."""
    verdicts = dict(results.get("verdicts") or {})
    for old, new in _FORMER_VERDICT_KEYS.items():
        if old in verdicts:
            value = verdicts.pop(old)
            verdicts.setdefault(new, value)
    return verdicts


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value))


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The CLI summary: one line per model with its summary metrics, and the verdict accuracy
    with the critic that produced it. Metric names are prefixed by their evaluator instance
    when several evaluators report the same key."""
    columns = [c for c in metric_columns(results) if c.metric.summary]
    keys = [c.metric.key for c in columns]
    labels = model_labels(results)
    width = max([len(v) for v in labels.values()] + [16])
    lines = []
    for model, label in labels.items():
        parts = []
        for column in columns:
            value = column.values(results).get(model)
            if not _is_number(value):
                continue
            name = column.metric.key if keys.count(column.metric.key) == 1 else f"{column.evaluator}.{column.metric.key}"
            parts.append(f"{name}={column.metric.format_value(value)}")
        lines.append(f"  {label:<{width}} " + " ".join(parts))
    columns_split = {c.split for c in columns}
    if lines and columns_split:
        lines.append(f"  (on the {', '.join(sorted(columns_split))} split)")
    elif lines and isinstance(results.get("settings"), dict) and not results["settings"].get("evaluators"):
        lines.append('  (no metrics: the settings name no evaluator; add [evaluators.standard] plugin = "standard")')
    blocks = results.get("branches") or {"": results}
    for key, block in blocks.items():
        lead = f"  branch {key}: " if key else "  "
        verdicts = block.get("verdicts") or {}
        if _is_number(verdicts.get("verdict_accuracy")):
            note = f"; the critic {verdicts['note']}" if verdicts.get("note") else ""
            lines.append(f"{lead}verdict accuracy {verdicts['verdict_accuracy']:.4f} ({verdicts.get('critic', 'critic')}{note})")
        review = block.get("review") or {}
        if review.get("overrides"):
            before = (review.get("before") or {}).get("verdict_accuracy")
            was = f"; the judge alone: {before:.4f}" if _is_number(before) else ""
            lines.append(f"{lead}review: {review['overrides']} verdicts decided by a person in {review.get('samples')} samples, {review.get('changed')} changed{was}")
    return lines


def iter_model_values(results: Mapping[str, Any]) -> Iterator[tuple[str, MetricColumn, Any]]:
    """(model key, column, value) for every model and declared metric: the long format a study
    or a sweep writes."""
    for column in metric_columns(results):
        for model, value in column.values(results).items():
            yield model, column, value
