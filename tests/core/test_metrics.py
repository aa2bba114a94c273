"""Metrics against plain numpy reference implementations on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lvlmva.metrics import (
    accuracy,
    alignment_score,
    average_group_accuracy,
    group_accuracies,
    holm_adjusted,
    mean_std,
    proportion_weighted_accuracy,
    spurious_attribution_share,
    verdict_metrics,
    wilcoxon_signed_rank,
    worst_group_accuracy,
)
from lvlmva.records import Split, SpuriousDataset, Verdicts

# -- numpy reference twins ---------------------------------------------------------------------


def np_group_accs(pred, labels, groups, num_groups):
    out = np.full(num_groups, np.nan)
    for g in range(num_groups):
        sel = groups == g
        if sel.any():
            out[g] = np.mean(pred[sel] == labels[sel])
    return out


def np_alignment_score(attr, masks):
    shares = []
    for a, m in zip(attr, masks, strict=True):
        mag = np.abs(a).sum(axis=0)
        if mag.sum() == 0:
            continue
        shares.append((mag * m).sum() / mag.sum())
    return 1.0 - np.mean(shares) if shares else np.nan


def np_verdict_metrics(labels, relevant, masks, truth_min_pixels):
    """relevant[b] is None (failed) or a list of bools per cluster."""
    tp = fp = tn = fn = 0
    for lab, rel, m in zip(labels, relevant, masks, strict=True):
        if rel is None:
            continue
        for j, is_relevant in enumerate(rel):
            pixels = lab == j
            if not pixels.any():
                continue
            spurious = (pixels & m).sum() >= truth_min_pixels
            said_no = not is_relevant
            tp += spurious and said_no
            fn += spurious and not said_no
            fp += (not spurious) and said_no
            tn += (not spurious) and not said_no
    return tp, fp, tn, fn


# -- tests -------------------------------------------------------------------------------------


@pytest.fixture
def grouped(rng):
    n, k, num_groups = 300, 5, 6
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    groups = rng.integers(0, num_groups - 1, n)  # the last group stays empty
    return logits, labels, groups, num_groups


def test_accuracy_matches_numpy(grouped):
    logits, labels, _, _ = grouped
    want = np.mean(logits.argmax(1) == labels)
    assert accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == pytest.approx(want)
    pred = torch.from_numpy(logits.argmax(1))
    assert accuracy(pred, torch.from_numpy(labels)) == pytest.approx(want)
    with pytest.raises(ValueError, match="no samples"):
        accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def test_group_metrics_match_numpy(grouped):
    logits, labels, groups, num_groups = grouped
    pred = logits.argmax(1)
    ref = np_group_accs(pred, labels, groups, num_groups)
    args = (
        torch.from_numpy(logits),
        torch.from_numpy(labels),
        torch.from_numpy(groups),
        num_groups,
    )
    got = group_accuracies(*args)
    np.testing.assert_allclose(got.numpy(), ref, equal_nan=True)
    assert math.isnan(got[-1])
    assert average_group_accuracy(*args) == pytest.approx(np.nanmean(ref))
    assert worst_group_accuracy(*args) == pytest.approx(np.nanmin(ref))


def test_proportion_weighted_accuracy_matches_numpy(grouped, rng):
    logits, labels, groups, num_groups = grouped
    pred = logits.argmax(1)
    ref_accs = np_group_accs(pred, labels, groups, num_groups)
    weights = rng.random(num_groups)
    present = ~np.isnan(ref_accs)
    want = (weights[present] * ref_accs[present]).sum() / weights[present].sum()
    args = (
        torch.from_numpy(logits),
        torch.from_numpy(labels),
        torch.from_numpy(groups),
        num_groups,
    )
    assert proportion_weighted_accuracy(
        *args, group_weights=torch.from_numpy(weights)
    ) == pytest.approx(want)
    # the evaluated set's own proportions give plain accuracy, which differs from AGA
    assert proportion_weighted_accuracy(*args) == pytest.approx(np.mean(pred == labels))
    assert proportion_weighted_accuracy(*args) != pytest.approx(average_group_accuracy(*args))
    with pytest.raises(ValueError, match="non-negative"):
        proportion_weighted_accuracy(*args, group_weights=torch.ones(num_groups - 1))


def test_group_indices_out_of_range_are_errors():
    with pytest.raises(ValueError, match="0..1"):
        group_accuracies(
            torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]), 2
        )


def test_alignment_score_matches_numpy_and_skips_zero_maps(rng):
    attr = rng.normal(size=(9, 3, 6, 6))
    attr[4] = 0.0
    masks = rng.random((9, 6, 6)) < 0.2
    got = alignment_score(torch.from_numpy(attr).float(), torch.from_numpy(masks))
    assert got == pytest.approx(np_alignment_score(attr, masks), rel=1e-6)
    shares = spurious_attribution_share(torch.from_numpy(attr), torch.from_numpy(masks))
    assert int(shares.isnan().sum()) == 1 and math.isnan(shares[4])
    assert math.isnan(
        alignment_score(torch.zeros(2, 1, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool))
    )


def test_alignment_score_extremes():
    attr = torch.zeros(2, 1, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 0, 0] = True
    attr[:, 0, 0, 0] = -5.0  # every bit of attribution on the decoy
    assert alignment_score(attr, masks) == pytest.approx(0.0)
    attr[:, 0, 3, 3] = 5.0  # half of it
    assert alignment_score(attr, masks) == pytest.approx(0.5)


def test_alignment_score_is_taken_on_the_true_class_not_the_predicted_one(ctx):
    """A known answer where every prediction is wrong: the attributions scored must be those
    of the true class. The class is chosen where the evaluator asks for attributions, so the
    score is checked through the standard evaluator, the toolkit's one caller."""
    from lvlmva.plugins.evaluators.standard import StandardEvaluator, StandardEvaluatorOptions

    images = torch.zeros(2, 1, 4, 4)
    images[0, 0, 3, 3] = 1.0  # pixel (3, 3) decides the prediction
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 of 16 pixels, (0, 0) among them
    masks[1, 0, :2] = True  # 2 of 16 pixels, (0, 0) among them
    split = Split(images, labels, spurious_masks=masks)
    data = SpuriousDataset("decoy-mnist", split, split, ("zero", "one"), ("zero", "one"))
    # predicts class 1 where pixel (3, 3) is lit, else class 0: sample 0 -> 1, sample 1 -> 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -0.5]))
        model[1].weight[1, 15] = 1.0

    def attribute(model, inputs, targets):
        # class 0: the same attribution on every pixel; class 1: all of it on pixel (0, 0)
        out = torch.zeros_like(inputs)
        for i, target in enumerate(targets.tolist()):
            if target == 0:
                out[i] = 1.0
            else:
                out[i, 0, 0, 0] = 1.0
        return out

    evaluator = StandardEvaluator(StandardEvaluatorOptions(alignment_score_samples=2))
    got = evaluator.evaluate(model, data, ctx, attribute=attribute)
    assert got["accuracy"] == 0.0  # predicted and true classes differ for both samples
    # by hand, true classes: sample 0 (class 0) has 4/16 of its attribution on its mask,
    # sample 1 (class 1) all of it: 1 - (0.25 + 1) / 2. The predicted classes would give
    # 1 - (1 + 2/16) / 2 = 0.4375, class 0 throughout 0.8125, class 1 throughout 0.
    assert got["alignment_score"] == pytest.approx(0.375)
    assert got["alignment_score_samples"] == 2 and got["alignment_score_skipped"] == 0


def test_verdict_metrics_match_numpy(rng):
    b, j, h, w = 12, 5, 10, 10
    labels = rng.integers(0, j, (b, h, w))
    labels[:, :, :5] = rng.integers(0, 2, (b, h, 5))  # clusters 2..4 are often small or empty
    labels[0][labels[0] == 4] = 3  # sample 0 has an empty cluster 4
    labels[3][labels[3] == 4] = 3  # so has sample 3, whose verdict failed: not counted
    masks = np.zeros((b, h, w), dtype=bool)
    masks[:, :3, :3] = True
    relevant = [list(rng.random(j) < 0.5) for _ in range(b)]
    relevant[3] = None
    colors = tuple("rgbyp")
    verdicts = [
        Verdicts(i, colors, None, failure="invalid JSON")
        if r is None
        else Verdicts(i, colors, tuple(bool(x) for x in r))
        for i, r in enumerate(relevant)
    ]
    for truth_min_pixels in (1, 4):
        got = verdict_metrics(
            torch.from_numpy(labels),
            verdicts,
            torch.from_numpy(masks),
            truth_min_pixels=truth_min_pixels,
        )
        tp, fp, tn, fn = np_verdict_metrics(labels, relevant, masks, truth_min_pixels)
        assert got["truth_min_pixels"] == truth_min_pixels
        assert got["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        assert got["verdict_accuracy"] == pytest.approx(tp / (tp + fn))
        assert got["cluster_accuracy"] == pytest.approx((tp + tn) / (tp + fp + tn + fn))
        assert got["failed"] == 1 and got["failed_sample_ids"] == [3]
        assert got["judged_samples"] == b - 1
        empty = sum(
            not (labels[i] == c).any()
            for i, r in enumerate(relevant)
            if r is not None
            for c in range(j)
        )
        assert empty >= 1  # the fixture has what the count is about
        assert got["empty_clusters"] == empty


def test_verdict_metrics_perfect_and_undefined():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    perfect = verdict_metrics(labels, [Verdicts(7, ("red", "blue"), (True, False))], masks)
    assert perfect["verdict_accuracy"] == 1.0 and perfect["cluster_accuracy"] == 1.0
    assert perfect["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 0}
    failed = verdict_metrics(labels, [Verdicts(7, ("red", "blue"), None, failure="x")], masks)
    assert failed["verdict_accuracy"] is None and failed["clusters"] == 0
    with pytest.raises(ValueError, match="only 1 verdicts"):
        verdict_metrics(labels, [Verdicts(7, ("red",), (True,))], masks)
    with pytest.raises(ValueError, match="2 verdicts for 1"):
        verdict_metrics(labels, [Verdicts(7, ("red",), (True,))] * 2, masks)


def test_truth_min_pixels_is_a_pixel_count_that_sets_the_true_verdict():
    # cluster 1 ("blue") has 4 pixels, 2 of them on the true mask; both verdicts say "no"
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 1
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    verdicts = [Verdicts(7, ("red", "blue"), (False, False))]
    two = verdict_metrics(labels, verdicts, masks, truth_min_pixels=2)
    assert two["confusion"] == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}  # blue truly spurious
    three = verdict_metrics(labels, verdicts, masks, truth_min_pixels=3)
    assert three["confusion"] == {"tp": 0, "fp": 2, "tn": 0, "fn": 0}  # 2 pixels are not 3
    assert (two["truth_min_pixels"], three["truth_min_pixels"]) == (2, 3)
    # one name for one meaning: the critic option min_overlap is a share, not this count
    assert "min_overlap" not in two
    with pytest.raises(ValueError, match="truth_min_pixels"):
        verdict_metrics(labels, verdicts, masks, truth_min_pixels=0)


def test_wilcoxon_matches_scipy(rng):
    a = rng.normal(size=7)
    b = a + rng.normal(0.5, 0.3, size=7)
    got = wilcoxon_signed_rank(torch.from_numpy(a), list(b))
    want = stats.wilcoxon(a, b)
    assert got["statistic"] == pytest.approx(want.statistic)
    assert got["p_value"] == pytest.approx(want.pvalue)
    assert got["n"] == 7
    with pytest.raises(ValueError, match="pairs"):
        wilcoxon_signed_rank([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="every difference is zero"):
        wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0])


def test_mean_std_matches_numpy(rng):
    x = rng.normal(size=7)
    mean, std = mean_std(list(x))
    assert mean == pytest.approx(np.mean(x))
    assert std == pytest.approx(np.std(x, ddof=1))
    assert mean_std(x, ddof=0)[1] == pytest.approx(np.std(x))
    assert math.isnan(mean_std([0.5])[1])
    with pytest.raises(ValueError):
        mean_std([])


def np_holm(p):
    """Holm's step-down adjustment written from its definition with numpy."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    out = np.empty_like(p)
    out[order] = np.maximum.accumulate(scaled)
    return out


def test_holm_adjusted_by_hand_and_against_numpy(rng):
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjusted([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # step-down: not 1 * 0.5
    assert holm_adjusted([0.9, 0.6, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
    assert holm_adjusted([0.02]) == [0.02]
    assert holm_adjusted([]) == []
    for _ in range(20):
        p = rng.uniform(0, 0.2, size=int(rng.integers(1, 8)))
        assert holm_adjusted(list(p)) == pytest.approx(list(np_holm(p)))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm_adjusted([0.1, float("nan")])
