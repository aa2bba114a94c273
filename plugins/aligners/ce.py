"""Counterexamples (Teso and Kersting 2019), as the XIL typology code has it.

CE changes the data instead of the loss: for an alignment sample, copies whose spurious
regions are randomised (or replaced), with the label kept, join the training data, and plain
cross entropy does the rest; a model that keeps reading those regions meets them carrying
noise. The typology code (ml-research/A-Typology-for-Exploring-the-Mitigation-of-Shortcut-
Behavior, ``xil_methods/ce.py``) adds ``n_counterexamples`` copies per annotated sample to the
training set once, each masked pixel drawn uniformly from the value range (integers 0-255 for
DecoyMNIST; per channel in [0, 1) for ISIC), and trains on the augmented set with cross
entropy. For a batch of ``B`` samples with correction masks ``A``, and ``k`` counterexamples of
every sample with a mask::

    x~_nj   = x_n with the pixels in A_n replaced, label y_n      (j = 1..k)
    L       = mean over the B samples and their counterexamples of  cross_entropy(f(x), y)

Replacement (``strategy``): ``random`` (the typology code's): every masked value drawn
uniformly between the channel's lowest and highest value (``value_range``, or those of the
step's batch); ``other-sample`` (Teso and Kersting's substitution): the masked pixels copied
from another sample of the step's batch, chosen at random.

Where this departs from the typology code: counterexamples are drawn afresh at every step in
which their sample is drawn (a new draw each time, not one fixed set), beside the 8 + 64
samples of the alignment trainer's batches; the values are continuous in the range rather than
integers. Draws come from torch's generator, which the trainer seeds per alignment
(``f"{seed_name}-stochastic-layers"``), so a run repeats them.

CE has no penalty weight: the loss terms are the mean over everything (``loss``), the cross
entropy of the batch's own samples (``ce``) and that of the counterexamples (``ce_counter``).
``counterexamples`` (k) may be a grid, chosen on the validation split.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from lvlmva.protocols import PluginOptions
from lvlmva.training import AlignmentOptions, LossAligner

from .xil import check_batch

__all__ = ["make_counterexamples", "ce_loss", "CeAligner", "CeOptions"]

Strategy = Literal["random", "other-sample"]


def make_counterexamples(
    inputs: torch.Tensor,
    masks: torch.Tensor,
    count: int,
    *,
    strategy: Strategy = "random",
    value_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counterexamples, rows)``: ``count`` copies of every row of ``inputs`` ``[B, C, H, W]``
    whose mask is not empty, in row order (the copies of a row together), with the masked values
    replaced; ``rows`` int64 the row each copy comes from. ``masks`` ``[B, H, W]`` or
    ``[B, C, H, W]``. ``generator`` (on ``inputs``' device) or torch's global one draws.

    ``random``: uniform in ``value_range`` or, when None, per channel between the batch's lowest
    and highest value. ``other-sample``: the values of another row of the batch, drawn
    uniformly among the other rows (a batch of one row has none: an error)."""
    masks = check_batch("make_counterexamples", inputs, None, masks)
    masks = masks.to(torch.bool).expand_as(inputs)
    rows = masks.flatten(1).any(dim=1).nonzero().squeeze(1).repeat_interleave(count)
    copies = inputs[rows]
    where = masks[rows]
    if strategy == "random":
        if value_range is None:
            low = inputs.amin(dim=(0, 2, 3), keepdim=True)
            high = inputs.amax(dim=(0, 2, 3), keepdim=True)
        else:
            low, high = (
                torch.tensor(v, dtype=inputs.dtype, device=inputs.device) for v in value_range
            )
        draw = torch.rand(
            copies.shape, generator=generator, dtype=inputs.dtype, device=inputs.device
        )
        values = low + draw * (high - low)
    elif strategy == "other-sample":
        b = inputs.shape[0]
        if b < 2 and rows.numel():
            raise ValueError(
                "make_counterexamples: 'other-sample' needs a batch of two rows or more"
            )
        offset = torch.randint(
            1, max(b, 2), (rows.numel(),), generator=generator, device=inputs.device
        )
        values = inputs[(rows + offset) % b]
    else:
        raise ValueError(f"make_counterexamples: unknown strategy {strategy!r}")
    return torch.where(where, values, copies), rows


def ce_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    counterexamples: int,
    *,
    strategy: Strategy = "random",
    value_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CE loss of one batch: ``(total, ce, ce_counter)``: the mean cross entropy over the
    batch and its counterexamples (:func:`make_counterexamples`), over the batch alone, and over
    the counterexamples alone (0 when there are none). One forward pass of both together."""
    extra, rows = make_counterexamples(
        inputs.detach(),
        masks,
        counterexamples,
        strategy=strategy,
        value_range=value_range,
        generator=generator,
    )
    b = inputs.shape[0]
    logits = model(torch.cat([inputs.detach(), extra]))
    losses = F.cross_entropy(logits, torch.cat([targets, targets[rows]]), reduction="none")
    own, counter = losses[:b], losses[b:]
    ce_counter = counter.mean() if counter.numel() else losses.new_zeros(())
    return losses.mean(), own.mean(), ce_counter


class _CeLossOptions(PluginOptions):
    """CE's own options."""

    counterexamples: int | tuple[int, ...] = Field(
        1,
        description="Counterexamples of every alignment sample in a step (the typology code's "
        "n_counterexamples per instance: 1). A list is a grid: one model is aligned per value, "
        "the best by selection on the validation split kept (ties: the first value); a grid "
        "needs a validation split.",
    )
    strategy: Strategy = Field(
        "random",
        description="How a counterexample's masked pixels are replaced: 'random' (the typology "
        "code's: uniform between the lowest and highest value) or 'other-sample' (the pixels of "
        "another sample of the batch, drawn at random).",
    )
    value_range: tuple[float, float] | None = Field(
        None,
        description="[low, high] of the 'random' draws, on the model's input scale (e.g. "
        "[0, 255] for DecoyMNIST on the raw scale). None: per channel, the lowest and highest "
        "value of the step's batch.",
    )

    @field_validator("counterexamples")
    @classmethod
    def _at_least_one(cls, value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise ValueError("counterexamples: a grid needs at least one value")
        if not all(v >= 1 for v in values):
            raise ValueError(f"counterexamples must be >= 1 (each value of a grid), got {value}")
        return value

    @model_validator(mode="after")
    def _ordered_range(self) -> _CeLossOptions:
        if self.value_range is not None and not self.value_range[0] <= self.value_range[1]:
            raise ValueError(
                f"value_range must be [low, high] with low <= high, got {list(self.value_range)}"
            )
        return self


class CeOptions(AlignmentOptions, _CeLossOptions):
    """Options of the CE aligner: its counterexamples and the options of every aligner."""


class CeAligner(LossAligner):
    """Counterexamples (Teso and Kersting 2019): copies with the masked regions randomised, label kept.

    Every step adds ``counterexamples`` copies of each alignment sample in it, their masked
    pixels replaced (``strategy``), and trains with plain cross entropy on the batch and its
    counterexamples. Any model. Batches, seeds, Adam, clipping, the per-epoch loss terms
    (``ce``, ``ce_counter``) and a grid of ``counterexamples`` chosen on the validation split
    are the alignment trainer's.
    """

    Options: ClassVar[type[PluginOptions]] = CeOptions
    seed_name: ClassVar[str] = "ce"

    def loss_params(self) -> dict[str, int | tuple[int, ...]]:
        """``counterexamples``: one value, or a tuple of them (a grid)."""
        return {"counterexamples": self.options.counterexamples}

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        *,
        counterexamples: int,
    ) -> dict[str, torch.Tensor]:
        """:func:`ce_loss` as named terms: ``loss`` (the total), ``ce``, ``ce_counter``."""
        total, ce, counter = ce_loss(
            model,
            inputs,
            targets,
            masks,
            counterexamples,
            strategy=self.options.strategy,
            value_range=self.options.value_range,
        )
        return {"loss": total, "ce": ce, "ce_counter": counter}
