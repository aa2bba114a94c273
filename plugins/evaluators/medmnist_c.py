"""Corruption robustness with MedMNIST-C (the ``medmnistc`` package): how much accuracy each
model loses under realistic image corruptions, five severities each (seed A.5).

``medmnistc`` is imported only when this evaluator runs (it needs ImageMagick's Wand:
``apt-get install libmagickwand-6.q16-6`` and ``pip install medmnistc``). Its corruptions draw
from numpy's and Python's global random state; each application here is seeded from the run
seed, the corruption, the severity and the image index, so the numbers repeat. A corruption that
cannot run (a known breakage with numpy 2, an image too small for it) is reported with its
reason in ``not_computed`` (shown in report.md) and the others go on; it never counts as a result.

Metrics, all on the same seeded subset of the test split:

- ``clean_accuracy``; ``mean_drop``: clean minus corrupted accuracy, averaged over every
  corruption and severity that ran (lower is better);
- ``drop_vs_original``: the original model's ``mean_drop`` minus this model's (the paper's
  dAcc_f - dAcc_aligned; higher is better, 0 for the original);
- ``drop.<corruption>`` per corruption (mean over severities) and the tables
  ``drop_by_severity`` and ``drop_vs_original_by_corruption``.

Figure: ``drop_by_severity.png``, each model's accuracy drop per severity (mean over the
corruptions that ran), shown in report.md under the evaluator's tables.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from lvlmva.metrics import accuracy
from lvlmva.protocols import Figure, Metric, PluginOptions, RunContext
from lvlmva.records import SpuriousDataset
from lvlmva.training import predict_logits

__all__ = ["MedmnistCEvaluator", "MedmnistCOptions", "resolve_corruptions", "DEFAULT_FAMILY"]

#: the MedMNIST-C family whose corruption list a data set family gets by default
DEFAULT_FAMILY = {"skin": "dermamnist", "knee": "chestmnist"}
SEVERITIES = 5
ORIGINAL = "original"
#: how to get medmnistc and the ImageMagick library its Wand dependency loads (as the guide says)
INSTALL = 'apt-get install libmagickwand-6.q16-6 && pip install -e ".[medmnistc]" (or pip install medmnistc)'


def _registry() -> Mapping[str, Mapping[str, Any]]:
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
    except ImportError as exc:
        raise RuntimeError(
            f"the medmnist-c evaluator needs the medmnistc package and ImageMagick's Wand: {INSTALL} "
            f"(import failed: {exc})"
        ) from None
    return CORRUPTIONS_DS


def resolve_corruptions(family: str, names: list[str] | None, registry: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{label: corruption object}``: the family's whole list when ``names`` is None; else each
    name as ``family/name``, a name of the family's list, a name found in another family, or a
    medmnistc class name (``GammaCorrection``: every instance of that class, from any family,
    labelled ``family/name``). Raises ``ValueError`` naming what is unknown."""
    if family not in registry:
        raise ValueError(f"medmnist-c: unknown family {family!r}; known: {', '.join(registry)}")
    if names is None:
        return dict(registry[family])
    out: dict[str, Any] = {}
    classes: dict[str, list[tuple[str, str]]] = {}
    for fam, entries in registry.items():
        for name, obj in entries.items():
            classes.setdefault(type(obj).__name__, []).append((fam, name))
    for wanted in names:
        if "/" in wanted:
            fam, name = wanted.split("/", 1)
            if fam not in registry or name not in registry[fam]:
                raise ValueError(f"medmnist-c: no corruption {wanted!r}")
            out[wanted] = registry[fam][name]
        elif wanted in registry[family]:
            out[wanted] = registry[family][wanted]
        elif wanted in classes:
            # every name of that class once: the chosen family's own where it has it (labelled
            # by name alone), else the first family that defines it (labelled family/name)
            for fam, name in sorted(classes[wanted], key=lambda fn: fn[0] != family):
                if not any(label == name or label.endswith("/" + name) for label in out):
                    out[name if fam == family else f"{fam}/{name}"] = registry[fam][name]
        else:
            owner = next((fam for fam, entries in registry.items() if wanted in entries), None)
            if owner is None:
                raise ValueError(
                    f"medmnist-c: unknown corruption {wanted!r}: neither a name of a family's list nor "
                    f"a medmnistc class ({', '.join(sorted(classes))})"
                )
            out[f"{owner}/{wanted}"] = registry[owner][wanted]
    return out


class MedmnistCOptions(PluginOptions):
    """Options of ``medmnist-c``."""

    family: str | None = Field(
        None,
        description="The MedMNIST-C family whose corruption list is used (dermamnist, chestmnist, ...); "
        "None: by the data set's family (skin -> dermamnist, knee -> chestmnist).",
    )
    corruptions: list[str] | None = Field(
        None,
        description="Corruptions to apply: names of the family's list, 'family/name', or medmnistc class "
        "names across families (GammaCorrection, DefocusBlur, Contrast: the paper's picks for skin). "
        "None: the family's whole list.",
    )
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1, description="Severities 1 (mild) .. 5 (strongest).")
    samples: int = Field(500, ge=1, description="Test images corrupted (a seeded subset; all when the split is smaller).")
    batch_size: int = Field(256, ge=1, description="Images per forward pass.", json_schema_extra={"fingerprint": False})

    @field_validator("severities")
    @classmethod
    def _range(cls, value: list[int]) -> list[int]:
        if any(s < 1 or s > SEVERITIES for s in value) or len(set(value)) != len(value):
            raise ValueError(f"severities must be distinct values in 1..{SEVERITIES}, got {value}")
        return sorted(value)


def _seed_for(seed: int, label: str, severity: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{severity}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _to_uint8(data: SpuriousDataset, images: torch.Tensor) -> torch.Tensor:
    """The stored pixels as uint8 ``[B, C, H, W]`` (what the corruptions expect)."""
    if images.dtype == torch.uint8:
        return images
    if data.input_scale == "0-255":
        return images.round().clamp(0, 255).to(torch.uint8)
    if data.input_scale == "0-1":
        return (images * 255).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(
        f"medmnist-c needs uint8 images or float images on the 0-255 or 0-1 scale; this data set's "
        f"inputs are {data.input_scale!r}"
    )


def _from_uint8(data: SpuriousDataset, pixels: torch.Tensor) -> torch.Tensor:
    """Model inputs from corrupted uint8 pixels, as the split turns its own pixels into inputs."""
    split = data.test
    if split.normalization is not None:
        return split.normalization.apply(pixels)
    return pixels.to(torch.float32) if data.input_scale == "0-255" else pixels.to(torch.float32) / 255


class MedmnistCEvaluator:
    """Accuracy drop under MedMNIST-C corruptions, per corruption and severity, for every model,
    and each model's drop against the original's."""

    Options = MedmnistCOptions
    needs_groups: ClassVar[bool] = False
    needs_true_masks: ClassVar[bool] = False
    split: ClassVar[str] = "test"
    #: imported before any work (``lvlmva validate`` too): module -> how to install it
    optional_imports: ClassVar[dict[str, str]] = {"medmnistc.corruptions.registry": INSTALL}
    metrics: tuple[Metric, ...] = ()

    def __init__(self, options: MedmnistCOptions) -> None:
        self.options = options
        self._corruptions: dict[str, Any] | None = None
        self._family: str | None = options.family
        self.metrics = self._declare(options.corruptions or [])

    def _declare(self, labels: list[str]) -> tuple[Metric, ...]:
        base = (
            Metric("clean_accuracy", "clean accuracy", True, ".4f", summary=False, description="Accuracy on the corrupted subset before corruption."),
            Metric("mean_drop", "corruption drop", False, ".4f", description="Clean minus corrupted accuracy, mean over corruptions and severities."),
            Metric("drop_vs_original", "drop vs original", True, "+.4f", summary=False, description="The original's mean drop minus this model's (higher: more robust than the original)."),
            Metric("drop_by_severity", "accuracy drop by corruption and severity", False, ".4f", summary=False),
            Metric("drop_vs_original_by_corruption", "drop difference to the original by corruption", True, "+.4f", summary=False),
        )
        per = tuple(Metric(f"drop.{label}", f"drop {label}", False, ".4f", summary=False) for label in labels)
        return base + per

    def check_data(self, data: SpuriousDataset) -> list[str]:
        """Refuses before anything trains: the package missing, an unknown corruption, or data
        these corruptions cannot take."""
        try:
            self._prepare(data)
            _to_uint8(data, data.test.images[:1])
        except (RuntimeError, ValueError) as exc:
            return [str(exc)]
        return []

    def _prepare(self, data: SpuriousDataset) -> dict[str, Any]:
        if self._corruptions is None:
            registry = _registry()
            family = self.options.family or DEFAULT_FAMILY.get(data.family)
            if family is None:
                raise ValueError(f"medmnist-c: no default corruption family for data set family {data.family!r}; set family")
            self._family = family
            self._corruptions = resolve_corruptions(family, self.options.corruptions, registry)
            self.metrics = self._declare(list(self._corruptions))
        return self._corruptions

    def _subset(self, data: SpuriousDataset, ctx: RunContext) -> torch.Tensor:
        n = len(data.test)
        k = min(self.options.samples, n)
        return torch.randperm(n, generator=ctx.generator("medmnist-c-subset"))[:k].sort().values

    def _corrupt(self, obj: Any, label: str, severity: int, pixels: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:

        out = torch.empty_like(pixels)
        grey = pixels.shape[1] == 1
        # medmnistc draws from the global generators: seeded per image here, and put back after
        # so that nothing else in the run sees a changed random state
        saved = np.random.get_state(), random.getstate()
        try:
            self._corrupt_rows(obj, label, severity, pixels, index, seed, out, grey)
        finally:
            np.random.set_state(saved[0])
            random.setstate(saved[1])
        return out

    def _corrupt_rows(self, obj: Any, label: str, severity: int, pixels: torch.Tensor, index: torch.Tensor, seed: int, out: torch.Tensor, grey: bool) -> None:
        from PIL import Image

        for row in range(pixels.shape[0]):
            s = _seed_for(seed, label, severity, int(index[row]))
            np.random.seed(s)
            random.seed(s)
            if hasattr(obj, "rng") or type(obj).__name__ == "ImpulseNoise":
                obj.rng = np.random.default_rng(s)  # medmnistc's impulse noise reads this attribute
            arr = pixels[row].permute(1, 2, 0).numpy()
            image = Image.fromarray(arr[:, :, 0] if grey else arr).convert("RGB")
            result = np.asarray(obj.apply(image, severity=severity - 1))
            if result.shape[:2] != arr.shape[:2]:
                raise ValueError(f"returned an image of {result.shape[:2]}, not {arr.shape[:2]}")
            if result.ndim == 2:
                result = result[:, :, None]
            result = result.astype(np.uint8)
            if grey:
                result = result[:, :, :3].mean(axis=2, keepdims=True).round().astype(np.uint8) if result.shape[2] >= 3 else result[:, :, :1]
            out[row] = torch.from_numpy(np.ascontiguousarray(result[:, :, : pixels.shape[1]])).permute(2, 0, 1)

    def _corrupted_sets(self, data: SpuriousDataset, ctx: RunContext) -> tuple[torch.Tensor, dict[tuple[str, int], torch.Tensor], dict[str, str]]:
        """The subset, its corrupted inputs per (corruption, severity) and the failures; made once
        per run (every model sees the same corrupted images)."""
        key = (id(data), ctx.seed)
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        corruptions = self._prepare(data)
        index = self._subset(data, ctx)
        pixels = _to_uint8(data, data.test.images[index])
        sets: dict[tuple[str, int], torch.Tensor] = {}
        failed: dict[str, str] = {}
        severities = self.options.severities
        with ctx.progress_bar("medmnist-c corruptions", len(corruptions) * len(severities)) as bar:
            for label, obj in corruptions.items():
                try:
                    for severity in severities:
                        sets[(label, severity)] = _from_uint8(data, self._corrupt(obj, label, severity, pixels, index, ctx.seed))
                        bar.advance()
                except Exception as exc:  # a corruption that cannot run: reported, the others go on
                    failed[label] = f"{type(exc).__name__}: {exc}"
                    for severity in severities:
                        bar.advance(int(sets.pop((label, severity), None) is None))
                    ctx.log_jsonl("metrics.jsonl", {"stage": "medmnist-c", "corruption": label, "failed": failed[label]})
        result = (index, sets, failed)
        self._cache = (key, result)
        return result

    def evaluate(
        self,
        model: nn.Module,
        data: SpuriousDataset,
        ctx: RunContext,
        attribute: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        index, sets, failed = self._corrupted_sets(data, ctx)
        labels = data.test.labels[index]

        def score(inputs: torch.Tensor) -> float:
            logits = predict_logits(model, inputs, ctx.device, batch_size=self.options.batch_size)
            return accuracy(logits, labels)

        clean = score(data.test.inputs[index])
        by_severity = {f"{label}/s{severity}": clean - score(inputs) for (label, severity), inputs in sets.items()}
        per_corruption = {
            label: float(np.mean([by_severity[f"{label}/s{s}"] for s in self.options.severities]))
            for label in dict.fromkeys(label for label, _ in sets)
        }
        out: dict[str, Any] = {
            "clean_accuracy": clean,
            "mean_drop": float(np.mean(list(by_severity.values()))) if by_severity else None,
            "drop_vs_original": None,
            "drop_by_severity": by_severity,
            "drop_vs_original_by_corruption": {},
            "samples": int(index.numel()),
            "family": self._family,
            "severities": list(self.options.severities),
            "not_computed": {f"drop.{label}": reason for label, reason in failed.items()},
        }
        for label in self._corruptions or {}:
            out[f"drop.{label}"] = per_corruption.get(label)
        return out

    def finalize(self, models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each model's drops against the original's (the original's own difference is 0)."""
        base = models.get(ORIGINAL)
        if base is None or base.get("mean_drop") is None:
            return models
        for values in models.values():
            if values.get("mean_drop") is not None:
                values["drop_vs_original"] = base["mean_drop"] - values["mean_drop"]
            values["drop_vs_original_by_corruption"] = {
                label: base[f"drop.{label}"] - values[f"drop.{label}"]
                for label in (self._corruptions or {})
                if base.get(f"drop.{label}") is not None and values.get(f"drop.{label}") is not None
            }
        return models

    def figures(self, models: dict[str, dict[str, Any]], labels: dict[str, str], ctx: RunContext) -> list[Figure]:
        """``drop_by_severity.png``: per model, the accuracy drop at each severity, mean over
        the corruptions that ran (none when no corruption ran)."""
        severities = list(self.options.severities)
        lines = {}
        for model, values in models.items():
            table = values.get("drop_by_severity") or {}
            means = []
            for s in severities:
                drops = [v for k, v in table.items() if k.endswith(f"/s{s}") and v is not None]
                means.append(float(np.mean(drops)) if drops else float("nan"))
            if any(not np.isnan(m) for m in means):
                lines[model] = means
        if not lines:
            return []
        from matplotlib.figure import Figure as Canvas

        from lvlmva.report import save_figure

        fig = Canvas(figsize=(5.5, 3.4), layout="constrained")
        ax = fig.subplots()
        for k, (model, means) in enumerate(lines.items()):
            ax.plot(severities, means, marker="o", color=f"C{k % 10}", label=labels.get(model, model))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(severities)
        ax.set_xlabel("severity")
        ax.set_ylabel("accuracy drop (clean − corrupted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, ctx.stage_dir / "drop_by_severity.png")
        ran = len({k.rsplit("/s", 1)[0] for v in models.values() for k in (v.get("drop_by_severity") or {})})
        return [
            Figure(
                "drop_by_severity.png",
                f"Accuracy drop per severity under MedMNIST-C corruptions, mean over the {ran} corruptions "
                f"that ran, on {next(iter(models.values())).get('samples', '?')} test images (lower: more robust).",
            )
        ]
