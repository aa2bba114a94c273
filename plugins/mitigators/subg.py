"""SUBG: group-balanced subsampling of the training split, then ERM (Idrissi et al. 2022,
"Simple data balancing achieves competitive worst-group-accuracy"; facebookresearch/BalancingGroups,
``datasets.py`` ``GroupDataset.subsample_``).

Once, before training: one seeded permutation of the training split; walking it in order, a
sample is kept while its (class, attribute) cell (= its group) has fewer than ``min_size``
kept samples, ``min_size`` being the size of the smallest cell. Every cell then holds exactly
``min_size`` samples: the first ones of the permutation. Validation and test splits are left
as they are. A fresh model is then trained on the kept samples with the run's ``[train]``
settings, its epoch chosen by its ``selection`` rule (worst-group validation accuracy by default,
as in BalancingGroups).

An empty cell makes ``min_size`` 0 (BalancingGroups would train on nothing): that is an error,
found by ``check_data`` before anything trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .reweighting import empty_cell_problems
from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    count_groups,
    data_problems,
    fresh_model,
    group_label,
    group_problems,
    require,
    selection_details,
)

if TYPE_CHECKING:
    from lvlmva.training import Trainer

__all__ = ["SubgMitigator", "SubgOptions", "Subsample", "subsample_groups", "train_on_subsample"]


class Subsample(NamedTuple):
    """The kept training indices (int64, in permutation order), the size every cell was cut
    to, and the cell sizes before ``[num_groups]``."""

    indices: torch.Tensor
    min_size: int
    cell_sizes: torch.Tensor


def subsample_groups(
    groups: torch.Tensor, num_groups: int, generator: torch.Generator
) -> Subsample:
    """BalancingGroups' ``subsample_("groups")``: the first ``min_size`` samples of every cell
    in the order of ``torch.randperm(N, generator=generator)`` (one draw). An empty cell is a
    ``ValueError`` (BalancingGroups would keep nothing)."""
    cell_sizes = torch.bincount(groups, minlength=num_groups)
    min_size = int(cell_sizes.min())
    if min_size == 0:
        empty = torch.nonzero(cell_sizes == 0).flatten().tolist()
        raise ValueError(f"subg: cell(s) {empty} have no samples: there is nothing to keep")
    perm = torch.randperm(groups.numel(), generator=generator)
    in_order = groups[perm]
    # Each sample's rank in its cell, in permutation order: a stable sort keeps that order.
    by_cell = torch.argsort(in_order, stable=True)
    starts = torch.cumsum(cell_sizes, 0) - cell_sizes
    rank = torch.empty_like(by_cell)
    rank[by_cell] = torch.arange(groups.numel()) - starts[in_order[by_cell]]
    return Subsample(perm[rank < min_size], min_size, cell_sizes)


def train_on_subsample(
    method: str,
    kept: Subsample,
    sizes_name: str,
    options: RetrainOptions,
    trainer: Trainer,
    data: SpuriousDataset,
    ctx: RunContext,
) -> TrainedModel:
    """Train a fresh model (initialisation ``ctx.generator(f"{method}-init")``, data order by
    the tag ``method``) on the kept training samples, its epoch chosen by ``options.selection``,
    and record the subsample under ``details["subsample"]`` (the cell sizes under
    ``sizes_name``): SUBG's and SUBY's shared second half."""
    selector = EpochSelector.for_options(trainer, data, options)
    model = fresh_model(trainer, ctx, f"{method}-init")
    trainer.fit(
        data.train,
        model,
        indices=kept.indices,
        epochs=options.epochs,
        tag=method,
        on_epoch=selector,
    )
    chosen = selector.finish(model)
    params = {"min_size": kept.min_size}
    details = {
        "method": method,
        **selection_details(options.selection, options.select_epoch),
        "models_trained": 1,
        "subsample": {
            "min_size": kept.min_size,
            "kept": int(kept.indices.numel()),
            "of": len(data.train),
            sizes_name: kept.cell_sizes.tolist(),
        },
        "grid": [{"params": params, **chosen}],
        "chosen": {"index": 0, "params": params, **chosen_scores(chosen)},
    }
    return TrainedModel(model, details)


class SubgOptions(RetrainOptions):
    """Options of ``subg``."""


class SubgMitigator:
    """SUBG (Idrissi et al. 2022): ERM on the training split subsampled to its smallest group.

    Trains one model.

    Cells are the data set's groups (``group_names``: class x spurious attribute); every one must
    have training samples. The permutation is drawn from ``ctx.generator("subg")``, the model's
    initialisation from ``ctx.generator("subg-init")``; the data order follows the tag
    ``"subg"``. BalancingGroups tunes learning rate, weight decay and batch size: here they are
    the run's ``[train]`` settings, so that SUBG trains exactly as the original model did.
    """

    Options: ClassVar[type[PluginOptions]] = SubgOptions
    needs_groups: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: SubgOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        problems = data_problems(data, "subg", selection=self.options.selection)
        problems += group_problems(data, "subg")
        why = "subsamples every training group (class x attribute) to the smallest"
        return problems + empty_cell_problems(data, "subg", "group", why)
        sizes = torch.bincount(data.train.groups, minlength=count_groups(data))
        empty = [g for g in range(sizes.numel()) if int(sizes[g]) == 0]
        if empty:
            listed = ", ".join(group_label(data, g) for g in empty)
            problems.append(
                f"subg subsamples every training cell (class x attribute) to the smallest, but "
                f"{len(empty)} cell(s) have no training samples: {listed}. Use a data set whose "
                "training split has every group (DecoyMNIST: dataset.train_match_share < 1)"
            )
        return problems

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        require(self.check_data(data))
        assert data.train.groups is not None  # checked above
        num_groups = count_groups(data)
        kept = subsample_groups(data.train.groups, num_groups, ctx.generator("subg"))
        return train_on_subsample("subg", kept, "cell_sizes", self.options, trainer, data, ctx)
