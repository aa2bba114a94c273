"""DFR: Deep Feature Reweighting, "DFR on validation" (Kirichenko et al. 2022, "Last layer
re-training is sufficient for robustness to spurious correlations";
PolinaKirichenko/deep_feature_reweighting ``dfr_evaluate_spurious.py``, and the authors' later,
simplified version in izmailovpavel/spurious_feature_learning).

The original model's last layer is retrained on group-balanced validation data; the feature
extractor is kept.

1. Features: ``model.features(x)`` (the penultimate layer) of every validation image, the model
   in eval mode, no augmentation.
2. Tuning (``dfr_on_validation_tune``): shuffle the validation split and cut it in half; the
   second half (the larger when odd) is subsampled to its smallest group (group-balanced),
   standardised by a ``StandardScaler`` fit on it, and fits one L1 logistic regression
   (liblinear) per grid point; each is scored on the first half, and the grid point with the
   best worst-group accuracy there wins (ties to the first: the larger C). Another
   ``selection`` rule compares another score of that half (worst-class or plain accuracy), or
   under ``"oracle-test"`` each point's worst-group accuracy on the test split (an upper
   bound).
3. Final head (``dfr_on_validation_eval``): ``num_retrains`` fits with the chosen point, each on
   a fresh group-balanced subsample of the whole validation split; their ``coef_`` and
   ``intercept_`` are averaged.
4. The average, with the scaler folded in, becomes the model's ``head``.

Seeding: the reference never seeds its DFR runs; here every draw comes from
``ctx.generator("dfr-tune")`` and ``ctx.generator("dfr-final")`` (see :func:`tune` and
:func:`final_head` for their order), including liblinear's ``random_state``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from lvlmva.model_selection import SelectionRule, rule, selection_record
from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import SpuriousDataset, TrainedModel

from .validation import (
    WGA,
    data_problems,
    first_best,
    grid_rule,
    require,
    selection_field,
)

if TYPE_CHECKING:
    from lvlmva.training import Trainer

__all__ = [
    "C_GRID",
    "DfrMitigator",
    "DfrOptions",
    "Linear",
    "balanced_subsample",
    "class_weightings",
    "fit_linear",
    "final_head",
    "penultimate_features",
    "predict_linear",
    "tune",
    "write_head",
]

#: the reference's C grid (``C_OPTIONS``)
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)

_SEED_HIGH = 2**31 - 1  # liblinear's random_state must fit an int32


class DfrOptions(PluginOptions):
    """Options of ``dfr``."""

    c_grid: list[float] = Field(
        default_factory=lambda: list(C_GRID),
        description="Inverse L1 regularisation strengths C to try (a grid; the reference's "
        "C_OPTIONS). Ties go to the first. Each point is one logistic regression on half of the "
        "validation features: no network is trained.",
    )
    class_weight_grid: list[float] = Field(
        default_factory=lambda: [1.0],
        description="Class upweighting factors w to try (a grid, crossed with c_grid). 1 = no "
        "class weights; each other w adds one point per class k, with class k's samples weighted "
        "w and the others 1 (for two classes: the reference's {0: 1, 1: w} and {0: w, 1: 1}). "
        "Default [1]: the reference uses only equal weights when it retrains on balanced "
        "validation data alone, as here; its grid is 1, 2, 3, 10, 100, 300, 1000.",
    )
    num_retrains: int = Field(
        20, ge=1, description="Fits averaged into the final head (the reference's num_retrains)."
    )
    scaler: Literal["val", "train", "none"] = Field(
        "val",
        description='Data the StandardScaler of the final head is fit on: "val" (the default, '
        "as in the authors' later version: the features the head is fit on, standardised as "
        "in tuning, where the scaler is always fit on validation data, and without reading the "
        'training split), "train" (the original code: the training embeddings, dominated by the '
        'majority groups), or "none" (no standardisation, in tuning either).',
    )
    max_iter: int = Field(
        100,
        ge=1,
        description="liblinear iterations per fit (scikit-learn's default, as the reference).",
    )
    selection: SelectionRule = selection_field()

    @field_validator("c_grid", "class_weight_grid")
    @classmethod
    def _positive_grid(cls, values: list[float], info) -> list[float]:
        if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{info.field_name} must be distinct numbers > 0, got {values}")
        return values


# -- features ------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not callable(getattr(model, "features", None)) or not isinstance(
        getattr(model, "head", None), nn.Linear
    ):
        raise TypeError(
            "dfr needs a model with features(x) -> [B, D] and head: nn.Linear (the ModelFactory "
            f"contract); {type(model).__name__} lacks them"
        )


@torch.no_grad()
def penultimate_features(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """``model.features`` of ``images`` in eval mode, float64 ``[N, D]`` (the train/eval mode is
    restored afterwards)."""
    was_training = model.training
    model.to(device).eval()
    try:
        chunks = [
            model.features(images[start : start + batch_size].to(device)).double().cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks).flatten(1).numpy()


# -- sampling --------------------------------------------------------------------------------------


def balanced_subsample(
    groups: np.ndarray, present: Sequence[int], generator: torch.Generator
) -> np.ndarray:
    """Positions of a group-balanced subsample of ``groups``: for each group of ``present`` in
    order, its members (ascending positions) shuffled by one ``torch.randperm`` draw, the first
    ``m`` kept, ``m`` the size of the smallest of them (the reference's ``g_idx``, ``min_g``)."""
    members = [np.flatnonzero(groups == g) for g in present]
    smallest = min(len(m) for m in members)
    picked = [m[torch.randperm(len(m), generator=generator).numpy()[:smallest]] for m in members]
    return np.concatenate(picked)


def _random_state(generator: torch.Generator) -> int:
    return int(torch.randint(0, _SEED_HIGH, (1,), generator=generator))


# -- the linear model ------------------------------------------------------------------------------


class Linear(NamedTuple):
    """A linear classifier on standardised features: ``coef`` ``[R, D]``, ``intercept`` ``[R]``;
    R = 1 for two classes (the score of class 1, as liblinear returns it), else one row per
    class (one-vs-rest)."""

    coef: np.ndarray
    intercept: np.ndarray


def class_weightings(grid: Sequence[float], num_classes: int) -> list[list[float]]:
    """Per-class weights of every point of ``class_weight_grid``: ``[1] * K`` for w = 1, else
    ``K`` weightings (class 0 first), class k weighted w and the others 1."""
    out: list[list[float]] = []
    for w in grid:
        if w == 1:
            out.append([1.0] * num_classes)
            continue
        for k in range(num_classes):
            weights = [1.0] * num_classes
            weights[k] = float(w)
            out.append(weights)
    return out


def _l1_logistic(c: float, random_state: int, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 deprecated `penalty`: l1_ratio=1 is the same L1 penalty.
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(
            C=c, l1_ratio=1.0, solver="liblinear", random_state=random_state, max_iter=max_iter
        )
    return LogisticRegression(
        penalty="l1", C=c, solver="liblinear", random_state=random_state, max_iter=max_iter
    )


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    c: float,
    class_weights: Sequence[float] | None,
    random_state: int,
    max_iter: int,
) -> tuple[Linear, int]:
    """``LogisticRegression(L1, liblinear, C=c)`` on ``x``, ``y``; and the number of
    convergence warnings it raised.

    Two classes: one fit, as the reference. More classes: liblinear is binary, so one fit of
    class k against the rest per class (what liblinear's own one-vs-rest did, and
    ``OneVsRestClassifier`` does), with the same ``random_state``. ``class_weights[k]``
    multiplies the loss of every sample of class k (for two classes, scikit-learn's
    ``class_weight={0: w0, 1: w1}``); ``None`` = no weights.
    """
    from sklearn.exceptions import ConvergenceWarning

    weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float64)[y]
    targets = [y] if num_classes == 2 else [(y == k).astype(np.int64) for k in range(num_classes)]
    coefs, intercepts = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for target in targets:
            model = _l1_logistic(c, random_state, max_iter)
            model.fit(x, target, sample_weight=weights)
            coefs.append(model.coef_[0])
            intercepts.append(model.intercept_[0])
    unconverged = 0
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            unconverged += 1
        else:  # only convergence is counted; anything else is passed on
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return Linear(np.stack(coefs), np.asarray(intercepts)), unconverged


def predict_linear(x: np.ndarray, linear: Linear) -> np.ndarray:
    """The classes scikit-learn's ``predict`` gives: score > 0 for two classes, else argmax."""
    scores = x @ linear.coef.T + linear.intercept
    if linear.coef.shape[0] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return scores.argmax(axis=1)


class _Scaler(NamedTuple):
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray | None, dim: int) -> _Scaler:
        """A ``StandardScaler`` fit on ``x``; ``None``: the identity."""
        if x is None:
            return cls(np.zeros(dim), np.ones(dim))
        from sklearn.preprocessing import StandardScaler

        fitted = StandardScaler().fit(x)
        return cls(fitted.mean_, fitted.scale_)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def _scores(pred: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    correct = pred == labels
    accs = [float(correct[groups == g].mean()) for g in np.unique(groups)]
    by_class = [float(correct[labels == k].mean()) for k in np.unique(labels)]
    return {
        WGA: min(accs),
        "average_group_accuracy": float(np.mean(accs)),
        "worst_class_accuracy": min(by_class),
        "accuracy": float(correct.mean()),
    }


# -- the procedure ----------------------------------------------------------------------------------


def _points(options: DfrOptions, num_classes: int) -> list[dict[str, Any]]:
    """The grid in the reference's order: for c, for class weighting."""
    weightings = class_weightings(options.class_weight_grid, num_classes)
    return [{"C": float(c), "class_weights": w} for c in options.c_grid for w in weightings]


def tune(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    points: Sequence[dict[str, Any]],
    num_classes: int,
    generator: torch.Generator,
    *,
    standardise: bool = True,
    max_iter: int = 100,
    selection: str = "worst-group",
    test: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score every grid point on the halves of the validation split (``dfr_on_validation_tune``)
    and choose one by rule ``selection``; ``"oracle-test"`` needs ``test`` (features, labels,
    groups of the test split), which every point is then also scored on.

    Draws from ``generator``, in order: ``torch.randperm(N)`` (its first ``N // 2`` are the
    held-out half, the rest the fitting half); the balanced subsample of the fitting half
    (:func:`balanced_subsample` over the groups of the whole split); one liblinear
    ``random_state`` shared by every point. Returns ``{"grid", "chosen", ...}``.
    """
    n = len(y)
    perm = torch.randperm(n, generator=generator).numpy()
    held, fitting = perm[: n // 2], perm[n // 2 :]
    present = np.unique(groups).tolist()
    missing = sorted(set(present) - set(np.unique(groups[fitting]).tolist()))
    if missing:
        raise ValueError(
            f"dfr: the tuning half of the validation split has no sample of group(s) {missing} "
            f"({n} validation samples): enlarge the validation split"
        )
    picked = fitting[balanced_subsample(groups[fitting], present, generator)]
    random_state = _random_state(generator)
    scaler = _Scaler.fit(x[picked] if standardise else None, x.shape[1])
    x_fit, x_held = scaler(x[picked]), scaler(x[held])
    grid, unconverged = [], 0
    for point in points:
        uniform = all(w == 1 for w in point["class_weights"])
        weights = None if uniform else point["class_weights"]
        linear, warned = fit_linear(
            x_fit, y[picked], num_classes, point["C"], weights, random_state, max_iter
        )
        unconverged += warned
        val = _scores(predict_linear(x_held, linear), y[held], groups[held])
        grid.append({"params": dict(point), "val": val})
        if test is not None:
            grid[-1]["test"] = _scores(predict_linear(scaler(test[0]), linear), test[1], test[2])
    if rule(selection).split == "test" and test is None:
        raise ValueError("dfr: selection = 'oracle-test' needs the test split's features")
    best = first_best(grid, selection)
    chosen = {k: v for k, v in grid[best].items() if k in ("params", "val", "test")}
    return {
        "grid": grid,
        "chosen": {"index": best, **chosen},
        "fitting_half": int(len(fitting)),
        "held_out_half": int(len(held)),
        "per_group": int(len(picked) // len(present)),
        "unconverged_fits": unconverged,
    }


def final_head(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    point: dict[str, Any],
    num_classes: int,
    generator: torch.Generator,
    *,
    num_retrains: int = 20,
    max_iter: int = 100,
) -> tuple[Linear, dict[str, Any]]:
    """The mean of ``num_retrains`` fits of ``point`` on fresh group-balanced subsamples of
    ``x`` (already standardised; ``dfr_on_validation_eval``).

    Draws from ``generator``, per fit in order: the balanced subsample
    (:func:`balanced_subsample` over the groups of ``groups``), then liblinear's
    ``random_state``."""
    present = np.unique(groups).tolist()
    uniform = all(w == 1 for w in point["class_weights"])
    weights = None if uniform else point["class_weights"]
    fits, unconverged, per_group = [], 0, 0
    for _ in range(num_retrains):
        picked = balanced_subsample(groups, present, generator)
        per_group = len(picked) // len(present)
        linear, warned = fit_linear(
            x[picked],
            y[picked],
            num_classes,
            point["C"],
            weights,
            _random_state(generator),
            max_iter,
        )
        fits.append(linear)
        unconverged += warned
    mean = Linear(
        np.mean([f.coef for f in fits], axis=0), np.mean([f.intercept for f in fits], axis=0)
    )
    return mean, {"fits": num_retrains, "per_group": per_group, "unconverged_fits": unconverged}


@torch.no_grad()
def write_head(head: nn.Linear, linear: Linear, mean: np.ndarray, scale: np.ndarray) -> None:
    """Set ``head`` so that ``argmax head(f)`` is the class ``linear`` predicts for the
    standardised features ``(f - mean) / scale``.

    The scaler is folded in: ``W' = W / scale``, ``b' = b - W' . mean``. For two classes
    liblinear's one score ``s`` becomes the logits ``(-s/2, s/2)``: their softmax is the
    logistic regression's probability, and the argmax agrees with ``s > 0`` (ties to class 0).
    """
    weight = linear.coef / scale
    bias = linear.intercept - weight @ mean
    if weight.shape[0] == 1:
        weight = np.concatenate([-weight / 2, weight / 2])
        bias = np.concatenate([-bias / 2, bias / 2])
    if tuple(weight.shape) != tuple(head.weight.shape):
        raise ValueError(
            f"dfr: a head of shape {list(weight.shape)} does not fit the model's head "
            f"{list(head.weight.shape)}"
        )
    head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
    if head.bias is None:
        raise ValueError("dfr: the model's head has no bias")
    head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


class DfrMitigator:
    """DFR on validation (Kirichenko et al. 2022): the last layer refit on balanced val data.

    The original model's head is retrained on group-balanced validation features. Trains no
    network: ``len(c_grid) x (weightings)`` logistic regressions in tuning (one per
    grid point, on half of the validation split) and ``num_retrains`` for the final head; a
    weighting is one per ``class_weight_grid`` value 1 and K per other value (K classes). The
    feature extractor is the original model's, unchanged. Needs a model with ``features(x)``
    and ``head: nn.Linear``, and a validation split with every group (at least two samples of
    each, so that both halves can have it) and every class. The test split is never read.
    """

    Options: ClassVar[type[PluginOptions]] = DfrOptions
    needs_groups: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = True

    def __init__(self, options: DfrOptions) -> None:
        self.options = options

    def check_data(self, data: SpuriousDataset) -> list[str]:
        # the head is fit on group-balanced validation data whatever the selection rule
        problems = data_problems(data, "dfr", per_group=2)
        if self.options.selection != "worst-group" and not problems:
            problems = data_problems(data, "dfr", selection=self.options.selection)
        if data.val is None or data.val.groups is None or problems:
            return problems
        counts = torch.bincount(data.val.labels, minlength=data.num_classes)
        absent = [k for k in range(data.num_classes) if int(counts[k]) == 0]
        if absent:
            names = ", ".join(repr(data.class_names[k]) for k in absent)
            problems.append(
                "dfr retrains the head on the validation split, which has no sample of "
                f"class(es) {names}: enlarge it"
            )
        if data.num_classes < 2:
            problems.append("dfr needs at least two classes")
        return problems

    def mitigate(
        self, original: nn.Module, trainer: Trainer, data: SpuriousDataset, ctx: RunContext
    ) -> TrainedModel:
        opts = self.options
        require(self.check_data(data))
        assert data.val is not None and data.val.groups is not None  # checked above
        _check_model(original)
        num_classes = data.num_classes
        x_val = penultimate_features(original, data.val.inputs, trainer.device)
        y_val, g_val = data.val.labels.numpy(), data.val.groups.numpy()
        test = None
        if rule(opts.selection).split == "test":
            assert data.test.groups is not None  # checked above
            x_test = penultimate_features(original, data.test.inputs, trainer.device)
            test = (x_test, data.test.labels.numpy(), data.test.groups.numpy())

        tuning = tune(
            x_val, y_val, g_val, _points(opts, num_classes), num_classes,
            ctx.generator("dfr-tune"), standardise=opts.scaler != "none", max_iter=opts.max_iter,
            selection=opts.selection, test=test,
        )  # fmt: skip
        point = tuning["chosen"]["params"]
        if opts.scaler == "train":
            fit_on = penultimate_features(original, data.train.inputs, trainer.device)
        else:
            fit_on = x_val if opts.scaler == "val" else None
        scaler = _Scaler.fit(fit_on, x_val.shape[1])
        linear, final = final_head(
            scaler(x_val), y_val, g_val, point, num_classes, ctx.generator("dfr-final"),
            num_retrains=opts.num_retrains, max_iter=opts.max_iter,
        )  # fmt: skip
        write_head(original.head, linear, scaler.mean, scaler.scale)
        original.eval()
        on_val = _scores(predict_linear(scaler(x_val), linear), y_val, g_val)
        details = {
            "method": "dfr",
            "selection": selection_record(opts.selection),
            "criterion": (
                rule(opts.selection).criterion
                if rule(opts.selection).split == "test"
                else rule(opts.selection).criterion.replace(
                    "the validation split", "the held-out half of the validation split"
                )
                + " (the other half fits)"
            ),
            "grid_rule": grid_rule(opts.selection) + " (the larger C)",
            "models_trained": 0,
            "linear_fits": (len(tuning["grid"]) + opts.num_retrains) * _ovr(num_classes),
            "grid": tuning["grid"],
            "chosen": tuning["chosen"],
            "tuning": {k: v for k, v in tuning.items() if k not in ("grid", "chosen")},
            "final": {
                **final,
                "scaler": opts.scaler,
                "val": on_val,
                "val_note": "the final head on the whole validation split, which it was fit on "
                "(optimistic: not a selection score)",
            },
        }
        return TrainedModel(original, details)


def _ovr(num_classes: int) -> int:
    """liblinear fits per logistic regression: one for two classes, else one per class."""
    return 1 if num_classes == 2 else num_classes
