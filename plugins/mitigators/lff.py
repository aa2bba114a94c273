"""LfF: Learning from Failure (Nam et al. 2020, "Learning from Failure: Training Debiased
Classifier from Biased Classifier"; alinlab/LfF ``train.py``, ``module/loss.py``
``GeneralizedCELoss`` and ``util.py`` ``EMA``, at commit e66796e).

Two models of the same architecture train side by side on the same batches, without group
labels:

- the *biased* model ``b`` minimises the generalised cross-entropy (GCE) with ``q = 0.7``, which
  leans on what is easy to learn (the shortcut) more than cross-entropy does;
- the *debiased* model ``d`` minimises cross-entropy weighted per sample by the relative
  difficulty ``w = L_b / (L_b + L_d + 1e-8)``: high where the biased model fails and the
  debiased one does not yet.

Every training batch, as the reference's loop does (``train.py``):

1. ``CE_b``, ``CE_d``: the per-sample cross-entropies of both models on the batch (detached).
2. Exponential moving averages per training sample (``EMA.update``, ``alpha = 0.7``):
   ``ema[i] <- alpha * ema[i] + (1 - alpha * seen[i]) * CE[i]``, ``seen[i]`` 0 before sample
   ``i``'s first batch and 1 after, so the first value is ``CE[i]`` itself.
3. Class-wise normalisation (``EMA.max_loss``): each sample's average is divided by the largest
   average of its class over the *whole* training split at that moment (samples not yet seen
   count as 0), separately for ``b`` and ``d``.
4. ``w = L_b / (L_b + L_d + 1e-8)`` from the normalised averages (no gradient through ``w``).
5. The loss ``mean(GCE_b) + mean(w * CE_d)`` (both plain means over the batch), one backward
   pass, one optimiser step of each model.

GCE as the reference writes it (``GeneralizedCELoss``): ``CE * q * p_y^q``, ``p_y`` the
softmax probability of the true class, detached. Its gradient is ``q * p_y^q`` times the
gradient of CE, that is ``q`` times the gradient of the paper's ``(1 - p_y^q) / q`` (Zhang and
Sabuncu 2018); SubpopBench's ``LfF`` (``learning/algorithms.py``, ``GCE2``) copies it. Here the
same, so the loss matches the reference's values, not only its direction.

One optimiser: the two models are the two halves of one module (:class:`LfFPair`, whose
forward is the debiased model's) trained by one ``Trainer.fit`` call with an ``objective``, so
one Adam holds both models' parameters where the reference has one Adam per model with the same
hyperparameters. That is the same update: Adam (with L2 ``weight_decay``, added to each
parameter's own gradient, as torch's ``Adam`` does; and AdamW's decoupled decay alike) keeps its
moments and step count per parameter and updates each parameter from its own gradient alone,
and the two models step together every batch, so their step counts agree. The gradients do not
mix either: ``w`` is detached, so ``b``'s parameters get gradient from the GCE term only and
``d``'s from the weighted CE term only. The tests check the equivalence numerically.

What differs from the reference:

- optimiser and schedule: the run's ``[train]`` settings (Adam, its lr and weight decay, batch
  size, epochs), where the reference sets Adam lr 1e-3 (1e-4 with weight decay 1e-4 on CelebA),
  batch 256 and a number of steps; every training sample is visited once per epoch here, in a
  seeded shuffled order (the reference's shuffled DataLoader, restarted when exhausted);
- the model kept: the debiased model at the epoch the ``selection`` rule ranks best (worst-group
  validation accuracy by default; BalancingGroups' model selection), the whole pair restored
  from that epoch; the reference keeps its last step's model (``select_epoch = false`` here);
- a class whose largest moving average is exactly 0 (every sample fit to float precision) would
  divide 0 by 0, which the reference reports as an error (``NameError('loss_weight')``); here
  the divisor is clamped to the smallest positive float, so such samples weigh 0;
- SubpopBench's ``LfF`` takes ``w`` from the batch's own losses, without moving averages or
  class-wise normalisation, and trains ``b`` with SGD: not followed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .reweighting import ChainedCallbacks
from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    count_groups,
    data_problems,
    fresh_model,
    require,
    selection_details,
    split_scores,
)

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = [
    "LfFObjective",
    "LfFPair",
    "LffMitigator",
    "LffOptions",
    "SampleLossEma",
    "generalized_cross_entropy",
    "relative_difficulty",
]

#: the reference's guard in ``w = L_b / (L_b + L_d + 1e-8)``
DIFFICULTY_EPS = 1e-8


def generalized_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, q: float
) -> torch.Tensor:
    """Per-sample GCE as alinlab/LfF's ``GeneralizedCELoss`` computes it, ``[B]``:
    ``CE * q * p_y^q`` with ``p_y`` (the softmax probability of the target) detached. Its
    gradient is ``q * p_y^q * grad(CE)`` = ``q * grad((1 - p_y^q) / q)``."""
    p_true = F.softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1).detach()
    return F.cross_entropy(logits, targets, reduction="none") * (p_true**q) * q


class SampleLossEma:
    """Exponential moving averages of per-sample losses over a training split (the reference's
    ``EMA``): :attr:`value` ``[N]`` starts at 0; :meth:`update` sets
    ``value[i] <- alpha * value[i] + (1 - alpha * seen[i]) * loss`` for the batch's indices
    (the first update of a sample stores its loss as it is)."""

    def __init__(self, labels: torch.Tensor, alpha: float) -> None:
        self.labels = labels
        self.alpha = alpha
        self.value = torch.zeros(labels.shape[0])
        self.seen = torch.zeros(labels.shape[0])

    def to(self, device: torch.device) -> SampleLossEma:
        self.labels = self.labels.to(device)
        self.value = self.value.to(device)
        self.seen = self.seen.to(device)
        return self

    def update(self, losses: torch.Tensor, idx: torch.Tensor) -> None:
        losses = losses.detach().to(self.value.dtype)
        self.value[idx] = self.alpha * self.value[idx] + (1 - self.alpha * self.seen[idx]) * losses
        self.seen[idx] = 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.detach().cpu().clone(), "seen": self.seen.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.value.device
        self.value = state["value"].to(device=device, dtype=self.value.dtype)
        self.seen = state["seen"].to(device=device, dtype=self.seen.dtype)

    def class_max(self, num_classes: int) -> torch.Tensor:
        """The largest average of every class over the whole split, ``[num_classes]`` (the
        reference's ``max_loss``; unseen samples count as 0, a class without samples is 0)."""
        out = torch.zeros(num_classes, dtype=self.value.dtype, device=self.value.device)
        return out.scatter_reduce(0, self.labels, self.value, "amax", include_self=True)


def relative_difficulty(
    ema_b: SampleLossEma, ema_d: SampleLossEma, idx: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """LfF's weights of the samples ``idx``: each model's moving average divided by the largest
    of its class (class-wise normalisation), then ``L_b / (L_b + L_d + 1e-8)``."""
    labels = ema_b.labels[idx]
    tiny = torch.finfo(ema_b.value.dtype).tiny
    loss_b = ema_b.value[idx] / ema_b.class_max(num_classes).clamp(min=tiny)[labels]
    loss_d = ema_d.value[idx] / ema_d.class_max(num_classes).clamp(min=tiny)[labels]
    return loss_b / (loss_b + loss_d + DIFFICULTY_EPS)


class LfFPair(nn.Module):
    """The biased and the debiased model as one module: what ``Trainer.fit`` optimises (one
    Adam over both) and what the epoch selector scores and restores. ``forward`` is the
    debiased model's."""

    def __init__(self, biased: nn.Module, debiased: nn.Module) -> None:
        super().__init__()
        self.biased = biased
        self.debiased = debiased

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.debiased(x)


class LfFObjective:
    """The :meth:`Trainer.fit` ``objective`` of LfF on an :class:`LfFPair`: holds both models'
    moving averages of per-sample cross-entropy over the training split (``labels``, moved to
    the batch's device on first use) and returns ``(mean(GCE_b) + mean(w * CE_d), logits_d)``
    for every batch (the module docstring's steps 1-5)."""

    def __init__(self, labels: torch.Tensor, num_classes: int, q: float, alpha: float) -> None:
        self.num_classes = num_classes
        self.q = q
        self.ema_b = SampleLossEma(labels, alpha)
        self.ema_d = SampleLossEma(labels, alpha)

    def weights(self) -> torch.Tensor:
        """The relative difficulty of every training sample from the current averages, ``[N]``
        (on the CPU)."""
        every = torch.arange(self.ema_b.labels.shape[0], device=self.ema_b.value.device)
        return relative_difficulty(self.ema_b, self.ema_d, every, self.num_classes).cpu()

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(model, LfFPair):
            raise TypeError(f"lff: the objective trains an LfFPair, got {type(model).__name__}")
        if self.ema_b.value.device != idx.device:
            self.ema_b.to(idx.device)
            self.ema_d.to(idx.device)
        logits_b = model.biased(x)
        logits_d = model.debiased(x)
        ce_d = F.cross_entropy(logits_d, y, reduction="none")
        self.ema_b.update(F.cross_entropy(logits_b.detach(), y, reduction="none"), idx)
        self.ema_d.update(ce_d.detach(), idx)
        w = relative_difficulty(self.ema_b, self.ema_d, idx, self.num_classes).to(ce_d.dtype)
        loss = generalized_cross_entropy(logits_b, y, self.q).mean() + (ce_d * w).mean()
        return loss, logits_d

    def state_dict(self) -> dict[str, Any]:
        """Both moving averages (for a checkpoint of the fit)."""
        return {"ema_b": self.ema_b.state_dict(), "ema_d": self.ema_d.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_b.load_state_dict(state["ema_b"])
        self.ema_d.load_state_dict(state["ema_d"])


class _WeightsByEpoch:
    """An ``on_epoch`` callback: the mean relative difficulty per training group (reporting
    only: training never reads group labels) after every epoch."""

    def __init__(self, objective: LfFObjective, groups: torch.Tensor | None, num_groups: int):
        self.objective, self.groups, self.num_groups = objective, groups, num_groups
        self.by_epoch: list[list[float | None]] = []

    def __call__(self, end: EpochEnd) -> None:
        if self.groups is not None:
            self.by_epoch.append(
                _group_means(self.objective.weights(), self.groups, self.num_groups)
            )

    def state_dict(self) -> dict[str, Any]:
        return {"by_epoch": self.by_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.by_epoch = [list(means) for means in state["by_epoch"]]


def _group_means(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> list[float | None]:
    sums = torch.bincount(groups, weights=values.double(), minlength=num_groups)
    counts = torch.bincount(groups, minlength=num_groups)
    return [
        float(s / c) if c else None for s, c in zip(sums.tolist(), counts.tolist(), strict=True)
    ]


class LffOptions(RetrainOptions):
    """Options of ``lff``; ``epochs`` and ``select_epoch`` are those of the pair of models."""

    q: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Exponent q of the biased model's generalised cross-entropy (the reference's "
        "GeneralizedCELoss default, 0.7; SubpopBench's LfF_q default too).",
    )
    ema_alpha: float = Field(
        0.7,
        ge=0,
        lt=1,
        description="Decay of the per-sample moving averages of the two models' losses (the "
        "reference's train.py passes alpha=0.7 to its EMA, whose own default is 0.9).",
    )


class LffMitigator:
    """LfF (Nam et al. 2020): a GCE-trained biased model steers a debiased model's per-sample
    weights to the samples the biased model fails on.

    Trains two models together (one ``Trainer.fit`` call, one Adam over both, every batch through
    :class:`LfFObjective`) and returns the debiased one. Training reads no group labels. Needs a
    validation split, on which the epoch is chosen (``selection``; group labels there only for
    ``"worst-group"``): the debiased model is scored, and both models are restored from the
    chosen epoch. Initialisations are seeded from ``ctx.generator("lff-biased-init")`` and
    ``ctx.generator("lff-debiased-init")``, the data order from the tag ``"lff"``. ``details``
    record the biased model's validation scores at the chosen epoch and, where the training
    split has group labels, the mean weight ``w`` per group after every epoch. Differs from
    alinlab/LfF ``train.py`` in the optimiser settings, the model kept and a 0/0 guard (the
    module docstring lists them).
    """

    Options: ClassVar[type[PluginOptions]] = LffOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: LffOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        return data_problems(data, "lff", selection=self.options.selection)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        opts = self.options
        require(self.check_data(data))
        num_groups = count_groups(data)
        objective = LfFObjective(data.train.labels, data.num_classes, opts.q, opts.ema_alpha)
        by_epoch = _WeightsByEpoch(objective, data.train.groups, num_groups)
        selector = EpochSelector.for_options(trainer, data, opts)

        pair = LfFPair(
            fresh_model(trainer, ctx, "lff-biased-init"),
            fresh_model(trainer, ctx, "lff-debiased-init"),
        )
        trainer.fit(
            data.train,
            pair,
            epochs=opts.epochs,
            tag="lff",
            on_epoch=ChainedCallbacks(selector, by_epoch),
            objective=objective,
        )
        chosen = selector.finish(pair)  # restores both models of the chosen epoch
        biased_val = split_scores(
            trainer.predict(pair.biased, data.val.inputs), data.val, num_groups
        )
        at_chosen = (
            by_epoch.by_epoch[chosen["epoch"] - 1]
            if chosen["epoch"] and by_epoch.by_epoch
            else None
        )
        params = {"q": opts.q, "ema_alpha": opts.ema_alpha}
        details: dict[str, Any] = {
            "method": "lff",
            **selection_details(opts.selection, opts.select_epoch),
            "models_trained": 2,
            "returned": "the debiased model (the biased one is discarded)",
            "q": opts.q,
            "ema_alpha": opts.ema_alpha,
            "biased_val": biased_val,
            "weight_by_group_by_epoch": by_epoch.by_epoch,
            "weight_by_group_at_chosen_epoch": at_chosen,
            "grid": [{"params": params, **chosen}],
            "chosen": {"index": 0, "params": params, **chosen_scores(chosen)},
        }
        pair.debiased.eval()
        return TrainedModel(pair.debiased, details)
