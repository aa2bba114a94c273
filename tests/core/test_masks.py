"""Tests of lvlmva.masks against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvlmva.masks import cluster_overlap, masks_from_verdicts, true_cluster_spurious
from lvlmva.records import Verdicts

COLORS = ("red", "blue", "green", "yellow", "pink")


def _verdicts(relevant: np.ndarray) -> list[Verdicts]:
    return [
        Verdicts(sample_id=i, colors=COLORS, relevant=tuple(bool(x) for x in row))
        for i, row in enumerate(relevant)
    ]


def test_masks_from_verdicts_matches_a_numpy_reference(rng):
    b, h, w, j = 6, 9, 7, len(COLORS)
    labels = rng.integers(0, j, size=(b, h, w))
    relevant = rng.random((b, j)) < 0.6
    mask, ok = masks_from_verdicts(torch.from_numpy(labels), _verdicts(relevant))
    want = np.zeros((b, h, w), dtype=bool)
    for i in range(b):
        for c in range(j):
            if not relevant[i, c]:
                want[i] |= labels[i] == c
    assert mask.dtype == torch.bool and ok.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), want)
    assert ok.all()


def test_failed_verdicts_give_an_empty_mask_and_not_ok(rng):
    labels = torch.from_numpy(rng.integers(0, 5, size=(3, 4, 4)))
    verdicts = _verdicts(np.zeros((3, 5), dtype=bool))  # all spurious
    verdicts[1] = Verdicts(
        sample_id=1, colors=COLORS, relevant=None, failure="colour 'red' missing"
    )
    mask, ok = masks_from_verdicts(labels, verdicts)
    assert ok.tolist() == [True, False, True]
    assert not mask[1].any()
    assert mask[0].all() and mask[2].all()


def test_masks_from_verdicts_checks_counts_and_labels():
    labels = torch.zeros(2, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="1 verdicts for 2"):
        masks_from_verdicts(labels, _verdicts(np.ones((1, 5), dtype=bool)))
    labels[1, 0, 0] = 3
    short = [
        Verdicts(sample_id=i, colors=("red", "blue"), relevant=(True, False)) for i in range(2)
    ]
    with pytest.raises(ValueError, match="sample 1: cluster map has label 3"):
        masks_from_verdicts(labels, short)


def test_cluster_overlap_and_true_cluster_spurious_match_a_reference(rng):
    b, h, w, j = 5, 10, 10, 4
    labels = rng.integers(0, j, size=(b, h, w))
    truth = rng.random((b, h, w)) < 0.2
    pixels, on = cluster_overlap(torch.from_numpy(labels), torch.from_numpy(truth), j)
    want_p = np.stack([[np.sum(labels[i] == c) for c in range(j)] for i in range(b)])
    want_o = np.stack([[np.sum((labels[i] == c) & truth[i]) for c in range(j)] for i in range(b)])
    np.testing.assert_array_equal(pixels.numpy(), want_p)
    np.testing.assert_array_equal(on.numpy(), want_o)
    for threshold in (0.0, 0.2, 0.5):
        got = true_cluster_spurious(torch.from_numpy(labels), torch.from_numpy(truth), threshold, j)
        share = want_o / np.maximum(want_p, 1)
        np.testing.assert_array_equal(got.numpy(), (want_o > 0) & (share >= threshold))


def test_true_cluster_spurious_on_a_known_layout():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 1  # cluster 1: 16 pixels, holds the whole 2x2 decoy
    labels[0, 4:, 4:] = 2  # cluster 2: 16 pixels, touches one decoy pixel below
    truth = torch.zeros(1, 8, 8, dtype=torch.bool)
    truth[0, :2, :2] = True
    truth[0, 4, 4] = True
    assert true_cluster_spurious(labels, truth, 0.0, 4).tolist() == [[False, True, True, False]]
    assert true_cluster_spurious(labels, truth, 0.2, 4).tolist() == [[False, True, False, False]]
    with pytest.raises(ValueError, match="min_overlap"):
        true_cluster_spurious(labels, truth, 1.5)
    with pytest.raises(ValueError, match="true_masks must be bool"):
        cluster_overlap(labels, truth.long())


def test_verdict_masks_give_both_polarities_and_nothing_for_a_failed_sample():
    from lvlmva.masks import verdict_masks
    from lvlmva.records import Verdicts

    labels = torch.tensor([[[0, 0, 1], [2, 2, 1]], [[0, 1, 1], [0, 1, 2]]])
    verdicts = [Verdicts(3, ("red", "blue", "green"), (True, False, True)), Verdicts(4, ("red", "blue", "green"), None, failure="told to fail")]
    spurious, relevant, ok = verdict_masks(labels, verdicts)
    assert ok.tolist() == [True, False]
    assert spurious[0].tolist() == [[False, False, True], [False, False, True]]  # cluster 1 judged "no"
    assert relevant[0].tolist() == [[True, True, False], [True, True, False]]  # clusters 0 and 2 "yes"
    assert not spurious[1].any() and not relevant[1].any()
