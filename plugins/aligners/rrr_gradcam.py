"""RRR with Grad-CAM instead of input gradients, as the XIL typology code has it.

The typology code (ml-research/A-Typology-for-Exploring-the-Mitigation-of-Shortcut-Behavior,
``xil_methods/xil_loss.py``, ``RRRGradCamLoss``) penalises the Grad-CAM map of the model's last
convolutional layer, for the *predicted* class, inside the correction masks. For a batch of
``B`` samples with correction masks ``A`` (``A = 0`` for ordinary samples)::

    L       = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    G_n     = Grad-CAM of the layer for class argmax_k f(x_n)_k, [h, w], without a ReLU
    S_n     = (G_n - min G_n) / (max G_n - min G_n + 1e-6)
    penalty = mean_n  sum_j (a_nj * S_nj)^2      (resolution = "layer")
    a_nj    = the share of layer cell j's input pixels that A_n covers

With ``resolution = "input"`` the map is upsampled (nearest) to the input's ``H x W`` and the
sum runs over pixels with ``A_n`` itself. Grad-CAM's channel weights are constants (the
gradient that makes them is not differentiated), as in the typology code's Captum map, unless
``differentiate_weights``.

Where this departs from the typology code: it resizes the mask with torchvision's ``Resize``
and rounds it (an integer tensor), so a region smaller than half a layer cell vanishes; here a
cell weighs by the share of it that is masked. It sums the penalty over the batch; here it is
averaged over the whole batch like RRR's (``lam`` = its ``regularization_rate`` x ``B``). Its
``normalization_rate`` is not computed. It switches the model to eval mode to explain it; here
the model stays in the trainer's mode (the built-in models behave alike in both). Masks of
several channels count a pixel masked in any channel (the map has no channels).
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

__all__ = ["rrr_gradcam_loss", "RrrGradCamAligner", "RrrGradCamOptions"]


def rrr_gradcam_loss(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    lam: float,
    *,
    resolution: Resolution = "layer",
    differentiate_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RRR-Grad-CAM loss of one batch: ``(total, ce, penalty)``, ``total = ce + lam *
    penalty`` (module docstring). ``layer`` is a module of ``model`` (:func:`~.xil.conv_layer`);
    ``masks`` ``[B, H, W]`` or ``[B, C, H, W]``, non-zero = "the model must not use this pixel"."""
    spurious = check_batch("rrr_gradcam_loss", inputs, targets, masks).to(inputs.dtype).amax(dim=1)
    inputs = inputs.detach()
    rows, rest = penalty_rows(model, spurious)
    ce_sum = inputs.new_zeros(())
    penalty_sum = inputs.new_zeros(())
    if rows.numel():
        logits, cam = grad_cam(
            model,
            layer,
            inputs[rows],
            lambda z: z.argmax(dim=1),
            differentiate_weights=differentiate_weights,
        )
        ce_sum = F.cross_entropy(logits, targets[rows], reduction="sum")
        saliency = min_max_normalise(cam)
        if resolution == "layer":
            weight = mask_at(spurious[rows], tuple(cam.shape[-2:])).to(saliency.dtype)
            penalty_sum = (weight * saliency).square().sum()
        else:  # the map upsampled (nearest) to the input, summed per cell (nearest_cells)
            sums, _ = nearest_cells(spurious[rows].square(), tuple(cam.shape[-2:]))
            penalty_sum = (saliency.square() * sums.to(saliency.dtype)).sum()
    return batch_mean_loss(model, inputs, targets, rest, ce_sum, penalty_sum, lam)


class _RrrGradCamLossOptions(WeightOptions):
    """RRR-Grad-CAM's own options."""

    lam: float | tuple[float, ...] = Field(
        100.0,
        description="lambda: weight of the Grad-CAM penalty (the squared normalised map inside "
        "the masks, summed over positions, mean over the batch of alignment + ordinary samples; "
        "lam = the typology code's regularization rate x the batch size). The map is scaled to "
        "[0, 1) per sample, so lam does not depend on the input scale; the default suits "
        "DecoyMNIST with the cnn and the quick settings. " + GRID_SENTENCE,
    )
    layer: str | None = Field(None, description=LAYER_DESCRIPTION)
    resolution: Resolution = Field(
        "layer",
        description="Where map and mask meet: 'layer' (the typology code's: the mask at the "
        "layer's h x w, each cell weighted by the share of its pixels that are masked) or "
        "'input' (the map upsampled, nearest, to the image's H x W: finer, for layers with few "
        "positions).",
    )
    differentiate_weights: bool = Field(False, description=DIFFERENTIATE_DESCRIPTION)


class RrrGradCamOptions(AlignmentOptions, _RrrGradCamLossOptions):
    """Options of the RRR-Grad-CAM aligner: its loss options and those of every aligner."""


class RrrGradCamAligner(PenaltyAligner):
    """RRR on Grad-CAM (the XIL typology): penalises the predicted class's map in the masks.

    The Grad-CAM map of a convolutional layer (the last one by default) for the predicted
    class, scaled to [0, 1) per sample, is penalised where the masks cover it. Needs a
    convolutional model: the mlp is refused before anything trains. Batches, seeds, Adam,
    clipping, the per-epoch loss terms (``ce``, ``penalty``) and a ``lam`` grid chosen on the
    validation split are the alignment trainer's.
    """

    Options: ClassVar[type[PluginOptions]] = RrrGradCamOptions
    seed_name: ClassVar[str] = "rrr-gradcam"

    def check_model(self, model: nn.Module) -> list[str]:
        """A model without the layer (the mlp has no Conv2d) is refused with its conv layers."""
        try:
            conv_layer("rrr-gradcam", model, self.options.layer)
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
        lam: float,
    ) -> dict[str, torch.Tensor]:
        """:func:`rrr_gradcam_loss` on the options' layer as named terms: ``loss``, ``ce``,
        ``penalty``."""
        _, layer = conv_layer("rrr-gradcam", model, self.options.layer)
        total, ce, penalty = rrr_gradcam_loss(
            model,
            layer,
            inputs,
            targets,
            masks,
            lam,
            resolution=self.options.resolution,
            differentiate_weights=self.options.differentiate_weights,
        )
        return self.terms(total, ce, penalty)
