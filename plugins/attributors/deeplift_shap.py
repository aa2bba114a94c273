"""DeepLiftShap attributions (Captum) with a model-preparation step for DeepLift.

Captum's DeepLift keeps per-module state (the input and output of each nonlinearity) between
the forward and the backward pass. A module used more than once in one forward pass has that
state overwritten, so DeepLift raises or returns wrong attributions (captum issues 578, 1082,
1104). torchvision's ResNet blocks call ``self.relu`` two (BasicBlock) or three (Bottleneck)
times per forward. :func:`prepare_model_for_deeplift` gives every use its own module.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
import torch.fx
from pydantic import Field
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lvlmva.protocols import PluginOptions, RunContext

__all__ = [
    "DeepLiftBasicBlock",
    "DeepLiftBottleneck",
    "DeepLiftShapAttributor",
    "DeepLiftShapOptions",
    "count_module_calls",
    "prepare_model_for_deeplift",
]


def _disable_inplace(model: nn.Module) -> None:
    # DeepLift's hooks read a nonlinearity's input after the forward pass; an in-place
    # activation has overwritten it by then.
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False


def _copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A new instance of ``module`` whose parameters and buffers are the original's (a reused
    layer with weights stays one set of weights), with no hooks carried over."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
        sub._backward_hooks.clear()
    return clone


class DeepLiftBasicBlock(BasicBlock):
    """torchvision BasicBlock whose two ReLU calls use ``relu1`` and ``relu2``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class DeepLiftBottleneck(Bottleneck):
    """torchvision Bottleneck whose three ReLU calls use ``relu1``, ``relu2`` and ``relu3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


_TORCHVISION_BLOCKS: dict[type, tuple[int, type]] = {
    BasicBlock: (2, DeepLiftBasicBlock),
    Bottleneck: (3, DeepLiftBottleneck),
}


def _split_torchvision_blocks(model: nn.Module) -> None:
    """Rewrite torchvision ResNet blocks in place: each ReLU call gets its own module."""
    for module in list(model.modules()):
        # Exact type match: a user subclass may have its own forward, which the generic pass
        # handles instead.
        if type(module) not in _TORCHVISION_BLOCKS:
            continue
        uses, new_cls = _TORCHVISION_BLOCKS[type(module)]
        relu = module.relu
        del module.relu
        for k in range(1, uses + 1):
            module.add_module(f"relu{k}", _copy_sharing_parameters(relu))
        module.__class__ = new_cls


def count_module_calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """How often each submodule is called in one forward pass on ``example_input``.

    Keys are qualified module names (a module registered under several names counts under its
    first); the root module is left out.
    """
    counts: Counter[str] = Counter()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_hook(lambda *_, n=name: counts.update([n])))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return dict(counts)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; re-raised with the reason kept
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx to give each module call its "
            f"own module ({type(exc).__name__}: {exc}); pass example_input to detect reuse by "
            "running the model, or give each use its own module in the model's code"
        ) from exc


def _reused_targets(traced: torch.fx.GraphModule) -> set[str]:
    calls = Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    return {target for target, count in calls.items() if count > 1}


def _split_call_sites(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every ``call_module`` site of a traced graph its own module instance."""
    seen: Counter[str] = Counter()
    for node in traced.graph.nodes:
        if node.op != "call_module":
            continue
        seen[node.target] += 1
        if seen[node.target] == 1:
            continue
        new_target = f"{node.target}_use{seen[node.target]}"
        original = traced.get_submodule(node.target)
        traced.add_submodule(new_target, _copy_sharing_parameters(original))
        node.target = new_target
    traced.recompile()
    return traced


def prepare_model_for_deeplift(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> nn.Module:
    """A deep copy of ``model`` on which Captum's DeepLift is correct.

    - In-place activations are made out-of-place.
    - torchvision ``BasicBlock``/``Bottleneck`` get one ReLU module per call (the class is
      swapped for :class:`DeepLiftBasicBlock`/:class:`DeepLiftBottleneck`, whose forward uses
      ``relu1``, ``relu2``, ``relu3``; the state dict is unchanged as ReLUs hold no state).
    - Any other module called more than once per forward pass (found with forward hooks on
      ``example_input``, or in the ``torch.fx`` graph without one) gets one copy per call site
      through a ``torch.fx`` rewrite (the result is then a ``GraphModule``); copies share the
      original's parameters.

    Raises ``ValueError`` when reuse remains or cannot be checked. The original model is not
    changed; the copy keeps its training/eval mode.
    """
    prepared = copy.deepcopy(model)
    _disable_inplace(prepared)
    _split_torchvision_blocks(prepared)
    if example_input is None:
        traced = _trace(prepared)
        if not _reused_targets(traced):
            return prepared
    else:
        calls = count_module_calls(prepared, example_input)
        if all(count == 1 for count in calls.values()):
            return prepared
        traced = _trace(prepared)
    prepared = _split_call_sites(traced)
    _disable_inplace(prepared)
    if example_input is not None:
        left = {n: c for n, c in count_module_calls(prepared, example_input).items() if c > 1}
        if left:
            raise ValueError(
                f"modules still called more than once per forward pass after preparation: "
                f"{left}; give each use its own module instance in the model's code"
            )
    return prepared


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _module_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class DeepLiftShapOptions(PluginOptions):
    background_size: int = Field(
        25,
        ge=2,
        description="Background samples drawn (seeded) from the training data; DeepLiftShap "
        "averages DeepLift over them (method.md 2.1). Captum needs at least 2.",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Inputs per DeepLiftShap call; each call runs batch_size x background_size "
        "examples through the model.",
        json_schema_extra={"fingerprint": False},
    )
    multiply_by_inputs: bool = Field(
        True,
        description="Multiply multipliers by (input - baseline) (Captum's default: global "
        "attributions that sum to f(x) - E[f(background)]).",
    )
    engine: Literal["captum", "rescale"] = Field(
        "captum",
        description='"captum": Captum\'s DeepLiftShap (per-module hooks). "rescale": the same rescale '
        "rule as autograd functions on ReLU and MaxPool2d (lvlmva.plugins.attributors.rescale): on ResNet-50 "
        "at 224 x 224 on a 2-core CPU 1.2x the raw forward and backward passes, where Captum takes "
        "2-3.5x (docs/results.md); equal to "
        "Captum on models without max pools, and complete (attributions sum to f(x) - E[f(b)]) through "
        "max pools, where Captum's rule is not. Refuses models with other nonlinear modules. "
        "prepare_model does not apply (the rule needs no module per use).",
    )
    prepare_model: bool = Field(
        True,
        description="Attribute a copy of the model in which every activation use has its own "
        "module and none is in-place (needed for torchvision ResNets).",
    )


class DeepLiftShapAttributor:
    """DeepLiftShap attributions for the given target classes against a seeded background.

    The model is copied, prepared for DeepLift and put in eval mode; the caller's model is left
    as it is. Background: ``background_size`` samples of ``reference_pool`` drawn without
    replacement from ``ctx.generator("deeplift-background")``.
    """

    Options = DeepLiftShapOptions
    needs_background = True

    def __init__(self, options: DeepLiftShapOptions) -> None:
        self.options = options

    def draw_background(self, reference_pool: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """The ``background_size`` reference samples this attributor uses for a run."""
        k = self.options.background_size
        n = int(reference_pool.shape[0])
        if n < k:
            raise ValueError(
                f"reference_pool has {n} samples but background_size is {k}; lower "
                "attributor.background_size or provide more training data"
            )
        index = torch.randperm(n, generator=ctx.generator("deeplift-background"))[:k]
        return reference_pool[index]

    def attribute(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        reference_pool: torch.Tensor,
        ctx: RunContext,
    ) -> torch.Tensor:
        """float32 CPU attributions ``[B, C, H, W]`` of ``inputs`` for class ``targets``."""
        from captum.attr import DeepLiftShap

        if inputs.dim() != 4:
            raise ValueError(f"inputs must be [B, C, H, W], got {tuple(inputs.shape)}")
        if tuple(targets.shape) != (inputs.shape[0],):
            raise ValueError(
                f"targets must be [{inputs.shape[0]}] class indices, got {tuple(targets.shape)}"
            )
        if reference_pool.dim() != 4 or reference_pool.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"reference_pool must be [N, {', '.join(map(str, inputs.shape[1:]))}], "
                f"got {tuple(reference_pool.shape)}"
            )
        device = ctx.device
        background = self.draw_background(reference_pool, ctx).to(device, torch.float32)
        if inputs.shape[0] == 0:
            return torch.zeros(inputs.shape, dtype=torch.float32)
        targets = targets.to(torch.int64)
        if self.options.engine == "rescale":
            # the rule's autograd functions keep their own inputs per call, so a reused or
            # in-place ReLU needs no splitting: only the swap of ReLU and MaxPool2d (on a copy)
            from .rescale import deeplift_shap_rescale, prepare_rescale

            ruled = prepare_rescale(model).to(device).eval()
            for param in ruled.parameters():
                param.requires_grad_(False)
            return torch.cat([
                deeplift_shap_rescale(ruled, inputs[part].to(device, torch.float32), targets[part].to(device),
                                      background, self.options.multiply_by_inputs).detach().to("cpu", torch.float32)
                for part in _chunks(inputs.shape[0], self.options.batch_size)
            ])  # fmt: skip
        if self.options.prepare_model:
            example = inputs[:1].to(_module_device(model), torch.float32)
            explained = prepare_model_for_deeplift(model, example_input=example)
        else:
            explained = copy.deepcopy(model)
        explained = explained.to(device).eval()
        # Only input gradients are needed.
        for param in explained.parameters():
            param.requires_grad_(False)
        explainer = DeepLiftShap(explained, multiply_by_inputs=self.options.multiply_by_inputs)
        out = []
        for part in _chunks(inputs.shape[0], self.options.batch_size):
            x = inputs[part].to(device, torch.float32)
            with warnings.catch_warnings():
                # captum announces on every call that it hooks non-linear modules for the
                # duration of the attribution; that is expected here, not a problem to report.
                warnings.filterwarnings(
                    "ignore", message="Setting forward, backward hooks", category=UserWarning
                )
                attr = explainer.attribute(x, baselines=background, target=targets[part].to(device))
            out.append(attr.detach().to("cpu", torch.float32))
        return torch.cat(out)
