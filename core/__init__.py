"""lvlmva: LVLM-aided visual alignment of task-specific vision models.

The names here are the public surface for plugin authors; everything else may change.
"""

from __future__ import annotations

from .hookspecs import hookimpl, hookspec
from .pipeline import Stage, StageCall
from .progress import ProgressBar
from .protocols import (
    ROLES,
    Aligner,
    Attributor,
    Critic,
    DatasetProvider,
    Evaluator,
    Figure,
    Judge,
    Metric,
    Mitigator,
    ModelFactory,
    PluginOptions,
    RunContext,
    Segmenter,
)
from .records import (
    AlignmentSet,
    Critique,
    CritiqueRequest,
    RenderedSample,
    Segmentation,
    Split,
    SpuriousDataset,
    Usage,
    Verdicts,
)
from .registry import PluginError, PluginRegistry, get_registry
from .training import AlignmentOptions, AlignmentTrainer, EpochEnd, LossAligner, Trainer
from .version import __version__

__all__ = [
    "__version__",
    "hookimpl",
    "hookspec",
    "ROLES",
    "Aligner",
    "Attributor",
    "Critic",
    "DatasetProvider",
    "Evaluator",
    "Figure",
    "Judge",
    "Metric",
    "Mitigator",
    "ModelFactory",
    "PluginOptions",
    "ProgressBar",
    "RunContext",
    "Segmenter",
    "AlignmentSet",
    "Critique",
    "CritiqueRequest",
    "RenderedSample",
    "Segmentation",
    "Split",
    "SpuriousDataset",
    "Usage",
    "Verdicts",
    "PluginError",
    "PluginRegistry",
    "get_registry",
    "Trainer",
    "EpochEnd",
    "AlignmentTrainer",
    "AlignmentOptions",
    "LossAligner",
    "Stage",
    "StageCall",
]
