"""Metrics and statistics of a run: accuracies by group, the alignment score, the accuracy of
the Critic & Judge verdicts, and the significance test over seeds.

Predictions may be given as class indices ``[N]`` or as logits/scores ``[N, K]`` (argmax is
taken). Group metrics ignore empty groups. Two kinds of "average accuracy" are in use by peers
and are kept apart here: :func:`average_group_accuracy` (AGA, the unweighted mean of per-group
accuracies) and :func:`proportion_weighted_accuracy` (per-group accuracies weighted by group
proportions, usually those of the training split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .masks import cluster_overlap
from .records import Verdicts

__all__ = [
    "accuracy",
    "group_accuracies",
    "average_group_accuracy",
    "worst_group_accuracy",
    "proportion_weighted_accuracy",
    "spurious_attribution_share",
    "alignment_score",
    "verdict_metrics",
    "wilcoxon_signed_rank",
    "holm_adjusted",
    "mean_std",
]


def _classes(pred: torch.Tensor) -> torch.Tensor:
    if pred.dim() == 2:
        return pred.argmax(dim=1)
    if pred.dim() == 1:
        return pred.long()
    raise ValueError(
        f"predictions must be class indices [N] or scores [N,K], got {tuple(pred.shape)}"
    )


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose predicted class equals the label."""
    cls = _classes(pred)
    if cls.shape != labels.shape:
        raise ValueError(
            f"accuracy: predictions {tuple(cls.shape)} vs labels {tuple(labels.shape)}"
        )
    if cls.numel() == 0:
        raise ValueError("accuracy: no samples")
    return float((cls == labels).double().mean())


def group_accuracies(
    pred: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Accuracy per group, float64 ``[num_groups]``; ``nan`` for a group with no samples."""
    cls = _classes(pred)
    if not (cls.shape == labels.shape == groups.shape):
        raise ValueError(
            f"group_accuracies: predictions {tuple(cls.shape)}, labels {tuple(labels.shape)} and "
            f"groups {tuple(groups.shape)} must have the same shape"
        )
    groups = groups.long()
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(
            f"group_accuracies: group indices must lie in 0..{num_groups - 1}, got "
            f"{int(groups.min())}..{int(groups.max())}"
        )
    correct = (cls == labels).double()
    counts = torch.bincount(groups, minlength=num_groups).double()
    hits = torch.bincount(groups, weights=correct, minlength=num_groups)
    return torch.where(counts > 0, hits / counts.clamp(min=1), torch.full_like(counts, math.nan))


def _present(accs: torch.Tensor, name: str) -> torch.Tensor:
    present = accs[~torch.isnan(accs)]
    if present.numel() == 0:
        raise ValueError(f"{name}: every group is empty")
    return present


def average_group_accuracy(
    pred: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> float:
    """AGA: the unweighted mean of the accuracies of the non-empty groups."""
    accs = group_accuracies(pred, labels, groups, num_groups)
    return float(_present(accs, "average_group_accuracy").mean())


def worst_group_accuracy(
    pred: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> float:
    """WGA: the lowest accuracy among the non-empty groups."""
    accs = group_accuracies(pred, labels, groups, num_groups)
    return float(_present(accs, "worst_group_accuracy").min())


def proportion_weighted_accuracy(
    pred: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    group_weights: torch.Tensor | None = None,
) -> float:
    """Per-group accuracies averaged with weights ``group_weights`` ``[num_groups]`` (e.g. the
    group sizes or proportions of the training split, as in the Waterbirds convention).

    Weights are renormalised over the groups present in the evaluated samples. Without
    ``group_weights`` the evaluated samples' own group sizes are used, which equals plain
    accuracy.
    """
    accs = group_accuracies(pred, labels, groups, num_groups)
    if group_weights is None:
        weights = torch.bincount(groups.long(), minlength=num_groups).double()
    else:
        weights = torch.as_tensor(group_weights, dtype=torch.float64).flatten()
        if weights.numel() != num_groups or bool((weights < 0).any()):
            raise ValueError(
                f"proportion_weighted_accuracy: group_weights must be {num_groups} non-negative "
                f"numbers, got {weights.tolist()}"
            )
    present = ~torch.isnan(accs)
    total = weights[present].sum()
    if total <= 0:
        raise ValueError(
            "proportion_weighted_accuracy: the evaluated groups have zero total weight"
        )
    return float((weights[present] * accs[present]).sum() / total)


def spurious_attribution_share(
    attributions: torch.Tensor, true_masks: torch.Tensor
) -> torch.Tensor:
    """Per sample, the share of absolute attribution on the true spurious pixels:
    ``sum_i A_true_i |Phi_i| / sum_i |Phi_i|`` (channels summed), float64 ``[B]``; ``nan`` for a
    sample whose attribution is zero everywhere (the share is undefined)."""
    if attributions.dim() != 4:
        raise ValueError(f"attributions must be [B,C,H,W], got {tuple(attributions.shape)}")
    b, _, h, w = attributions.shape
    if tuple(true_masks.shape) != (b, h, w):
        raise ValueError(f"true_masks must be [{b},{h},{w}], got {tuple(true_masks.shape)}")
    magnitude = attributions.detach().double().abs().sum(dim=1)
    total = magnitude.flatten(1).sum(dim=1)
    inside = (magnitude * true_masks.to(magnitude.dtype)).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), math.nan)


def alignment_score(attributions: torch.Tensor, true_masks: torch.Tensor) -> float:
    """Alignment score ``1 - mean_n(sum_i A_true_ni |Phi_ni| / sum_i |Phi_ni|)``: the share of
    absolute attribution outside the true spurious feature (1 = none on it).

    Samples whose attribution is zero everywhere are skipped (count them with
    ``spurious_attribution_share(...).isnan().sum()``); ``nan`` when every sample is skipped.
    """
    share = spurious_attribution_share(attributions, true_masks)
    share = share[~torch.isnan(share)]
    if share.numel() == 0:
        return math.nan
    return float(1.0 - share.mean())


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def verdict_metrics(
    labels: torch.Tensor,
    verdicts: Sequence[Verdicts],
    true_masks: torch.Tensor,
    truth_min_pixels: int = 1,
) -> dict[str, Any]:
    """How well the verdicts find the clusters on the true spurious feature.

    ``labels`` int64 ``[B, H, W]`` are the cluster maps, ``verdicts[b]`` the verdicts for
    sample ``b`` (cluster ``j`` = ``verdicts[b].colors[j]``), ``true_masks`` bool ``[B, H, W]``.

    A cluster is truly spurious (its true verdict is "no") when at least ``truth_min_pixels``
    of its pixels lie on the true mask: with the default 1, when it overlaps a true spurious
    feature at all. This is a pixel count that sets the truth the verdicts are scored
    against, not the critic option ``min_overlap`` (a share of the cluster's pixels that
    decides the oracle and scripted critics' own answers). "Spurious" is the positive class, a
    "no" verdict a positive prediction. Clusters with no pixel are left out (nothing to judge), and
    so are samples with a failed verdict (counted in ``failed``).

    Returns ``verdict_accuracy`` (share of truly spurious clusters marked "no", the paper's
    verdict accuracy; ``None`` when there is none), ``cluster_accuracy`` (over all judged
    clusters), ``confusion`` ``{"tp","fp","tn","fn"}``, and the counts ``clusters``,
    ``spurious_clusters``, ``empty_clusters``, ``samples``, ``judged_samples``, ``failed``,
    ``failed_sample_ids``, ``truth_min_pixels``.
    """
    if labels.dim() != 3:
        raise ValueError(f"verdict_metrics: labels must be [B,H,W], got {tuple(labels.shape)}")
    if true_masks.shape != labels.shape:
        raise ValueError(
            f"verdict_metrics: true_masks {tuple(true_masks.shape)} must match labels {tuple(labels.shape)}"
        )
    if len(verdicts) != labels.shape[0]:
        raise ValueError(
            f"verdict_metrics: {len(verdicts)} verdicts for {labels.shape[0]} cluster maps"
        )
    if truth_min_pixels < 1:
        raise ValueError(
            f"verdict_metrics: truth_min_pixels (a pixel count) must be >= 1, got {truth_min_pixels}"
        )
    b = labels.shape[0]
    ok = [v.ok for v in verdicts]
    failed_ids = [v.sample_id for v in verdicts if not v.ok]
    num_clusters = max([len(v.colors) for v in verdicts] + [1])
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("verdict_metrics: negative cluster label")

    # no[b, j] = verdict "no" (spurious) for cluster j of sample b; judged[b, j] = a verdict exists
    no = torch.zeros(b, num_clusters, dtype=torch.bool)
    judged = torch.zeros(b, num_clusters, dtype=torch.bool)
    for i, v in enumerate(verdicts):
        if v.relevant is None:
            continue
        present_max = int(labels[i].max()) if labels[i].numel() else -1
        if present_max >= len(v.relevant):
            raise ValueError(
                f"verdict_metrics: sample {v.sample_id} has cluster {present_max} but only "
                f"{len(v.relevant)} verdicts"
            )
        k = len(v.relevant)
        no[i, :k] = ~torch.tensor(v.relevant, dtype=torch.bool)
        judged[i, :k] = True

    # Failed samples may carry any labels; count their clusters too (they are not judged).
    width = max(num_clusters, int(labels.max()) + 1 if labels.numel() else 1)
    sizes, overlap = cluster_overlap(labels, true_masks.bool(), width)
    sizes, overlap = sizes[:, :num_clusters], overlap[:, :num_clusters]
    counted = judged & (sizes > 0) & torch.tensor(ok, dtype=torch.bool).unsqueeze(1)
    truth = overlap >= truth_min_pixels

    tp = int((counted & truth & no).sum())
    fn = int((counted & truth & ~no).sum())
    fp = int((counted & ~truth & no).sum())
    tn = int((counted & ~truth & ~no).sum())
    clusters = tp + fn + fp + tn
    return {
        "verdict_accuracy": _ratio(tp, tp + fn),
        "cluster_accuracy": _ratio(tp + tn, clusters),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "clusters": clusters,
        "spurious_clusters": tp + fn,
        "empty_clusters": int((judged & (sizes == 0)).sum()),
        "samples": b,
        "judged_samples": sum(ok),
        "failed": len(failed_ids),
        "failed_sample_ids": failed_ids,
        "truth_min_pixels": truth_min_pixels,
    }


def wilcoxon_signed_rank(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    alternative: str = "two-sided",
) -> dict[str, float | int]:
    """Wilcoxon signed-rank test of paired values ``a`` vs ``b`` (e.g. aligned vs original over
    seeds), via ``scipy.stats.wilcoxon``. Returns ``statistic``, ``p_value`` and ``n`` (pairs).

    Zero differences are dropped (scipy's ``"wilcox"`` rule); when every difference is zero the
    test is undefined and a ``ValueError`` says so.
    """
    from scipy import stats

    x = torch.as_tensor(a, dtype=torch.float64).flatten().numpy()
    y = torch.as_tensor(b, dtype=torch.float64).flatten().numpy()
    if x.shape != y.shape:
        raise ValueError(f"wilcoxon_signed_rank: {x.size} values vs {y.size}: the test needs pairs")
    if x.size == 0:
        raise ValueError("wilcoxon_signed_rank: no pairs")
    if not (x - y).any():
        raise ValueError("wilcoxon_signed_rank: every difference is zero, the test is undefined")
    result = stats.wilcoxon(x, y, zero_method="wilcox", alternative=alternative)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "n": int(x.size)}


def mean_std(values: Sequence[float] | torch.Tensor, ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (sample std, ``ddof=1`` by default) of ``values``; the std
    is ``nan`` when there are no more values than ``ddof``."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("mean_std: no values")
    mean = float(x.mean())
    if x.numel() <= ddof:
        return mean, math.nan
    return mean, float(((x - mean).square().sum() / (x.numel() - ddof)).sqrt())


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest of m p-values
    is multiplied by ``m - i + 1`` (i from 1), capped at 1 and made non-decreasing in that
    order. Rejecting where the adjusted p is below alpha controls the family-wise error rate at
    alpha without assuming independence between the tests."""
    p = [float(v) for v in p_values]
    if any(not 0.0 <= v <= 1.0 for v in p):  # also rejects nan
        raise ValueError(f"holm_adjusted: p-values must lie in [0, 1], got {p}")
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted
