"""SUBY: class-balanced subsampling of the training split, then ERM (Idrissi et al. 2022,
"Simple data balancing achieves competitive worst-group-accuracy"; facebookresearch/BalancingGroups,
``datasets.py`` ``GroupDataset.subsample_``, lines 55-78 at commit 72d31e5, method ``"suby"`` =
``subsample_("classes")`` in ``get_loaders``).

Once, before training: one seeded permutation of the training split; walking it in order, a
sample is kept while its class has fewer than ``min_size`` kept samples, ``min_size`` being the
size of the smallest class. Every class then holds exactly ``min_size`` samples: the first ones
of the permutation. This is SUBG's procedure with classes for cells, so the subsample is
:func:`lvlmva.plugins.mitigators.subg.subsample_groups` applied to the class labels. Group
labels are not read. Validation and test splits are left as they are. A fresh model is then
trained on the kept samples with the run's ``[train]`` settings, its epoch chosen by its
``selection`` rule (worst-group validation accuracy by default, as in BalancingGroups).

A class without training samples makes ``min_size`` 0 (BalancingGroups would train on
nothing): that is an error, found by ``check_data`` before anything trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .reweighting import empty_cell_problems
from .subg import Subsample, subsample_groups, train_on_subsample
from .validation import (
    RetrainOptions,
    data_problems,
    require,
)

if TYPE_CHECKING:
    from lvlmva.training import Trainer

__all__ = ["SubyMitigator", "SubyOptions", "subsample_classes"]


def subsample_classes(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> Subsample:
    """BalancingGroups' ``subsample_("classes")``: the first ``min_size`` samples of every class
    in the order of ``torch.randperm(N, generator=generator)`` (one draw), ``min_size`` the size
    of the smallest class; ``cell_sizes`` are the class sizes. An empty class is a
    ``ValueError``."""
    sizes = torch.bincount(labels, minlength=num_classes)
    if int(sizes.min()) == 0:
        empty = torch.nonzero(sizes == 0).flatten().tolist()
        raise ValueError(f"suby: class(es) {empty} have no samples: there is nothing to keep")
    return subsample_groups(labels, num_classes, generator)


class SubyOptions(RetrainOptions):
    """Options of ``suby``."""


class SubyMitigator:
    """SUBY (Idrissi et al. 2022): ERM on the training split subsampled to its smallest class.

    Trains one model.

    Needs no group labels to train (on the validation split only for ``selection =
    "worst-group"``); every class must have training samples. The permutation is drawn from
    ``ctx.generator("suby")``, the model's initialisation from ``ctx.generator("suby-init")``;
    the data order follows the tag ``"suby"``. BalancingGroups tunes learning rate, weight decay
    and batch size and trains with SGD: here they are the run's ``[train]`` settings, so that
    SUBY trains exactly as the original model did.
    """

    Options: ClassVar[type[PluginOptions]] = SubyOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: SubyOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        problems = data_problems(data, "suby", selection=self.options.selection)
        why = "subsamples every training class to the smallest"
        return problems + empty_cell_problems(data, "suby", "class", why)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        require(self.check_data(data))
        kept = subsample_classes(data.train.labels, data.num_classes, ctx.generator("suby"))
        return train_on_subsample("suby", kept, "class_sizes", self.options, trainer, data, ctx)
