"""Right-for-the-Better-Reasons alignment (Shao et al. 2021), as the XIL typology code has it.

RBR replaces RRR's input gradient by an influence-function saliency. The paper constrains the
input gradient of the influence of a training sample on its own loss, Koh and Liang's
``I_pert,loss(z, z) = -grad_theta L(z)^T H^-1 grad_x grad_theta L(z)``, with ``H`` the Hessian
of the training loss. This aligner follows the typology code (ml-research/A-Typology-for-
Exploring-the-Mitigation-of-Shortcut-Behavior, ``xil_methods/xil_loss.py``, ``RBRLoss``), which
simplifies it in two places: ``H`` is the identity, and the influence's direction
``grad_theta L(z)^T H^-1`` is a vector of ones, so that the influence saliency is the input
gradient of the sum of all entries of the parameter gradient; and the saliency it penalises is
that, times RRR's input gradient, elementwise. For a batch of ``B`` samples with correction
masks ``A`` (``A = 0`` for ordinary samples)::

    L       = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    s_n     = sum over every entry of grad_theta cross_entropy(f(x_n), y_n)
    penalty = mean_n  sum_{c,i} (A_ni * d s_n / dx_nci * d/dx_nci sum_k log_softmax(f(x_n))_k)^2

Reduction: the typology code takes ``s`` from the batch's *mean* cross entropy (so each
sample's influence gradient carries a factor 1/B) and *sums* the penalty over the batch; here
``s_n`` is each sample's own and the penalty is averaged over the whole batch, like RRR's. On
the same batch of ``B`` samples this penalty is therefore ``B`` times the typology code's
(``B^2`` from the factor, ``1/B`` from the mean), and ``lam`` is its ``regularization_rate``
divided by ``B``. Its ``normalization_rate`` (a ratio of the loss terms over the training set
before training) is not computed: ``lam`` alone weighs the penalty.

The penalty needs third derivatives of the network (the gradient, with respect to the
parameters, of an input gradient of a parameter gradient): on the masked rows only, as for RRR,
unless a layer mixes the samples of the batch (batch norm in training mode).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lvlmva.protocols import PluginOptions
from lvlmva.training import AlignmentOptions

from .xil import (
    GRID_SENTENCE,
    PenaltyAligner,
    WeightOptions,
    batch_mean_loss,
    check_batch,
    penalty_rows,
)

__all__ = ["rbr_loss", "RbrAligner", "RbrOptions"]


def rbr_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RBR loss of one batch: ``(total, ce, penalty)``, ``total = ce + lam * penalty``
    (module docstring: the formula and its reductions). ``inputs`` float ``[B, C, H, W]``,
    ``targets`` int64 ``[B]``, ``masks`` ``[B, H, W]`` or ``[B, C, H, W]`` (non-zero = "the
    model must not use this pixel")."""
    weights = check_batch("rbr_loss", inputs, targets, masks).to(inputs.dtype)
    inputs = inputs.detach()
    rows, rest = penalty_rows(model, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    ce_sum = inputs.new_zeros(())
    penalty_sum = inputs.new_zeros(())
    if rows.numel():
        x = inputs[rows].requires_grad_(True)
        logits = model(x)
        own = F.cross_entropy(logits, targets[rows], reduction="sum")
        ce_sum = own
        # Each sample's input moves only its own loss: the input gradient of the summed
        # parameter gradient of the summed loss is every sample's d s_n / dx_n.
        param_grads = torch.autograd.grad(own, params, create_graph=True, allow_unused=True)
        s = sum(g.sum() for g in param_grads if g is not None)
        if not isinstance(s, torch.Tensor) or not s.requires_grad:
            influence = torch.zeros_like(x)  # no parameter gradient depends on the input
        else:
            (influence,) = torch.autograd.grad(s, x, create_graph=True)
        (saliency,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
        penalty_sum = (weights[rows] * influence * saliency).square().sum()
    return batch_mean_loss(model, inputs, targets, rest, ce_sum, penalty_sum, lam)


class _RbrLossOptions(WeightOptions):
    """RBR's own option, the weight of its penalty."""

    lam: float | tuple[float, ...] = Field(
        3e4,
        description="lambda: weight of the influence-times-input-gradient penalty (sum over "
        "pixels, mean over the batch of alignment + ordinary samples; lam = the typology code's "
        "regularization rate / the batch size). The penalty's size differs by orders of "
        "magnitude between models and input scales: the default suits DecoyMNIST on the 0-255 "
        "scale with the mlp and the quick settings (lr 1e-3, clipping at 10; 1e5 there already "
        "costs accuracy), the cnn on the same data needs about 1e8. A grid is the safer "
        "choice. " + GRID_SENTENCE,
    )


class RbrOptions(AlignmentOptions, _RbrLossOptions):
    """Options of the RBR aligner: ``lam`` and the options of every aligner."""


class RbrAligner(PenaltyAligner):
    """Right for the Better Reasons (Shao et al. 2021): penalises an influence-function saliency.

    The saliency is the typology code's: the input gradient of the summed parameter gradient of
    the sample's loss (the identity for the Hessian), times the input gradient of the summed
    log-probabilities; its square is penalised inside the masks. Any differentiable model; a
    step costs third derivatives on the alignment samples. Batches, seeds, Adam, clipping, the
    per-epoch loss terms (``ce``, ``penalty``) and a ``lam`` grid chosen on the validation split
    are the alignment trainer's.
    """

    Options: ClassVar[type[PluginOptions]] = RbrOptions
    seed_name: ClassVar[str] = "rbr"

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        *,
        lam: float,
    ) -> dict[str, torch.Tensor]:
        """:func:`rbr_loss` as named terms: ``loss`` (the total), ``ce`` and ``penalty``."""
        total, ce, penalty = rbr_loss(model, inputs, targets, masks, lam)
        return self.terms(total, ce, penalty)
