"""GroupDRO: the loss a weighted sum of per-group mean losses, the weights ``q`` moved online
towards the groups that lose most (Sagawa et al. 2020, "Distributionally robust neural networks
for group shifts"; kohpangwei/group_DRO ``loss.py`` ``LossComputer``; facebookresearch/
BalancingGroups ``models.py`` ``GroupDRO``).

Every training batch, with ``L_g`` the mean cross-entropy of the batch's samples of group ``g``
(0 for a group with none in the batch):

1. ``q_g <- q_g * exp(eta * L_g)`` (``L`` detached), then ``q <- q / sum(q)``;
2. the batch loss is ``sum_g q_g * L_g``, with the ``q`` just updated.

``q`` starts uniform and carries over from batch to batch and epoch to epoch. This is group_DRO's
``compute_robust_loss`` (``loss.py`` lines 61-71 at commit cbbc1c5; ``compute_group_avg``, lines
95-101, gives an absent group the loss 0, so its ``q`` is only renormalised) with the defaults of
``run_expt.py`` (lines 35-41) and of its published commands (README: ``--robust
--reweight_groups --generalization_adjustment 0``). BalancingGroups' ``GroupDRO`` (``models.py``
lines 218-247 at commit 72d31e5) is the same update, from ``q`` all ones (the same after the
first normalisation), with the absent groups left out of the sum (the same: their ``L_g`` is 0).

The training samples are drawn as RWG draws them (``reweight_groups``, default on): each epoch
``N`` indices with replacement, sample ``i`` with probability proportional to ``N / n_group(i)``.
Both references do this: BalancingGroups' ``get_loaders`` gives method ``"dro"`` the group
weights ``wg`` (``datasets.py`` lines 349-350), group_DRO's commands pass ``--reweight_groups``
(``data/dro_dataset.py`` ``get_loader``, lines 43-69: ``WeightedRandomSampler(weights,
len(self), replacement=True)``).

``eta`` defaults to BalancingGroups' 0.1 (``train.py`` line 141, fixed for every data set);
group_DRO's ``--robust_step_size`` defaults to 0.01, SubpopBench's ``groupdro_eta`` too.

Left out, all off by default in group_DRO: generalization adjustments ``C / sqrt(n_g)`` added to
the group losses (``--generalization_adjustment``, 0 in every published command), the
normalised loss (``--use_normalized_loss``), the greedy CVaR variant (``--btl`` with ``alpha``,
``gamma`` and ``--minimum_variational_weight``, which only it reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .reweighting import (
    ChainedCallbacks,
    WeightedDraws,
    empty_cell_problems,
    inverse_frequency_weights,
    resolved_epochs,
    sampling_record,
)
from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    count_groups,
    data_problems,
    fresh_model,
    group_problems,
    require,
    selection_details,
)

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = ["GroupDroMitigator", "GroupDroObjective", "GroupDroOptions", "group_mean_losses"]


def group_mean_losses(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The mean of ``losses`` ``[B]`` over each group's samples, ``[num_groups]``; 0 for a group
    with no sample in the batch (group_DRO's ``compute_group_avg``)."""
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, groups, losses)
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    return sums / counts.clamp(min=1)


class GroupDroObjective:
    """The :meth:`Trainer.fit` ``objective`` of GroupDRO: holds the group weights :attr:`q`
    (uniform at first) and, for every batch, updates them by an exponentiated-gradient step of
    size ``eta`` on the detached per-group mean losses and returns ``(sum_g q_g L_g, logits)``.

    ``groups`` are the group labels of the whole training split, looked up by the batch's
    indices; they are moved to the batch's device on first use.
    """

    def __init__(self, groups: torch.Tensor, num_groups: int, eta: float) -> None:
        self.groups = groups
        self.num_groups = num_groups
        self.eta = eta
        self.q = torch.full((num_groups,), 1.0 / num_groups)

    def step(self, group_loss: torch.Tensor) -> torch.Tensor:
        """``q <- q * exp(eta * group_loss)``, normalised to sum 1; returns the new ``q``."""
        q = self.q.to(group_loss.device) * torch.exp(self.eta * group_loss.detach())
        self.q = q / q.sum()
        return self.q

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.groups.device != idx.device:
            self.groups = self.groups.to(idx.device)
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        group_loss = group_mean_losses(losses, self.groups[idx], self.num_groups)
        q = self.step(group_loss)
        return (q.to(group_loss.dtype) * group_loss).sum(), logits

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].clone()


class _QByEpoch:
    """An ``on_epoch`` callback that keeps ``q`` as it is at the end of every epoch."""

    def __init__(self, objective: GroupDroObjective) -> None:
        self.objective = objective
        self.by_epoch: list[list[float]] = []

    def __call__(self, end: EpochEnd) -> None:
        self.by_epoch.append(self.objective.q.cpu().tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"by_epoch": self.by_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.by_epoch = [list(q) for q in state["by_epoch"]]


class GroupDroOptions(RetrainOptions):
    """Options of ``groupdro``."""

    eta: float = Field(
        0.1,
        gt=0,
        description="Step size of the exponentiated-gradient update of the group weights q "
        "(q_g <- q_g exp(eta L_g), normalised, every batch). Default 0.1: BalancingGroups' "
        "fixed eta; group_DRO's --robust_step_size and SubpopBench default to 0.01.",
    )
    reweight_groups: bool = Field(
        True,
        description="Draw every epoch's samples group-balanced, with replacement, as rwg does "
        "(both references: BalancingGroups gives 'dro' the group weights, group_DRO's commands "
        "pass --reweight_groups). False: every training sample once per epoch, shuffled.",
    )


class GroupDroMitigator:
    """GroupDRO (Sagawa et al. 2020): minimise the q-weighted per-group losses, q moved online
    towards the worst groups.

    Trains one model.

    Training reads the group labels of the training split (class x spurious attribute); every
    group must have training samples (an empty one could not be protected: its weight would
    only be renormalised). The loss is the Trainer's ``objective`` hook
    (:class:`GroupDroObjective`); with ``reweight_groups`` the epochs are drawn group-balanced
    with replacement from ``ctx.generator("groupdro")``. The model's initialisation is seeded
    from ``ctx.generator("groupdro-init")``, the data order from the tag ``"groupdro"``.
    ``details`` record ``q`` after every epoch, at the chosen epoch and at the end. Differs from
    the references in the optimiser and hyperparameters (the run's ``[train]`` settings; both
    use SGD) and in what the module docstring lists as left out.
    """

    Options: ClassVar[type[PluginOptions]] = GroupDroOptions
    needs_groups: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: GroupDroOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        problems = data_problems(data, "groupdro", selection=self.options.selection)
        problems += group_problems(data, "groupdro")
        why = "weighs the loss of every group of the training split"
        return problems + empty_cell_problems(data, "groupdro", "group", why)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        opts = self.options
        require(self.check_data(data))
        assert data.train.groups is not None  # checked above
        groups, num_groups = data.train.groups, count_groups(data)
        epochs = resolved_epochs(opts, trainer)
        objective = GroupDroObjective(groups, num_groups, opts.eta)
        q_by_epoch = _QByEpoch(objective)
        selector = EpochSelector.for_options(trainer, data, opts)
        callbacks: list[Any] = [selector, q_by_epoch]
        draws = None
        if opts.reweight_groups:
            draws = WeightedDraws(
                inverse_frequency_weights(groups, num_groups),
                ctx.generator("groupdro"),
                cells=groups,
                num_cells=num_groups,
            )
        model = fresh_model(trainer, ctx, "groupdro-init")
        trainer.fit(
            data.train,
            model,
            indices=draws,
            epochs=epochs,
            tag="groupdro",
            on_epoch=ChainedCallbacks(*callbacks),
            objective=objective,
        )
        chosen = selector.finish(model)
        params = {"eta": opts.eta}
        at_chosen = q_by_epoch.by_epoch[chosen["epoch"] - 1] if chosen["epoch"] else None
        details = {
            "method": "groupdro",
            **selection_details(opts.selection, opts.select_epoch),
            "models_trained": 1,
            "eta": opts.eta,
            "reweight_groups": opts.reweight_groups,
            "sampling": None
            if draws is None
            else sampling_record("group", groups, num_groups, draws),
            "q_by_epoch": q_by_epoch.by_epoch,
            "q_at_chosen_epoch": at_chosen,
            "final_q": objective.q.cpu().tolist(),
            "grid": [{"params": params, **chosen}],
            "chosen": {"index": 0, "params": params, **chosen_scores(chosen)},
        }
        return TrainedModel(model, details)
