"""Choice of the alignment samples by the predictive entropy of the original model."""

from __future__ import annotations

import torch
from torch import nn

from .options import SelectionOptions
from .protocols import RunContext
from .records import AlignmentSet, Split
from .training import predict_logits

__all__ = ["predictive_entropy", "select_alignment_set"]


def predictive_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H = -sum_k p_k log p_k`` in nats per row of ``logits`` ``[N, K]`` (float32 ``[N]``).

    Computed from ``log_softmax`` so that saturated probabilities give 0, never NaN.
    """
    log_p = torch.log_softmax(logits.double(), dim=1)
    return (-(log_p.exp() * log_p).sum(dim=1)).clamp_min(0).float()


def select_alignment_set(
    model: nn.Module, split: Split, options: SelectionOptions, ctx: RunContext
) -> AlignmentSet:
    """Pick ``options.n`` samples of ``split`` (a ``ValueError`` when the split is smaller:
    a silently smaller alignment set would change what the results mean).

    - ``lowest-entropy``: the most confident samples, most confident first;
    - ``highest-entropy``: the least confident, least confident first;
    - ``random``: a uniform draw without replacement from ``ctx.generator("selection-random")``.

    Ties keep index order (stable sort). ``scores`` is the entropy of each chosen sample.
    """
    n = options.n
    if n > len(split):
        raise ValueError(f"selection.n = {n}, but the split has only {len(split)} samples")
    entropy = predictive_entropy(predict_logits(model, split.inputs, ctx.device))
    if options.strategy == "lowest-entropy":
        indices = torch.argsort(entropy, stable=True)[:n]
    elif options.strategy == "highest-entropy":
        indices = torch.argsort(entropy, descending=True, stable=True)[:n]
    elif options.strategy == "random":
        indices = torch.randperm(len(split), generator=ctx.generator("selection-random"))[:n]
    else:  # pydantic restricts the choices; a new strategy must be added here
        raise ValueError(f"selection.strategy: unknown strategy {options.strategy!r}")
    return AlignmentSet(indices=indices.long(), scores=entropy[indices], strategy=options.strategy)
