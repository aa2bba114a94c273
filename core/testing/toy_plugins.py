"""Toy mitigators and a toy aligner for tests and examples: test helpers, not baselines.

They exercise the :class:`lvlmva.protocols.Mitigator` role, the :class:`lvlmva.training.Trainer`
(index lists, sample weights) and the alignment trainer, so that runs can compare methods
before more real ones exist; their numbers mean nothing about shortcut mitigation. Load them
with ``LVLMVA_PLUGINS=lvlmva.testing.toy_plugins`` or ``lvlmva.registry.register_module``:

- ``toy-retrain``: a fresh model trained on a seeded random share of the training split.
- ``toy-upweight``: a fresh model trained with the samples of the smaller groups upweighted.
- ``toy-masked-input`` (aligner): cross-entropy on the alignment samples with their masked
  pixels set to zero, mixed with ordinary samples as RRR mixes them (a loss, no penalty).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn

from lvlmva.hookspecs import hookimpl
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset
from lvlmva.training import AlignmentOptions, LossAligner

if TYPE_CHECKING:
    from lvlmva.registry import PluginRegistry
    from lvlmva.training import Trainer

__all__ = [
    "ToyRetrain",
    "ToyRetrainOptions",
    "ToyUpweight",
    "ToyUpweightOptions",
    "ToyMaskedInput",
    "lvlmva_register",
]

_EPOCHS_HELP = "Passes over the chosen samples; None = the run's train.epochs."


class ToyRetrainOptions(PluginOptions):
    """Options of ``toy-retrain``."""

    fraction: float = Field(0.5, gt=0, le=1, description="Share of the training split trained on.")
    epochs: int | None = Field(None, ge=0, description=_EPOCHS_HELP)
    fail_on_seeds: list[int] = Field(
        default_factory=list,
        description="Raise on runs with these seeds (to test how a study records a failed method).",
    )
    sleep_s: float = Field(0.0, ge=0, description="Seconds to wait before training (to test interrupting a study).")


class ToyRetrain:
    """Test helper, not a baseline: retrains a fresh model on a random share of the training split.

    The share is the first ``ceil(fraction * N)`` entries of a permutation drawn from
    ``ctx.generator("toy-retrain")``; ``original`` is not used.
    """

    Options: ClassVar[type[PluginOptions]] = ToyRetrainOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = False

    def __init__(self, options: ToyRetrainOptions) -> None:
        self.options = options

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> nn.Module:
        if ctx.seed in self.options.fail_on_seeds:
            raise RuntimeError(f"toy-retrain was told to fail on seed {ctx.seed}")
        if self.options.sleep_s:
            time.sleep(self.options.sleep_s)
        n = len(data.train)
        keep = math.ceil(self.options.fraction * n)
        order = torch.randperm(n, generator=ctx.generator("toy-retrain"))
        return trainer.fit(
            data.train, indices=order[:keep], epochs=self.options.epochs, tag="toy-retrain"
        )


class ToyUpweightOptions(PluginOptions):
    """Options of ``toy-upweight``."""

    upweight: float = Field(
        5.0, gt=0, description="Weight of the samples of the smaller half of the groups (else 1)."
    )
    epochs: int | None = Field(None, ge=0, description=_EPOCHS_HELP)


class ToyUpweight:
    """Test helper, not a baseline: trains a fresh model with the smaller groups upweighted.

    Of the groups present in the training split, the ``G // 2`` with the fewest training
    samples (ties: the lower group index) get weight ``upweight``, the others 1; ``original``
    is not used.
    """

    Options: ClassVar[type[PluginOptions]] = ToyUpweightOptions
    needs_groups: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = False

    def __init__(self, options: ToyUpweightOptions) -> None:
        self.options = options

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> nn.Module:
        return trainer.fit(
            data.train, weights=self.weights(data), epochs=self.options.epochs, tag="toy-upweight"
        )

    def weights(self, data: SpuriousDataset) -> torch.Tensor:
        """float32 ``[N]``: the weight of each training sample."""
        groups = data.train.groups
        if groups is None:
            raise ValueError("toy-upweight needs group labels on the training split")
        present, counts = torch.unique(groups, return_counts=True)
        # A stable sort by count keeps ties in group order (unique returns groups sorted).
        smaller = present[torch.sort(counts, stable=True).indices[: present.numel() // 2]]
        weights = torch.ones(len(data.train), dtype=torch.float32)
        weights[torch.isin(groups, smaller)] = self.options.upweight
        return weights


class ToyMaskedInput(LossAligner):
    """Test helper, not a method: fine-tunes with the masked pixels of the alignment samples set
    to zero (plain cross-entropy), on the alignment trainer."""

    Options: ClassVar[type[PluginOptions]] = AlignmentOptions
    seed_name: ClassVar[str] = "toy-masked-input"

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        kept = inputs * (~masks).unsqueeze(1).to(inputs.dtype)
        ce = nn.functional.cross_entropy(model(kept), targets)
        return {"loss": ce, "masked_share": masks.float().mean()}


@hookimpl
def lvlmva_register(registry: PluginRegistry) -> None:
    registry.add("mitigator", "toy-retrain", ToyRetrain)
    registry.add("mitigator", "toy-upweight", ToyUpweight)
    registry.add("aligner", "toy-masked-input", ToyMaskedInput)
