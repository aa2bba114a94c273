"""An evaluator that reports plain accuracy on one split."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lvlmva import Metric, PluginOptions, RunContext, SpuriousDataset

__all__ = ["AccuracyEvaluator"]


class AccuracyEvaluator:
    """Toy evaluator: accuracy of the model on one split."""

    class Options(PluginOptions):
        split: Literal["test", "train"] = Field("test", description="The split to score.")
        batch_size: int = Field(256, ge=1, description="Images per forward pass.")

    metrics = (
        Metric("accuracy", "Accuracy", description="share of samples classified correctly"),
        Metric("samples", "Samples", higher_is_better=None, format="d", summary=False),
    )
    needs_groups = False
    needs_true_masks = False

    def __init__(self, options: AccuracyEvaluator.Options) -> None:
        self.options = options

    @property
    def split(self) -> str:
        """The split the metrics are computed on (tables name it)."""
        return self.options.split

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        ctx: RunContext,
        attribute: Callable[..., torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """``{"accuracy": share correct, "samples": n}`` on ``options.split``."""
        split = getattr(data, self.options.split)
        model.eval().to(ctx.device)
        step = self.options.batch_size
        predicted = torch.cat(
            [
                model(split.images[i : i + step].to(ctx.device)).argmax(dim=1).cpu()
                for i in range(0, len(split), step)
            ]
        )
        return {
            "accuracy": float((predicted == split.labels).float().mean()),
            "samples": len(split),
        }
