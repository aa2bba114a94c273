"""lvlmva: LVLM-aided visual alignment of task-specific vision models.

The names here are the public surface for plugin authors; everything else may change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .hookspecs import hookimpl, hookspec  # noqa: E402
from .pipeline import Stage, StageCall  # noqa: E402
from .protocols import (  # noqa: E402
    ROLES,
    Aligner,
    Attributor,
    Critic,
    DatasetProvider,
    Evaluator,
    Judge,
    Metric,
    Mitigator,
    ModelFactory,
    PluginOptions,
    RunContext,
    Segmenter,
)
from .records import (  # noqa: E402
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
from .registry import PluginError, PluginRegistry, get_registry  # noqa: E402
from .training import EpochEnd, Trainer  # noqa: E402

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
    "Judge",
    "Metric",
    "Mitigator",
    "ModelFactory",
    "PluginOptions",
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
    "Stage",
    "StageCall",
]
