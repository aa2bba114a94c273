"""HINT alignment (Selvaraju et al. 2019), as the XIL typology code simplifies it.

HINT rewards attribution inside the regions judged relevant instead of penalising it inside the
spurious ones. The paper aligns the *ranking* of Grad-CAM importances with human importances
(a pairwise ranking loss over regions); the typology code (ml-research/A-Typology-for-
Exploring-the-Mitigation-of-Shortcut-Behavior, ``xil_methods/xil_loss.py``, ``HINTLoss``, with
``upsample=True`` as its learner builds it) replaces the ranking by a squared difference
between the normalised Grad-CAM map and the binary relevance mask. This aligner follows the
typology code. For a batch of ``B`` samples with relevance masks ``R`` (the regions judged
relevant; ordinary samples have none)::

    L       = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    G_n     = Grad-CAM of the layer for the true class y_n, [h, w], without a ReLU
              (with positive_only: negative values set to 0)
    S_n     = (G_n - min G_n) / (max G_n - min G_n + 1e-6)
    penalty = (1/B) sum over samples with a relevance mask of  sum_i (up(S_n)_i - R_ni)^2

``up`` upsamples the map (nearest) to the input's ``H x W`` (``resolution = "input"``, the
typology learner's); with ``resolution = "layer"`` the mask is taken to the layer's ``h x w``
instead (each cell the share of its pixels judged relevant) and the sum runs over cells.
Samples without a relevance mask (the ordinary ones; an alignment sample whose every region was
judged spurious) add nothing. The spurious masks do not enter the loss: HINT reads only the
relevant regions (``alignment.relevant``; with the true masks, everything off them), which the
trainer hands it per batch.

Where this departs from the typology code: it sums the squared differences over the batch;
here they are averaged over the whole batch like RRR's penalty (``lam`` = its
``regularization_rate`` x ``B``). Its ``normalization_rate`` is not computed. It switches the
model to eval mode to explain it; here the model stays in the trainer's mode. Grad-CAM's
channel weights are constants as in its Captum map, unless ``differentiate_weights``.
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
    DIFFERENTIATE_DESCRIPTION,
    GRID_SENTENCE,
    LAYER_DESCRIPTION,
    PenaltyAligner,
    Resolution,
    WeightOptions,
    batch_mean_loss,
    check_batch,
    conv_layer,
    grad_cam,
    mask_at,
    min_max_normalise,
    nearest_cells,
    penalty_rows,
)

__all__ = ["hint_loss", "HintAligner", "HintOptions"]


def hint_loss(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    relevant: torch.Tensor,
    lam: float,
    *,
    resolution: Resolution = "input",
    positive_only: bool = False,
    differentiate_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The HINT loss of one batch: ``(total, ce, penalty)``, ``total = ce + lam * penalty``
    (module docstring). ``layer`` is a module of ``model``; ``relevant`` ``[B, H, W]`` (or
    ``[B, C, H, W]``, a pixel relevant in any channel counts), non-zero = "the model should use
    this pixel"; rows without any relevant pixel add no penalty."""
    wanted = check_batch("hint_loss", inputs, targets, relevant, "relevant")
    wanted = wanted.to(inputs.dtype).amax(dim=1)
    inputs = inputs.detach()
    rows, rest = penalty_rows(model, wanted)
    ce_sum = inputs.new_zeros(())
    penalty_sum = inputs.new_zeros(())
    if rows.numel():
        classes = targets[rows]
        logits, cam = grad_cam(
            model,
            layer,
            inputs[rows],
            lambda _z: classes,
            differentiate_weights=differentiate_weights,
        )
        ce_sum = F.cross_entropy(logits, classes, reduction="sum")
        saliency = min_max_normalise(cam, positive_only=positive_only)
        target = wanted[rows]
        cells = tuple(cam.shape[-2:])
        if resolution == "input":  # the map upsampled (nearest) to the input, summed per cell
            hits, pixels = nearest_cells(target, cells)
            squares, _ = nearest_cells(target.square(), cells)
            s, hits, squares = saliency, hits.to(saliency.dtype), squares.to(saliency.dtype)
            misfit = pixels.to(s.dtype) * s.square() - 2 * s * hits + squares
        else:
            misfit = (saliency - mask_at(target, cells).to(saliency.dtype)).square()
        per_row = misfit.flatten(1).sum(dim=1)
        has = target.flatten(1).any(dim=1).to(per_row.dtype)  # coupled batches hold all rows
        penalty_sum = (per_row * has).sum()
    return batch_mean_loss(model, inputs, targets, rest, ce_sum, penalty_sum, lam)


class _HintLossOptions(WeightOptions):
    """HINT's own options."""

    lam: float | tuple[float, ...] = Field(
        0.03,
        description="lambda: weight of the HINT penalty (the squared difference between the "
        "normalised Grad-CAM map and the relevance mask, summed over pixels, mean over the "
        "batch of alignment + ordinary samples; lam = the typology code's regularization rate x "
        "the batch size). The map is scaled to [0, 1) per sample, so lam does not depend on the "
        "input scale. The default suits DecoyMNIST with the cnn and the quick settings, where "
        "larger values cost accuracy when the relevant regions are everything off the decoy "
        "(lam 10 took the test accuracy of a 3,000-digit run from 0.69 to 0.50). " + GRID_SENTENCE,
    )
    layer: str | None = Field(None, description=LAYER_DESCRIPTION)
    resolution: Resolution = Field(
        "input",
        description="Where map and relevance mask meet: 'input' (the typology learner's: the "
        "map upsampled, nearest, to the image's H x W) or 'layer' (the mask at the layer's "
        "h x w, each cell the share of its pixels judged relevant).",
    )
    positive_only: bool = Field(
        False,
        description="Set the map's negative values to 0 before scaling it (the typology code's "
        "positive_only; off there by default).",
    )
    differentiate_weights: bool = Field(False, description=DIFFERENTIATE_DESCRIPTION)


class HintOptions(AlignmentOptions, _HintLossOptions):
    """Options of the HINT aligner: its loss options and those of every aligner."""


class HintAligner(PenaltyAligner):
    """HINT (Selvaraju et al. 2019, as the XIL typology has it): rewards Grad-CAM in relevant regions.

    The true class's Grad-CAM map of a convolutional layer (the last one by default), scaled to
    [0, 1) per sample, is pulled towards the mask of the regions judged relevant (squared
    difference). Reads ``alignment.relevant``, which the pipeline gives every aligner; needs a
    convolutional model: the mlp is refused before anything trains. Batches, seeds, Adam,
    clipping, the per-epoch loss terms (``ce``, ``penalty``) and a ``lam`` grid chosen on the
    validation split are the alignment trainer's.
    """

    Options: ClassVar[type[PluginOptions]] = HintOptions
    seed_name: ClassVar[str] = "hint"
    needs_relevant: ClassVar[bool] = True

    def check_model(self, model: nn.Module) -> list[str]:
        """A model without the layer (the mlp has no Conv2d) is refused with its conv layers."""
        try:
            conv_layer("hint", model, self.options.layer)
        except ValueError as exc:
            return [str(exc)]
        return []

    def loss(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: torch.Tensor,
        *,
        relevant: torch.Tensor,
        lam: float,
    ) -> dict[str, torch.Tensor]:
        """:func:`hint_loss` on the options' layer as named terms: ``loss``, ``ce``,
        ``penalty``. ``masks`` (the spurious regions) are not read."""
        _, layer = conv_layer("hint", model, self.options.layer)
        total, ce, penalty = hint_loss(
            model,
            layer,
            inputs,
            targets,
            relevant,
            lam,
            resolution=self.options.resolution,
            positive_only=self.options.positive_only,
            differentiate_weights=self.options.differentiate_weights,
        )
        return self.terms(total, ce, penalty)
