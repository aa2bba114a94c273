"""Model selection as a declared choice: which score chooses an epoch, a grid point or an
aligner's weight, on which split.

Every mitigator and every aligner with a grid chooses by one of four rules (its ``selection``
option), and records the rule with what it chose (:func:`selection_record`), so that
``results.json``, the report and a study's tables say which rule chose each model:

- ``"worst-group"``: worst-group accuracy on the validation split. Needs the validation split's
  group labels: the rule of BalancingGroups (Idrissi et al. 2022), DFR, JTT and GroupDRO.
- ``"worst-class"``: the lowest per-class accuracy on the validation split. Needs no group
  labels: SubpopBench (Yang et al. 2023) found it selects nearly as well as worst-group
  accuracy, which makes it the fair rule for methods sold as needing no group labels.
- ``"average"``: accuracy on the validation split (no group labels; plain ERM practice).
- ``"oracle-test"``: worst-group accuracy on the *test* split. Not a choice a user can make:
  the test split chose the model, so its test numbers are an upper bound, and every table
  labels such a model so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .metrics import accuracy, average_group_accuracy, group_accuracies, worst_group_accuracy
from .records import Split, SpuriousDataset

__all__ = [
    "RULES",
    "Rule",
    "SelectionRule",
    "UPPER_BOUND_MARK",
    "is_upper_bound",
    "rule",
    "selection_problems",
    "selection_record",
    "selection_scores",
    "selection_split",
    "score_value",
    "worst_class_accuracy",
]

SelectionRule = Literal["worst-group", "worst-class", "average", "oracle-test"]

#: what a table appends to the label of a model chosen on the test split
UPPER_BOUND_MARK = "[oracle-test selection: upper bound]"


@dataclass(frozen=True)
class Rule:
    """A selection rule: the ``score`` key of :func:`selection_scores` it maximises on
    ``split`` (``"val"`` or ``"test"``), in words (``criterion``), whether it needs that split's
    group labels, and whether its choice is an upper bound (the test split chose)."""

    name: str
    split: str
    score: str
    criterion: str
    needs_groups: bool
    upper_bound: bool


RULES: dict[str, Rule] = {
    "worst-group": Rule(
        "worst-group",
        "val",
        "worst_group_accuracy",
        "worst-group accuracy on the validation split (needs its group labels)",
        True,
        False,
    ),
    "worst-class": Rule(
        "worst-class",
        "val",
        "worst_class_accuracy",
        "worst-class accuracy on the validation split (no group labels)",
        False,
        False,
    ),
    "average": Rule(
        "average",
        "val",
        "accuracy",
        "accuracy on the validation split (no group labels)",
        False,
        False,
    ),
    "oracle-test": Rule(
        "oracle-test",
        "test",
        "worst_group_accuracy",
        "worst-group accuracy on the TEST split: an upper bound, not a choice a user can make",
        True,
        True,
    ),
}
assert set(RULES) == set(get_args(SelectionRule))


def rule(name: str) -> Rule:
    """The :class:`Rule` named ``name`` (a ``ValueError`` naming the choices otherwise)."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown selection rule {name!r}; choose one of {sorted(RULES)}"
        ) from None


def worst_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The lowest accuracy among the classes present in ``labels`` (per-class recall)."""
    accs = group_accuracies(pred, labels, labels, num_classes)
    present = accs[~torch.isnan(accs)]
    if present.numel() == 0:
        raise ValueError("worst_class_accuracy: no samples")
    return float(present.min())


def selection_scores(
    logits: torch.Tensor, split: Split, num_groups: int, num_classes: int | None = None
) -> dict[str, float | None]:
    """Every score a rule can compare, for ``logits`` ``[N, K]`` on ``split``: ``accuracy``,
    ``worst_class_accuracy``, and ``worst_group_accuracy`` and ``average_group_accuracy``
    (None when the split has no group labels). Empty groups and classes are left out."""
    num_classes = logits.shape[1] if num_classes is None else num_classes
    scores: dict[str, float | None] = {
        "worst_group_accuracy": None,
        "average_group_accuracy": None,
        "worst_class_accuracy": worst_class_accuracy(logits, split.labels, num_classes),
        "accuracy": accuracy(logits, split.labels),
    }
    if split.groups is not None and num_groups > 0:
        scores["worst_group_accuracy"] = worst_group_accuracy(
            logits, split.labels, split.groups, num_groups
        )
        scores["average_group_accuracy"] = average_group_accuracy(
            logits, split.labels, split.groups, num_groups
        )
    return scores


def selection_split(data: SpuriousDataset, name: str) -> Split:
    """The split rule ``name`` scores on (the test split for ``"oracle-test"``)."""
    chosen = rule(name)
    split = data.test if chosen.split == "test" else data.val
    if split is None:
        raise ValueError(
            f"selection = {name!r} scores on the {chosen.split} split, which the data set does not have"
        )
    return split


def selection_problems(data: SpuriousDataset, name: str, who: str) -> list[str]:
    """What keeps rule ``name`` from choosing on ``data``: the split it scores on is missing or
    empty, or it lacks the group labels the rule compares."""
    chosen = rule(name)
    split = data.test if chosen.split == "test" else data.val
    words = "validation" if chosen.split == "val" else "test"
    if split is None or len(split) == 0:
        hint = " (dataset.val_size)" if chosen.split == "val" else ""
        return [
            f"{who}: selection = {name!r} chooses by {chosen.criterion}, but there is no {words} split{hint}"
        ]
    if chosen.needs_groups and split.groups is None:
        return [
            f"{who}: selection = {name!r} needs group labels on the {words} split, which the data set "
            "does not have; 'worst-class' and 'average' need none"
        ]
    return []


def selection_record(name: str) -> dict[str, Any]:
    """How a model was chosen, for its ``details``: ``{"rule", "criterion", "split",
    "upper_bound"}``."""
    chosen = rule(name)
    return {
        "rule": chosen.name,
        "criterion": chosen.criterion,
        "split": chosen.split,
        "upper_bound": chosen.upper_bound,
    }


def is_upper_bound(details: Any) -> bool:
    """Whether a model's ``details`` say the test split chose it."""
    if not isinstance(details, dict):
        return False
    selection = details.get("selection")
    return isinstance(selection, dict) and bool(selection.get("upper_bound"))


def score_value(scores: dict[str, Any], name: str) -> float:
    """The value rule ``name`` compares in ``scores`` (``-inf`` for a missing or NaN one, so that
    it never wins)."""
    value = scores.get(rule(name).score)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value)
