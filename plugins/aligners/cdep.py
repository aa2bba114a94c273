"""Contextual Decomposition Explanation Penalization (Rieger et al. 2020), as the XIL typology
code has it.

Contextual decomposition (Murdoch et al. 2018; Singh et al. 2019) splits every activation of a
forward pass into the part that comes from a chosen region of the input and the part that comes
from the rest, ``z = beta + gamma``, layer by layer, so that the logits split as
``f(x) = beta(x) + gamma(x)``. CDEP penalises the part of the logits that the spurious region
explains. The typology code (ml-research/A-Typology-for-Exploring-the-Mitigation-of-Shortcut-
Behavior, ``xil_methods/xil_loss.py``, ``CDEPLoss`` with ``xil_methods/cd_util/cd.py``) takes
the region's share of each logit through a softmax over the pair. For a batch of ``B`` samples
with correction masks ``A`` (``A = 0`` for ordinary samples) and ``K`` classes::

    L       = CE + lam * penalty
    CE      = mean_n  cross_entropy(f(x_n), y_n)
    beta_n, gamma_n = CD of f at x_n with the region A_n: beta from A_n * x_n, gamma from (1 - A_n) * x_n
    penalty = (1/B) sum over samples with a mask of  mean_k  exp(beta_nk) / (exp(beta_nk) + exp(gamma_nk))

The propagation rules, per layer (those of the typology code's ``cd.py``):

- ``Linear``, ``Conv2d``: ``beta' = W beta``, ``gamma' = W gamma``; the bias goes to both in
  proportion to their size, ``beta' += b |W beta| / (|W beta| + |W gamma|)`` (each with 1e-20
  added), ``gamma'`` the rest of it;
- ``ReLU``: ``beta' = relu(beta)``, ``gamma' = relu(beta + gamma) - relu(beta)``;
- ``AvgPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``, ``Identity``: applied to each part alone
  (linear, no bias).

These are the layers of the built-in ``mlp`` (Flatten, Linear, ReLU) and ``cnn`` (Conv2d, ReLU,
AdaptiveAvgPool2d, Flatten, Linear) models. The decomposition follows the chain of a model's
layers: the built-in ``Mlp`` and ``SmallCnn`` (their ``features`` then ``head``), or an
``nn.Sequential`` (nested ones flattened). Any other model, or a chain with another layer
(batch norm, max pooling, dropout, residual blocks: a ResNet), is refused before anything trains
(``check_model``).

Where this departs from the typology code: it averages the share over the samples and classes
of its batch, every sample having a mask; here the samples without a mask (the ordinary ones)
add nothing and count in the mean over the batch, like RRR's penalty (on a batch where every
sample has a mask the two agree, and ``lam`` is its ``regularization_rate``). Without a mask a
sample's ``beta`` is 0 and its share ``1 / (1 + exp(gamma))`` would still pull on the logits:
the typology code never meets that case, since all its samples have masks. Its
``normalization_rate`` is not computed. It finds the layers from ``model.modules()`` by the
class names it knows and skips the others silently; here an unknown layer is an error.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lvlmva.protocols import PluginOptions
from lvlmva.training import AlignmentOptions

from .xil import GRID_SENTENCE, PenaltyAligner, WeightOptions, check_batch

__all__ = [
    "SUPPORTED_LAYERS",
    "decomposable_layers",
    "contextual_decomposition",
    "cdep_loss",
    "CdepAligner",
    "CdepOptions",
]

#: the layers contextual decomposition propagates (module docstring: the rules)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
)

#: added to both parts' sizes before the bias is split, as the typology code does
_BIAS_SPLIT_EPS = 1e-20


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The layers of ``model`` in the order its forward pass runs them, where that order is
    known: the built-in mlp and cnn models and ``nn.Sequential`` chains. None otherwise."""
    from lvlmva.plugins.models.cnn import SmallCnn
    from lvlmva.plugins.models.mlp import Mlp

    def flatten(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, module in seq.named_children():
            qualified = f"{prefix}{name}"
            if type(module) is nn.Sequential:
                out += flatten(f"{qualified}.", module)
            else:
                out.append((qualified, module))
        return out

    if type(model) in (Mlp, SmallCnn):
        return [*flatten("features.", model.features), ("head", model.head)]
    if type(model) is nn.Sequential:
        return flatten("", model)
    return None


def decomposable_layers(model: nn.Module) -> list[nn.Module]:
    """The chain of layers contextual decomposition runs through for ``model``; ``ValueError``
    saying why when it cannot decompose it (not a chain it knows, or a layer without a rule)."""
    chain = _chain(model)
    if chain is None:
        raise ValueError(
            f"cdep decomposes the built-in mlp and cnn models and nn.Sequential chains of "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)}; {type(model).__name__} is "
            "none of them"
        )
    bad = [
        f"{name} ({type(m).__name__})" for name, m in chain if not isinstance(m, SUPPORTED_LAYERS)
    ]
    if bad:
        raise ValueError(
            f"cdep has no decomposition rule for {', '.join(bad)} of {type(model).__name__}; it "
            f"decomposes {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}"
        )
    return [m for _, m in chain]


def _split_bias(
    rel: torch.Tensor, irrel: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is None:
        return rel, irrel
    size_rel = rel.abs() + _BIAS_SPLIT_EPS
    size_irrel = irrel.abs() + _BIAS_SPLIT_EPS
    share = size_rel / (size_rel + size_irrel)
    return rel + share * bias, irrel + (1 - share) * bias


def contextual_decomposition(
    layers: list[nn.Module], relevant: torch.Tensor, irrelevant: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta, gamma)`` at the end of ``layers`` (:func:`decomposable_layers`) for the input
    parts ``relevant`` and ``irrelevant`` (their sum is the input); ``beta + gamma`` is the
    forward pass of their sum."""
    rel, irrel = relevant, irrelevant
    for layer in layers:
        if isinstance(layer, nn.Linear):
            rel, irrel = _split_bias(
                F.linear(rel, layer.weight), F.linear(irrel, layer.weight), layer.bias
            )
        elif isinstance(layer, nn.Conv2d):
            both = layer._conv_forward(torch.cat([rel, irrel]), layer.weight, None)
            n = rel.shape[0]
            bias = None if layer.bias is None else layer.bias.view(1, -1, 1, 1)
            rel, irrel = _split_bias(both[:n], both[n:], bias)
        elif isinstance(layer, nn.ReLU):
            relu_rel = F.relu(rel)
            rel, irrel = relu_rel, F.relu(rel + irrel) - relu_rel
        elif isinstance(layer, SUPPORTED_LAYERS):  # linear without bias: each part alone
            n = rel.shape[0]
            both = layer(torch.cat([rel, irrel]))
            rel, irrel = both[:n], both[n:]
        else:
            raise ValueError(f"cdep has no decomposition rule for {type(layer).__name__}")
    return rel, irrel


def cdep_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    lam: float,
    layers: list[nn.Module] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CDEP loss of one batch: ``(total, ce, penalty)``, ``total = ce + lam * penalty``
    (module docstring). ``masks`` ``[B, H, W]`` or ``[B, C, H, W]``, non-zero = "the model must
    not use this pixel"; ``layers`` defaults to :func:`decomposable_layers` of ``model``."""
    weights = check_batch("cdep_loss", inputs, targets, masks).to(inputs.dtype)
    if layers is None:
        layers = decomposable_layers(model)
    b = inputs.shape[0]
    inputs = inputs.detach()
    ce = F.cross_entropy(model(inputs), targets)
    rows = weights.flatten(1).any(dim=1).nonzero().squeeze(1)
    penalty_sum = inputs.new_zeros(())
    if rows.numel():
        x, region = inputs[rows], weights[rows]
        beta, gamma = contextual_decomposition(layers, region * x, (1 - region) * x)
        share = torch.softmax(torch.stack([beta, gamma], dim=-1), dim=-1)[..., 0]
        penalty_sum = share.mean(dim=1).sum()
    penalty = penalty_sum / b
    return ce + lam * penalty, ce, penalty


class _CdepLossOptions(WeightOptions):
    """CDEP's own option, the weight of its penalty."""

    lam: float | tuple[float, ...] = Field(
        100.0,
        description="lambda: weight of the CDEP penalty (the spurious regions' share of the "
        "logits, softmax over the pair, mean over classes, mean over the batch of alignment + "
        "ordinary samples; lam = the typology code's regularization rate). A share is a number "
        "in (0, 1), so lam does not depend on the input scale; the default suits DecoyMNIST with "
        "the mlp or the cnn and the quick settings. " + GRID_SENTENCE,
    )


class CdepOptions(AlignmentOptions, _CdepLossOptions):
    """Options of the CDEP aligner: ``lam`` and the options of every aligner."""


class CdepAligner(PenaltyAligner):
    """CDEP (Rieger et al. 2020): penalises the logits' share that contextual decomposition gives the masks.

    Decomposes the built-in mlp and cnn models (Linear, Conv2d, ReLU, AvgPool2d,
    AdaptiveAvgPool2d, Flatten, Identity, in an nn.Sequential chain or the built-ins'
    features-then-head); any other model is refused before anything trains. Batches, seeds,
    Adam, clipping, the per-epoch loss terms (``ce``, ``penalty``) and a ``lam`` grid chosen on
    the validation split are the alignment trainer's.
    """

    Options: ClassVar[type[PluginOptions]] = CdepOptions
    seed_name: ClassVar[str] = "cdep"

    def check_model(self, model: nn.Module) -> list[str]:
        """A model contextual decomposition cannot follow, refused with the reason."""
        try:
            decomposable_layers(model)
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
        """:func:`cdep_loss` as named terms: ``loss`` (the total), ``ce`` and ``penalty``."""
        total, ce, penalty = cdep_loss(model, inputs, targets, masks, lam)
        return self.terms(total, ce, penalty)
