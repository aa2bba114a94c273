"""A multilayer perceptron for small images (the DecoyMNIST model of Ross et al. 2017)."""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from lvlmva.protocols import PluginOptions

__all__ = ["Mlp", "MlpFactory"]


class Mlp(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden layer, then a linear head.

    ``features(x)`` is the flattened input passed through the hidden layers (``[B, D]``, D = the
    last hidden width, or C*H*W without hidden layers); ``forward(x) = head(features(x))``. Every
    ReLU is its own module, so DeepLift-style attribution sees each non-linearity once.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: list[int]) -> None:
        super().__init__()
        width = int(input_shape[0] * input_shape[1] * input_shape[2])
        layers: list[nn.Module] = [nn.Flatten()]
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MlpFactory:
    """Multilayer perceptron: flatten, hidden Linear+ReLU layers, linear head."""

    class Options(PluginOptions):
        hidden: list[int] = Field(
            default_factory=lambda: [256],
            description="Widths of the hidden layers, input side first; [] gives a linear model.",
        )

        @field_validator("hidden")
        @classmethod
        def _positive(cls, value: list[int]) -> list[int]:
            if any(size < 1 for size in value):
                raise ValueError(f"every hidden width must be >= 1, got {value}")
            return value

    def __init__(self, options: MlpFactory.Options) -> None:
        self.options = options

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """An untrained :class:`Mlp` (weights from torch's global generator: seed it first)."""
        if num_classes < 1:
            raise ValueError(f"MlpFactory.build: num_classes must be >= 1, got {num_classes}")
        return Mlp(input_shape, num_classes, list(self.options.hidden))
