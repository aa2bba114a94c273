"""A :class:`~lvlmva.training.Trainer` that records what it is asked to train: for the tests
of mitigators (and of plugins of one's own), which check what each ``fit`` received."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ..plugins.models.mlp import MlpFactory
from ..protocols import RunContext
from ..records import SpuriousDataset
from ..settings import TrainOptions
from ..training import EpochEnd, Trainer

__all__ = ["RecordingTrainer"]


class RecordingTrainer(Trainer):
    """A Trainer of a small MLP (``hidden`` units) for ``data`` that records every ``fit`` in
    :attr:`calls`: the split, the model passed, its initial state (a copy, when one was
    passed), the keyword arguments (``indices``, ``weights``, ``tag``, ``epochs``, ...) and
    every epoch's :class:`~lvlmva.training.EpochEnd` with a copy of the model as it was then
    (``ends``)."""

    def __init__(
        self,
        data: SpuriousDataset,
        ctx: RunContext,
        *,
        epochs: int = 3,
        lr: float = 1e-2,
        batch_size: int = 64,
        hidden: tuple[int, ...] | list[int] = (16,),
    ) -> None:
        factory = MlpFactory(MlpFactory.Options(hidden=list(hidden)))
        super().__init__(
            lambda: factory.build(data.input_shape, data.num_classes),
            TrainOptions(epochs=epochs, lr=lr, batch_size=batch_size),
            ctx,
        )
        self.calls: list[dict[str, Any]] = []

    def fit(self, split, model=None, *, on_epoch=None, **kwargs):  # noqa: D102
        initial = None if model is None else copy.deepcopy(model.state_dict())
        call = {"split": split, "model": model, "initial": initial, "ends": [], **kwargs}
        self.calls.append(call)

        def record(end: EpochEnd):
            call["ends"].append(dataclasses.replace(end, model=copy.deepcopy(end.model)))
            return None if on_epoch is None else on_epoch(end)

        return super().fit(split, model, on_epoch=record, **kwargs)
