"""Rendering of alignment samples for a Critic: the original image, the cluster map in named
colours, and the cluster map laid over the original (method.md 2.3).

The prompts name clusters by colour, so the palette is a fixed, ordered list of colour names with
RGB values far apart from each other. Small images are upscaled with nearest-neighbour so that
every cluster keeps hard edges and a single colour.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import write_error
from .options import RenderOptions
from .records import RenderedSample

__all__ = [
    "PALETTE",
    "COLOR_SYNONYMS",
    "palette_for",
    "colorize_labels",
    "to_display",
    "upscale_factor",
    "encode_png",
    "render_samples",
]

#: Ordered (name, RGB) pairs. Names are plain colour words a vision-language model uses without
#: hesitation; the RGB values are saturated and far apart (minimum pairwise distance is checked in
#: the tests) so that no two clusters could be called by the same name.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 25)),
    ("blue", (25, 75, 230)),
    ("green", (30, 170, 50)),
    ("yellow", (255, 225, 25)),
    ("pink", (255, 130, 200)),
    ("brown", (140, 80, 30)),
    ("grey", (128, 128, 128)),
    ("orange", (255, 135, 0)),
    ("purple", (130, 40, 190)),
    ("cyan", (0, 220, 230)),
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
)

#: Other spellings a model may use for a palette colour (answer text -> palette name).
COLOR_SYNONYMS: dict[str, str] = {"gray": "grey", "violet": "purple", "turquoise": "cyan"}

_PALETTE_RGB = dict(PALETTE)

Color = tuple[str, tuple[int, int, int]]


def palette_for(names: Sequence[str]) -> list[Color]:
    """The ``(name, rgb)`` pairs for ``names``, in the given order.

    Raises ``ValueError`` naming the offending entry when a name is not in :data:`PALETTE`
    (spelling variants such as ``"gray"`` are accepted and mapped) or appears twice.
    """
    out: list[Color] = []
    seen: set[str] = set()
    for raw in names:
        name = COLOR_SYNONYMS.get(raw.strip().lower(), raw.strip().lower())
        if name not in _PALETTE_RGB:
            allowed = ", ".join(n for n, _ in PALETTE)
            raise ValueError(f"render.palette: unknown colour {raw!r}; allowed: {allowed}")
        if name in seen:
            raise ValueError(f"render.palette: colour {raw!r} is listed twice")
        seen.add(name)
        out.append((name, _PALETTE_RGB[name]))
    return out


def _palette_tensor(palette: Sequence[Color | str]) -> torch.Tensor:
    rows = [palette_for([c])[0][1] if isinstance(c, str) else c[1] for c in palette]
    return torch.tensor(rows, dtype=torch.uint8).reshape(-1, 3)


def colorize_labels(labels: torch.Tensor, palette: Sequence[Color | str]) -> torch.Tensor:
    """Cluster labels ``[B, H, W]`` (int, ``0..J-1``) -> uint8 RGB ``[B, H, W, 3]``.

    ``palette`` is a sequence of ``(name, rgb)`` pairs (as from :func:`palette_for`) or of colour
    names; cluster ``j`` gets ``palette[j]``.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B,H,W], got {tuple(labels.shape)}")
    table = _palette_tensor(palette)
    labels = labels.long().cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= table.shape[0]):
        raise ValueError(
            f"cluster labels range {int(labels.min())}..{int(labels.max())} but the palette has "
            f"{table.shape[0]} colours"
        )
    return table[labels]


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (C = 1 or 3, any value scale) -> uint8 RGB ``[B, H, W, 3]``.

    uint8 images (stored pixels) are shown as they are. Float images are min-max normalised
    each on its own, so inputs on a 0-255 or a 0-1 scale (or
    standardised ones) display the same; a constant image becomes black.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B,1,H,W] or [B,3,H,W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:  # stored pixels: shown as they are
        x = images.detach().cpu()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.permute(0, 2, 3, 1).contiguous()
    x = images.detach().to(device="cpu", dtype=torch.float64)
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    span = hi - lo
    # A constant image has nothing to show; dividing by 1 keeps it at 0 instead of NaN.
    x = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    x = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()


def upscale_factor(height: int, width: int, min_side: int) -> int:
    """The smallest integer factor that makes the smaller side at least ``min_side``."""
    return max(1, math.ceil(min_side / min(height, width)))


def _upscale(rgb: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of ``[B, H, W, 3]`` by an integer factor."""
    if factor == 1:
        return rgb
    return rgb.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def encode_png(rgb: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes of one uint8 RGB image ``[H, W, 3]``; the same pixels give the same bytes."""
    arr = rgb.numpy() if isinstance(rgb, torch.Tensor) else rgb
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"encode_png needs uint8 [H,W,3], got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    # Pillow writes no timestamp or other varying chunk, so the bytes are reproducible.
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def render_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: Sequence[int],
    options: RenderOptions,
    num_clusters: int,
    out_dir: Path,
    rel_dir: str,
) -> list[RenderedSample]:
    """Render the three Critic images for every sample and write them to ``out_dir``.

    - ``images``: ``[B, C, H, W]`` on any value scale (normalised per image).
    - ``labels``: int64 ``[B, H, W]`` cluster map with values ``0..num_clusters-1``.
    - ``sample_ids``: one id per sample (file names and ``RenderedSample.sample_id``).

    Writes ``sample_<id>_original.png``, ``sample_<id>_clusters.png`` and
    ``sample_<id>_overlay.png`` into ``out_dir``; ``RenderedSample.files`` holds the same paths
    relative to the run directory, ``f"{rel_dir}/sample_<id>_...png"``. The cluster colours are
    the first ``num_clusters`` names of ``options.palette``.
    """
    b = images.shape[0]
    if (
        labels.dim() != 3
        or labels.shape[0] != b
        or tuple(labels.shape[1:]) != tuple(images.shape[2:])
    ):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)} (want [B,H,W])"
        )
    if len(sample_ids) != b:
        raise ValueError(f"{len(sample_ids)} sample ids for {b} images")
    palette = palette_for(options.palette)
    if num_clusters > len(palette):
        raise ValueError(
            f"{num_clusters} clusters but render.palette names only {len(palette)} colours"
        )
    palette = palette[:num_clusters]
    colors = tuple(name for name, _ in palette)

    factor = upscale_factor(int(images.shape[2]), int(images.shape[3]), options.size)
    original = to_display(images)
    clusters = colorize_labels(labels, palette)
    alpha = float(options.overlay_alpha)
    overlay = (
        ((1.0 - alpha) * original.to(torch.float32) + alpha * clusters.to(torch.float32))
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    original, clusters, overlay = (_upscale(t, factor) for t in (original, clusters, overlay))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered: list[RenderedSample] = []
    for i, sid in enumerate(sample_ids):
        sid = int(sid)
        data = {
            "original": encode_png(original[i]),
            "clusters": encode_png(clusters[i]),
            "overlay": encode_png(overlay[i]),
        }
        files = []
        for kind, png in data.items():
            name = f"sample_{sid}_{kind}.png"
            try:
                (out_dir / name).write_bytes(png)
            except OSError as exc:
                raise write_error(out_dir / name, exc) from exc
            files.append(f"{rel_dir}/{name}")
        rendered.append(
            RenderedSample(
                sample_id=sid,
                original=data["original"],
                clusters=data["clusters"],
                overlay=data["overlay"],
                colors=colors,
                files=tuple(files),
            )
        )
    return rendered
