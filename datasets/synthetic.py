"""Procedural proxies of the paper's medical data sets, with known shortcuts and true masks.

The paper's knee radiographs and skin lesions are private, so offline runs use images drawn
from the class specifications (seed Tables 4 and 5) with a planted shortcut whose every pixel is
known:

- ``synthetic-skin`` (RGB): a lesion on skin. Benign lesions are small, round and symmetric, with
  a sharp border and one even brown; malignant ones are larger, asymmetric, with an irregular,
  blurred border and several brown-to-black shades. The shortcut is a coloured adhesive patch
  near a corner: in training it sits mostly beside benign lesions (``share_train``), in
  validation and test on a share of every class alike (``share_test``).
- ``synthetic-knee`` (grey): two bone ends (femoral condyles above, the tibial plateau below) and
  the joint space between them. Osteoarthritis narrows the space, adds osteophytes (bony spurs
  at the joint margins), sclerosis (a denser band under the joint surfaces) and an uneven joint
  line. The shortcut is an "L" or "R" laterality marker near an edge, present mostly on
  osteoarthritic knees in training (``share_train``), on a share of every class alike in
  validation and test (``share_test``).

Group ``2 * y + s`` is class ``y`` with (``s = 1``) or without the shortcut; its name is
``"<class>/<shortcut>"`` or ``"<class>/no-<shortcut>"``. The true spurious mask is the patch's or
the marker's pixels. Shares are exact (``round(share * n)`` images per class and split, chosen by
a seeded permutation), so every group a share allows has samples. Images are stored as uint8
with per-channel normalisation by the training split's mean and standard deviation.

Every image is drawn from a generator seeded by the run seed and the split's name, in chunks of
tensor operations: thousands of 64 x 64 images per second on one CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from lvlmva.protocols import PluginOptions, RunContext
from lvlmva.records import Normalization, Split, SpuriousDataset

from .class_specs import load_class_spec

__all__ = [
    "SyntheticSkinProvider",
    "SyntheticKneeProvider",
    "make_synthetic",
    "draw_skin",
    "draw_knee",
    "train_normalization",
    "shortcut_group_names",
    "UINT8_SCALE",
]

_CHUNK = 256

#: adhesive patch colours (RGB): the bright blue, green, yellow and pink of plasters in ISIC
_PATCH_COLORS = torch.tensor(
    [[60, 120, 225], [70, 190, 110], [235, 200, 50], [235, 110, 165]], dtype=torch.float32
)

# 5 x 7 bitmaps of the laterality letters
_LETTERS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _letter(name: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in _LETTERS[name]], dtype=torch.bool)


def _uniform(gen: torch.Generator, n: int, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1]: ``(y, x)``, each ``[1, H, W]``."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return axis.view(1, size, 1).expand(1, size, size), axis.view(1, 1, size).expand(1, size, size)


def _corner_boxes(gen: torch.Generator, n: int, size: int, height: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left pixel ``(row, col)`` of an ``height x width`` box near one of the four corners
    (a margin of 2-8 % of the side), one corner per image drawn uniformly."""
    corner = torch.randint(0, 4, (n,), generator=gen)
    margin = (_uniform(gen, n, 0.02, 0.08) * size).round().long()
    margin2 = (_uniform(gen, n, 0.02, 0.08) * size).round().long()
    bottom, right = corner // 2 == 1, corner % 2 == 1
    row = torch.where(bottom, size - margin - height, margin)
    col = torch.where(right, size - margin2 - width, margin2)
    return row.clamp(min=0), col.clamp(min=0)


def draw_skin(labels: torch.Tensor, patched: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB images ``[N, 3, size, size]`` and bool patch masks ``[N, size, size]`` for
    class ``labels`` (0 benign, 1 malignant) with a patch where ``patched``."""
    n = int(labels.shape[0])
    yy, xx = _grid(size)
    malignant = labels.bool().view(n, 1, 1)
    # skin: a warm beige with a soft gradient; one grain field for every channel
    base = torch.stack([_uniform(gen, n, 205, 235), _uniform(gen, n, 160, 190), _uniform(gen, n, 135, 165)], 1)
    tilt = _uniform(gen, n, -0.06, 0.06).view(n, 1, 1) * xx + _uniform(gen, n, -0.06, 0.06).view(n, 1, 1) * yy
    grain = 4.0 * torch.randn((n, 1, size, size), generator=gen)

    # the lesion: radius by angle, with harmonics for asymmetry (k = 1) and an irregular border
    mal = malignant.view(n)
    cy = _uniform(gen, n, -0.2, 0.2).view(n, 1, 1)
    cx = _uniform(gen, n, -0.2, 0.2).view(n, 1, 1)
    r0 = torch.where(mal, _uniform(gen, n, 0.22, 0.40), _uniform(gen, n, 0.13, 0.28)).view(n, 1, 1)
    dy, dx = yy - cy, xx - cx
    theta = torch.atan2(dy, dx)
    rho = torch.sqrt(dy * dy + dx * dx)
    shape = torch.ones_like(theta)
    for k in range(1, 6):
        amp = torch.where(mal, _uniform(gen, n, 0.04, 0.16), _uniform(gen, n, 0.0, 0.025)).view(n, 1, 1)
        phase = _uniform(gen, n, 0, 2 * math.pi).view(n, 1, 1)
        shape += amp * torch.cos(k * theta + phase)
    radius = r0 * shape.clamp_(min=0.3)
    softness = torch.where(mal, _uniform(gen, n, 0.025, 0.05), _uniform(gen, n, 0.005, 0.012)).view(n, 1, 1)
    cover = torch.sigmoid((radius - rho) / softness).unsqueeze(1)  # [N, 1, H, W], 1 inside

    # colour: one even brown (benign), or brown, dark and light shades mixed by two
    # low-frequency fields (malignant; the fields are zero for benign lesions)
    brown = torch.stack([_uniform(gen, n, 95, 140), _uniform(gen, n, 60, 90), _uniform(gen, n, 40, 65)], 1).view(n, 3, 1, 1)
    dark = torch.stack([_uniform(gen, n, 30, 60), _uniform(gen, n, 20, 40), _uniform(gen, n, 20, 35)], 1).view(n, 3, 1, 1)
    light = torch.stack([_uniform(gen, n, 150, 180), _uniform(gen, n, 100, 130), _uniform(gen, n, 75, 100)], 1).view(n, 3, 1, 1)
    freq = _uniform(gen, n, 4, 9).view(n, 1, 1)
    angle = _uniform(gen, n, 0, math.pi).view(n, 1, 1)
    phase = _uniform(gen, n, 0, 2 * math.pi).view(n, 1, 1)
    on = mal.view(n, 1, 1).float()
    to_dark = (on * (torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase) + 1) / 2).unsqueeze(1)
    to_light = (on * 0.3 * (torch.sin(0.7 * freq * (xx * torch.sin(angle) - yy * torch.cos(angle)) + 2 * phase) + 1)).unsqueeze(1)
    lesion = brown + (dark - brown) * to_dark
    lesion = lesion + (light - lesion) * to_light
    skin = base.view(n, 3, 1, 1) * (1 + tilt).unsqueeze(1)
    img = skin + (lesion - skin) * cover + grain

    # the adhesive patch: a coloured rectangle with a lighter pad, near a corner
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    height = (_uniform(gen, n, 0.16, 0.24) * size).round().long().clamp(min=2)
    width = (_uniform(gen, n, 0.24, 0.36) * size).round().long().clamp(min=2)
    swap = torch.rand(n, generator=gen) < 0.5
    height, width = torch.where(swap, width, height), torch.where(swap, height, width)
    row, col = _corner_boxes(gen, n, size, height, width)
    color = _PATCH_COLORS[torch.randint(0, len(_PATCH_COLORS), (n,), generator=gen)]
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    box = (
        (rows >= row.view(n, 1, 1)) & (rows < (row + height).view(n, 1, 1))
        & (cols >= col.view(n, 1, 1)) & (cols < (col + width).view(n, 1, 1))
    )  # fmt: skip
    box &= patched.bool().view(n, 1, 1)
    masks |= box
    inner = (
        (rows >= (row + height // 3).view(n, 1, 1)) & (rows < (row + height - height // 3).view(n, 1, 1))
        & (cols >= (col + width // 3).view(n, 1, 1)) & (cols < (col + width - width // 3).view(n, 1, 1))
    ) & box  # fmt: skip
    patch_rgb = color.view(n, 3, 1, 1).expand(n, 3, size, size)
    pad_rgb = (0.5 * color + 0.5 * 240).view(n, 3, 1, 1).expand(n, 3, size, size)
    img = torch.where(box.unsqueeze(1), patch_rgb, img)
    img = torch.where(inner.unsqueeze(1), pad_rgb, img)
    return img.round().clamp(0, 255).to(torch.uint8), masks


def draw_knee(labels: torch.Tensor, marked: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 grey images ``[N, 1, size, size]`` and bool marker masks ``[N, size, size]`` for
    class ``labels`` (0 no osteoarthritis, 1 osteoarthritis) with a marker where ``marked``."""
    n = int(labels.shape[0])
    yy, xx = _grid(size)
    oa = labels.bool().view(n, 1, 1)
    img = _uniform(gen, n, 15, 35).view(n, 1, 1).expand(n, size, size).clone()

    joint = _uniform(gen, n, -0.12, 0.12).view(n, 1, 1)  # the joint line's height
    gap = torch.where(oa.view(n), _uniform(gen, n, 0.04, 0.12), _uniform(gen, n, 0.07, 0.15)).view(n, 1, 1)
    shift = _uniform(gen, n, -0.08, 0.08).view(n, 1, 1)
    x = xx - shift
    rough = torch.where(oa, _uniform(gen, n, 0.006, 0.02).view(n, 1, 1), torch.full((n, 1, 1), 0.003))
    wave = rough * torch.sin(_uniform(gen, n, 9, 16).view(n, 1, 1) * x + _uniform(gen, n, 0, 6.3).view(n, 1, 1))
    # femur: two condyles bulging down (a notch between them), the shaft narrowing upwards
    condyles = 0.06 * (1 - torch.cos(2 * math.pi * x / 0.62)) / 2
    femur_edge = joint - gap / 2 - condyles + wave
    femur_half = 0.30 + 0.28 * torch.sigmoid((yy - (joint - 0.35)) / 0.08)
    femur = (yy < femur_edge) & (x.abs() < femur_half)
    # tibia: a nearly flat plateau, the shaft narrowing downwards
    tibia_edge = joint + gap / 2 + 0.05 * x * x - wave
    tibia_half = 0.30 + 0.30 * torch.sigmoid(((joint + 0.35) - yy) / 0.08)
    tibia = (yy > tibia_edge) & (x.abs() < tibia_half)
    bone = femur | tibia
    level = _uniform(gen, n, 150, 185).view(n, 1, 1)
    img = torch.where(bone, level + 10 * torch.cos(6 * xx) * torch.cos(5 * yy), img)
    # sclerosis: a denser band under both joint surfaces (strong in osteoarthritis)
    band = torch.where(oa, _uniform(gen, n, 0.05, 0.09).view(n, 1, 1), torch.full((n, 1, 1), 0.02))
    gain = torch.where(oa, _uniform(gen, n, 8, 24).view(n, 1, 1), torch.full((n, 1, 1), 6.0))
    near = (femur & (femur_edge - yy < band)) | (tibia & (yy - tibia_edge < band))
    img = torch.where(near, img + gain, img)
    # osteophytes: bony spurs at the outer margins of the joint
    spurs = torch.zeros((n, size, size), dtype=torch.bool)
    for side in (-1.0, 1.0):
        for level_y in (-1.0, 1.0):  # femur side, tibia side
            present = oa.view(n) & (torch.rand(n, generator=gen) < 0.35)
            radius = _uniform(gen, n, 0.025, 0.05).view(n, 1, 1)
            sy = joint + level_y * (gap / 2 + 0.03)
            sx = side * (0.56 + _uniform(gen, n, 0.0, 0.04).view(n, 1, 1))
            spot = ((yy - sy) ** 2 + (x - sx) ** 2) < radius**2
            spurs |= spot & present.view(n, 1, 1)
    img = torch.where(spurs, level + 15, img)
    img = img + 5.0 * torch.randn((n, size, size), generator=gen)

    # the laterality marker: a white "L" or "R" on a dark plate near an edge
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    scale = max(1, round(size / 48))
    plate_h, plate_w = 7 * scale + 2 * scale, 5 * scale + 2 * scale
    heights = torch.full((n,), plate_h)
    widths = torch.full((n,), plate_w)
    row, col = _corner_boxes(gen, n, size, heights, widths)
    letters = torch.randint(0, 2, (n,), generator=gen)
    bitmaps = [_letter(c).repeat_interleave(scale, 0).repeat_interleave(scale, 1) for c in ("L", "R")]
    for i in torch.nonzero(marked.bool()).flatten().tolist():
        r, c = int(row[i]), int(col[i])
        img[i, r : r + plate_h, c : c + plate_w] = 10.0
        glyph = bitmaps[int(letters[i])]
        window = img[i, r + scale : r + scale + glyph.shape[0], c + scale : c + scale + glyph.shape[1]]
        window[glyph] = 245.0
        masks[i, r : r + plate_h, c : c + plate_w] = True
    return img.round().clamp(0, 255).to(torch.uint8).unsqueeze(1), masks


#: how the uint8 providers describe their inputs (results.json's input_scale)
UINT8_SCALE = "0-255 (uint8 pixels, normalised per channel by the training split's mean and std)"


def shortcut_group_names(class_names: tuple[str, ...], shortcut: str) -> tuple[str, ...]:
    """Names of the groups ``2 * y + s``: ``"<class>/no-<shortcut>"``, ``"<class>/<shortcut>"``."""
    return tuple(f"{c}/{s}" for c in class_names for s in (f"no-{shortcut}", shortcut))


def train_normalization(images: torch.Tensor, chunk: int = 256) -> Normalization:
    """Per-channel mean and standard deviation of uint8 images on the 0-1 scale, summed in
    float64 chunk by chunk (no float copy of the whole split)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    # the sample variance, as torch.std gives it
    var = (squares - count * mean.square()) / max(count - 1, 1)
    std = var.clamp(min=0).sqrt().clamp(min=1e-6)
    return Normalization(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), scale=1 / 255)


def _exact_flags(labels: torch.Tensor, shares: tuple[float, ...], gen: torch.Generator) -> torch.Tensor:
    """bool ``[N]``: exactly ``round(shares[y] * count_y)`` images of each class ``y`` flagged,
    chosen by a seeded permutation."""
    flags = torch.zeros(labels.shape[0], dtype=torch.bool)
    for y, share in enumerate(shares):
        members = torch.nonzero(labels == y).flatten()
        take = round(share * members.numel())
        order = members[torch.randperm(members.numel(), generator=gen)]
        flags[order[:take]] = True
    return flags


def _labels(n: int, positive_share: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly ``round(positive_share * n)`` class-1 labels, shuffled."""
    labels = torch.zeros(n, dtype=torch.int64)
    labels[: round(positive_share * n)] = 1
    return labels[torch.randperm(n, generator=gen)]


Draw = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _split(draw: Draw, n: int, positive_share: float, shares: tuple[float, float], size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = _labels(n, positive_share, gen)
    flags = _exact_flags(labels, shares, gen)
    images, masks = [], []
    for start in range(0, n, _CHUNK):
        img, mask = draw(labels[start : start + _CHUNK], flags[start : start + _CHUNK], size, gen)
        images.append(img)
        masks.append(mask)
    return torch.cat(images), labels, flags, torch.cat(masks)


def make_synthetic(
    family: Literal["skin", "knee"],
    *,
    size: int,
    train_size: int,
    val_size: int,
    test_size: int,
    positive_share: float,
    share_train: tuple[float, float],
    share_test: float,
    generator: Callable[[str], torch.Generator],
) -> SpuriousDataset:
    """A synthetic skin or knee data set (see the module docstring); ``generator(salt)`` gives
    the seeded generator of each split."""
    draw, shortcut = (draw_skin, "patch") if family == "skin" else (draw_knee, "marker")
    names, descriptions = load_class_spec(family)
    raw = {}
    for split, n, shares in (
        ("train", train_size, share_train),
        ("val", val_size, (share_test, share_test)),
        ("test", test_size, (share_test, share_test)),
    ):
        if n:
            raw[split] = _split(draw, n, positive_share, shares, size, generator(f"synthetic-{family}-{split}"))
    norm = train_normalization(raw["train"][0])

    def as_split(name: str) -> Split | None:
        if name not in raw:
            return None
        images, labels, flags, masks = raw[name]
        return Split(images=images, labels=labels, groups=2 * labels + flags.long(), spurious_masks=masks, normalization=norm)

    return SpuriousDataset(
        family=family,
        train=as_split("train"),  # type: ignore[arg-type]
        test=as_split("test"),  # type: ignore[arg-type]
        val=as_split("val"),
        class_names=names,
        class_descriptions=descriptions,
        group_names=shortcut_group_names(names, shortcut),
        input_scale=UINT8_SCALE,
    )


Share = Annotated[float, Field(ge=0, le=1)]


class _SyntheticOptions(PluginOptions):
    size: int = Field(64, ge=16, le=512, description="Image side in pixels (64 for quick runs, 224 for the paper's settings).")
    train_size: int = Field(2000, ge=2, description="Training images.")
    val_size: int = Field(500, ge=0, description="Validation images, shortcut distributed like the test split (0 = none).")
    test_size: int = Field(1000, ge=2, description="Test images.")
    positive_share: float = Field(0.5, gt=0, lt=1, description="Share of class 1 (malignant / osteoarthritis) in every split, exact.")
    share_test: float = Field(0.5, ge=0, le=1, description="Share of the images of every class with the shortcut in validation and test (the same for each class: uncorrelated).")


class _SyntheticProvider:
    """What both proxies share: options checked by pydantic, data drawn by :func:`make_synthetic`."""

    family: ClassVar[Literal["skin", "knee"]]
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = True

    def __init__(self, options: _SyntheticOptions) -> None:
        self.options = options

    def load(self, ctx: RunContext) -> SpuriousDataset:
        o = self.options
        return make_synthetic(
            self.family, size=o.size, train_size=o.train_size, val_size=o.val_size, test_size=o.test_size,
            positive_share=o.positive_share, share_train=o.share_train, share_test=o.share_test,  # type: ignore[attr-defined]
            generator=ctx.generator,
        )  # fmt: skip


class SyntheticSkinProvider(_SyntheticProvider):
    """Synthetic dermoscopy: benign/malignant lesions (seed Table 4) with coloured adhesive
    patches beside benign lesions in training; true patch masks."""

    family = "skin"

    class Options(_SyntheticOptions):
        share_train: tuple[Share, Share] = Field(
            (0.85, 0.05),
            description="Share of the training images with a patch, per class (benign, malignant): "
            "the shortcut's strength. ISIC's benign images carry patches about half the time and "
            "its malignant ones never; a small malignant share keeps every group in training (SUBG, JTT).",
        )



class SyntheticKneeProvider(_SyntheticProvider):
    """Synthetic knee radiographs: joints without/with osteoarthritis (seed Table 5) with an "L"
    or "R" marker mostly on osteoarthritic knees in training; true marker masks."""

    family = "knee"

    class Options(_SyntheticOptions):
        share_train: tuple[Share, Share] = Field(
            (0.02, 0.98),
            description="Share of the training images with a laterality marker, per class "
            "(no osteoarthritis, osteoarthritis): the shortcut's strength.",
        )

