"""Residual networks (torchvision resnet18/34/50) for any class count and 1 or 3 input channels.

Nothing is downloaded: ``weights`` names a local file holding an ImageNet ``state_dict`` (for
example one saved once with ``torch.save(torchvision.models.resnet50(weights="DEFAULT")
.state_dict(), path)`` on a machine with internet), loaded with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torchvision.models import resnet as tv

from lvlmva.protocols import PluginOptions

__all__ = ["ResNetClassifier", "ResNetFactory", "ResNetOptions", "load_imagenet_weights", "read_state_dict"]

_ARCHITECTURES = {"resnet18": tv.resnet18, "resnet34": tv.resnet34, "resnet50": tv.resnet50}


class ResNetOptions(PluginOptions):
    """Options of ``resnet``."""

    depth: Literal["resnet18", "resnet34", "resnet50"] = Field(
        "resnet18", description="The torchvision architecture (the paper's models are resnet50)."
    )
    weights: Path | None = Field(
        None,
        description="A local file with an ImageNet state_dict of the same architecture (torch.save "
        "of torchvision's model.state_dict()); loaded with weights_only=True, the fc layer left out "
        "(the head is new for the run's classes). With 1 input channel the first convolution's RGB "
        "filters are summed. None: random initialisation. Nothing is ever downloaded.",
        json_schema_extra={"fingerprint": "content"},
    )
    stem: Literal["imagenet", "small"] = Field(
        "imagenet",
        description='"imagenet": 7x7 stride-2 convolution and 3x3 max pool (the standard network, '
        'for 224 x 224 inputs); "small": one 3x3 stride-1 convolution and no pool (the CIFAR '
        "variant, for 32-64 px inputs, where the standard stem leaves a 2 x 2 map at layer 4). "
        "With weights, the small stem's first convolution is new.",
    )


class ResNetClassifier(nn.Module):
    """A torchvision ResNet split into ``features`` (stem, the four stages, global average
    pool, flattened: ``[B, D]``, D = 512 or 2048) and ``head`` (``nn.Linear(D, K)``), with
    ``forward(x) = head(features(x))``. The residual blocks are torchvision's own, so the
    DeepLiftShap attributor's preparation (one ReLU module per use) applies unchanged."""

    def __init__(self, backbone: tv.ResNet, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Linear(width, num_classes)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a local weights file (``weights_only=True``); ``ValueError`` naming the
    file when it is missing or not a state_dict."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"model.weights: no such file: {path}") from None
    except Exception as exc:  # pickle errors, a file that is not a torch file
        raise ValueError(f"model.weights: cannot read {path} as a state_dict: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights: {path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def load_imagenet_weights(model: ResNetClassifier, state: dict[str, torch.Tensor], *, first_conv_is_new: bool, source: Path | str = "weights") -> None:
    """Load an ImageNet ``state_dict`` (torchvision key names) into ``model``'s backbone.

    ``fc.*`` is left out (the head is new). With one input channel the first convolution's
    RGB filters are summed over the channel axis; with ``first_conv_is_new`` it is not loaded.
    Raises ``ValueError`` naming ``source`` for anything else that does not fit."""
    path = source
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    target = model.backbone.state_dict()
    conv = state.get("conv1.weight")
    if first_conv_is_new:
        state.pop("conv1.weight", None)
    elif conv is not None and conv.shape[1] == 3 and target["conv1.weight"].shape[1] == 1:
        state["conv1.weight"] = conv.sum(dim=1, keepdim=True)
    missing = sorted(set(target) - set(state) - ({"conv1.weight"} if first_conv_is_new else set()))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shapes differ (first: {k} {tuple(state[k].shape)} vs {tuple(target[k].shape)})")
        raise ValueError(f"model.weights: {path} does not fit this architecture: " + "; ".join(parts))
    model.backbone.load_state_dict(state, strict=not first_conv_is_new)


class ResNetFactory:
    """torchvision ResNet-18/34/50 with a new linear head, 1 or 3 input channels, optional local
    ImageNet weights; exposes penultimate features and the head (for DFR)."""

    Options = ResNetOptions

    def __init__(self, options: ResNetOptions) -> None:
        self.options = options
        self._weights: dict[str, torch.Tensor] | None = None  # read once: JTT builds k + 1 models

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """An untrained (or ImageNet-initialised) :class:`ResNetClassifier`; random weights come
        from torch's global generator: seed it first."""
        channels = int(input_shape[0])
        if channels not in (1, 3):
            raise ValueError(f"resnet: inputs must have 1 or 3 channels, got {channels}")
        if num_classes < 1:
            raise ValueError(f"resnet: num_classes must be >= 1, got {num_classes}")
        backbone = _ARCHITECTURES[self.options.depth](weights=None)
        small = self.options.stem == "small"
        if small:
            backbone.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        elif channels != 3:
            backbone.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        model = ResNetClassifier(backbone, num_classes, input_shape)
        if self.options.weights is not None:
            if self._weights is None:
                self._weights = read_state_dict(self.options.weights)
            load_imagenet_weights(model, self._weights, first_conv_is_new=small, source=self.options.weights)
        return model
