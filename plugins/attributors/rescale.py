"""DeepLift's rescale rule as autograd functions: Captum's DeepLift multipliers without its
per-module hooks.

Captum runs the model on ``cat([inputs, baselines])`` with a forward pre-hook, a forward hook
and a backward hook on every nonlinearity; the hooks clone each activation and recompute the
differences at the backward pass. Here each ``nn.ReLU`` and ``nn.MaxPool2d`` of a prepared copy
of the model is swapped for a module whose autograd function applies the rule itself, so the
work is one forward and one backward over the paired batch, plus the rule's few element-wise
operations. The ReLU rule computes its multiplier in the forward pass and keeps only that (half
the batch's size), so that its backward is one multiplication, as ReLU's own backward is one
threshold: on ResNet-50 at 224 x 224 on a 2-core CPU the whole attribution then takes 1.2x the
raw forward and backward passes (benchmarks/bench_medical.py).

The rules, for a batch whose first half are inputs and second half their references (Captum's
``nonlinear`` and ``maxpool`` rules, applied to both halves alike):

- ReLU: ``grad_in = grad_out * (relu(x) - relu(x0)) / (x - x0)``, or the ordinary gradient where
  ``|x - x0| < eps``, the same multiplier for both halves;
- MaxPool2d: the output differences against the element-wise maximum of both halves' pooled
  maps are routed back to the positions that were maximal (added up where windows overlap),
  summed over both halves and divided by the input difference; the ordinary gradient where
  ``|x - x0| < eps``. This is Captum's rule without its two losses: Captum routes with
  ``max_unpool2d``, which overwrites overlapping windows, and takes the indices of its stored
  input, so its attributions do not sum to the output difference through a max pool (issue
  1276). Here they do; on models without max pools both engines give the same numbers.

Other nonlinear modules (Sigmoid, Tanh, ELU, ...) are refused: use Captum's engine for them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EPS", "RescaleReLU", "RescaleMaxPool2d", "prepare_rescale", "deeplift_shap_rescale", "UNSUPPORTED"]

EPS = 1e-10

#: nonlinear modules Captum's DeepLift has rules for that this engine does not
UNSUPPORTED = (nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.MaxPool1d, nn.MaxPool3d, nn.GELU, nn.SiLU)


class _ReLURule(torch.autograd.Function):
    # The multiplier is computed in the forward pass, where the input is at hand anyway, and
    # only it is kept (half the batch's size): the input need not outlive the forward, and the
    # backward is a single multiplication, as close to ReLU's own backward as the rule allows.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(x)
        x_in, x_ref = x.chunk(2)
        y_in, y_ref = y.chunk(2)
        delta_in = torch.sub(x_in, x_ref)
        multiplier = torch.sub(y_in, y_ref).div_(delta_in)
        # a pair equal before the ReLU gives 0/0; its multiplier is the ordinary ReLU gradient
        # (the input's side of the threshold; both sides agree unless the pair straddles 0
        # within EPS), as wherever |delta| < EPS. The smallest |delta| (a reduction, no copy)
        # tells whether any is there: rare, patched where it happens.
        if bool(torch.linalg.vector_norm(delta_in, ord=float("-inf")) < EPS):
            multiplier = torch.where(delta_in.abs() < EPS, (x_in > 0).to(x.dtype), multiplier)
        ctx.save_for_backward(multiplier)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (multiplier,) = ctx.saved_tensors
        # one multiplier per (input, reference) pair serves both halves
        return (grad.view(2, *multiplier.shape) * multiplier).view_as(grad)


class _MaxPoolRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):  # type: ignore[override]
        out, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(x, out, indices)
        ctx.params = (kernel_size, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, out, indices = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.params
        x_in, x_ref = x.chunk(2)
        out_in, out_ref = out.chunk(2)
        delta_in = torch.cat(2 * [x_in - x_ref])
        xmax = torch.max(out_in, out_ref)
        delta_out = torch.cat([xmax - out_ref, out_in - xmax])
        # route every window's difference to the position that was maximal, adding where
        # windows overlap (max_unpool2d would overwrite: that loses part of the difference)
        routed = torch.zeros_like(x).flatten(2)
        routed.scatter_add_(2, indices.flatten(2), (grad * delta_out).flatten(2))
        routed = routed.view_as(x)
        a, b = routed.chunk(2)
        routed = torch.cat(2 * [a + b])
        small = delta_in.abs() < EPS
        new = routed / delta_in
        if bool(small.any()):
            ordinary = torch.ops.aten.max_pool2d_with_indices_backward(
                grad, x, _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), ceil_mode, indices
            )
            new = torch.where(small, ordinary, new)
        return new, None, None, None, None, None


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class RescaleReLU(nn.Module):
    """ReLU whose backward is DeepLift's rescale rule on a paired (inputs; references) batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLURule.apply(x)


class RescaleMaxPool2d(nn.Module):
    """MaxPool2d whose backward is Captum's DeepLift max-pool rule on a paired batch."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        if pool.return_indices:
            raise ValueError("MaxPool2d with return_indices=True is not supported by the rescale engine")
        self.params = (pool.kernel_size, pool.stride if pool.stride is not None else pool.kernel_size, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaxPoolRule.apply(x, *self.params)


def prepare_rescale(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every ReLU and MaxPool2d (in-place or reused ones too: each call of the
    rule keeps its own input) swapped for its rescale-rule module: a copy, or the model itself with
    ``inplace``. Raises ``ValueError`` naming a nonlinear module this engine has no rule for."""
    prepared = model if inplace else copy.deepcopy(model)
    for name, module in list(prepared.named_modules()):
        if isinstance(module, UNSUPPORTED):
            raise ValueError(
                f"the rescale engine has no rule for {name} ({type(module).__name__}); "
                'set attributor.engine = "captum"'
            )
    for parent in list(prepared.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, child_name, RescaleReLU())
            elif type(child) is nn.MaxPool2d:
                setattr(parent, child_name, RescaleMaxPool2d(child))
    return prepared


def deeplift_shap_rescale(
    prepared: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, background: torch.Tensor, multiply_by_inputs: bool = True
) -> torch.Tensor:
    """DeepLiftShap attributions ``[B, C, H, W]``: for every input, DeepLift against each
    background sample (one paired forward and backward for all of them), averaged over the
    background, as Captum's DeepLiftShap computes them."""
    b, k = inputs.shape[0], background.shape[0]
    expanded = inputs.repeat_interleave(k, dim=0)
    refs = background.repeat(b, 1, 1, 1)
    batch = torch.cat([expanded, refs]).detach().requires_grad_(True)
    out = prepared(batch)
    t = targets.repeat_interleave(k).to(out.device)
    picked = out.gather(1, torch.cat([t, t])[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, batch)
    grad = grad[: b * k]
    attributions = (expanded - refs) * grad if multiply_by_inputs else grad
    return attributions.view(b, k, *inputs.shape[1:]).mean(dim=1)
