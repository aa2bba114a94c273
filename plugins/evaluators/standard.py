"""The standard evaluator: accuracy, group accuracies and the alignment score on the test split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from lvlmva.metrics import (
    accuracy,
    alignment_score,
    average_group_accuracy,
    group_accuracies,
    proportion_weighted_accuracy,
    spurious_attribution_share,
    worst_group_accuracy,
)
from lvlmva.protocols import Figure, Metric, PluginOptions, RunContext
from lvlmva.records import SpuriousDataset
from lvlmva.training import predict_logits

__all__ = ["StandardEvaluator", "StandardEvaluatorOptions"]

#: ``(model, inputs [B,C,H,W], targets [B]) -> attributions [B,C,H,W]``
AttributeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class StandardEvaluatorOptions(PluginOptions):
    """Options of the standard evaluator."""

    batch_size: int = Field(
        1024,
        ge=1,
        description="Test images per forward pass.",
        json_schema_extra={"fingerprint": False},
    )
    alignment_score_samples: int = Field(
        256,
        ge=0,
        description="Test images (a seeded random choice) on which the alignment score is "
        "computed when the data set has true spurious masks; 0 = skip the score.",
    )
    attribution_batch_size: int = Field(
        64,
        ge=1,
        description="Test images per call of the attributor for the alignment score.",
        json_schema_extra={"fingerprint": False},
    )


class StandardEvaluator:
    """Test accuracy, per-group accuracy, AGA, WGA, proportion-weighted accuracy, alignment score.

    Result keys: ``accuracy``, ``test_samples``; with group labels ``group_accuracy`` (group
    name -> accuracy, ``None`` for a group absent from the test split), ``aga``, ``wga`` and
    ``proportion_weighted_accuracy`` (test group accuracies weighted by the training split's
    group proportions; by the test split's own when the training split has no groups); with an
    ``attribute`` function and true test masks ``alignment_score`` (computed on
    ``alignment_score_samples`` test images, attributions for the true class),
    ``alignment_score_samples`` and ``alignment_score_skipped`` (all-zero attributions).

    Figure (with group labels): ``group_accuracy.png``, every model's accuracy per group side by
    side, the worst group of each model marked.
    """

    Options: ClassVar[type[PluginOptions]] = StandardEvaluatorOptions
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("accuracy", "Accuracy", description="share of test samples classified correctly"),
        Metric("aga", "AGA", description="average group accuracy: the mean of the per-group accuracies"),
        Metric("wga", "WGA", description="worst-group accuracy: the lowest per-group accuracy"),
        Metric(
            "proportion_weighted_accuracy",
            "Prop.-weighted acc.",
            summary=False,
            description="test group accuracies weighted by the training split's group proportions",
        ),
        Metric(
            "alignment_score",
            "Alignment score",
            description="share of absolute attribution outside the true spurious feature",
        ),
        Metric("group_accuracy", "Accuracy per group", summary=False),
    )
    #: the split its metrics are computed on (tables say so)
    split: ClassVar[str] = "test"
    #: the training split's group labels weight the proportion-weighted accuracy
    also_reads: ClassVar[tuple[str, ...]] = ("train",)
    needs_groups: ClassVar[bool] = False
    needs_true_masks: ClassVar[bool] = False

    def __init__(self, options: StandardEvaluatorOptions) -> None:
        self.options = options

    def evaluate(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        ctx: RunContext,
        attribute: AttributeFn | None = None,
    ) -> dict[str, Any]:
        test = data.test
        if len(test) == 0:
            raise ValueError("StandardEvaluator: the test split is empty")
        logits = predict_logits(model, test.inputs, ctx.device, batch_size=self.options.batch_size)
        pred = logits.argmax(dim=1)
        out: dict[str, Any] = {"accuracy": accuracy(pred, test.labels), "test_samples": len(test)}
        if test.groups is not None:
            out.update(self._group_metrics(pred, data))
        if (
            attribute is not None
            and test.spurious_masks is not None
            and self.options.alignment_score_samples > 0
        ):
            out.update(self._alignment_score(model, data, ctx, attribute))
        return out

    def _group_metrics(self, pred: torch.Tensor, data: SpuriousDataset) -> dict[str, Any]:
        test = data.test
        assert test.groups is not None
        num_groups = len(data.group_names) or int(test.groups.max()) + 1
        names = data.group_names or tuple(str(g) for g in range(num_groups))
        accs = group_accuracies(pred, test.labels, test.groups, num_groups)
        weights = None
        if data.train.groups is not None:
            weights = torch.bincount(data.train.groups.long(), minlength=num_groups).double()
            if weights.numel() != num_groups:
                raise ValueError(
                    f"StandardEvaluator: training groups go up to {weights.numel() - 1}, but "
                    f"there are {num_groups} group names"
                )
        return {
            "group_accuracy": {
                name: (None if torch.isnan(acc) else float(acc))
                for name, acc in zip(names, accs, strict=True)
            },
            "aga": average_group_accuracy(pred, test.labels, test.groups, num_groups),
            "wga": worst_group_accuracy(pred, test.labels, test.groups, num_groups),
            "proportion_weighted_accuracy": proportion_weighted_accuracy(
                pred, test.labels, test.groups, num_groups, group_weights=weights
            ),
        }

    def _alignment_score(
        self, model: nn.Module, data: SpuriousDataset, ctx: RunContext, attribute: AttributeFn
    ) -> dict[str, Any]:
        test = data.test
        assert test.spurious_masks is not None
        n = min(self.options.alignment_score_samples, len(test))
        chosen = torch.randperm(len(test), generator=ctx.generator("alignment-score-samples"))[:n]
        chosen = chosen.sort().values
        step = self.options.attribution_batch_size
        parts = []
        for start in range(0, n, step):
            idx = chosen[start : start + step]
            attr = attribute(model, test.inputs[idx], test.labels[idx])
            want = (int(idx.shape[0]), *test.images.shape[1:])
            if tuple(attr.shape) != want:
                raise ValueError(f"StandardEvaluator: attribute returned {tuple(attr.shape)} for inputs {want}")
            parts.append(attr.detach().float().cpu())
        attributions = torch.cat(parts)
        masks = test.spurious_masks[chosen]
        skipped = int(spurious_attribution_share(attributions, masks).isnan().sum())
        score = alignment_score(attributions, masks)
        return {
            "alignment_score": None if skipped == n else score,
            "alignment_score_samples": n,
            "alignment_score_skipped": skipped,
        }

    def figures(self, models: dict[str, dict[str, Any]], labels: dict[str, str], ctx: RunContext) -> list[Figure]:
        """``group_accuracy.png``: bars of each model's accuracy per test group (none without
        group labels)."""
        per_model = {m: v["group_accuracy"] for m, v in models.items() if isinstance(v.get("group_accuracy"), dict)}
        if not per_model:
            return []
        from matplotlib.figure import Figure as Canvas

        from lvlmva.report import save_figure

        groups = list(dict.fromkeys(g for values in per_model.values() for g in values))
        width = 0.8 / len(per_model)
        fig = Canvas(figsize=(min(12.0, max(5.0, 0.4 * len(groups) + 2.0)), 3.8), layout="constrained")
        ax = fig.subplots()
        for k, (model, values) in enumerate(per_model.items()):
            heights = [values.get(g) for g in groups]
            xs = [i + (k - (len(per_model) - 1) / 2) * width for i in range(len(groups))]
            shown = [(x, h) for x, h in zip(xs, heights, strict=True) if h is not None]
            ax.bar([x for x, _ in shown], [h for _, h in shown], width=width, color=f"C{k % 10}",
                   label=labels.get(model, model))  # fmt: skip
            if shown:  # the worst group, which WGA reports
                x, h = min(shown, key=lambda xh: xh[1])
                ax.plot([x], [h], marker="v", color="black", markersize=6)
        many = len(groups) > 4
        ax.set_xticks(range(len(groups)), groups, fontsize=7, rotation=45 if many else 0, ha="right" if many else "center")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test accuracy")
        ax.grid(axis="y", alpha=0.3)
        # above the bars, so that it hides none of them
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, len(per_model)), frameon=False)
        save_figure(fig, ctx.stage_dir / "group_accuracy.png")
        return [
            Figure(
                "group_accuracy.png",
                "Test accuracy per group and model; a triangle marks each model's worst group (its WGA).",
            )
        ]
