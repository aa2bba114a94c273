"""AFR: Automatic Feature Reweighting (Qiu, Potapczynski, Izmailov and Wilson 2023, "Simple and
Fast Group Robustness by Automatic Feature Reweighting"; AndPotap/afr at commit b34b6cd:
``train_supervised.py`` and ``train_embeddings.py`` with the README's commands, ``losses/
__init__.py`` ``get_exp_weights`` and ``afr_fn``, ``utils/supervised_utils.py`` ``take_step``,
``rebalance_weights`` and ``normalize_weights``, ``data/datasets.py`` ``_randomly_split_in_two``,
and the tuning notebook ``notebooks/wb_celeba.ipynb``).

No group labels are used for training:

1. Split: the training split is shuffled once and cut in two: the first ``erm_fraction`` (the
   reference's ``--train_prop=80``) trains the ERM model, the rest (``--train_prop=-20``, the
   last 20 %) is held out for reweighting.
2. Stage 1: ERM on the first part (the run's ``[train]`` settings); the reference keeps the last
   epoch (``final_checkpoint.pt``), as here by default.
3. Weights: on the held-out part, with ``p_i`` the ERM model's softmax probability of sample
   ``i``'s true class (eval mode), ``w_i = exp(-gamma * p_i)`` (``get_exp_weights``); then
   each class's weights are multiplied by ``N / N_class`` (``rebalance_weights``, on by default:
   ``--rebalance_weights``, the notebook's ``balance_classes=True``) and all divided by their
   sum (``normalize_weights``).
4. Stage 2: only the last layer is retrained, on the held-out part's penultimate features
   (eval mode, computed once), from the ERM head ``(W0, b0)``: full-batch gradient descent on
   ``sum_i w_i CE_i + lambda * (||W - W0||^2 + ||b - b0||^2)`` (``afr_fn`` plus ``take_step``'s
   ``reg_coeff`` term): SGD without momentum or weight decay, lr 0.01, the gradient norm clipped
   at 1, 500 epochs of one step each (the README's Waterbirds command).
5. Selection: every stage-2 epoch is scored on the validation split and the best kept (the
   notebook's ``early_stop='wga'``); the grid of (gamma, lambda) is searched in full and the
   best point kept (the notebook's sweep, ``val_wga > best_vwga``: ties to the first).

What differs from the reference:

- the split is drawn from ``ctx.generator("afr-split")`` (the reference shuffles with Python's
  ``random.seed(21)``), and is a partition: the reference's ``-20`` takes the last
  ``int(0.2 N)`` samples, which can leave one sample in neither part;
- stage 1 trains with the run's ``[train]`` settings (Adam) where the reference uses SGD with
  momentum 0.9 (lr 3e-3, weight decay 1e-4, 50 epochs, batch 32 on Waterbirds);
  ``erm_select_epoch`` can choose its epoch on validation instead of keeping the last;
- the stage-2 epoch and the grid point are chosen by the ``selection`` rule, worst-group
  validation accuracy by default as in the reference, but ties go to the later epoch (the
  project's rule, BalancingGroups'; the notebook's ``np.argmax`` takes the first);
  ``select_epoch = false`` keeps the last epoch;
- stage 2 starts at the ERM head, as ``train_embeddings.py`` does; the notebook instead adds a
  second, freshly initialised linear layer to the frozen ERM head and penalises that layer's
  weights, which is the same objective from a different (random) start;
- grids: the reference tunes per data set (Waterbirds: gamma in ``np.linspace(4, 20, 33)``,
  lambda in ``[0, 0.1, 0.2, 0.3]``; CelebA: gamma in ``np.linspace(1, 3, 10)``, lambda in
  ``np.logspace(-3, -1, 3)``, with 1,000 epochs at lr 0.02). The default grid here spans both,
  thinned (14 gammas, the 6 lambdas of both), since a new data set's range is not known;
- SGD in float32 on the trainer's device; the features come from ``dfr``'s
  :func:`~lvlmva.plugins.mitigators.dfr.penultimate_features` and the head is written by its
  :func:`~lvlmva.plugins.mitigators.dfr.write_head`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lvlmva.model_selection import rule, score_value
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Split, SpuriousDataset, TrainedModel

from .dfr import Linear, penultimate_features, write_head
from .validation import (
    EpochSelector,
    RetrainOptions,
    count_groups,
    data_problems,
    first_best,
    fresh_model,
    require,
    selection_details,
    split_scores,
)

if TYPE_CHECKING:
    from lvlmva.training import Trainer

__all__ = [
    "GAMMA_GRID",
    "LAMBDA_GRID",
    "AfrMitigator",
    "AfrOptions",
    "afr_weights",
    "fit_reweighted_head",
    "split_training",
]

#: gamma: CelebA's ``np.linspace(1, 3, 10)`` and Waterbirds' ``np.linspace(4, 20, 33)``, thinned
GAMMA_GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0)
#: lambda: CelebA's ``np.logspace(-3, -1, 3)`` and Waterbirds' ``[0, 0.1, 0.2, 0.3]``
LAMBDA_GRID = (0.0, 0.001, 0.01, 0.1, 0.2, 0.3)


class AfrOptions(RetrainOptions):
    """Options of ``afr``: ``epochs`` are stage 1's (the ERM model); ``select_epoch`` and
    ``selection`` choose stage 2's epoch and the grid point."""

    erm_fraction: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Share of the training split the ERM model of stage 1 trains on (the "
        "reference's --train_prop=80); the rest is held out and reweighted in stage 2.",
    )
    erm_select_epoch: bool = Field(
        False,
        description="False (the reference: final_checkpoint.pt): stage 1 keeps its last epoch. "
        "True: its epoch is chosen by the selection rule on validation. Its validation scores "
        "are recorded per epoch either way.",
    )
    gamma_grid: list[float] = Field(
        default_factory=lambda: list(GAMMA_GRID),
        description="Temperatures gamma of the weights exp(-gamma * p_true) to try (a grid, "
        "crossed with lambda_grid). Default: the reference's CelebA (1 to 3) and Waterbirds "
        "(4 to 20) ranges, thinned.",
    )
    lambda_grid: list[float] = Field(
        default_factory=lambda: list(LAMBDA_GRID),
        description="Strengths lambda of the penalty lambda * ||(W, b) - (W0, b0)||^2 that "
        "pulls the head towards the ERM head (a grid; the reference's reg_coeff). Default: "
        "the reference's CelebA and Waterbirds values together.",
    )
    balance_classes: bool = Field(
        True,
        description="Multiply each class's weights by N / N_class before normalising (the "
        "reference's --rebalance_weights, default on; the notebook's balance_classes=True).",
    )
    head_epochs: int = Field(
        500,
        ge=1,
        description="Epochs of stage 2, one full-batch gradient step each (the reference's "
        "Waterbirds num_epochs; CelebA 1000).",
    )
    head_lr: float = Field(
        0.01,
        gt=0,
        description="Learning rate of stage 2's SGD, without momentum or weight decay (the "
        "reference's Waterbirds init_lr; CelebA 0.02).",
    )
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Stage 2 clips the gradient norm of the head to this (the reference's "
        "grad_norm 1.0); None: no clipping.",
    )

    @field_validator("gamma_grid", "lambda_grid")
    @classmethod
    def _grid(cls, values: list[float], info) -> list[float]:
        if not values or any(not v >= 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{info.field_name} must be distinct numbers >= 0, got {values}")
        return values


def split_training(
    n: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's two parts of the training split: one ``torch.randperm(n)`` draw; its
    first ``int(n * fraction)`` indices train the ERM model, the rest are held out (each part
    sorted)."""
    perm = torch.randperm(n, generator=generator)
    cut = int(n * fraction)
    return torch.sort(perm[:cut]).values, torch.sort(perm[cut:]).values


def afr_weights(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float, balance_classes: bool = True
) -> torch.Tensor:
    """AFR's weights of samples with ERM ``logits`` ``[N, K]``, float64 ``[N]``, summing to 1:
    ``exp(-gamma * p_true)``, each class's multiplied by ``N / N_class`` when
    ``balance_classes``, then normalised (``get_exp_weights``, ``rebalance_weights``,
    ``normalize_weights``)."""
    p_true = F.softmax(logits.double(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    weights = torch.exp(-gamma * p_true)
    if balance_classes:
        counts = torch.bincount(labels).double()
        weights = weights * (labels.numel() / counts[labels])
    return weights / weights.sum()


def fit_reweighted_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor],
    lam: float,
    *,
    epochs: int,
    lr: float,
    max_grad_norm: float | None,
    on_epoch: Any = None,
) -> nn.Linear:
    """Stage 2 for one grid point: a linear layer started at ``head = (W0, b0)``, trained by
    full-batch SGD (no momentum) on ``sum(weights * CE) + lam * ||(W, b) - (W0, b0)||^2`` for
    ``epochs`` steps, the gradient norm clipped at ``max_grad_norm`` (``take_step``). After
    every step ``on_epoch(epoch, layer)`` is called (epoch from 1). Returns the layer."""
    w0, b0 = (t.detach() for t in head)
    layer = nn.Linear(w0.shape[1], w0.shape[0]).to(features.device, features.dtype)
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    optimiser = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    weights = weights.to(features.device, features.dtype)
    for epoch in range(1, epochs + 1):
        optimiser.zero_grad(set_to_none=True)
        ce = F.cross_entropy(layer(features), labels, reduction="none")
        penalty = (layer.weight - w0).pow(2).sum() + (layer.bias - b0).pow(2).sum()
        ((weights * ce).sum() + lam * penalty).backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(layer.parameters(), max_grad_norm)
        optimiser.step()
        if on_epoch is not None:
            on_epoch(epoch, layer)
    return layer


class _BestEpoch:
    """Scores a stage-2 layer on the split(s) the selection rule reads after every epoch and
    keeps the best (ties to the later epoch, as :class:`EpochSelector`); with ``keep_best``
    False only the last epoch (of ``epochs``) is scored and kept."""

    def __init__(self, features: dict[str, torch.Tensor], splits: dict[str, Split],
                 num_groups: int, selection: str, keep_best: bool, epochs: int) -> None:  # fmt: skip
        self.features, self.splits, self.num_groups = features, splits, num_groups
        self.selection, self.keep_best, self.epochs = selection, keep_best, epochs
        self.key = rule(selection).split
        self.best: tuple[int, dict[str, Any], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last: dict[str, Any] = {}

    @torch.no_grad()
    def __call__(self, epoch: int, layer: nn.Linear) -> None:
        if not self.keep_best and epoch < self.epochs:
            return
        scores = {
            name: split_scores(layer(x).cpu(), self.splits[name], self.num_groups)
            for name, x in self.features.items()
        }
        self.last = {"epoch": epoch, **scores}
        if (
            not self.keep_best
            or self.best is None
            or score_value(scores[self.key], self.selection)
            >= score_value(self.best[1][self.key], self.selection)
        ):
            state = (layer.weight.detach().cpu().clone(), layer.bias.detach().cpu().clone())
            self.best = (epoch, scores, state)


def _check_model(model: nn.Module) -> None:
    if not callable(getattr(model, "features", None)) or not isinstance(
        getattr(model, "head", None), nn.Linear
    ):
        raise TypeError(
            "afr needs a model with features(x) -> [B, D] and head: nn.Linear (the ModelFactory "
            f"contract); {type(model).__name__} lacks them"
        )


def _weight_shares(weights: torch.Tensor, groups: torch.Tensor | None, num_groups: int):
    """The share of the total weight each group of the held-out part gets (reporting only)."""
    if groups is None:
        return None
    return torch.bincount(groups, weights=weights, minlength=num_groups).tolist()


class AfrMitigator:
    """AFR (Qiu et al. 2023): ERM on most of the training split, then its last layer retrained
    on the held-out rest, each sample weighted by exp(-gamma * p_true) of the ERM model, the head
    pulled towards the ERM head by lambda.

    Trains one network (stage 1, seeded from ``ctx.generator("afr-init")``, data order from the
    tag ``"afr-erm"``) and one linear head per (gamma, lambda) grid point, each on the held-out
    part's features: ``len(gamma_grid) x len(lambda_grid)`` heads of ``head_epochs``
    full-batch steps. The split is drawn from ``ctx.generator("afr-split")``. Training reads
    no group labels; the validation split chooses stage 2's epoch and the grid point
    (``selection``; group labels there only for ``"worst-group"``). Needs a model with
    ``features(x)`` and ``head: nn.Linear``. ``details`` record the split, stage 1's
    validation scores per epoch, every grid point's chosen epoch and scores, the effective
    sample size ``1 / sum(w^2)`` of each gamma's weights (the reference's ``n_eff``) and, where
    the training split has group labels, each held-out group's share of the weight. The module
    docstring lists what differs from AndPotap/afr.
    """

    Options: ClassVar[type[PluginOptions]] = AfrOptions
    needs_groups: ClassVar[bool] = False
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: AfrOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        problems = data_problems(data, "afr", selection=self.options.selection)
        n = len(data.train)
        cut = int(n * self.options.erm_fraction)
        if cut < 1 or n - cut < 1:
            problems.append(
                f"afr splits the {n} training samples into {cut} for ERM and {n - cut} held out "
                f"(erm_fraction = {self.options.erm_fraction}): both parts need samples; "
                "enlarge the training split or change erm_fraction"
            )
        if data.num_classes < 2:
            problems.append("afr needs at least two classes")
        return problems

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        opts = self.options
        require(self.check_data(data))
        assert data.val is not None  # checked above
        num_groups = count_groups(data)
        erm_part, held = split_training(
            len(data.train), opts.erm_fraction, ctx.generator("afr-split")
        )

        # stage 1: ERM on the first part
        stage1 = EpochSelector(
            trainer, data, num_groups, keep_best=opts.erm_select_epoch, selection=opts.selection
        )
        model = fresh_model(trainer, ctx, "afr-init")
        _check_model(model)
        trainer.fit(
            data.train, model, indices=erm_part, epochs=opts.epochs, tag="afr-erm", on_epoch=stage1
        )
        erm = stage1.finish(model)

        # stage 2: the head on the held-out part's features
        device = trainer.device

        def features(images: torch.Tensor) -> torch.Tensor:
            x = penultimate_features(model, images, device)
            return torch.as_tensor(x, dtype=torch.float32, device=device)

        x_held = features(data.train.inputs[held])
        y_held = data.train.labels[held].to(device)
        w0 = model.head.weight.detach().to(device, torch.float32)
        b0 = model.head.bias.detach().to(device, torch.float32)
        with torch.no_grad():
            erm_logits = (x_held @ w0.T + b0).cpu()
        splits = {"val": data.val}
        if rule(opts.selection).split == "test":
            splits["test"] = data.test
        scored = {name: features(split.inputs) for name, split in splits.items()}
        held_groups = None if data.train.groups is None else data.train.groups[held]

        grid: list[dict[str, Any]] = []
        by_gamma: dict[float, dict[str, Any]] = {}
        best_head: tuple[torch.Tensor, torch.Tensor] | None = None
        for gamma in opts.gamma_grid:
            weights = afr_weights(erm_logits, data.train.labels[held], gamma, opts.balance_classes)
            by_gamma[gamma] = {
                "gamma": gamma,
                "effective_samples": float(1.0 / (weights**2).sum()),
                "weight_share_by_group": _weight_shares(weights, held_groups, num_groups),
            }
            for lam in opts.lambda_grid:
                tracker = _BestEpoch(
                    scored, splits, num_groups, opts.selection, opts.select_epoch, opts.head_epochs
                )
                fit_reweighted_head(
                    x_held, y_held, weights, (w0, b0), lam, epochs=opts.head_epochs,
                    lr=opts.head_lr, max_grad_norm=opts.max_grad_norm, on_epoch=tracker,
                )  # fmt: skip
                assert tracker.best is not None  # head_epochs >= 1
                epoch, scores, state = tracker.best
                grid.append(
                    {
                        "params": {"gamma": gamma, "lambda": lam},
                        "epoch": epoch,
                        **scores,
                        "last_epoch_val": tracker.last["val"],
                    }
                )
                if first_best(grid, opts.selection) == len(grid) - 1:
                    best_head = state
        best = first_best(grid, opts.selection)
        assert best_head is not None
        dim = best_head[0].shape[1]
        linear = Linear(best_head[0].double().numpy(), best_head[1].double().numpy())
        write_head(model.head, linear, np.zeros(dim), np.ones(dim))
        model.eval()
        point = grid[best]
        details = {
            "method": "afr",
            **selection_details(opts.selection, opts.select_epoch, grid=True),
            "epoch_meaning": "stage 2's epochs, one full-batch gradient step each (the "
            "reference's num_epochs)",
            "models_trained": 1,
            "head_fits": len(grid),
            "split": {
                "erm_fraction": opts.erm_fraction,
                "erm_samples": int(erm_part.numel()),
                "held_out_samples": int(held.numel()),
            },
            "stage1": {
                "epoch_rule": "chosen on validation by the selection rule"
                if opts.erm_select_epoch
                else "the last epoch (the reference's final_checkpoint.pt)",
                "epoch": erm["epoch"],
                **{k: v for k, v in erm.items() if k in ("val", "test", "epochs")},
            },
            "balance_classes": opts.balance_classes,
            "head_epochs": opts.head_epochs,
            "head_lr": opts.head_lr,
            "max_grad_norm": opts.max_grad_norm,
            "weights_by_gamma": list(by_gamma.values()),
            "grid": grid,
            "chosen": {
                "index": best,
                "params": point["params"],
                **{k: point[k] for k in ("epoch", "val", "test") if k in point},
            },
        }
        return TrainedModel(model, details)
