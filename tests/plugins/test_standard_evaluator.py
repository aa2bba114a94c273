"""Tests of the standard evaluator against metrics recomputed in numpy."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from lvlmva.plugins import BUILTINS
from lvlmva.plugins.evaluators.standard import StandardEvaluator, StandardEvaluatorOptions
from lvlmva.protocols import Evaluator, check_capabilities
from lvlmva.records import Split, SpuriousDataset
from lvlmva.testing.data import tiny_decoy_dataset


@pytest.fixture(scope="module")
def decoy() -> SpuriousDataset:
    return tiny_decoy_dataset(n_train=128, n_test=96, seed=0)


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def input_as_attribution(model, inputs, targets):
    return inputs.clone()


def test_is_a_registered_evaluator():
    module, _, attr = BUILTINS["evaluator"]["standard"].partition(":")
    assert getattr(importlib.import_module(module), attr) is StandardEvaluator
    assert check_capabilities("evaluator", StandardEvaluator) == []
    assert isinstance(StandardEvaluator(StandardEvaluatorOptions()), Evaluator)
    assert StandardEvaluator.needs_groups is False and StandardEvaluator.needs_true_masks is False
    for name, field in StandardEvaluatorOptions.model_fields.items():
        assert field.description, name


def test_metrics_match_numpy(decoy, ctx):
    model = mlp()
    out = StandardEvaluator(StandardEvaluatorOptions(batch_size=40)).evaluate(model, decoy, ctx)
    json.dumps(out, allow_nan=False)  # JSON-serialisable for results.json

    with torch.no_grad():
        pred = model(decoy.test.images).argmax(1).numpy()
    labels = decoy.test.labels.numpy()
    groups = decoy.test.groups.numpy()
    g = len(decoy.group_names)
    accs = np.array(
        [
            np.mean(pred[groups == i] == labels[groups == i]) if (groups == i).any() else np.nan
            for i in range(g)
        ]
    )
    train_w = np.bincount(decoy.train.groups.numpy(), minlength=g).astype(float)
    present = ~np.isnan(accs)

    assert out["accuracy"] == pytest.approx(np.mean(pred == labels))
    assert out["test_samples"] == 96
    assert list(out["group_accuracy"]) == list(decoy.group_names)
    for name, acc in zip(decoy.group_names, accs, strict=True):
        if np.isnan(acc):
            assert out["group_accuracy"][name] is None
        else:
            assert out["group_accuracy"][name] == pytest.approx(acc)
    assert out["aga"] == pytest.approx(np.nanmean(accs))
    assert out["wga"] == pytest.approx(np.nanmin(accs))
    want_pwa = (train_w[present] * accs[present]).sum() / train_w[present].sum()
    assert out["proportion_weighted_accuracy"] == pytest.approx(want_pwa)
    assert "alignment_score" not in out  # no attribute function given


def test_alignment_score_on_all_and_on_a_seeded_choice(decoy, ctx):
    model = mlp()
    full = StandardEvaluator(
        StandardEvaluatorOptions(alignment_score_samples=1000, attribution_batch_size=17)
    )
    out = full.evaluate(model, decoy, ctx, attribute=input_as_attribution)
    images = decoy.test.images.numpy()
    masks = decoy.test.spurious_masks.numpy()
    shares = [
        (np.abs(x).sum(0) * m).sum() / np.abs(x).sum() for x, m in zip(images, masks, strict=True)
    ]
    assert out["alignment_score"] == pytest.approx(1 - np.mean(shares), rel=1e-6)
    assert out["alignment_score_samples"] == 96 and out["alignment_score_skipped"] == 0

    few = StandardEvaluator(StandardEvaluatorOptions(alignment_score_samples=10))
    a = few.evaluate(model, decoy, ctx, attribute=input_as_attribution)
    b = few.evaluate(model, decoy, ctx, attribute=input_as_attribution)
    assert a["alignment_score_samples"] == 10
    assert a["alignment_score"] == b["alignment_score"]
    ctx.seed = 5
    c = few.evaluate(model, decoy, ctx, attribute=input_as_attribution)
    assert c["alignment_score"] != a["alignment_score"]


def test_all_zero_attributions_give_no_score(decoy, ctx):
    ev = StandardEvaluator(StandardEvaluatorOptions(alignment_score_samples=8))
    out = ev.evaluate(mlp(), decoy, ctx, attribute=lambda m, x, y: torch.zeros_like(x))
    assert out["alignment_score"] is None and out["alignment_score_skipped"] == 8
    with pytest.raises(ValueError, match="attribute returned"):
        ev.evaluate(mlp(), decoy, ctx, attribute=lambda m, x, y: x[:, :, :3])


def test_without_groups_or_masks_only_accuracy(ctx):
    gen = torch.Generator().manual_seed(0)
    split = Split(
        torch.rand(20, 1, 28, 28, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    )
    data = SpuriousDataset("plain", split, split, tuple("0123456789"), tuple("0123456789"))
    out = StandardEvaluator(StandardEvaluatorOptions()).evaluate(
        mlp(), data, ctx, attribute=input_as_attribution
    )
    assert set(out) == {"accuracy", "test_samples"}
