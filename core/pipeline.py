"""The pipeline behind ``lvlmva compose``.

```
data -> train -> select -> attribute -> segment -> render -> critic -> judge -> masks
     -> align -> bound -> mitigate -> evaluate -> report
```

Each stage writes its artifact into ``run_dir/<stage>/`` together with ``fingerprint.json``: a
hash of the settings sections the stage reads and of the fingerprints of the stages it reads
from. A re-run with the same settings loads finished stages; a changed setting recomputes that
stage and every stage after it. A stage is computed in ``run_dir/.partial-<stage>/`` and renamed
into place only when complete, so a killed run never leaves a half-written artifact that loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .atomic import write_atomic
from .protocols import RunContext
from .records import (
    AlignmentSet,
    Critique,
    CritiqueRequest,
    RenderedSample,
    Segmentation,
    SpuriousDataset,
    Usage,
    Verdicts,
    total_usage,
)
from .registry import PluginRegistry, get_plugin_manager, get_registry
from .settings import Settings, SettingsError

__all__ = ["STAGES", "StageSpec", "Pipeline", "StageFailed", "ConfigurationError", "RunDirectoryBusy", "default_cache_dir"]

#: bump when a stage's artifact format changes, so that old run directories recompute
ARTIFACT_VERSION = 1


class ConfigurationError(SettingsError):
    """Settings that validate one by one but do not fit together (checked before any work)."""


class StageFailed(Exception):
    """A stage raised; the run directory is kept with every stage finished before it."""

    def __init__(self, stage: str, run_dir: Path, cause: BaseException) -> None:
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause} (run directory kept: {run_dir})")
        self.stage = stage
        self.run_dir = run_dir
        self.cause = cause


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: the settings it reads (sections or ``section.key``), the stages whose
    artifacts it reads, and the role whose plugin it needs (skipped when that role is unset)."""

    name: str
    sections: tuple[str, ...]
    after: tuple[str, ...]
    role: str | None = None
    persist: bool = True
    summary: str = ""


STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", ("dataset", "run.seed"), (), "dataset", persist=False, summary="load the data set"),
    StageSpec("train", ("model", "train", "run.seed", "device"), ("data",), "model", summary="train the original model f"),
    StageSpec("select", ("selection",), ("data", "train"), summary="choose alignment samples"),
    StageSpec("attribute", ("attributor",), ("data", "train", "select"), "attributor", summary="explain f on them"),
    StageSpec("segment", ("segmenter",), ("attribute",), "segmenter", summary="split explanations into clusters"),
    StageSpec("render", ("render",), ("data", "select", "segment"), summary="draw cluster images"),
    StageSpec("critic", ("critic",), ("data", "select", "segment", "render"), "critic", summary="discuss clusters"),
    StageSpec("judge", ("judge",), ("critic",), "judge", summary="turn critiques into verdicts"),
    StageSpec("masks", ("masks.source",), ("data", "select", "segment", "judge"), summary="correction masks"),
    StageSpec("align", ("aligner",), ("data", "train", "select", "masks"), "aligner", summary="fine-tune with RRR"),
    StageSpec("bound", ("aligner",), ("data", "train", "select"), "aligner", summary="align with true masks (upper bound)"),
    StageSpec("mitigate", ("mitigator",), ("data", "train"), "mitigator", summary="shortcut-mitigation baseline"),
    StageSpec(
        "evaluate",
        ("evaluator", "attributor"),
        ("data", "train", "select", "segment", "critic", "judge", "masks", "align", "bound", "mitigate"),
        "evaluator",
        summary="metrics into results.json",
    ),
    StageSpec("report", ("report", "attributor"), ("data", "train", "render", "critic", "judge", "align", "bound", "mitigate", "evaluate"), summary="report.md and figures"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}

#: stages that --refresh recomputes instead of reusing (their answers are paid for by call)
REFRESHED_STAGES = ("critic", "judge")

#: model artifacts and the name each gets in results.json
MODEL_STAGES = {"train": "original", "align": "aligned", "bound": "true-mask bound", "mitigate": "mitigated"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lvlmva"


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@dataclass
class StageOutcome:
    name: str
    status: str  # computed | reused | skipped | failed | pending
    fingerprint: str
    seconds: float = 0.0
    reason: str = ""


@dataclass
class Pipeline:
    """Runs the stages of one settings file in one run directory."""

    settings: Settings
    run_dir: Path
    refresh: bool = False
    progress: bool = False
    registry: PluginRegistry = field(default_factory=get_registry)
    echo: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        run = self.settings.run
        self.cache_dir = Path(run.cache_dir) if run.cache_dir else default_cache_dir()
        self._plugins: dict[str, Any] = {}
        self._memory: dict[str, Any] = {}
        self.outcomes: dict[str, StageOutcome] = {}
        from .training import resolve_device

        try:
            self._device = resolve_device(run.device)
        except ValueError as exc:
            raise ConfigurationError(f"run.device = {run.device!r}: {exc}") from None
        self.check()
        self.fingerprints = self._fingerprints()

    # -- planning ---------------------------------------------------------------------------
    def plugin(self, role: str) -> Any:
        """The configured plugin instance of ``role`` (``None`` when the role is unset)."""
        if role not in self._plugins:
            choice = self.settings.plugins.get(role)
            self._plugins[role] = (
                None if choice is None else self.registry.get(role, choice.name)(choice.options)
            )
        return self._plugins[role]

    def plugin_class(self, role: str) -> type | None:
        choice = self.settings.plugins.get(role)
        return None if choice is None else self.registry.get(role, choice.name)

    def _fingerprints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for spec in STAGES:
            blob = json.dumps(
                {
                    "stage": spec.name,
                    "artifact_version": ARTIFACT_VERSION,
                    "lvlmva": __version__,
                    "settings": {key: self._setting(key) for key in spec.sections},
                    "after": {name: out[name] for name in spec.after},
                },
                sort_keys=True,
                default=str,
            )
            out[spec.name] = hashlib.sha256(blob.encode()).hexdigest()[:32]
        return out

    def _setting(self, key: str) -> Any:
        """A settings section (or ``section.key``) as the fingerprint sees it: the device as
        resolved ("auto" and "cpu" are the same on a machine without CUDA), options marked
        ``fingerprint=False`` left out (they change how, not what: batch sizes for inference,
        concurrency, where data is read from), files marked ``fingerprint="content"`` hashed by
        content, and a role's plugin with the distribution and version that supplied it."""
        if key == "device":
            return self.device.type
        section, _, sub = key.partition(".")
        value = self.settings.section(section)
        if value is None:
            return None
        choice = self.settings.plugins.get(section)
        model = type(choice.options) if choice is not None else type(self.settings.core[section])
        out = {}
        for name, item in value.items():
            field = model.model_fields.get(name)
            marker = (field.json_schema_extra or {}).get("fingerprint", True) if field is not None and isinstance(field.json_schema_extra, dict) else True
            if marker is False:
                continue
            if marker == "content" and item:
                item = {"path": item, "sha256": _file_sha256(Path(item))}
            out[name] = item
        if choice is not None:
            entry = self.registry.entry(section, choice.name)
            out["__source__"] = f"{entry.distribution} {entry.version}"
        return out if not sub else out.get(sub)

    def skip_reason(self, spec: StageSpec) -> str | None:
        """Why ``spec`` will not run with these settings (``None`` when it runs). ``check()``
        has made sure that a critic comes with a judge, an attributor and a segmenter, and that
        an aligner has masks to use, so a stage's own role and the critic decide."""
        plugins, masks = self.settings.plugins, self.settings.masks
        if spec.role is not None and spec.role not in plugins:
            return f"no [{spec.role}] plugin configured"
        if spec.name in ("attribute", "segment", "render") and "critic" not in plugins:
            return "no critic configured: nothing to explain to"
        if spec.name == "masks" and masks.source == "verdicts" and "judge" not in plugins:
            return "no critic/judge configured and masks.source = 'verdicts'"
        if spec.name == "bound":
            if not masks.true_mask_bound:
                return "masks.true_mask_bound = false"
            if masks.source == "true":
                return "the aligned model already uses true masks"
            if not self._provider_flag("has_true_masks"):
                return "the data set has no true spurious masks"
        return None

    def _provider_flag(self, flag: str) -> bool:
        cls = self.plugin_class("dataset")
        return bool(getattr(cls, flag, False)) if cls is not None else False

    def check(self) -> None:
        """Capability flags and the combination of roles, before any work starts."""
        problems: list[str] = []
        plugins = self.settings.plugins
        for role in ("dataset", "model"):
            if role not in plugins:
                problems.append(f"[{role}] is required: set plugin = \"...\" ({', '.join(self.registry.names(role))})")
        if "critic" in plugins and "judge" not in plugins:
            problems.append("[critic] is set but [judge] is not: a critic's text needs a judge to become verdicts")
        if "judge" in plugins and "critic" not in plugins:
            problems.append("[judge] is set but [critic] is not")
        if "critic" in plugins and ("attributor" not in plugins or "segmenter" not in plugins):
            problems.append("[critic] needs an [attributor] and a [segmenter] to produce the clusters it discusses")
        critic = self.plugin_class("critic")
        has_true = self._provider_flag("has_true_masks")
        if critic is not None and getattr(critic, "needs_true_masks", False) and not has_true:
            problems.append(f"critic {plugins['critic'].name!r} needs true spurious masks, which dataset {plugins['dataset'].name!r} does not provide")
        if self.settings.masks.source == "true" and "aligner" in plugins and not has_true:
            problems.append("masks.source = 'true' needs a data set with true spurious masks")
        if "aligner" in plugins and self.settings.masks.source == "verdicts" and "judge" not in plugins:
            problems.append("[aligner] needs masks: configure [critic] and [judge], or set masks.source = 'true'")
        for role in ("mitigator", "evaluator"):
            cls = self.plugin_class(role)
            if cls is None:
                continue
            if getattr(cls, "needs_groups", False) and not self._provider_flag("has_groups"):
                problems.append(f"{role} {plugins[role].name!r} needs group labels, which the data set does not provide")
            if getattr(cls, "needs_true_masks", False) and not has_true:
                problems.append(f"{role} {plugins[role].name!r} needs true spurious masks, which the data set does not provide")
        mitigator = self.plugin_class("mitigator")
        val_size = getattr(plugins["dataset"].options, "val_size", None) if "dataset" in plugins else None
        if mitigator is not None and getattr(mitigator, "needs_validation", False) and val_size == 0:
            problems.append(f"mitigator {plugins['mitigator'].name!r} needs a validation split: set dataset.val_size")
        segmenter = plugins.get("segmenter")
        if segmenter is not None:
            j = getattr(segmenter.options, "num_clusters", None)
            if j is not None and j > len(self.settings.render.palette):
                problems.append(f"segmenter.num_clusters = {j} but render.palette names only {len(self.settings.render.palette)} colours")
        if problems:
            raise ConfigurationError("\n".join(problems))

    def plan(self) -> list[StageOutcome]:
        """What a run would do now: reuse, compute or skip, stage by stage. The data set (not
        stored) counts as pending only when a later stage must compute."""
        out = []
        for spec in STAGES:
            reason = self.skip_reason(spec)
            if reason is not None:
                out.append(StageOutcome(spec.name, "skipped", self.fingerprints[spec.name], reason=reason))
            elif spec.persist and self._finished(spec):
                out.append(StageOutcome(spec.name, "reused", self.fingerprints[spec.name]))
            else:
                out.append(StageOutcome(spec.name, "pending", self.fingerprints[spec.name]))
        if not any(o.status == "pending" for o in out if STAGE_BY_NAME[o.name].persist):
            out = [StageOutcome(o.name, "reused", o.fingerprint) if o.status == "pending" else o for o in out]
        return out

    # -- running ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def context(self, stage: str, stage_dir: Path | None = None, attempt: str = "") -> RunContext:
        return RunContext(
            seed=self.settings.run.seed,
            device=self.device,
            run_dir=self.run_dir,
            stage_dir=stage_dir or self.run_dir / stage,
            cache_dir=self.cache_dir,
            refresh=self.refresh,
            progress=self.progress,
            stage=stage,
            attempt=attempt,
        )

    def run(self) -> dict[str, Any]:
        """Run every stage; returns the results (the content of results.json)."""
        hooks = get_plugin_manager().hook
        results: dict[str, Any] = {}
        status = "failed"
        saved = _GlobalTorchState.save()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = _RunLock(self.run_dir)  # two runs in one directory would delete each other's work
        try:
            write_atomic(self.run_dir / "settings.resolved.toml", self.settings.to_toml())
            write_atomic(self.run_dir / "env.json", json.dumps(environment_info(self.device), indent=2, sort_keys=True))
            self._unpublish()
            pending = {o.name for o in self.plan() if o.status == "pending"}
            for spec in STAGES:
                if not spec.persist:
                    # The data set is cheap and deterministic, so it is not stored; it is loaded
                    # in its own slot (own seed, own hooks) when any later stage must compute.
                    if pending - {spec.name}:
                        self.get(spec.name)
                    continue
                self._run_stage(spec, hooks)
            results = self._publish()
            status = "ok"
        finally:
            lock.release()
            saved.restore()
            timings = {o.name: {"status": o.status, "seconds": round(o.seconds, 3)} for o in self.outcomes.values()}
            if self.run_dir.exists():
                write_atomic(self.run_dir / "timings.json", json.dumps(timings, indent=2))
            hooks.lvlmva_run_finished(run_dir=self.run_dir, results=results if status == "ok" else {}, status=status)
        return results

    def _run_stage(self, spec: StageSpec, hooks: Any) -> None:
        fp = self.fingerprints[spec.name]
        reason = self.skip_reason(spec)
        if reason is not None:
            self.outcomes[spec.name] = StageOutcome(spec.name, "skipped", fp, reason=reason)
            self._memory[spec.name] = None
            self.echo(f"  - {spec.name:<9} skipped: {reason}")
            hooks.lvlmva_stage_finished(stage=spec.name, run_dir=self.run_dir, status="skipped", seconds=0.0)
            return
        if spec.persist and self._finished(spec):
            self.outcomes[spec.name] = StageOutcome(spec.name, "reused", fp)
            self.echo(f"  = {spec.name:<9} reused ({fp[:8]})")
            hooks.lvlmva_stage_finished(stage=spec.name, run_dir=self.run_dir, status="reused", seconds=0.0)
            return
        self._compute(spec, hooks)

    def _finished(self, spec: StageSpec) -> bool:
        if self.refresh and spec.name in REFRESHED_STAGES and spec.name not in self.outcomes:
            return False  # --refresh: ask the critic and judge again (not just their caches)
        marker = self.run_dir / spec.name / "fingerprint.json"
        try:
            stored = json.loads(marker.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return stored.get("fingerprint") == self.fingerprints[spec.name] and (self.run_dir / spec.name / "artifact.pt").exists()

    def _compute(self, spec: StageSpec, hooks: Any) -> Any:
        fp = self.fingerprints[spec.name]
        partial = self.run_dir / f".partial-{spec.name}"
        if spec.persist:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        attempt = uuid.uuid4().hex[:12]
        hooks.lvlmva_stage_started(stage=spec.name, run_dir=self.run_dir, fingerprint=fp)
        ctx = self.context(spec.name, partial if spec.persist else self.run_dir, attempt)
        from .training import seed_everything

        seed_everything(_stage_seed(self.settings.run.seed, spec.name), self.settings.run.deterministic)
        started = time.perf_counter()
        try:
            value = getattr(self, f"_stage_{spec.name}")(ctx)
            if spec.persist:
                artifact = partial / "artifact.pt"
                torch.save(self._to_state(spec.name, value), artifact)
                try:  # what cannot be loaded back must not be committed as finished
                    torch.load(artifact, weights_only=True, map_location="cpu")
                except Exception as exc:  # torch raises UnpicklingError or others; re-raised below
                    raise TypeError(f"the {spec.name} artifact holds values that cannot be stored safely: {exc}") from exc
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # recorded with the stage's name, then re-raised as StageFailed
            seconds = time.perf_counter() - started
            self.outcomes[spec.name] = StageOutcome(spec.name, "failed", fp, seconds, reason=str(exc))
            self.echo(f"  ! {spec.name:<9} failed after {seconds:.1f}s: {type(exc).__name__}: {exc}")
            hooks.lvlmva_stage_finished(stage=spec.name, run_dir=self.run_dir, status="failed", seconds=seconds)
            raise StageFailed(spec.name, self.run_dir, exc) from exc
        seconds = time.perf_counter() - started
        if spec.persist:
            marker = {"stage": spec.name, "fingerprint": fp, "seconds": seconds, "lvlmva": __version__}
            (partial / "fingerprint.json").write_text(json.dumps(marker, indent=2))
            final = self.run_dir / spec.name
            old = self.run_dir / f".old-{spec.name}"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
            self._forget_logs(spec.name, keep_attempt=attempt)
        if spec.name in ("evaluate", "report"):
            value = self._to_state(spec.name, value)  # the same plain data a reuse would load
        self._memory[spec.name] = value
        self.outcomes[spec.name] = StageOutcome(spec.name, "computed", fp, seconds)
        self.echo(f"  + {spec.name:<9} computed in {seconds:.1f}s")
        hooks.lvlmva_stage_finished(stage=spec.name, run_dir=self.run_dir, status="computed", seconds=seconds)
        return value

    def _forget_logs(self, stage: str, keep_attempt: str) -> None:
        """Once a new artifact of ``stage`` is committed, drop the JSON lines that earlier or
        interrupted computations of it logged (paid LVLM answers stay in the response cache)."""
        for name in ("metrics.jsonl", "transcripts.jsonl"):
            path = self.run_dir / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if record.get("run_stage") == stage and record.get("run_attempt") != keep_attempt:
                        continue
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                kept.append(line)
            write_atomic(path, "".join(k + "\n" for k in kept))

    def get(self, name: str) -> Any:
        """A stage's value: from memory, from its artifact, or computed now (the data set)."""
        if name in self._memory:
            return self._memory[name]
        spec = STAGE_BY_NAME[name]
        if self.skip_reason(spec) is not None:
            return None
        if not spec.persist:
            # Computed in the middle of another stage: keep that stage's random state intact.
            with _isolated_rng():
                return self._compute(spec, get_plugin_manager().hook)
        if not self._finished(spec):
            raise RuntimeError(f"stage {name!r} has no finished artifact (run the stages in order)")
        state = torch.load(self.run_dir / name / "artifact.pt", weights_only=True, map_location="cpu")
        value = self._from_state(name, state)
        self._memory[name] = value
        return value

    # -- artifact conversions ----------------------------------------------------------------
    def _to_state(self, name: str, value: Any) -> Any:
        if name in MODEL_STAGES:
            return {"state_dict": {k: v.detach().cpu() for k, v in value.state_dict().items()}}
        if name in ("select", "segment"):
            return value.to_state()
        if name == "render":
            return [
                {"sample_id": r.sample_id, "original": r.original, "clusters": r.clusters, "overlay": r.overlay, "colors": list(r.colors), "files": list(r.files)}
                for r in value
            ]
        if name in ("critic", "judge"):
            return [item.to_state() for item in value]
        if name in ("evaluate", "report"):
            # Plugins' metrics may hold numpy scalars or paths: store them as the JSON they become.
            return json.loads(json.dumps(value, default=_json_default))
        return value  # attribute, masks: tensors and plain data already

    def _from_state(self, name: str, state: Any) -> Any:
        if name in MODEL_STAGES:
            with _isolated_rng():  # building the module draws initial weights we then overwrite
                model = self.new_model()
            model.load_state_dict(state["state_dict"])
            return model.eval()
        if name in ("select", "segment"):
            return {"select": AlignmentSet, "segment": Segmentation}[name].from_state(state)
        if name == "render":
            return [RenderedSample(**{**r, "colors": tuple(r["colors"]), "files": tuple(r["files"])}) for r in state]
        if name == "critic":
            return [Critique.from_state(s) for s in state]
        if name == "judge":
            return [Verdicts.from_state(s) for s in state]
        return state

    def new_model(self) -> nn.Module:
        """A fresh, untrained model from the [model] factory for the data's input shape."""
        data: SpuriousDataset = self.get("data")
        return self.plugin("model").build(data.input_shape, data.num_classes)

    # -- stages -------------------------------------------------------------------------------
    def _stage_data(self, ctx: RunContext) -> SpuriousDataset:
        data = self.plugin("dataset").load(ctx)
        if not isinstance(data, SpuriousDataset):
            raise TypeError(f"dataset plugin returned {type(data).__name__}, not SpuriousDataset")
        return data

    def _stage_train(self, ctx: RunContext) -> nn.Module:
        from .training import train_classifier

        data: SpuriousDataset = self.get("data")
        model = self.new_model()
        return train_classifier(model, data.train, self.settings.train, ctx, tag="train")

    def _stage_select(self, ctx: RunContext) -> AlignmentSet:
        from .selection import select_alignment_set

        data: SpuriousDataset = self.get("data")
        return select_alignment_set(self.get("train"), data.train, self.settings.selection, ctx)

    def _stage_attribute(self, ctx: RunContext) -> dict[str, torch.Tensor]:
        data: SpuriousDataset = self.get("data")
        chosen: AlignmentSet = self.get("select")
        idx = chosen.indices
        attributions = self.plugin("attributor").attribute(
            self.get("train"), data.train.images[idx], data.train.labels[idx], data.train.images, ctx
        )
        _check_shape("attributor", attributions, tuple(data.train.images[idx].shape))
        return {"attributions": attributions.detach().float().cpu()}

    def _stage_segment(self, ctx: RunContext) -> Segmentation:
        attributions = self.get("attribute")["attributions"]
        seg = self.plugin("segmenter").segment(attributions, ctx)
        if not isinstance(seg, Segmentation):
            raise TypeError(f"segmenter returned {type(seg).__name__}, not Segmentation")
        return seg

    def _stage_render(self, ctx: RunContext) -> list[RenderedSample]:
        from .rendering import render_samples

        data: SpuriousDataset = self.get("data")
        chosen: AlignmentSet = self.get("select")
        seg: Segmentation = self.get("segment")
        return render_samples(
            data.train.images[chosen.indices],
            seg.labels,
            [int(i) for i in chosen.indices],
            self.settings.render,
            seg.num_clusters,
            ctx.stage_dir,
            "render",
        )

    def _stage_critic(self, ctx: RunContext) -> list[Critique]:
        data: SpuriousDataset = self.get("data")
        chosen: AlignmentSet = self.get("select")
        seg: Segmentation = self.get("segment")
        rendered: list[RenderedSample] = self.get("render")
        critic = self.plugin("critic")
        with_truth = getattr(critic, "needs_true_masks", False)
        requests = []
        for row, (index, sample) in enumerate(zip(chosen.indices.tolist(), rendered, strict=True)):
            label = int(data.train.labels[index])
            requests.append(
                CritiqueRequest(
                    sample_id=int(index),
                    label=data.class_names[label],
                    class_description=data.class_descriptions[label],
                    family=data.family,
                    rendered=sample,
                    cluster_map=seg.labels[row],
                    true_mask=data.train.spurious_masks[index] if with_truth else None,
                )
            )
        critiques = critic.critique(requests, ctx)
        _check_answers("critic", requests, critiques)
        return critiques

    def _stage_judge(self, ctx: RunContext) -> list[Verdicts]:
        critiques: list[Critique] = self.get("critic")
        verdicts = self.plugin("judge").judge(critiques, ctx)
        _check_answers("judge", critiques, verdicts)
        return verdicts

    def _stage_masks(self, ctx: RunContext) -> dict[str, Any]:
        data: SpuriousDataset = self.get("data")
        chosen: AlignmentSet = self.get("select")
        if self.settings.masks.source == "true":
            masks = data.train.spurious_masks[chosen.indices]
            return {"masks": masks, "ok": torch.ones(len(chosen), dtype=torch.bool), "failures": []}
        from .masks import masks_from_verdicts

        seg: Segmentation = self.get("segment")
        verdicts: list[Verdicts] = self.get("judge")
        masks, ok = masks_from_verdicts(seg.labels, verdicts)
        failures = [
            {"sample_id": v.sample_id, "stage": "judge", "reason": v.failure} for v in verdicts if not v.ok
        ]
        return {"masks": masks, "ok": ok, "failures": failures}

    def _aligned_subset(self) -> tuple[AlignmentSet, torch.Tensor]:
        chosen: AlignmentSet = self.get("select")
        m = self.get("masks")
        keep = m["ok"]
        subset = AlignmentSet(chosen.indices[keep], chosen.scores[keep], chosen.strategy)
        return subset, m["masks"][keep]

    def _stage_align(self, ctx: RunContext) -> nn.Module:
        subset, masks = self._aligned_subset()
        if len(subset) == 0:
            raise RuntimeError("no alignment sample has valid verdicts; see transcripts.jsonl and the judge's failures")
        return self.plugin("aligner").align(self.get("train"), self.get("data"), subset, masks, ctx)

    def _stage_bound(self, ctx: RunContext) -> nn.Module:
        data: SpuriousDataset = self.get("data")
        chosen: AlignmentSet = self.get("select")
        masks = data.train.spurious_masks[chosen.indices]
        return self.plugin("aligner").align(self.get("train"), data, chosen, masks, ctx)

    def _stage_mitigate(self, ctx: RunContext) -> nn.Module:
        # A copy: the original model is evaluated as "original" in the same run.
        original = copy.deepcopy(self.get("train"))
        return self.plugin("mitigator").mitigate(original, self.new_model, self.get("data"), ctx)

    def attribute_fn(self, ctx: RunContext) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None:
        attributor = self.plugin("attributor")
        if attributor is None:
            return None
        data: SpuriousDataset = self.get("data")
        return lambda model, x, y: attributor.attribute(model, x, y, data.train.images, ctx)

    def compute_seconds(self) -> dict[str, float]:
        """Seconds each finished stage took when it was computed (also for reused stages)."""
        out: dict[str, float] = {}
        for spec in STAGES:
            marker = self.run_dir / spec.name / "fingerprint.json"
            if spec.name in self.outcomes and self.outcomes[spec.name].status == "computed":
                out[spec.name] = self.outcomes[spec.name].seconds
            elif marker.exists():
                out[spec.name] = float(json.loads(marker.read_text()).get("seconds", 0.0))
        return out

    def models(self) -> dict[str, nn.Module]:
        out = {}
        for stage, label in MODEL_STAGES.items():
            model = self.get(stage)
            if model is not None:
                out[label] = model
        return out

    def _stage_evaluate(self, ctx: RunContext) -> dict[str, Any]:
        data: SpuriousDataset = self.get("data")
        evaluator = self.plugin("evaluator")
        attribute = self.attribute_fn(ctx)
        results: dict[str, Any] = {"models": {}}
        for label, model in self.models().items():
            results["models"][label] = evaluator.evaluate(model, data, ctx, attribute=attribute)
        verdicts: list[Verdicts] | None = self.get("judge")
        critiques: list[Critique] | None = self.get("critic")
        if verdicts is not None and data.train.spurious_masks is not None:
            from .metrics import verdict_metrics

            chosen: AlignmentSet = self.get("select")
            seg: Segmentation = self.get("segment")
            results["verdicts"] = verdict_metrics(seg.labels, verdicts, data.train.spurious_masks[chosen.indices])
        masks = self.get("masks")
        if masks is not None:
            # One failure per sample: a critique that failed is reported with the critic's reason,
            # not the judge's "no critique to judge".
            by_sample = {f["sample_id"]: f for f in masks["failures"]}
            for c in critiques or []:
                if c.failure is not None:
                    by_sample[c.sample_id] = {"sample_id": c.sample_id, "stage": "critic", "reason": c.failure}
            failures = sorted(by_sample.values(), key=lambda f: f["sample_id"])
            results["alignment"] = {
                "samples": int(masks["ok"].numel()),
                "aligned_on": int(masks["ok"].sum()),
                "failed": int((~masks["ok"]).sum()),
                "failures": failures,
                "mask_source": self.settings.masks.source,
                "mean_mask_pixels": float(masks["masks"][masks["ok"]].float().sum(dim=(1, 2)).mean()) if bool(masks["ok"].any()) else 0.0,
            }
        usage: Usage = total_usage([*(critiques or []), *(verdicts or [])])
        results["usage"] = usage.to_state()
        results["input_scale"] = data.input_scale
        return results

    def _stage_report(self, ctx: RunContext) -> dict[str, Any]:
        if not self.settings.report.enabled:
            return {"written": False}
        from .report import write_report

        data: SpuriousDataset = self.get("data")
        n = min(self.settings.report.test_images, len(data.test))
        gen = ctx.generator("report-test-images")
        pick = torch.randperm(len(data.test), generator=gen)[:n]
        images, labels = data.test.images[pick], data.test.labels[pick]
        attributions: dict[str, torch.Tensor] = {}
        attribute = self.attribute_fn(ctx)
        if attribute is not None and n > 0:
            for label, model in self.models().items():
                attributions[label] = attribute(model, images, labels).detach().cpu()
        path = write_report(
            self.run_dir,
            {**(self.get("evaluate") or {}), "timings": self.compute_seconds()},
            options=self.settings.report,
            rendered=self.get("render") or [],
            verdicts=self.get("judge") or [],
            critiques=self.get("critic") or [],
            test_images=images,
            test_labels=labels,
            attributions=attributions,
            class_names=data.class_names,
            out_dir=ctx.stage_dir,
            title=self.settings.run_name,
        )
        return {"written": path.exists()}

    # -- published files ----------------------------------------------------------------------
    def _unpublish(self) -> None:
        """Remove results.json, report.md and figures/ from an earlier run: they are published
        again from this run's artifacts at its end, so a failed run never shows stale ones."""
        for name in ("results.json", "report.md"):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "figures", ignore_errors=True)

    def _publish(self) -> dict[str, Any]:
        """Write results.json (the evaluation plus the settings that made it) and copy the
        report out of its stage folder; returns the results."""
        evaluation = self.get("evaluate")
        if evaluation is None:
            return {}
        results = {**evaluation, "settings": self.settings.as_dict()}
        write_atomic(self.run_dir / "results.json", json.dumps(results, indent=2, sort_keys=True, default=_json_default))
        report = self.run_dir / "report"
        if (self.get("report") or {}).get("written"):
            if (report / "figures").exists():
                shutil.copytree(report / "figures", self.run_dir / "figures", dirs_exist_ok=True)
            write_atomic(self.run_dir / "report.md", (report / "report.md").read_bytes())
        return results


class RunDirectoryBusy(ConfigurationError):
    """Another process is running in the same run directory."""


class _RunLock:
    """An exclusive lock on ``run_dir/.lock`` for the length of a run (released by the OS when
    the process dies, so a killed run never leaves the directory locked)."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self._fh = open(run_dir / ".lock", "w")  # noqa: SIM115 (held open for the whole run)
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise RunDirectoryBusy(f"{run_dir} is in use by another lvlmva run; wait for it or use --out") from None

    def release(self) -> None:
        import fcntl

        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


class _GlobalTorchState:
    """torch's process-wide determinism switches, restored after a run so that a run inside a
    larger program (a notebook, a test session) leaves them as it found them."""

    def __init__(self, enabled: bool, warn_only: bool, cudnn_benchmark: bool) -> None:
        self.enabled, self.warn_only, self.cudnn_benchmark = enabled, warn_only, cudnn_benchmark

    @classmethod
    def save(cls) -> _GlobalTorchState:
        return cls(
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
        )

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.enabled, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


class _isolated_rng:
    """Save and restore torch's, numpy's and random's global generators."""

    def __enter__(self) -> None:
        import random

        import numpy as np

        self._states = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc: object) -> None:
        import random

        import numpy as np

        torch.set_rng_state(self._states[0])
        np.random.set_state(self._states[1])
        random.setstate(self._states[2])


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None


def _stage_seed(seed: int, stage: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _check_shape(role: str, tensor: Any, want: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{role} returned {got}, expected a tensor of shape {want}")


def _check_answers(role: str, asked: list[Any], answers: list[Any]) -> None:
    if len(answers) != len(asked):
        raise ValueError(f"{role} returned {len(answers)} answers for {len(asked)} samples")
    for a, b in zip(asked, answers, strict=True):
        if a.sample_id != b.sample_id:
            raise ValueError(f"{role} answered sample {b.sample_id} where {a.sample_id} was asked: answers must keep the order")


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions, git revision and device, for env.json."""
    from importlib import metadata

    versions = {}
    for dist in ("lvlmva", "torch", "torchvision", "captum", "numpy", "scikit-learn", "scipy", "openai", "transformers", "pydantic", "pydantic-settings", "pluggy", "medmnist"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "cuda": torch.version.cuda,
        "git_revision": None,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        )
        if rev.returncode == 0:
            info["git_revision"] = rev.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git: the revision stays None
    return info
