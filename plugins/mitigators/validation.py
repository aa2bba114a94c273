"""What the mitigators share: scores on the validation split by group, the choice of the epoch
and of the grid point by worst-group validation accuracy, the checks of the data they need, and
seeded fresh models.

Nothing here reads the test split: every choice a mitigator makes is made on the validation
split (BalancingGroups' model selection, Idrissi et al. 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from lvlmva import training
from lvlmva.metrics import accuracy, average_group_accuracy, worst_group_accuracy
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Split, SpuriousDataset

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = [
    "CRITERION",
    "EPOCH_RULE",
    "GRID_RULE",
    "WGA",
    "EpochSelector",
    "RetrainOptions",
    "count_groups",
    "data_problems",
    "first_best",
    "fresh_model",
    "group_label",
    "require",
    "split_scores",
]

#: the key of the selection criterion in every scores dict
WGA = "worst_group_accuracy"
CRITERION = "worst-group accuracy on the validation split"
EPOCH_RULE = (
    "the epoch with the highest validation worst-group accuracy, ties to the later epoch "
    "(BalancingGroups keeps a checkpoint when the value is >= the best so far)"
)
GRID_RULE = "the grid point with the highest validation worst-group accuracy, ties to the first"


def count_groups(data: SpuriousDataset) -> int:
    """The number of groups: ``len(group_names)``, or one past the largest group index of the
    training and validation splits when the data set names none."""
    if data.group_names:
        return len(data.group_names)
    found = [s.groups for s in (data.train, data.val) if s is not None and s.groups is not None]
    return max((int(g.max()) + 1 for g in found if g.numel()), default=0)


def group_label(data: SpuriousDataset, group: int) -> str:
    """``'name'`` (group index) for messages."""
    if group < len(data.group_names):
        return f"{data.group_names[group]!r} (group {group})"
    return f"group {group}"


def split_scores(logits: torch.Tensor, split: Split, num_groups: int) -> dict[str, float]:
    """Worst-group, average-group and plain accuracy of ``logits`` ``[N, K]`` on ``split``
    (groups without samples in ``split`` are left out, as :mod:`lvlmva.metrics` does)."""
    groups = split.groups
    if groups is None:
        raise ValueError("split_scores: the split has no group labels")
    return {
        WGA: worst_group_accuracy(logits, split.labels, groups, num_groups),
        "average_group_accuracy": average_group_accuracy(logits, split.labels, groups, num_groups),
        "accuracy": accuracy(logits, split.labels),
    }


def data_problems(data: SpuriousDataset, who: str, *, per_group: int = 1) -> list[str]:
    """What keeps a mitigator that selects on the validation split from running: no
    validation split, no group labels, or a group of the training or validation split with
    fewer than ``per_group`` validation samples (the criterion would not see it)."""
    if data.val is None or len(data.val) == 0:
        return [
            f"{who} needs a validation split (it chooses its model by worst-group accuracy "
            "there): set the data set's validation size (dataset.val_size)"
        ]
    problems = []
    for name, split in (("training", data.train), ("validation", data.val)):
        if split.groups is None:
            problems.append(
                f"{who} needs group labels on the {name} split, which the data set does not have"
            )
    if problems:
        return problems
    counts = torch.bincount(data.val.groups, minlength=count_groups(data))
    expected = torch.unique(torch.cat([data.train.groups, data.val.groups])).tolist()
    short = [g for g in expected if int(counts[g]) < per_group]
    if short:
        listed = ", ".join(f"{group_label(data, g)}: {int(counts[g])}" for g in short)
        problems.append(
            f"{who} needs at least {per_group} validation sample(s) of every group the training "
            f"or validation split has; too few in {listed}. Enlarge the validation split, or "
            "give it every group (DecoyMNIST: val_decoys = 'random')"
        )
    return problems


def require(problems: Sequence[str]) -> None:
    """Raise a ``ValueError`` listing ``problems`` (when there are any)."""
    if problems:
        raise ValueError("\n".join(problems))


def first_best(points: Sequence[dict[str, Any]]) -> int:
    """Index of the grid point whose ``points[i]["val"][WGA]`` is highest, ties to the first
    (:func:`lvlmva.training.first_best`, the rule the aligners' grids follow too)."""
    return training.first_best([point["val"][WGA] for point in points])


def fresh_model(trainer: Trainer, ctx: RunContext, salt: str) -> nn.Module:
    """``trainer.new_model()`` initialised from a seed drawn from ``ctx.generator(salt)``: a
    model of a grid point does not depend on which points were trained before it. Torch's
    global generator is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator(salt)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return trainer.new_model()


class EpochSelector:
    """An ``on_epoch`` callback for :meth:`Trainer.fit`: scores the model on the validation
    split after every epoch and keeps the state of the best epoch (:data:`EPOCH_RULE`); with
    ``keep_best`` False the last epoch is kept (the scores are still recorded).

    After training, :meth:`finish` loads the kept state into the model and returns what was
    chosen: ``{"epoch", "val", "epochs"}`` (the per-epoch scores).
    """

    def __init__(
        self, trainer: Trainer, val: Split, num_groups: int, *, keep_best: bool = True
    ) -> None:
        self.trainer = trainer
        self.val = val
        self.num_groups = num_groups
        self.keep_best = keep_best
        self.history: list[dict[str, float | int]] = []
        self._best: tuple[int, dict[str, float], dict[str, torch.Tensor]] | None = None

    def scores(self, model: nn.Module) -> dict[str, float]:
        return split_scores(self.trainer.predict(model, self.val.inputs), self.val, self.num_groups)

    def __call__(self, end: EpochEnd) -> None:
        scores = self.scores(end.model)
        self.history.append({"epoch": end.epoch, **scores})
        if self.keep_best and (self._best is None or scores[WGA] >= self._best[1][WGA]):
            state = {k: v.detach().cpu().clone() for k, v in end.model.state_dict().items()}
            self._best = (end.epoch, scores, state)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        if self._best is not None:
            epoch, scores, state = self._best
            model.load_state_dict(state)
        elif self.history:
            last = self.history[-1]
            epoch, scores = int(last["epoch"]), {k: v for k, v in last.items() if k != "epoch"}
        else:  # zero epochs: the untrained model
            epoch, scores = 0, self.scores(model)
        return {"epoch": int(epoch), "val": scores, "epochs": list(self.history)}


class RetrainOptions(PluginOptions):
    """Options every mitigator that trains a fresh model has."""

    epochs: int | None = Field(
        None,
        ge=0,
        description="Epochs of each model trained; None = the run's train.epochs (BalancingGroups "
        "trains every method for the same number of epochs and selects one of them).",
    )
    select_epoch: bool = Field(
        True,
        description="Keep the epoch with the best worst-group validation accuracy (BalancingGroups' "
        "model selection; ties to the later epoch). False = the last epoch. The validation scores "
        "of every epoch are recorded either way.",
    )
