"""Gradient attributions from Captum: Integrated Gradients, GradientSHAP and Grad-CAM.

They keep the contract of the DeepLiftShap attributor: float32 CPU attributions
``[B, C, H, W]`` of ``inputs`` ``[B, C, H, W]`` for the classes ``targets``, computed on a copy of
the model in eval mode (the caller's model, its mode and its parameters' ``requires_grad`` are
left as they are), seeded through ``ctx`` where they draw anything. Plain gradients need no
model preparation: a ReLU module used several times per forward pass (torchvision's ResNets)
is only a problem for DeepLift's per-module rules.

Grad-CAM explains a layer, not the input: its map has one value per spatial position of the
layer (``[B, 1, h, w]``). It is upsampled to the input's ``H x W`` and spread evenly over the
``C`` input channels (each channel holds ``map / C``), so that the channel sum, which is what
PPEPS-WGM segments and what the alignment score weighs, is the upsampled Grad-CAM map itself,
and the output has the shape every attributor returns.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext

__all__ = [
    "GradCamAttributor",
    "GradCamOptions",
    "GradientShapAttributor",
    "GradientShapOptions",
    "IntegratedGradientsAttributor",
    "IntegratedGradientsOptions",
    "conv_layer_names",
]

#: how many conv layer names an error message lists (the deepest ones: Grad-CAM's usual choice)
_LISTED_LAYERS = 12


def _check_inputs(inputs: torch.Tensor, targets: torch.Tensor, reference_pool: torch.Tensor) -> None:
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be [B, C, H, W], got {tuple(inputs.shape)}")
    if tuple(targets.shape) != (inputs.shape[0],):
        raise ValueError(f"targets must be [{inputs.shape[0]}] class indices, got {tuple(targets.shape)}")
    if reference_pool.dim() != 4 or reference_pool.shape[1:] != inputs.shape[1:]:
        raise ValueError(
            f"reference_pool must be [N, {', '.join(map(str, inputs.shape[1:]))}], "
            f"got {tuple(reference_pool.shape)}"
        )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _explained_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy in eval mode on ``device`` whose parameters need no gradients (only the input's
    or a layer's are taken) and whose activations are out-of-place (Grad-CAM keeps a layer's
    output for the backward pass; an in-place activation after it would overwrite it)."""
    explained = copy.deepcopy(model).to(device).eval()
    for module in explained.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    for param in explained.parameters():
        param.requires_grad_(False)
    return explained


def _draw_background(reference_pool: torch.Tensor, size: int, ctx: RunContext, salt: str) -> torch.Tensor:
    n = int(reference_pool.shape[0])
    if n < size:
        raise ValueError(
            f"reference_pool has {n} samples but background_size is {size}; lower "
            "attributor.background_size or provide more training data"
        )
    index = torch.randperm(n, generator=ctx.generator(salt))[:size]
    return reference_pool[index]


class _CaptumAttributor:
    """What ``attribute`` does the same in the three: the inputs checked, then ``_prepare``
    (what can fail even without inputs: a background drawn, a layer looked up), no inputs giving
    zeros, and ``_explain`` of the rest on a copy of the model (:func:`_explained_copy`)."""

    def attribute(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        reference_pool: torch.Tensor,
        ctx: RunContext,
    ) -> torch.Tensor:
        """float32 CPU attributions ``[B, C, H, W]`` of ``inputs`` for class ``targets``."""
        _check_inputs(inputs, targets, reference_pool)
        prepared = self._prepare(model, reference_pool, ctx)
        if inputs.shape[0] == 0:
            return torch.zeros(inputs.shape, dtype=torch.float32)
        return self._explain(_explained_copy(model, ctx.device), inputs, targets, ctx, prepared)

    def _prepare(self, model: nn.Module, reference_pool: torch.Tensor, ctx: RunContext) -> object:
        return None

    def _explain(
        self, explained: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, ctx: RunContext, prepared: object
    ) -> torch.Tensor:
        raise NotImplementedError


def _in_batches(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    size: int,
    ctx: RunContext,
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``explain(x, target)`` of ``size`` inputs at a time (float32 and int64 on ``ctx.device``),
    concatenated as float32 on the CPU."""
    out = []
    for part in _chunks(inputs.shape[0], size):
        attr = explain(inputs[part].to(ctx.device, torch.float32), targets[part].to(ctx.device, torch.int64))
        out.append(attr.detach().to("cpu", torch.float32))
    return torch.cat(out)


# -- Integrated Gradients ---------------------------------------------------------------------


class IntegratedGradientsOptions(PluginOptions):
    n_steps: int = Field(
        50,
        ge=1,
        description="Points on the straight path from the baseline to the input at which "
        "gradients are taken (Captum's default 50). More steps: attributions closer to summing "
        "to f(x) - f(baseline).",
    )
    method: Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"] = Field(
        "gausslegendre",
        description="Quadrature rule of the path integral (Captum's methods; its default is gausslegendre).",
    )
    baseline: float = Field(
        0.0,
        description="The value of every pixel of the baseline input, on the scale the model "
        "reads (0: black on raw 0-255 or 0-1 inputs, the mean pixel on standardised ones).",
    )
    multiply_by_inputs: bool = Field(
        True,
        description="Multiply the averaged gradients by (input - baseline) (Captum's default: "
        "global attributions that sum to about f(x) - f(baseline)); false: the path-averaged gradients.",
    )
    batch_size: int = Field(
        4,
        ge=1,
        description="Inputs per Captum call; each call runs batch_size x n_steps examples through the model.",
        json_schema_extra={"fingerprint": False},
    )


class IntegratedGradientsAttributor(_CaptumAttributor):
    """Integrated Gradients (Captum) from a constant baseline image for the target classes.

    Deterministic: no background is drawn. The model is copied, put in eval mode and left as
    it was.
    """

    Options = IntegratedGradientsOptions
    needs_background = False

    def __init__(self, options: IntegratedGradientsOptions) -> None:
        self.options = options

    def _explain(
        self, explained: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, ctx: RunContext, prepared: object
    ) -> torch.Tensor:
        from captum.attr import IntegratedGradients

        opts = self.options
        explainer = IntegratedGradients(explained, multiply_by_inputs=opts.multiply_by_inputs)

        def explain(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            baselines = torch.full_like(x, opts.baseline)
            return explainer.attribute(x, baselines=baselines, target=target, n_steps=opts.n_steps, method=opts.method)

        return _in_batches(inputs, targets, opts.batch_size, ctx, explain)


# -- GradientSHAP ---------------------------------------------------------------------------------


class GradientShapOptions(PluginOptions):
    background_size: int = Field(
        25,
        ge=1,
        description="Baseline samples drawn (seeded) from the training data; GradientSHAP "
        "picks a baseline among them for every gradient it takes.",
    )
    n_samples: int = Field(
        25,
        ge=1,
        description="Gradients averaged per input, each at a random point between a random "
        "baseline and the input (Captum's default is 5; more: less noise).",
    )
    stdevs: float = Field(
        0.0,
        ge=0.0,
        description="Standard deviation of Gaussian noise added to the input at each sample, "
        "on the scale the model reads (Captum's default 0: none).",
    )
    multiply_by_inputs: bool = Field(
        True,
        description="Multiply the gradients by (input - baseline) (Captum's default: global "
        "attributions whose expected sum is f(x) - E[f(background)]).",
    )


class GradientShapAttributor(_CaptumAttributor):
    """GradientSHAP (Captum): expected gradients between background samples and the input.

    Background: ``background_size`` samples of ``reference_pool`` drawn without replacement
    from ``ctx.generator("gradient-shap-background")``. Captum draws the baselines, the points
    on the path and the noise from numpy's and torch's global generators; each input is
    attributed on its own with both seeded from the run seed and the input's content (and
    restored afterwards), so an input's attribution does not depend on the batch it comes in
    and a run does not disturb the random state of anything else.
    """

    Options = GradientShapOptions
    needs_background = True

    def __init__(self, options: GradientShapOptions) -> None:
        self.options = options

    def draw_background(self, reference_pool: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """The ``background_size`` baseline samples this attributor uses for a run."""
        return _draw_background(reference_pool, self.options.background_size, ctx, "gradient-shap-background")

    def _prepare(self, model: nn.Module, reference_pool: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        return self.draw_background(reference_pool, ctx).to(ctx.device, torch.float32)

    def _explain(
        self, explained: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, ctx: RunContext, prepared: object
    ) -> torch.Tensor:
        from captum.attr import GradientShap

        opts = self.options
        background = prepared
        explainer = GradientShap(explained, multiply_by_inputs=opts.multiply_by_inputs)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        out = []
        for i in range(inputs.shape[0]):
            x = inputs[i : i + 1].to(torch.float32)
            target = int(targets[i])
            digest = hashlib.sha256(x.numpy().tobytes() + target.to_bytes(8, "little", signed=True)).hexdigest()[:16]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator(f"gradient-shap:{digest}")))
            numpy_state = np.random.get_state()
            try:
                with torch.random.fork_rng(devices=devices):
                    np.random.seed(seed)
                    torch.manual_seed(seed)
                    attr = explainer.attribute(
                        x.to(ctx.device),
                        baselines=background,
                        target=target,
                        n_samples=opts.n_samples,
                        stdevs=opts.stdevs,
                    )
            finally:
                np.random.set_state(numpy_state)
            out.append(attr.detach().to("cpu", torch.float32))
        return torch.cat(out)


# -- Grad-CAM -----------------------------------------------------------------------------------


def conv_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``Conv2d`` layers, in the order ``named_modules`` gives."""
    return [name for name, module in model.named_modules() if name and isinstance(module, nn.Conv2d)]


def _describe_candidates(model: nn.Module) -> str:
    convs = conv_layer_names(model)
    if not convs:
        return (
            f"conv layers of {type(model).__name__}: none (Grad-CAM needs a convolutional model, "
            'such as model.plugin = "cnn" or "resnet")'
        )
    shown = convs[-_LISTED_LAYERS:]
    more = f" (the last {len(shown)} of {len(convs)})" if len(convs) > len(shown) else ""
    return f"conv layers of {type(model).__name__}{more}: {', '.join(shown)}"


class GradCamOptions(PluginOptions):
    layer: str | None = Field(
        None,
        min_length=1,
        description="The layer whose output Grad-CAM explains, by its name in the model's "
        "named_modules() (e.g. \"features.2\" of the cnn model, \"layer4\" of a ResNet); its "
        "output must be [B, K, h, w]. None: the model's last Conv2d layer. An unknown name is an "
        "error that lists the model's conv layers.",
    )
    relu_attributions: bool = Field(
        False,
        description="Keep only the positive part of the map, as the Grad-CAM paper does "
        "(Captum's default is false). Left off, negative evidence stays in the map, so that "
        'segmenter.effect = "negative" or "absolute" can segment it; "positive" gives the same '
        "clusters either way.",
    )
    upsample: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear",
        description="Interpolation from the layer's h x w to the input's H x W (bilinear and "
        "bicubic without aligned corners).",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Inputs per Captum call.",
        json_schema_extra={"fingerprint": False},
    )


class GradCamAttributor(_CaptumAttributor):
    """Grad-CAM (Captum's LayerGradCam) of a named layer, upsampled to the input size.

    The map at a layer position is ``sum_k a_k A_k`` with ``A_k`` the layer's channel k and
    ``a_k`` the spatial mean of the target logit's gradient on it. The upsampled map is spread
    evenly over the input channels (each holds ``map / C``): its channel sum is the map, and
    PPEPS-WGM and the alignment score read channel sums. Deterministic; no background.
    """

    Options = GradCamOptions
    needs_background = False

    def __init__(self, options: GradCamOptions) -> None:
        self.options = options

    def layer_name(self, model: nn.Module) -> str:
        """The layer this attributor explains in ``model``; ``ValueError`` naming the layer and
        listing the model's conv layers when there is none of that name (or no conv layer)."""
        if self.options.layer is None:
            convs = conv_layer_names(model)
            if not convs:
                raise ValueError(f"attributor.layer = None (the last conv layer): {_describe_candidates(model)}")
            return convs[-1]
        names = {name for name, _ in model.named_modules() if name}
        if self.options.layer not in names:
            raise ValueError(
                f"attributor.layer = {self.options.layer!r}: {type(model).__name__} has no layer of "
                f"that name; {_describe_candidates(model)}"
            )
        return self.options.layer

    def check_model(self, model: nn.Module) -> list[str]:
        """Problems that stop this attributor on ``model`` (an unknown layer name, a model
        without conv layers), found without running it."""
        try:
            self.layer_name(model)
        except ValueError as exc:
            return [str(exc)]
        return []

    def _prepare(self, model: nn.Module, reference_pool: torch.Tensor, ctx: RunContext) -> str:
        return self.layer_name(model)

    def _explain(
        self, explained: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, ctx: RunContext, prepared: object
    ) -> torch.Tensor:
        """The upsampled map divided by C in every channel."""
        from captum.attr import LayerGradCam

        opts = self.options
        name = str(prepared)
        explainer = LayerGradCam(explained, explained.get_submodule(name))
        c, h, w = (int(v) for v in inputs.shape[1:])
        align = None if opts.upsample == "nearest" else False

        def explain(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            cam = explainer.attribute(x, target=target, relu_attributions=opts.relu_attributions)
            if cam.dim() != 4:
                raise ValueError(
                    f"attributor.layer = {name!r}: its output has no spatial dimensions (Grad-CAM of "
                    f"it has shape {tuple(cam.shape)}, not [B, 1, h, w]); choose a layer with outputs "
                    f"[B, K, h, w]; {_describe_candidates(explained)}"
                )
            cam = torch.nn.functional.interpolate(cam, size=(h, w), mode=opts.upsample, align_corners=align)
            return (cam / c).expand(-1, c, -1, -1)

        return _in_batches(inputs, targets, opts.batch_size, ctx, explain).contiguous()
