"""What the XIL aligners (``rbr``, ``rrr-gradcam``, ``hint``, ``cdep``, ``ce``) share.

- :func:`check_batch`: the shapes of a batch, its masks broadcast over channels.
- :func:`penalty_rows`: the rows a penalty is computed on (those with a mask), and the rest;
  every row when a layer mixes the samples of a batch (batch norm in training mode).
- :func:`conv_layer` / :func:`grad_cam`: Grad-CAM of a convolutional layer as a function of the
  parameters, so that a loss on it trains the model.
- :func:`min_max_normalise`, :func:`mask_at`, :func:`nearest_cells`: the per-sample normalisation of
  the XIL typology code (ml-research/A-Typology-for-Exploring-the-Mitigation-of-Shortcut-Behavior,
  ``util.norm_saliencies_fast``) and the two ways a map and a mask of different sizes meet.
- :class:`WeightOptions`: the check of every aligner's penalty weight ``lam`` (one value or a
  grid).
- :func:`batch_mean_loss`: ``(total, ce, penalty)`` from the sums of a batch, the cross
  entropy of the rows without a penalty added; :class:`PenaltyAligner`: an aligner whose loss
  is ``ce + lam * penalty`` (its ``lam`` as the loss parameter, its terms named ``loss``,
  ``ce``, ``penalty``).

Every penalty here is reduced like RRR's: summed over pixels (or classes) of a sample and
averaged over the *whole* batch, ordinary samples included (they contribute 0), so that the
terms keep their size whatever share of the batch the alignment samples are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from lvlmva.protocols import PluginOptions
from lvlmva.training import LossAligner

__all__ = [
    "batch_mean_loss",
    "PenaltyAligner",
    "check_batch",
    "has_batch_coupling",
    "penalty_rows",
    "conv_layer",
    "grad_cam",
    "min_max_normalise",
    "mask_at",
    "nearest_cells",
    "Resolution",
    "WeightOptions",
    "GRID_SENTENCE",
    "LAYER_DESCRIPTION",
    "DIFFERENTIATE_DESCRIPTION",
]

#: Where a Grad-CAM map and a mask are compared: at the layer's ``h x w`` (the mask is
#: averaged over each layer cell) or at the input's ``H x W`` (the map is upsampled, nearest).
Resolution = Literal["layer", "input"]

#: the constant the typology code adds to the range of a map before dividing by it
NORMALISE_EPS = 1e-6


def check_batch(
    who: str,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    masks: torch.Tensor,
    name: str = "masks",
) -> torch.Tensor:
    """``masks`` (``[B, H, W]`` or ``[B, C, H, W]``, bool or float) checked against ``inputs``
    ``[B, C, H, W]`` and ``targets`` ``[B]`` (unless None), returned as ``[B, 1 or C, H, W]``."""
    if inputs.dim() != 4:
        raise ValueError(f"{who}: inputs must be [B,C,H,W], got {tuple(inputs.shape)}")
    b = inputs.shape[0]
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[0] != b or masks.shape[2:] != inputs.shape[2:]:
        raise ValueError(
            f"{who}: {name} must be [B,H,W] or [B,C,H,W] matching inputs {tuple(inputs.shape)}, "
            f"got {tuple(masks.shape)}"
        )
    if masks.shape[1] not in (1, inputs.shape[1]):
        raise ValueError(
            f"{who}: {name} channels {masks.shape[1]} do not broadcast to {inputs.shape[1]}"
        )
    if targets is not None and tuple(targets.shape) != (b,):
        raise ValueError(f"{who}: targets must be [{b}], got {tuple(targets.shape)}")
    return masks


def has_batch_coupling(model: nn.Module) -> bool:
    """True when a layer mixes the samples of a batch (batch norm using batch statistics): the
    batch may then not be split into separately forwarded parts without changing the loss."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


def penalty_rows(model: nn.Module, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, rest)``: indices of the rows whose mask is not empty and of the others; every
    row in ``rows`` when the model couples the samples of a batch (forwarded as one batch).

    The penalties' expensive parts (double backprop, decompositions) run on ``rows`` only; for
    models that treat samples independently that is the same number as running them on the
    whole batch, since a row without a mask adds nothing."""
    if has_batch_coupling(model):
        every = torch.arange(masks.shape[0], device=masks.device)
        return every, every[:0]
    masked = masks.flatten(1).any(dim=1)
    return masked.nonzero().squeeze(1), (~masked).nonzero().squeeze(1)


def batch_mean_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rest: torch.Tensor,
    ce_sum: torch.Tensor,
    penalty_sum: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, ce, penalty)`` of a batch of ``B = len(inputs)`` rows whose penalty rows gave
    ``ce_sum`` (their summed cross entropy) and ``penalty_sum``: the summed cross entropy of the
    ``rest`` rows (forwarded here) is added, both sums are divided by ``B`` and ``total = ce +
    lam * penalty``."""
    b = inputs.shape[0]
    if rest.numel():
        ce_sum = ce_sum + F.cross_entropy(model(inputs[rest]), targets[rest], reduction="sum")
    ce = ce_sum / b
    penalty = penalty_sum / b
    return ce + lam * penalty, ce, penalty


class PenaltyAligner(LossAligner):
    """A :class:`~lvlmva.training.LossAligner` whose loss is ``ce + lam * penalty``: its loss
    parameter is the options' ``lam`` (one value, or a tuple of them: a grid) and
    :meth:`terms` names a loss function's ``(total, ce, penalty)`` for the trainer."""

    def loss_params(self) -> dict[str, float | tuple[float, ...]]:
        """``lam``: one value, or a tuple of them (a grid)."""
        return {"lam": self.options.lam}  # type: ignore[attr-defined]

    @staticmethod
    def terms(total: torch.Tensor, ce: torch.Tensor, penalty: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named terms of ``(total, ce, penalty)``: ``loss``, ``ce`` and ``penalty``."""
        return {"loss": total, "ce": ce, "penalty": penalty}


def conv_layer(who: str, model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer a Grad-CAM loss explains: ``name`` in the model's
    ``named_modules()``, or the last ``Conv2d`` when ``name`` is None (the typology code's
    ``get_last_conv_layer``). ``ValueError`` naming the model's conv layers otherwise."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if n and isinstance(m, nn.Conv2d)]
    listed = ", ".join(convs[-12:]) if convs else "none"
    if name is None:
        if not convs:
            raise ValueError(
                f"{who} explains a convolutional layer (Grad-CAM), and {type(model).__name__} has "
                f'no Conv2d layer: use a convolutional model (model.plugin = "cnn" or "resnet")'
            )
        return convs[-1], modules[convs[-1]]
    if not name or name not in modules:
        raise ValueError(
            f"{who}: layer = {name!r}: {type(model).__name__} has no layer of that name; its "
            f"conv layers: {listed}"
        )
    return name, modules[name]


def grad_cam(
    model: nn.Module,
    layer: nn.Module,
    inputs: torch.Tensor,
    classes: Callable[[torch.Tensor], torch.Tensor],
    *,
    differentiate_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, cam)`` of one forward pass: ``cam`` ``[B, 1, h, w]`` is Grad-CAM of ``layer``
    for the classes ``classes(logits)`` (int64 ``[B]``), without a ReLU (Captum's
    ``LayerGradCam(..., relu_attributions=False)``, as the typology code calls it):
    ``cam = sum_k a_k A_k`` with ``A_k`` the layer's output channel k and ``a_k`` the spatial
    mean of the class logit's gradient on it.

    ``cam`` depends on the parameters through the activations ``A``; the channel weights ``a``
    are constants unless ``differentiate_weights`` (then the loss backpropagates through the
    gradient that made them: double backprop). The typology code takes Captum's map, whose
    weights come from a gradient without ``create_graph``: constants."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
        raise ValueError(
            f"Grad-CAM needs a layer that runs once per forward pass and returns one tensor; "
            f"{type(layer).__name__} ran {len(captured)} times"
        )
    act = captured[0]
    if act.dim() != 4:
        raise ValueError(
            f"Grad-CAM needs a layer with outputs [B, K, h, w]; {type(layer).__name__} gives "
            f"{tuple(act.shape)}"
        )
    chosen = classes(logits.detach())
    # a one-hot product rather than gather: gather's backward is nondeterministic on CUDA
    score = (logits * F.one_hot(chosen, logits.shape[1]).to(logits.dtype)).sum()
    (grads,) = torch.autograd.grad(
        score, act, create_graph=differentiate_weights, retain_graph=True
    )
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return logits, (weights * act).sum(dim=1, keepdim=True)


def min_max_normalise(maps: torch.Tensor, positive_only: bool = False) -> torch.Tensor:
    """Each sample's map scaled to [0, 1): ``(m - min) / (max - min + 1e-6)`` over all its
    values (the typology code's ``norm_saliencies_fast``); with ``positive_only`` negative
    values are set to 0 first."""
    flat = maps.flatten(1)
    if positive_only:
        flat = flat.clamp(min=0)
    low = flat.amin(dim=1, keepdim=True)
    shifted = flat - low
    return (shifted / (shifted.amax(dim=1, keepdim=True) + NORMALISE_EPS)).view_as(maps)


def mask_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks ``[B, H, W]`` (or ``[B, 1, H, W]``) at a layer's ``h x w``: float ``[B, 1, h, w]``,
    each cell the share of its input pixels that the mask covers (adaptive average pooling).

    The typology code resizes the mask with torchvision's (bilinear) ``Resize`` and, the mask
    being an integer tensor, rounds: a cell then counts only when about half of it is masked,
    and a region smaller than half a cell (the 4 x 4 decoy under a 7 x 7 layer of a 28 x 28
    image) vanishes. The share keeps it, in proportion to its size."""
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if not masks.is_floating_point():
        masks = masks.float()
    return F.adaptive_avg_pool2d(masks, size)


def nearest_cells(values: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What nearest-neighbour upsampling of an ``h x w`` map to the input's ``H x W`` (Captum's
    ``LayerAttribution.interpolate`` default, which the typology code's HINT uses) pairs with
    each cell of the map: ``(sums, pixels)``, the sum of ``values`` ``[B, H, W]`` over the input
    pixels that take the cell's value (float ``[B, 1, h, w]``) and how many they are
    (``[1, 1, h, w]``).

    A sum over pixels of the upsampled map ``up(S)`` against a mask is then a sum over cells:
    ``sum_i (up(S)_i - R_i)^2 = sum_c (pixels_c S_c^2 - 2 S_c sums_c(R) + sums_c(R^2))`` and
    ``sum_i (A_i up(S)_i)^2 = sum_c S_c^2 sums_c(A^2)``: the same number without upsampling
    the map, and so without the backward pass of upsampling, which CUDA runs
    nondeterministically."""
    h, w = size
    height, width = values.shape[-2:]
    dtype = values.dtype if values.is_floating_point() else torch.float32
    values = values.to(dtype)

    def owners(n: int, out: int) -> torch.Tensor:
        # the map cell each input row (column) takes its value from, as F.interpolate picks it
        index = torch.arange(n, dtype=torch.float32, device=values.device).view(1, 1, n, 1)
        picked = F.interpolate(index, size=(out, 1), mode="nearest").view(out).long()
        return F.one_hot(picked, n).to(dtype)  # [out, n]

    rows, cols = owners(h, height), owners(w, width)  # [H, h], [W, w]
    sums = torch.einsum("ic,bij,jd->bcd", rows, values, cols).unsqueeze(1)
    pixels = (rows.sum(0)[:, None] * cols.sum(0)[None, :]).view(1, 1, h, w)
    return sums, pixels


class WeightOptions(PluginOptions):
    """The check of a penalty weight ``lam``, one value or a grid: a base of an aligner's loss
    options, which declare ``lam`` with their own default and description."""

    @field_validator("lam", check_fields=False)
    @classmethod
    def _lam_is_non_negative(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        # A validator rather than Annotated bounds, so the settings reference shows a plain type.
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise ValueError("lam: a grid needs at least one value")
        if not all(v >= 0 for v in values):  # NaN fails too
            raise ValueError(f"lam must be >= 0 (each value of a grid), got {value}")
        return value


#: the grid sentence every lam description ends with
GRID_SENTENCE = (
    "A list is a grid: one model is aligned per value (k values cost k alignments), each from "
    "the same model with the same seeded batches, and the best by selection on the validation "
    "split is kept (ties: the first value); a grid needs a validation split."
)

#: the ``layer`` option of the Grad-CAM aligners
LAYER_DESCRIPTION = (
    "The convolutional layer whose Grad-CAM the loss constrains, by its name in the model's "
    'named_modules() (e.g. "features.2" of the cnn model); its output must be [B, K, h, w]. '
    "None: the model's last Conv2d layer (the typology code's choice). A model without a "
    "Conv2d layer (the mlp) or an unknown name is refused before anything trains."
)

#: the ``differentiate_weights`` option of the Grad-CAM aligners
DIFFERENTIATE_DESCRIPTION = (
    "Backpropagate the loss through Grad-CAM's channel weights too (the spatial means of the "
    "class logit's gradient; double backprop, about twice the step time). False: the weights "
    "are constants and the loss trains the model through the layer's activations only, as the "
    "typology code's Captum map does."
)
