"""A small convolutional network for quick runs on 32-128 px images (the synthetic proxies).

Stride-2 convolutions instead of pooling and one ReLU module per use, so that DeepLiftShap's
rules are exact on it (Captum's max-pool rule is not); global average pooling gives the
penultimate features that DFR refits the head on.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from lvlmva.protocols import PluginOptions

__all__ = ["SmallCnn", "SmallCnnFactory"]


class SmallCnn(nn.Module):
    """``Conv3x3(stride 2) -> ReLU`` per entry of ``channels``, global average pool, linear head.

    ``features(x)`` is ``[B, channels[-1]]``; ``forward(x) = head(features(x))``."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = int(input_shape[0])
        for out in channels:
            layers += [nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            width = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCnnFactory:
    """Small CNN: stride-2 3x3 convolutions with ReLU, global average pool, linear head."""

    class Options(PluginOptions):
        channels: list[int] = Field(
            default_factory=lambda: [16, 32, 64, 64],
            min_length=1,
            description="Output channels of the convolutions, input side first; each halves the image side.",
        )

        @field_validator("channels")
        @classmethod
        def _positive(cls, value: list[int]) -> list[int]:
            if any(c < 1 for c in value):
                raise ValueError(f"every channel count must be >= 1, got {value}")
            return value

    def __init__(self, options: SmallCnnFactory.Options) -> None:
        self.options = options

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """An untrained :class:`SmallCnn` (weights from torch's global generator: seed it first)."""
        if num_classes < 1:
            raise ValueError(f"cnn: num_classes must be >= 1, got {num_classes}")
        return SmallCnn(input_shape, num_classes, list(self.options.channels))
