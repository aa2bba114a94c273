"""Toy stripes: a two-class data set with a one-pixel shortcut, small enough for tests."""

from __future__ import annotations

import torch
from pydantic import Field

from lvlmva import PluginOptions, RunContext, Split, SpuriousDataset

__all__ = ["StripesProvider", "make_stripes"]


def make_stripes(
    n: int, size: int, noise: float, agreement: float, generator: torch.Generator
) -> Split:
    """``n`` single-channel ``size`` x ``size`` images: class 0 has horizontal stripes, class 1
    vertical ones. The top-left pixel is a tag that equals the label with probability
    ``agreement`` (the shortcut); it is the true spurious mask. Group = 2 * label + tag."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    even = (torch.arange(size) % 2 == 0).float()
    horizontal = even.view(size, 1).expand(size, size)
    patterns = torch.stack([horizontal, horizontal.T])  # [2, size, size]
    images = patterns[labels] + noise * torch.randn(n, size, size, generator=generator)
    agrees = torch.rand(n, generator=generator) < agreement
    tags = torch.where(agrees, labels, 1 - labels)
    images[:, 0, 0] = tags.float()
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 0, 0] = True
    return Split(
        images=images.clamp(0, 1).unsqueeze(1).float(),
        labels=labels.long(),
        groups=(2 * labels + tags).long(),
        spurious_masks=masks,
    )


class StripesProvider:
    """Toy stripes: horizontal vs vertical stripes with a corner-pixel shortcut (1x8x8)."""

    class Options(PluginOptions):
        n_train: int = Field(64, ge=2, description="Training images.")
        n_test: int = Field(64, ge=2, description="Test images.")
        size: int = Field(8, ge=2, description="Side of the square images in pixels.")
        noise: float = Field(0.2, ge=0, description="Standard deviation of the pixel noise.")
        shortcut: float = Field(
            1.0,
            ge=0,
            le=1,
            description="Share of training images whose corner tag equals the label; "
            "test images carry a random tag.",
        )

    has_groups = True
    has_true_masks = True

    def __init__(self, options: StripesProvider.Options) -> None:
        self.options = options

    def load(self, ctx: RunContext) -> SpuriousDataset:
        """Draw both splits from the run's seed (same seed, same images)."""
        o = self.options
        g = ctx.generator("toy-stripes")
        return SpuriousDataset(
            family="toy-stripes",
            train=make_stripes(o.n_train, o.size, o.noise, o.shortcut, g),
            test=make_stripes(o.n_test, o.size, o.noise, 0.5, g),
            class_names=("horizontal", "vertical"),
            class_descriptions=(
                "Stripes run from left to right across the whole image.",
                "Stripes run from top to bottom across the whole image.",
            ),
            group_names=("horizontal/tag-0", "horizontal/tag-1", "vertical/tag-0", "vertical/tag-1"),
        )
