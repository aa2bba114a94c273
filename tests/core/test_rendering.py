"""Tests of lvlmva.rendering: palette, display scaling, cluster colours, files and bytes."""

from __future__ import annotations

import colorsys
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from lvlmva.rendering import (
    PALETTE,
    colorize_labels,
    encode_png,
    palette_for,
    render_samples,
    to_display,
    upscale_factor,
)
from lvlmva.settings import RenderOptions


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _toy(b: int = 2, h: int = 28, w: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(b, 1, h, w, generator=g) * 255
    labels = torch.randint(0, 5, (b, h, w), generator=g)
    return images, labels


def test_palette_has_distinct_names_and_far_apart_colours():
    names = [n for n, _ in PALETTE]
    assert len(PALETTE) >= 9
    assert len(set(names)) == len(names)
    rgb = np.array([c for _, c in PALETTE], dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(dists) > 60


#: What each palette name means in HSV (hue in degrees, saturation and value in 0..1). Brown is
#: a dark orange, pink a light (desaturated) magenta-red; the achromatic colours go by value.
COLOUR_MEANINGS = {
    "red": lambda h, s, v: (h >= 345 or h <= 10) and s >= 0.6 and v >= 0.5,
    "orange": lambda h, s, v: 20 <= h <= 40 and s >= 0.7 and v >= 0.85,
    "brown": lambda h, s, v: 10 <= h <= 40 and s >= 0.4 and 0.25 <= v <= 0.7,
    "yellow": lambda h, s, v: 45 <= h <= 65 and s >= 0.6 and v >= 0.8,
    "green": lambda h, s, v: 90 <= h <= 160 and s >= 0.5 and v >= 0.4,
    "cyan": lambda h, s, v: 170 <= h <= 195 and s >= 0.6 and v >= 0.7,
    "blue": lambda h, s, v: 200 <= h <= 250 and s >= 0.6 and v >= 0.5,
    "purple": lambda h, s, v: 260 <= h <= 300 and s >= 0.5 and 0.4 <= v <= 0.9,
    "pink": lambda h, s, v: 300 <= h <= 350 and 0.2 <= s <= 0.7 and v >= 0.85,
    "grey": lambda h, s, v: s <= 0.1 and 0.3 <= v <= 0.7,
    "black": lambda h, s, v: v <= 0.15,
    "white": lambda h, s, v: s <= 0.1 and v >= 0.95,
}


def _means(name: str, rgb: tuple[int, int, int]) -> bool:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return COLOUR_MEANINGS[name](360 * h, s, v)


def test_every_palette_colour_has_a_meaning_to_check():
    assert sorted(n for n, _ in PALETTE) == sorted(COLOUR_MEANINGS)


@pytest.mark.parametrize(("name", "rgb"), PALETTE, ids=[n for n, _ in PALETTE])
def test_palette_colour_looks_like_its_name(name, rgb):
    """The prompts name clusters by colour: the RGB value must be what the word means, and
    what no other palette word means (so that two swapped entries fail)."""
    assert _means(name, rgb), (name, rgb)
    others = [other for other in COLOUR_MEANINGS if other != name and _means(other, rgb)]
    assert others == [], (name, rgb, others)


def test_default_render_palette_is_the_palette_prefix():
    default = RenderOptions().palette
    assert default == [n for n, _ in PALETTE[: len(default)]]
    assert palette_for(default) == list(PALETTE[: len(default)])


def test_palette_for_accepts_spelling_variants_and_keeps_order():
    assert palette_for(["Gray", "red"]) == [
        ("grey", dict(PALETTE)["grey"]),
        ("red", dict(PALETTE)["red"]),
    ]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["red", "chartreuse"], "unknown colour 'chartreuse'"),
        (["red", "blue", "red"], "listed twice"),
    ],
)
def test_palette_for_rejects_bad_names(names, message):
    with pytest.raises(ValueError, match=message):
        palette_for(names)


def test_colorize_labels_indexes_the_palette():
    labels = torch.tensor([[[0, 1], [2, 0]]])
    out = colorize_labels(labels, palette_for(["red", "blue", "green"]))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (1, 2, 2, 3)
    rgb = dict(PALETTE)
    assert out[0, 0, 0].tolist() == list(rgb["red"])
    assert out[0, 0, 1].tolist() == list(rgb["blue"])
    assert out[0, 1, 0].tolist() == list(rgb["green"])
    # names work as well as (name, rgb) pairs
    assert torch.equal(colorize_labels(labels, ["red", "blue", "green"]), out)


def test_colorize_labels_rejects_labels_beyond_the_palette():
    with pytest.raises(ValueError, match="palette has 2 colours"):
        colorize_labels(torch.tensor([[[0, 2]]]), ["red", "blue"])


def test_to_display_normalises_each_image_on_its_own_scale():
    base = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    a = to_display(base)
    b = to_display(base * 255)  # 0-255 scale shows the same
    c = to_display(base * 3 - 1)  # standardised inputs too
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.shape == (1, 4, 4, 3) and a.dtype == torch.uint8
    assert int(a.min()) == 0 and int(a.max()) == 255
    # grey input -> equal channels; constant image -> black, not NaN
    assert torch.equal(a[..., 0], a[..., 2])
    assert int(to_display(torch.full((1, 3, 2, 2), 7.0)).max()) == 0


def test_upscale_factor_reaches_the_minimum_side():
    assert upscale_factor(28, 28, 224) == 8
    assert upscale_factor(28, 30, 225) == 9  # ceil: 8 * 28 = 224 < 225
    assert upscale_factor(300, 400, 224) == 1


def test_render_samples_writes_three_pngs_per_sample(tmp_path):
    images, labels = _toy()
    options = RenderOptions(size=56, overlay_alpha=0.5)
    out = render_samples(images, labels, [11, 42], options, 5, tmp_path / "render", "render")
    assert [r.sample_id for r in out] == [11, 42]
    assert out[0].colors == ("red", "blue", "green", "yellow", "pink")
    assert out[1].files == (
        "render/sample_42_original.png",
        "render/sample_42_clusters.png",
        "render/sample_42_overlay.png",
    )
    for r in out:
        for rel, data in zip(r.files, r.images, strict=True):
            assert (tmp_path / rel).read_bytes() == data
            assert _decode(data).shape == (56, 56, 3)


def test_render_samples_pixels_match_a_numpy_reference(tmp_path):
    images, labels = _toy(b=1, h=7, w=5)
    alpha = 0.3
    out = render_samples(
        images, labels, [0], RenderOptions(size=28, overlay_alpha=alpha), 5, tmp_path, "r"
    )[0]
    factor = 6  # ceil(28 / 5)
    x = images[0, 0].numpy().astype(np.float64)
    grey = np.round((x - x.min()) / (x.max() - x.min()) * 255)
    table = np.array([c for _, c in PALETTE[:5]], dtype=np.float64)
    colours = table[labels[0].numpy()]
    over = np.round((1 - alpha) * grey[..., None] + alpha * colours)
    up = lambda a: np.repeat(np.repeat(a, factor, 0), factor, 1)  # noqa: E731
    np.testing.assert_array_equal(_decode(out.original), up(np.repeat(grey[..., None], 3, 2)))
    np.testing.assert_array_equal(_decode(out.clusters), up(colours))
    np.testing.assert_array_equal(_decode(out.overlay), up(over))


def test_render_samples_bytes_are_deterministic(tmp_path):
    images, labels = _toy()
    a = render_samples(images, labels, [1, 2], RenderOptions(size=28), 5, tmp_path / "a", "a")
    b = render_samples(
        images.clone(), labels.clone(), [1, 2], RenderOptions(size=28), 5, tmp_path / "b", "b"
    )
    assert [r.images for r in a] == [r.images for r in b]
    assert encode_png(np.zeros((2, 2, 3), np.uint8)) == encode_png(
        torch.zeros(2, 2, 3, dtype=torch.uint8)
    )


def test_render_samples_checks_its_inputs(tmp_path):
    images, labels = _toy()
    with pytest.raises(ValueError, match="names only 3 colours"):
        render_samples(
            images,
            labels,
            [0, 1],
            RenderOptions(palette=["red", "blue", "green"]),
            5,
            tmp_path,
            "r",
        )
    with pytest.raises(ValueError, match="sample ids"):
        render_samples(images, labels, [0], RenderOptions(), 5, tmp_path, "r")
    with pytest.raises(ValueError, match="do not match"):
        render_samples(images, labels[:, :10], [0, 1], RenderOptions(), 5, tmp_path, "r")
    with pytest.raises(ValueError, match="palette has 4 colours"):
        render_samples(images, labels, [0, 1], RenderOptions(), 4, tmp_path, "r")
