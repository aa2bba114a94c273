"""Tests of lvlmva.selection against a numpy reference of predictive entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lvlmva.records import Split
from lvlmva.selection import predictive_entropy, select_alignment_set
from lvlmva.settings import SelectionOptions


def _entropy_reference(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def _logit_split(rng: np.random.Generator, n: int = 200, k: int = 10) -> tuple[Split, np.ndarray]:
    """Images that are their own logits: the model is a flatten."""
    logits = rng.normal(scale=rng.uniform(0.1, 8.0, size=(n, 1)), size=(n, k)).astype(np.float32)
    images = torch.from_numpy(logits).reshape(n, 1, 1, k)
    return Split(images=images, labels=torch.zeros(n, dtype=torch.int64)), logits


def test_entropy_matches_numpy(rng):
    _, logits = _logit_split(rng)
    got = predictive_entropy(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(got, _entropy_reference(logits.astype(np.float64)), rtol=1e-5, atol=1e-6)
    saturated = torch.tensor([[1e4, 0.0, -1e4]])
    assert predictive_entropy(saturated).item() == 0.0


@pytest.mark.parametrize("strategy", ["lowest-entropy", "highest-entropy"])
def test_entropy_strategies_pick_the_extremes(ctx, rng, strategy):
    split, logits = _logit_split(rng)
    reference = _entropy_reference(logits.astype(np.float64))
    order = np.argsort(reference, kind="stable")
    if strategy == "highest-entropy":
        order = order[::-1]
    chosen = select_alignment_set(nn.Flatten(), split, SelectionOptions(strategy=strategy, n=17), ctx)
    assert chosen.strategy == strategy
    assert chosen.indices.dtype == torch.int64 and chosen.scores.dtype == torch.float32
    np.testing.assert_array_equal(chosen.indices.numpy(), order[:17])
    np.testing.assert_allclose(chosen.scores.numpy(), reference[order[:17]], rtol=1e-5, atol=1e-6)


def test_random_strategy_is_seeded(ctx, rng):
    split, logits = _logit_split(rng)
    opts = SelectionOptions(strategy="random", n=30)
    a = select_alignment_set(nn.Flatten(), split, opts, ctx)
    b = select_alignment_set(nn.Flatten(), split, opts, ctx)
    assert torch.equal(a.indices, b.indices)
    # the documented draw: the first 30 of a permutation from ctx.generator("selection-random")
    draw = torch.randperm(len(split), generator=ctx.generator("selection-random"))[:30]
    assert torch.equal(a.indices, draw)
    reference = _entropy_reference(logits.astype(np.float64))
    np.testing.assert_allclose(a.scores.numpy(), reference[a.indices.numpy()], rtol=1e-5, atol=1e-6)
    ctx.seed = 5
    c = select_alignment_set(nn.Flatten(), split, opts, ctx)
    assert not torch.equal(a.indices, c.indices)


def test_n_beyond_the_split_is_an_error(ctx, rng):
    """A silently smaller alignment set would change what the results mean."""
    split, _ = _logit_split(rng, n=12)
    with pytest.raises(ValueError, match="selection.n = 64, but the split has only 12 samples"):
        select_alignment_set(nn.Flatten(), split, SelectionOptions(n=64), ctx)
    chosen = select_alignment_set(nn.Flatten(), split, SelectionOptions(n=12), ctx)
    assert sorted(chosen.indices.tolist()) == list(range(12))
