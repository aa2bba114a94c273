"""Tests of DFR: the tuning and the final head recomputed with scikit-learn from the documented
draws, the head written into the model, class weights, the data checks."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np
import pydantic
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from lvlmva.plugins.mitigators import dfr
from lvlmva.plugins.mitigators.dfr import C_GRID, DfrMitigator, class_weightings, fit_linear
from lvlmva.plugins.models.mlp import MlpFactory
from lvlmva.settings import TrainOptions
from lvlmva.testing.data import planted_spurious_dataset
from lvlmva.training import Trainer


def _l1(c: float, random_state: int, **kwargs) -> LogisticRegression:
    """The reference's LogisticRegression(penalty="l1", solver="liblinear", C=c)."""
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(
            C=c, l1_ratio=1.0, solver="liblinear", random_state=random_state, **kwargs
        )
    return LogisticRegression(
        penalty="l1", C=c, solver="liblinear", random_state=random_state, **kwargs
    )


def _setup(ctx, sizes=None, val=None, classes=2, seed=0):
    """A data set, a trainer, and an MLP trained on it (the model DFR gets)."""
    k = classes
    sizes = sizes or [[150 if a == y else 8 for a in range(k)] for y in range(k)]
    val = val or [[12 if a == y else 9 for a in range(k)] for y in range(k)]
    data = planted_spurious_dataset(sizes, sizes, val, seed=seed)
    factory = MlpFactory(MlpFactory.Options(hidden=[12]))
    trainer = Trainer(
        lambda: factory.build(data.input_shape, k), TrainOptions(epochs=3, lr=1e-2), ctx
    )
    torch.manual_seed(seed)
    return data, trainer, trainer.fit(data.train, tag="train")


def _features(model, images) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.features(images).double().numpy()


def _balanced(groups: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The documented draw: per group in ascending order, its positions shuffled by one randperm,
    the smallest group's count kept (the reference's g_idx / min_g)."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    m = min(len(x) for x in members)
    return np.concatenate(
        [x[torch.randperm(len(x), generator=generator).numpy()[:m]] for x in members]
    )


def _wga(pred: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    return min(float((pred == y)[g == group].mean()) for group in np.unique(g))


def test_chosen_c_is_the_hand_computed_one_on_the_validation_halves(ctx):
    data, trainer, model = _setup(ctx)
    result = DfrMitigator(DfrMitigator.Options(num_retrains=2)).mitigate(
        copy.deepcopy(model), trainer, data, ctx
    )
    x, y, g = _features(model, data.val.images), data.val.labels.numpy(), data.val.groups.numpy()
    # dfr_on_validation_tune by hand: shuffle, halve; balance the second half; scale on it.
    gen = ctx.generator("dfr-tune")
    perm = torch.randperm(len(y), generator=gen).numpy()
    held, fitting = perm[: len(y) // 2], perm[len(y) // 2 :]
    picked = fitting[_balanced(g[fitting], gen)]
    random_state = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    scaler = StandardScaler().fit(x[picked])
    wga = []
    for c in C_GRID:
        fitted = _l1(c, random_state).fit(scaler.transform(x[picked]), y[picked])
        wga.append(_wga(fitted.predict(scaler.transform(x[held])), y[held], g[held]))
    details = result.details
    assert [p["params"]["C"] for p in details["grid"]] == list(C_GRID)
    assert [p["val"]["worst_group_accuracy"] for p in details["grid"]] == pytest.approx(wga)
    assert details["chosen"]["params"]["C"] == C_GRID[int(np.argmax(wga))]  # first of the best
    assert details["tuning"]["per_group"] == min(np.bincount(g[fitting]))
    assert details["tuning"]["held_out_half"] == len(y) // 2


@pytest.mark.parametrize(("scaler", "classes"), [("val", 2), ("train", 2), ("none", 2), ("val", 3)])
def test_final_head_is_the_mean_of_the_fits_with_the_scaler_folded_in(ctx, scaler, classes):
    data, trainer, model = _setup(ctx, classes=classes)
    options = DfrMitigator.Options(num_retrains=4, scaler=scaler, c_grid=[0.3])
    result = DfrMitigator(options).mitigate(copy.deepcopy(model), trainer, data, ctx)
    x, y, g = _features(model, data.val.images), data.val.labels.numpy(), data.val.groups.numpy()
    fit_on = {"val": x, "train": _features(model, data.train.images), "none": None}[scaler]
    if fit_on is None:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    else:
        fitted = StandardScaler().fit(fit_on)
        mean, scale = fitted.mean_, fitted.scale_
    z = (x - mean) / scale
    # dfr_on_validation_eval by hand: four fresh balanced subsamples, coef_ and intercept_ averaged.
    gen = ctx.generator("dfr-final")
    coefs, intercepts, counts = [], [], []
    for _ in range(4):
        picked = _balanced(g, gen)
        counts.append(np.bincount(g[picked], minlength=classes * classes))
        lr = _l1(0.3, int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        if classes > 2:
            lr = OneVsRestClassifier(lr).fit(z[picked], y[picked])
            coefs.append(np.stack([e.coef_[0] for e in lr.estimators_]))
            intercepts.append(np.array([e.intercept_[0] for e in lr.estimators_]))
        else:
            lr.fit(z[picked], y[picked])
            coefs.append(lr.coef_)
            intercepts.append(lr.intercept_)
    assert all(len(set(c.tolist())) == 1 for c in counts)  # every group equally often
    assert not np.allclose(coefs[0], coefs[1])  # fresh subsamples: different fits
    scores = z @ np.mean(coefs, axis=0).T + np.mean(intercepts, axis=0)
    logits = trainer.predict(result.model, data.val.images).double().numpy()
    if classes == 2:
        # One liblinear score s becomes the logits (-s/2, s/2).
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], scores[:, 0], atol=1e-4)
        np.testing.assert_allclose(logits.sum(axis=1), 0, atol=1e-4)
    else:
        np.testing.assert_allclose(logits, scores, atol=1e-4)
    # The feature extractor is the original's.
    before, after = model.state_dict(), result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))
    assert result.details["final"]["fits"] == 4 and result.details["final"]["scaler"] == scaler


def test_binary_logits_give_the_logistic_regressions_probability():
    head = torch.nn.Linear(3, 2)
    linear = dfr.Linear(np.array([[0.5, -1.0, 2.0]]), np.array([0.25]))
    dfr.write_head(head, linear, np.zeros(3), np.ones(3))
    x = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float32)
    p1 = torch.softmax(head(x), dim=1)[:, 1].detach().numpy()
    s = x.numpy() @ linear.coef[0] + linear.intercept[0]
    np.testing.assert_allclose(p1, 1 / (1 + np.exp(-s)), rtol=1e-6)


def test_class_weights_generalise_the_binary_grid_and_match_sklearn(rng):
    assert class_weightings([1.0, 3.0], 2) == [[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]]
    assert class_weightings([10.0], 3) == [[10.0, 1.0, 1.0], [1.0, 10.0, 1.0], [1.0, 1.0, 10.0]]
    options = DfrMitigator.Options(class_weight_grid=[1.0, 3.0])
    assert len(dfr._points(options, 3)) == len(C_GRID) * 4
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] + rng.normal(size=120) > 0.8).astype(np.int64)
    ours, _ = fit_linear(x, y, 2, 0.5, [1.0, 3.0], 7, 100)
    reference = _l1(0.5, 7, class_weight={0: 1.0, 1: 3.0}).fit(x, y)
    np.testing.assert_allclose(ours.coef, reference.coef_, atol=1e-6)
    np.testing.assert_allclose(ours.intercept, reference.intercept_, atol=1e-6)
    # An L1 penalty: a strong one zeroes every weight (an L2 one never does).
    strong, _ = fit_linear(x, y, 2, 1e-3, None, 7, 100)
    assert np.count_nonzero(strong.coef) == 0 and np.count_nonzero(ours.coef) > 0


def test_dfr_checks_its_validation_data(ctx):
    plugin = DfrMitigator(DfrMitigator.Options())
    data, trainer, model = _setup(ctx)
    one = torch.nonzero(data.val.groups == 1).flatten()[:1]
    rest = torch.nonzero(data.val.groups != 1).flatten()
    thin = dataclasses.replace(data, val=data.val.subset(torch.cat([rest, one])))
    (problem,) = plugin.check_data(thin)
    assert "at least 2 validation sample(s)" in problem and "'0/patch-1' (group 1): 1" in problem
    with pytest.raises(ValueError, match="at least 2"):
        plugin.mitigate(model, trainer, thin, ctx)
    with pytest.raises(TypeError, match="features"):
        plugin.mitigate(torch.nn.Sequential(torch.nn.Flatten()), trainer, data, ctx)
    with pytest.raises(pydantic.ValidationError):
        DfrMitigator.Options(c_grid=[])
    with pytest.raises(pydantic.ValidationError):
        DfrMitigator.Options(class_weight_grid=[1.0, 0.0])
    with pytest.raises(pydantic.ValidationError):
        DfrMitigator.Options(scaler="test")


def test_defaults_are_the_references():
    options = DfrMitigator.Options()
    assert options.c_grid == [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]
    assert options.num_retrains == 20 and options.class_weight_grid == [1.0]
    assert options.scaler == "val"
