"""Correction masks from verdicts (method.md 2.6) and the true spurious status of clusters.

``A = sum_j [verdict_j == "no"] * 1[C == j]``: the union of the clusters judged spurious. A
sample whose verdicts failed gets an all-False mask and ``ok = False`` so that the caller leaves
it out of alignment instead of treating it as all-relevant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .records import Verdicts

__all__ = ["masks_from_verdicts", "cluster_overlap", "true_cluster_spurious"]


def _check_labels(labels: torch.Tensor) -> None:
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B,H,W], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got minimum {int(labels.min())}")


def masks_from_verdicts(
    labels: torch.Tensor, verdicts: Sequence[Verdicts]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correction masks for a batch of cluster maps: ``(mask, ok)`` of :func:`verdict_masks`,
    the regions judged "no"."""
    spurious, _relevant, ok = verdict_masks(labels, verdicts)
    return spurious, ok


def verdict_masks(
    labels: torch.Tensor, verdicts: Sequence[Verdicts]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both polarities of the verdicts of a batch of cluster maps, so that no aligner derives
    them again.

    - ``labels``: int ``[B, H, W]`` cluster maps; ``verdicts[b]`` judges the clusters of map ``b``
      (``verdicts[b].colors[j]`` names cluster ``j``).

    Returns ``(spurious, relevant, ok)``: bool ``[B, H, W]`` True on pixels of clusters judged
    "no", bool ``[B, H, W]`` True on pixels of clusters judged "yes", and bool ``[B]``, False
    where the verdicts failed (both masks all False). Raises ``ValueError`` when the counts
    disagree or a map holds a cluster that its verdicts do not cover.
    """
    _check_labels(labels)
    b = labels.shape[0]
    if len(verdicts) != b:
        raise ValueError(f"{len(verdicts)} verdicts for {b} cluster maps")
    width = max([len(v.colors) for v in verdicts] + [1])
    # spurious[b, j]: cluster j of sample b was judged "no"; padding columns stay False.
    spurious = torch.zeros(b, width, dtype=torch.bool)
    relevant = torch.zeros(b, width, dtype=torch.bool)
    ok = torch.zeros(b, dtype=torch.bool)
    for i, v in enumerate(verdicts):
        if v.relevant is None:
            continue
        spurious[i, : len(v.relevant)] = torch.tensor([not r for r in v.relevant], dtype=torch.bool)
        relevant[i, : len(v.relevant)] = torch.tensor(list(v.relevant), dtype=torch.bool)
        ok[i] = True
    flat = labels.reshape(b, -1).long().cpu()
    if b:
        top = flat.max(dim=1).values if flat.shape[1] else torch.zeros(b, dtype=torch.long)
        n_colors = torch.tensor([len(v.colors) for v in verdicts])
        bad = ok & (top >= n_colors)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"sample {verdicts[i].sample_id}: cluster map has label {int(top[i])} but its "
                f"verdicts name only {int(n_colors[i])} colours"
            )
    flat = flat.clamp(max=width - 1)  # failed samples may hold any label; their row is all False
    return spurious.gather(1, flat).reshape(labels.shape), relevant.gather(1, flat).reshape(labels.shape), ok


def cluster_overlap(
    labels: torch.Tensor, true_masks: torch.Tensor, num_clusters: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster pixel counts: ``(pixels, on_mask)``, both int64 ``[B, J]``.

    ``pixels[b, j]`` = pixels of cluster ``j`` in map ``b``; ``on_mask[b, j]`` = how many of them
    lie in ``true_masks[b]``. ``J`` is ``num_clusters`` or ``labels.max() + 1``.
    """
    _check_labels(labels)
    if true_masks.shape != labels.shape or true_masks.dtype != torch.bool:
        raise ValueError(
            f"true_masks must be bool {list(labels.shape)}, got {true_masks.dtype} "
            f"{list(true_masks.shape)}"
        )
    b = labels.shape[0]
    top = int(labels.max()) + 1 if labels.numel() else 1
    j = top if num_clusters is None else int(num_clusters)
    if top > j:
        raise ValueError(f"labels reach {top - 1} but num_clusters is {j}")
    flat = labels.reshape(b, -1).long().cpu()
    on = true_masks.reshape(b, -1).cpu().long()
    pixels = torch.zeros(b, j, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    on_mask = torch.zeros(b, j, dtype=torch.long).scatter_add_(1, flat, on)
    return pixels, on_mask


def true_cluster_spurious(
    labels: torch.Tensor,
    true_masks: torch.Tensor,
    min_overlap: float = 0.0,
    num_clusters: int | None = None,
) -> torch.Tensor:
    """The true verdict of every cluster: bool ``[B, J]``, True = spurious.

    A cluster is spurious when it has at least one pixel in the true mask and that share of its
    pixels is at least ``min_overlap``. ``min_overlap = 0`` gives method.md's definition for
    verdict accuracy: "spurious if it overlaps the true feature" at all. Empty clusters are
    never spurious.
    """
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must lie in [0, 1], got {min_overlap}")
    pixels, on_mask = cluster_overlap(labels, true_masks, num_clusters)
    share = on_mask.double() / pixels.clamp(min=1).double()
    return (on_mask > 0) & (share >= min_overlap)
