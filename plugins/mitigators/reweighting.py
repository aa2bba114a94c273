"""RWY and RWG: ERM on training data resampled so that every class (RWY) or every group (RWG)
is drawn equally often (Idrissi et al. 2022, "Simple data balancing achieves competitive
worst-group-accuracy"; facebookresearch/BalancingGroups).

What the reference does (``datasets.py`` at commit 72d31e5): ``GroupDataset.count_groups``
(lines 37-53) gives training sample ``i`` the weight ``wy[i] = N / n_class(i)`` and
``wg[i] = N / n_group(i)``, ``N`` the size of the training split and ``n`` the size of the
sample's class or (class, attribute) cell; ``get_loaders`` (lines 315-359) hands ``wy`` (method
``"rwy"``) or ``wg`` (``"rwg"``, and ``"dro"``) to ``torch.utils.data.WeightedRandomSampler(
weights, len(weights))``: with replacement (the sampler's default), ``N`` draws per epoch, drawn
anew every epoch, each sample with probability proportional to its weight. Every class (or
group) of the split is thus expected to make up the same share of each epoch. The model is the
plain ``ERM`` of ``models.py``: mean cross-entropy of the drawn batch. The reweighting is done
by sampling, not by weighting the loss (SubpopBench's ``ReWeight`` weights the loss instead;
that is not this method).

Here the same: :func:`inverse_frequency_weights` are BalancingGroups' ``wy``/``wg``;
:class:`WeightedDraws` draws every epoch's ``N`` indices with replacement (``torch.multinomial``,
what the sampler calls) from a seeded generator and gives them to :meth:`Trainer.fit` as its
per-epoch ``indices``, which trains on them in a seeded shuffled order (an i.i.d. draw shuffled is still an
i.i.d. draw). The model trains with the run's ``[train]`` settings (BalancingGroups tunes lr,
weight decay and batch size per method) and its epoch is chosen by the ``selection`` rule,
worst-group validation accuracy by default (BalancingGroups).

A class (RWY) or group (RWG) without training samples is refused by ``check_data``, although
the reference would train on the others: it cannot be drawn, so the balance the method promises
does not hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from lvlmva.checkpoints import stateful
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    class_label,
    count_groups,
    data_problems,
    fresh_model,
    group_label,
    group_problems,
    require,
    selection_details,
)

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = [
    "RwgMitigator",
    "RwgOptions",
    "RwyMitigator",
    "RwyOptions",
    "WeightedDraws",
    "ChainedCallbacks",
    "empty_cell_problems",
    "inverse_frequency_weights",
]

Cells = Literal["class", "group"]


def inverse_frequency_weights(cells: torch.Tensor, num_cells: int) -> torch.Tensor:
    """BalancingGroups' ``wy`` / ``wg``: sample ``i`` weighs ``N / n_c(i)``, ``N = len(cells)``,
    ``n_c`` the number of samples in cell ``c`` (float64, as ``WeightedRandomSampler`` holds
    them). Drawn with probability proportional to it, each non-empty cell is ``1 / C'`` of the
    draws, ``C'`` the number of non-empty cells."""
    sizes = torch.bincount(cells, minlength=num_cells).double()
    return (cells.numel() / sizes)[cells]


def training_cells(data: SpuriousDataset, by: Cells) -> tuple[torch.Tensor, int]:
    """The training split's class labels (``"class"``) or group labels (``"group"``) and how
    many classes or groups there are."""
    if by == "class":
        return data.train.labels, data.num_classes
    if data.train.groups is None:
        raise ValueError("the training split has no group labels")
    return data.train.groups, count_groups(data)


def empty_cell_problems(data: SpuriousDataset, who: str, by: Cells, why: str) -> list[str]:
    """A problem naming every class (``by="class"``) or group of the data set without training
    samples; ``why`` says what the mitigator would do with it."""
    if by == "group" and data.train.groups is None:
        return []  # reported by group_problems
    cells, num_cells = training_cells(data, by)
    sizes = torch.bincount(cells, minlength=num_cells)
    empty = [c for c in range(num_cells) if int(sizes[c]) == 0]
    if not empty:
        return []
    label = group_label if by == "group" else class_label
    listed = ", ".join(label(data, c) for c in empty)
    what = "group(s)" if by == "group" else "class(es)"
    hint = (
        " (DecoyMNIST: dataset.train_match_share < 1)"
        if by == "group"
        else " whose training split has every class"
    )
    return [
        f"{who} {why}, but {len(empty)} {what} have no training samples: {listed}. Use a data "
        f"set{hint}"
    ]


class ChainedCallbacks:
    """One ``on_epoch`` callback that calls each of ``callbacks`` in turn (none of them stops
    training). Its state (for a checkpoint of the fit) is that of each callback, in order."""

    def __init__(self, *callbacks: Callable[[EpochEnd], bool | None]) -> None:
        self.callbacks = callbacks

    def __call__(self, end: EpochEnd) -> None:
        for callback in self.callbacks:
            callback(end)

    @property
    def can_checkpoint(self) -> bool:
        """Whether every callback can be saved (else the fit takes no checkpoint)."""
        return all(map(stateful, self.callbacks))

    def state_dict(self) -> dict[str, Any]:
        return {"callbacks": [callback.state_dict() for callback in self.callbacks]}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback, saved in zip(self.callbacks, state["callbacks"], strict=True):
            callback.load_state_dict(saved)  # type: ignore[attr-defined]


class WeightedDraws:
    """Every epoch's training indices as ``WeightedRandomSampler(weights, size)`` gives them to a
    ``DataLoader``: ``size`` (default ``len(weights)``) draws with replacement, index ``i`` with
    probability ``weights[i] / sum(weights)``, drawn anew for every epoch from ``generator``
    (one ``torch.multinomial`` call per epoch, as the sampler makes).

    Called with the epoch (from 1), it returns that epoch's draw: pass it to
    :meth:`Trainer.fit` as ``indices``, which asks once at the start of each epoch, in order.
    With ``cells`` (the class or group of every sample) the draws per cell of every epoch are
    kept in :attr:`drawn_per_cell`.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        generator: torch.Generator,
        *,
        size: int | None = None,
        cells: torch.Tensor | None = None,
        num_cells: int = 0,
    ) -> None:
        self.weights = weights.double()
        self.generator = generator
        self.size = len(weights) if size is None else size
        self.cells, self.num_cells = cells, num_cells
        self.drawn_per_cell: list[list[int]] = []
        self.epochs_drawn = 0

    def __call__(self, epoch: int) -> torch.Tensor:
        if epoch != self.epochs_drawn + 1:
            raise RuntimeError(
                f"WeightedDraws: epoch {epoch} asked after epoch {self.epochs_drawn}: the draws "
                "are one seeded sequence, asked in order"
            )
        self.epochs_drawn = epoch
        drawn = torch.multinomial(self.weights, self.size, True, generator=self.generator)
        if self.cells is not None:
            self.drawn_per_cell.append(
                torch.bincount(self.cells[drawn], minlength=self.num_cells).tolist()
            )
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """The generator and what was drawn so far (for a checkpoint of the fit)."""
        return {
            "generator": self.generator.get_state(),
            "epochs_drawn": self.epochs_drawn,
            "drawn_per_cell": self.drawn_per_cell,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epochs_drawn = int(state["epochs_drawn"])
        self.drawn_per_cell = [list(counts) for counts in state["drawn_per_cell"]]


def resolved_epochs(options: RetrainOptions, trainer: Trainer) -> int:
    """``options.epochs``, or the run's ``train.epochs`` when it is None."""
    return trainer.options.epochs if options.epochs is None else options.epochs


def sampling_record(
    by: Cells, cells: torch.Tensor, num_cells: int, draws: WeightedDraws
) -> dict[str, Any]:
    """The ``details["sampling"]`` of a mitigator that draws with :class:`WeightedDraws`."""
    sizes = torch.bincount(cells, minlength=num_cells)
    n = cells.numel()
    present = sizes > 0
    probability = torch.where(present, 1.0 / int(present.sum()), 0.0)
    return {
        "by": by,
        "sizes": sizes.tolist(),
        "sample_weights": [n / int(s) if int(s) else None for s in sizes],
        "cell_probabilities": probability.tolist(),
        "draws_per_epoch": draws.size,
        "replacement": True,
        "redrawn_every_epoch": True,
        "drawn_per_epoch": draws.drawn_per_cell,
    }


class RwyOptions(RetrainOptions):
    """Options of ``rwy``."""


class RwgOptions(RetrainOptions):
    """Options of ``rwg``."""


class _Reweighting:
    name: ClassVar[str]
    by: ClassVar[Cells]

    def __init__(self, options: RetrainOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        problems = data_problems(data, self.name, selection=self.options.selection)
        if self.by == "group":
            problems += group_problems(data, self.name)
        why = f"draws every {self.by} of the training split equally often"
        return problems + empty_cell_problems(data, self.name, self.by, why)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        require(self.check_data(data))
        name = self.name
        cells, num_cells = training_cells(data, self.by)
        epochs = resolved_epochs(self.options, trainer)
        draws = WeightedDraws(
            inverse_frequency_weights(cells, num_cells),
            ctx.generator(name),
            cells=cells,
            num_cells=num_cells,
        )
        selector = EpochSelector.for_options(trainer, data, self.options)
        model = fresh_model(trainer, ctx, f"{name}-init")
        trainer.fit(
            data.train,
            model,
            indices=draws,
            epochs=epochs,
            tag=name,
            on_epoch=selector,
        )
        chosen = selector.finish(model)
        details = {
            "method": name,
            **selection_details(self.options.selection, self.options.select_epoch),
            "models_trained": 1,
            "sampling": sampling_record(self.by, cells, num_cells, draws),
            "grid": [{"params": {}, **chosen}],
            "chosen": {"index": 0, "params": {}, **chosen_scores(chosen)},
        }
        return TrainedModel(model, details)


class RwyMitigator(_Reweighting):
    """RWY (Idrissi et al. 2022): ERM on epochs drawn class-balanced, with replacement.

    Trains one model.

    Every epoch is ``N`` training indices drawn with replacement, sample ``i`` with probability
    proportional to ``N / n_class(i)`` (BalancingGroups ``datasets.py``, ``wy`` and
    ``get_loaders``' ``WeightedRandomSampler``), drawn anew each epoch from
    ``ctx.generator("rwy")``; the model's initialisation is seeded from
    ``ctx.generator("rwy-init")``, the data order from the tag ``"rwy"``. Training reads no
    group labels. Differs from the reference in the optimiser and hyperparameters, which are
    the run's ``[train]`` settings (BalancingGroups: SGD, lr / weight decay / batch size
    searched), and in that a class without training samples is an error.
    """

    Options: ClassVar[type[PluginOptions]] = RwyOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True
    name: ClassVar[str] = "rwy"
    by: ClassVar[Cells] = "class"


class RwgMitigator(_Reweighting):
    """RWG (Idrissi et al. 2022): ERM on epochs drawn group-balanced, with replacement.

    Trains one model.

    Every epoch is ``N`` training indices drawn with replacement, sample ``i`` with probability
    proportional to ``N / n_group(i)`` (BalancingGroups ``datasets.py``, ``wg`` and
    ``get_loaders``' ``WeightedRandomSampler``; group_DRO's ``--reweight_groups`` without
    ``--robust`` is the same sampler, ``data/dro_dataset.py`` ``get_loader``), drawn anew each
    epoch from ``ctx.generator("rwg")``; the model's initialisation is seeded from
    ``ctx.generator("rwg-init")``, the data order from the tag ``"rwg"``. Groups are the data
    set's (class x spurious attribute); every one must have training samples (the reference
    would leave an empty one out). Optimiser and hyperparameters are the run's ``[train]``
    settings.
    """

    Options: ClassVar[type[PluginOptions]] = RwgOptions
    needs_groups: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = True
    name: ClassVar[str] = "rwg"
    by: ClassVar[Cells] = "group"
