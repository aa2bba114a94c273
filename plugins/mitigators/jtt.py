"""JTT: Just Train Twice (Liu et al. 2021; anniesch/jtt).

1. Stage 1: ERM on the training split for T epochs (the run's ``[train]`` settings).
2. Error set: the training samples the stage-1 model misclassifies. By default
   (``error_set = "train-pass"``) these are the predictions made *during* the training pass of
   epoch T, each batch predicted in train mode before its optimiser step: what the reference
   writes to ``output_train_epoch_T.csv`` and ``process_training.py`` reads. The other choice,
   ``"eval-pass"``, is a separate pass over the training split in eval mode after epoch T
   (BalancingGroups' JTT).
3. Stage 2: a fresh model trained from scratch on an index list where every error-set sample
   appears ``1 + lambda_up`` times and every other sample once (the reference concatenates
   the training set with the error set repeated ``lambda_up`` times; the trainer shuffles).

The grid is every (T, lambda_up) pair, T in ``t_grid`` and lambda_up in ``lambda_up_grid``
(the reference's generator script: 20, 50, 100). Each point's stage-2 model is chosen at its
best epoch and the points are compared by the ``selection`` rule, worst-group validation
accuracy by default (BalancingGroups): T is chosen on validation like lambda_up.

What T means: the number of stage-1 epochs, counted from 1, so the error set comes from the
T-th pass over the training split. The reference counts epochs from 0: T here is the
reference's ``--final_epoch T-1``. Its CelebA run (``--final_epoch 1``) is T = 2 here, its
Waterbirds run (``--final_epoch 60``) T = 61. Every grid point records its
``reference_final_epoch``.

A T whose error set is empty (a stage-1 model that fits every training sample by then) is
recorded in the grid as skipped, with the reason; only when every T's is empty is it an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .validation import (
    EpochSelector,
    RetrainOptions,
    chosen_scores,
    count_groups,
    data_problems,
    first_best,
    fresh_model,
    require,
    selection_details,
)

if TYPE_CHECKING:
    from lvlmva.training import EpochEnd, Trainer

__all__ = ["JttMitigator", "JttOptions", "upsampled_indices"]


def _distinct_positive(name: str, values: list[int]) -> list[int]:
    if not values:
        raise ValueError(f"{name} must name at least one value")
    if any(v < 1 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct integers >= 1, got {values}")
    return values


class JttOptions(RetrainOptions):
    """Options of ``jtt``; ``epochs`` and ``select_epoch`` are those of stage 2."""

    t_grid: list[int] = Field(
        default_factory=lambda: [1, 2, 3],
        description="Stage-1 epochs T to try, counted from 1 (a grid, chosen on validation with "
        "lambda_up). T is the reference's --final_epoch T-1: its CelebA setting (final_epoch 1) "
        "is T = 2, Waterbirds' (final_epoch 60) T = 61, MultiNLI's and CivilComments' "
        "(final_epoch 2) T = 3 (BalancingGroups' grids: 40/50/60 and 1/5/10). Default [1, 2, 3]: "
        "on a small data set a few epochs fit almost every training sample and leave no errors "
        "to upweight (a T whose error set is empty is skipped and recorded). One stage-1 run of "
        "max(T) epochs serves every T.",
    )
    lambda_up_grid: list[int] = Field(
        default_factory=lambda: [20, 50, 100],
        description="Upweighting factors lambda_up to try (a grid): an error-set sample appears "
        "1 + lambda_up times in stage 2. Default: the reference's generator script. The grid "
        "is t_grid x lambda_up_grid, one stage-2 model per point: k points train k + 1 models.",
    )
    error_set: Literal["train-pass", "eval-pass"] = Field(
        "train-pass",
        description='"train-pass" (the reference): the predictions made during the training pass '
        'of epoch T, in train mode, each batch before its step; "eval-pass": a separate pass over '
        "the training split in eval mode after epoch T (BalancingGroups).",
    )

    @field_validator("t_grid", "lambda_up_grid")
    @classmethod
    def _grid(cls, values: list[int], info) -> list[int]:
        return _distinct_positive(info.field_name, values)


def upsampled_indices(n: int, errors: torch.Tensor, lambda_up: int) -> torch.Tensor:
    """The stage-2 index list: ``0..n-1`` once, then the error set ``lambda_up`` more times."""
    return torch.cat([torch.arange(n), errors.repeat(lambda_up)])


class _ErrorSets:
    """An ``on_epoch`` callback for stage 1: the error set at each epoch of ``t_grid``."""

    def __init__(self, trainer: Trainer, data: SpuriousDataset, ts: list[int], mode: str) -> None:
        self.trainer, self.data, self.ts, self.mode = trainer, data, set(ts), mode
        self.found: dict[int, torch.Tensor] = {}

    def __call__(self, end: EpochEnd) -> None:
        if end.epoch not in self.ts:
            return
        labels = self.data.train.labels
        if self.mode == "train-pass":
            wrong = end.order[end.predicted != labels[end.order]]
        else:
            predicted = self.trainer.predict(end.model, self.data.train.inputs).argmax(dim=1)
            wrong = torch.nonzero(predicted != labels).flatten()
        self.found[end.epoch] = torch.unique(wrong)  # sorted; the order is every index once

    def state_dict(self) -> dict[str, Any]:
        return {"found": dict(self.found)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.found = {int(t): errors for t, errors in state["found"].items()}


class JttMitigator:
    """JTT (Liu et al. 2021): retrain with what a T-epoch ERM model got wrong upweighted.

    ERM for T epochs, then a fresh model trained with the samples stage 1 misclassified
    repeated lambda_up more times.

    Trains one stage-1 model for max(T) epochs (the error sets of every T of the grid come
    from that one run: epoch e's training is the same whatever follows it) and one stage-2
    model per grid point: a grid of k points trains k + 1 models. Stage 1 is seeded from
    ``ctx.generator("jtt-stage1-init")`` with the tag ``"jtt-stage1"``; every stage-2 model
    starts from the same initialisation (``"jtt-stage2-init"``), so that points differ only by
    (T, lambda_up), and trains with the tag ``"jtt-T<T>-up<lambda_up>"``.
    """

    Options: ClassVar[type[PluginOptions]] = JttOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: JttOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        return data_problems(data, "jtt", selection=self.options.selection)

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        opts = self.options
        require(self.check_data(data))
        num_groups = count_groups(data)
        n = len(data.train)

        errors = _ErrorSets(trainer, data, opts.t_grid, opts.error_set)
        stage1 = fresh_model(trainer, ctx, "jtt-stage1-init")
        trainer.fit(data.train, stage1, epochs=max(opts.t_grid), tag="jtt-stage1", on_epoch=errors)
        empty = [t for t in opts.t_grid if errors.found[t].numel() == 0]
        if len(empty) == len(opts.t_grid):
            also = ", or error_set = 'train-pass'" if opts.error_set == "eval-pass" else ""
            raise ValueError(
                f"jtt: the stage-1 model misclassified none of the {n} training samples in the "
                f"{opts.error_set} of epoch T = {', '.join(map(str, empty))}: the error set is "
                "empty and there is nothing to upweight. Use a smaller T (t_grid), a lower "
                "train.lr or a higher train.weight_decay, so that stage 1 does not fit every "
                f"training sample{also}"
            )

        grid: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        best_state: dict[str, torch.Tensor] = {}
        for t in opts.t_grid:
            error_set = errors.found[t]
            if error_set.numel() == 0:
                skipped.append(
                    {
                        "T": t,
                        "reference_final_epoch": t - 1,
                        "reason": f"the stage-1 model misclassified none of the {n} training "
                        f"samples in the {opts.error_set} of epoch {t}: nothing to upweight",
                    }
                )
                continue
            for lambda_up in opts.lambda_up_grid:
                indices = upsampled_indices(n, error_set, lambda_up)
                selector = EpochSelector.for_options(trainer, data, opts)
                model = fresh_model(trainer, ctx, "jtt-stage2-init")
                trainer.fit(
                    data.train,
                    model,
                    indices=indices,
                    epochs=opts.epochs,
                    tag=f"jtt-T{t}-up{lambda_up}",
                    on_epoch=selector,
                )
                chosen = selector.finish(model)
                grid.append(
                    {
                        "params": {"T": t, "lambda_up": lambda_up},
                        "reference_final_epoch": t - 1,
                        "error_set_size": int(error_set.numel()),
                        "error_set_groups": _group_counts(data, error_set, num_groups),
                        "stage2_samples": int(indices.numel()),
                        **chosen,
                    }
                )
                # only the best point's weights are kept
                if first_best(grid, opts.selection) == len(grid) - 1:
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
        best = first_best(grid, opts.selection)
        model.load_state_dict(best_state)
        details = {
            "method": "jtt",
            **selection_details(opts.selection, opts.select_epoch, grid=True),
            "error_set": opts.error_set,
            "t_meaning": "stage-1 epochs counted from 1: T is the reference's --final_epoch T-1",
            "models_trained": len(grid) + 1,
            "grid": grid,
            "skipped": skipped,
            "chosen": {
                "index": best,
                "params": grid[best]["params"],
                "reference_final_epoch": grid[best]["reference_final_epoch"],
                **{
                    k: v
                    for k, v in chosen_scores(grid[best]).items()
                    if k in ("epoch", "val", "test")
                },
            },
        }
        return TrainedModel(model, details)


def _group_counts(data: SpuriousDataset, indices: torch.Tensor, num_groups: int) -> list[int]:
    """Training samples per group among ``indices`` (how much of the error set each group is)."""
    groups = data.train.groups
    if groups is None:
        return []
    return torch.bincount(groups[indices], minlength=num_groups).tolist()
