"""Right-for-the-Right-Reasons alignment (Ross et al. 2017).

The loss, for a batch of ``B`` samples with binary correction masks ``A`` (``A = 0`` for
ordinary samples)::

    L = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    penalty = mean_n  sum_{c,i} (A_ni * d/dx_nci sum_k log_softmax(f(x_n))_k)^2

Reduction: the penalty is summed over channels and pixels and averaged over the *whole* batch,
ordinary samples included (they contribute 0 but count in the mean), exactly like the cross
entropy. With 8 alignment + 64 ordinary samples per step the penalty is therefore 8/72 of the
mean penalty of the alignment samples; ``lam`` values from other code bases that sum over the
batch must be divided by the batch size to compare. ``gamma`` (L2 on the weights) is 0 in the
method; the option ``weight_decay`` gives Adam's decoupled-from-the-loss equivalent when wanted.

The input gradients use plain ``torch.autograd.grad(..., create_graph=True)`` (double
backprop), never captum: the penalty must stay differentiable with respect to the parameters.

``lam`` may be a grid: one model is aligned per value, each from the same input model with the
same seeded batches, and the one with the best validation score (``selection``) is returned as
a :class:`~lvlmva.records.TrainedModel` whose details list every point's scores and the rule
that chose. The test split is read only under ``selection = "oracle-test"`` (an upper bound).

The training itself (batches, seeds, Adam, clipping, the per-epoch ``metrics.jsonl`` lines, the
grid) is :class:`lvlmva.training.AlignmentTrainer`'s: :class:`RrrAligner` is a
:class:`~lvlmva.training.LossAligner` that supplies :func:`rrr_loss` and ``lam``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lvlmva.model_selection import SelectionRule
from lvlmva.protocols import PluginOptions
from lvlmva.training import AlignmentOptions

from .xil import PenaltyAligner, batch_mean_loss, check_batch, has_batch_coupling

__all__ = ["rrr_loss", "RrrAligner", "RrrOptions"]


def rrr_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RRR loss of one batch: returns ``(total, ce, penalty)`` with ``total = ce + lam *
    penalty`` (see the module docstring for the reductions: both terms are means over the batch).

    - ``inputs``: float ``[B, C, H, W]``; ``targets``: int64 ``[B]``.
    - ``masks``: ``[B, H, W]`` (broadcast over channels) or ``[B, C, H, W]``, bool or float;
      non-zero = "the model must not use this pixel".

    Input gradients are computed only for samples whose mask is non-empty; the cross entropy
    covers all samples. For models that treat samples independently this is the same number as
    differentiating the whole batch (the penalty of an all-zero mask is 0), at a fraction of the
    double-backprop cost. Models with batch statistics in training mode (batch norm) are
    forwarded as one batch so that the statistics are those of the whole batch.
    """
    masks = check_batch("rrr_loss", inputs, targets, masks)
    b = inputs.shape[0]
    masked = masks.flatten(1).any(dim=1)
    weights = masks.to(inputs.dtype)
    inputs = inputs.detach()

    if has_batch_coupling(model):
        x = inputs.clone().requires_grad_(True)
        logits = model(x)
        ce = F.cross_entropy(logits, targets)
        (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
        penalty = (weights * grad).square().sum() / b
        return ce + lam * penalty, ce, penalty

    sel = masked.nonzero().squeeze(1)
    rest = (~masked).nonzero().squeeze(1)
    ce_sum = inputs.new_zeros(())
    penalty_sum = inputs.new_zeros(())
    if sel.numel():
        x = inputs[sel].requires_grad_(True)
        logits = model(x)
        ce_sum = F.cross_entropy(logits, targets[sel], reduction="sum")
        # Sum over samples and classes: each sample's input gradient only sees its own outputs.
        (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
        penalty_sum = (weights[sel] * grad).square().sum()
    return batch_mean_loss(model, inputs, targets, rest, ce_sum, penalty_sum, lam)


class _RrrLossOptions(PluginOptions):
    """RRR's own option, the weight of its penalty: a base of :class:`RrrOptions` placed so that
    it comes first in the settings reference, before the options every aligner has."""

    lam: float | tuple[float, ...] = Field(
        1e4,
        description="lambda: weight of the input-gradient penalty (penalty = sum over pixels, mean "
        "over the batch of alignment + ordinary samples). Its scale goes with the input scale: "
        "the penalty on 0-255 inputs is 255^2 times smaller than on 0-1 inputs. The default suits "
        "DecoyMNIST on the 0-255 scale with the quick settings (lr 1e-3, 3 epochs); on 0-1 "
        "inputs about 1 is the equivalent. A list (e.g. [1, 10, 100, 1e3, 1e4, 1e5]) is a grid: "
        "one model is aligned per value (k values cost k alignments), each from the same model "
        "with the same seeded batches, and the best by selection (on the validation split unless "
        "'oracle-test') is kept (ties: the first value); a grid needs a validation split.",
    )

    @field_validator("lam")
    @classmethod
    def _lam_is_non_negative(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        # A validator rather than Annotated bounds, so the settings reference shows a plain type.
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise ValueError("lam: a grid needs at least one value")
        if not all(v >= 0 for v in values):  # NaN fails too
            raise ValueError(f"lam must be >= 0 (each value of a grid), got {value}")
        return value


class RrrOptions(AlignmentOptions, _RrrLossOptions):
    """Options of the RRR aligner: ``lam`` and the options of every aligner
    (:class:`~lvlmva.training.AlignmentOptions`)."""

    selection: SelectionRule = Field(
        "average",
        description="How a lam grid is decided: 'average' (validation accuracy; needs no group "
        "labels; the default), 'worst-class' (the lowest per-class validation accuracy; no group "
        "labels), 'worst-group' (worst-group validation accuracy; needs group labels on the "
        "validation split) or 'oracle-test' (worst-group test accuracy: an upper bound, labelled "
        "so). Unused for a single lam.",
    )


class RrrAligner(PenaltyAligner):
    """Fine-tunes a copy of the model with the Right-for-the-Right-Reasons loss (Ross et al. 2017).

    Each step takes ``alignment_batch`` alignment samples with their masks (a seeded permutation
    of the alignment set, repeated as needed) and ``ordinary_batch`` training samples with an
    empty mask (a seeded permutation of the whole training split per epoch; an epoch is one pass
    over it). Tensors stay resident; batches move to ``ctx.device`` per step. The returned model
    is a new module in eval mode; the input model is left unchanged. A ``lam`` grid aligns one
    model per value and returns the best on the validation split as a ``TrainedModel``.
    """

    Options: ClassVar[type[PluginOptions]] = RrrOptions
    seed_name: ClassVar[str] = "rrr"

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        *,
        lam: float,
    ) -> dict[str, torch.Tensor]:
        """:func:`rrr_loss` as named terms: ``loss`` (the total), ``ce`` and ``penalty``."""
        total, ce, penalty = rrr_loss(model, inputs, targets, masks, lam)
        return self.terms(total, ce, penalty)
