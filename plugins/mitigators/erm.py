"""ERM: the control every peer reports (JTT, DFR and BalancingGroups all tabulate it).

A fresh model trained on the whole training split exactly as the original model ``f`` was
trained (the run's ``[train]`` settings), its epoch chosen like every other baseline's: by its
``selection`` rule, worst-group validation accuracy by default (BalancingGroups). It differs from ``original`` by its
initialisation, its data order and that choice of epoch, so that a baseline's gain over it is
the method's and not the selection's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    data_problems,
    fresh_model,
    require,
    selection_details,
)

if TYPE_CHECKING:
    from lvlmva.training import Trainer

__all__ = ["ErmMitigator", "ErmOptions"]


class ErmOptions(RetrainOptions):
    """Options of ``erm``."""


class ErmMitigator:
    """ERM retrained from scratch, its epoch chosen on val: the control of the baselines.

    Trains one model.

    Needs a validation split, on which its epoch is chosen (``selection``; group labels there
    only for ``"worst-group"``); with ``select_epoch = false`` the validation scores of every
    epoch are still recorded. Training reads no group labels. The model's initialisation is seeded
    from ``ctx.generator("erm-init")``, its data order from the tag ``"erm"``.
    """

    Options: ClassVar[type[PluginOptions]] = ErmOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: ErmOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        return data_problems(data, "erm", selection=self.options.selection)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        require(self.check_data(data))
        selector = EpochSelector.for_options(trainer, data, self.options)
        model = fresh_model(trainer, ctx, "erm-init")
        trainer.fit(data.train, model, epochs=self.options.epochs, tag="erm", on_epoch=selector)
        chosen = selector.finish(model)
        details = {
            "method": "erm",
            **selection_details(self.options.selection, self.options.select_epoch),
            "models_trained": 1,
            "grid": [{"params": {}, **chosen}],
            "chosen": {"index": 0, "params": {}, **chosen_scores(chosen)},
        }
        return TrainedModel(model, details)
