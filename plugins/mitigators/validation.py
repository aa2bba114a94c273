"""What the mitigators share: scores on the validation split by group and class, the choice of
the epoch and of the grid point by the mitigator's selection rule, the checks of the data they
need, and seeded fresh models.

Nothing here reads the test split, except under ``selection = "oracle-test"``, whose choices are
labelled an upper bound wherever they appear (:mod:`lvlmva.model_selection`). Every other
choice is made on the validation split (BalancingGroups' model selection, Idrissi et al. 2022;
SubpopBench's worst-class rule, Yang et al. 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from lvlmva import training
from lvlmva.model_selection import (
    SelectionRule,
    rule,
    score_value,
    selection_problems,
    selection_record,
    selection_scores,
)
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Split, SpuriousDataset

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = [
    "WGA",
    "EpochSelector",
    "RetrainOptions",
    "chosen_scores",
    "count_groups",
    "data_problems",
    "first_best",
    "fresh_model",
    "group_problems",
    "epoch_rule",
    "grid_rule",
    "group_label",
    "require",
    "selection_details",
    "selection_field",
    "split_scores",
]

#: the key of worst-group accuracy in every scores dict
WGA = "worst_group_accuracy"


def epoch_rule(selection: str, select_epoch: bool = True) -> str:
    """How the epoch of a model is chosen, in words."""
    if not select_epoch:
        return "the last epoch"
    return (
        f"the epoch with the highest {rule(selection).criterion}, ties to the later epoch "
        "(BalancingGroups keeps a checkpoint when the value is >= the best so far)"
    )


def grid_rule(selection: str) -> str:
    """How a grid point is chosen, in words."""
    return f"the grid point with the highest {rule(selection).criterion}, ties to the first"


def selection_details(
    selection: str, select_epoch: bool = True, *, grid: bool = False
) -> dict[str, Any]:
    """The part of a mitigator's ``details`` that says how its model was chosen:
    ``selection`` (:func:`lvlmva.model_selection.selection_record`), ``criterion``,
    ``epoch_rule`` and, with a grid, ``grid_rule``."""
    out: dict[str, Any] = {
        "selection": selection_record(selection),
        "criterion": rule(selection).criterion,
        "epoch_rule": epoch_rule(selection, select_epoch),
    }
    if grid:
        out["grid_rule"] = grid_rule(selection)
    return out


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


def split_scores(logits: torch.Tensor, split: Split, num_groups: int) -> dict[str, Any]:
    """Worst-group, average-group, worst-class and plain accuracy of ``logits`` ``[N, K]`` on
    ``split`` (:func:`lvlmva.model_selection.selection_scores`: the group scores None without
    group labels; empty groups and classes left out)."""
    return selection_scores(logits, split, num_groups)


def data_problems(
    data: SpuriousDataset, who: str, *, per_group: int = 1, selection: str = "worst-group"
) -> list[str]:
    """What keeps a mitigator that selects by rule ``selection`` from running: no validation
    split, no group labels where the rule compares groups, or a group (worst-group) or class
    (the other rules) of the training or validation split with fewer than ``per_group``
    validation samples (the criterion would not see it)."""
    if data.val is None or len(data.val) == 0:
        return [
            f"{who} needs a validation split (it chooses its epoch there): set the data set's "
            "validation size (dataset.val_size)"
        ]
    problems = selection_problems(data, selection, who)
    if problems:
        return problems
    by_group = rule(selection).needs_groups and data.val.groups is not None
    if by_group:
        cells = data.val.groups
        names = [s.groups for s in (data.train, data.val) if s.groups is not None]
        size, what, label = count_groups(data), "group", group_label
    else:
        cells, names = data.val.labels, [data.train.labels, data.val.labels]
        size, what, label = data.num_classes, "class", class_label
    counts = torch.bincount(cells, minlength=size)
    expected = torch.unique(torch.cat(names)).tolist()
    short = [g for g in expected if int(counts[g]) < per_group]
    if short:
        listed = ", ".join(f"{label(data, g)}: {int(counts[g])}" for g in short)
        problems.append(
            f"{who} needs at least {per_group} validation sample(s) of every {what} the training "
            f"or validation split has; too few in {listed}. Enlarge the validation split, or "
            "give it every group (DecoyMNIST: val_decoys = 'random')"
        )
    return problems


def class_label(data: SpuriousDataset, k: int) -> str:
    """``class 'name'`` for messages."""
    return f"class {data.class_names[k]!r}" if k < len(data.class_names) else f"class {k}"


def group_problems(
    data: SpuriousDataset, who: str, splits: Sequence[str] = ("train",)
) -> list[str]:
    """A problem per split of ``splits`` without the group labels a mitigator trains with."""
    words = {"train": "training", "val": "validation", "test": "test"}
    return [
        f"{who} needs group labels on the {words[name]} split, which the data set does not have"
        for name in splits
        if getattr(data, name) is not None and getattr(data, name).groups is None
    ]


def chosen_scores(chosen: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`EpochSelector.finish` returned, without the per-epoch history: the chosen
    ``epoch`` and its ``val`` (and ``test``) scores, for a ``details["chosen"]`` entry."""
    return {k: v for k, v in chosen.items() if k != "epochs"}


def require(problems: Sequence[str]) -> None:
    """Raise a ``ValueError`` listing ``problems`` (when there are any)."""
    if problems:
        raise ValueError("\n".join(problems))


def first_best(points: Sequence[dict[str, Any]], selection: str = "worst-group") -> int:
    """Index of the grid point that rule ``selection`` ranks highest, ties to the first
    (:func:`lvlmva.training.first_best`, the rule the aligners' grids follow too): each point
    holds its scores under ``"val"`` (and ``"test"`` for ``"oracle-test"``)."""
    key = rule(selection).split
    return training.first_best([score_value(point[key], selection) for point in points])


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
    split after every epoch (and on the test split under ``"oracle-test"``) and keeps the state
    of the best epoch by rule ``selection`` (:func:`epoch_rule`); with ``keep_best`` False the
    last epoch is kept (the scores are still recorded).

    After training, :meth:`finish` loads the kept state into the model and returns what was
    chosen: ``{"epoch", "val", "epochs"}`` (the per-epoch scores), with ``"test"`` beside
    ``"val"`` under ``"oracle-test"``.
    """

    def __init__(
        self,
        trainer: Trainer,
        data: SpuriousDataset,
        num_groups: int,
        *,
        keep_best: bool = True,
        selection: str = "worst-group",
    ) -> None:
        self.trainer = trainer
        self.data = data
        self.num_groups = num_groups
        self.keep_best = keep_best
        self.selection = selection
        self.split_key = rule(selection).split
        self.history: list[dict[str, Any]] = []
        self._best: tuple[int, dict[str, Any], dict[str, torch.Tensor]] | None = None

    @classmethod
    def for_options(
        cls, trainer: Trainer, data: SpuriousDataset, options: RetrainOptions
    ) -> EpochSelector:
        """A selector that follows ``options.selection`` and ``options.select_epoch``."""
        return cls(
            trainer,
            data,
            count_groups(data),
            keep_best=options.select_epoch,
            selection=options.selection,
        )

    def _split_scores(self, model: nn.Module, split: Split) -> dict[str, Any]:
        return split_scores(self.trainer.predict(model, split.inputs), split, self.num_groups)

    def scores(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """``{"val": ...}``, and ``"test"`` under ``"oracle-test"``."""
        out = {"val": self._split_scores(model, self.data.val)} if self.data.val is not None else {}
        if self.split_key == "test":
            out["test"] = self._split_scores(model, self.data.test)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The scores so far and the kept epoch (for a checkpoint of the fit it watches)."""
        return {"history": self.history, "best": self._best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        best = state["best"]
        self._best = None if best is None else (int(best[0]), best[1], best[2])

    def __call__(self, end: EpochEnd) -> None:
        scores = self.scores(end.model)
        entry: dict[str, Any] = {"epoch": end.epoch, **scores.get("val", {})}
        if "test" in scores:
            entry["test"] = scores["test"]
        self.history.append(entry)
        value = score_value(scores[self.split_key], self.selection)
        if self.keep_best and (
            self._best is None
            or value >= score_value(self._best[1][self.split_key], self.selection)
        ):
            state = {k: v.detach().cpu().clone() for k, v in end.model.state_dict().items()}
            self._best = (end.epoch, scores, state)

    def finish(self, model: nn.Module) -> dict[str, Any]:
        if self._best is not None:
            epoch, scores, state = self._best
            model.load_state_dict(state)
        elif self.history:
            last = self.history[-1]
            epoch = int(last["epoch"])
            scores = {"val": {k: v for k, v in last.items() if k not in ("epoch", "test")}}
            if "test" in last:
                scores["test"] = last["test"]
        else:  # zero epochs: the untrained model
            epoch, scores = 0, self.scores(model)
        return {"epoch": int(epoch), **scores, "epochs": list(self.history)}


def selection_field(default: str = "worst-group") -> Any:
    """The ``selection`` option of a mitigator (a pydantic ``Field``)."""
    return Field(
        default,
        description="What chooses the epoch (and the grid point, for a method with a grid): "
        "'worst-group' (worst-group validation accuracy; needs validation group labels; the "
        "references' rule), 'worst-class' (lowest per-class validation accuracy; no group "
        "labels, SubpopBench's finding), 'average' (validation accuracy), or 'oracle-test' "
        "(worst-group accuracy on the test split: an upper bound, labelled so wherever it "
        "appears).",
    )


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
        description="Keep the epoch that the selection rule ranks best (BalancingGroups' model "
        "selection; ties to the later epoch). False = the last epoch. The validation scores of "
        "every epoch are recorded either way.",
    )
    selection: SelectionRule = selection_field()
