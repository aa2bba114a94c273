"""The built-in stages of ``lvlmva compose`` and how a run's list of stages is built.

```
data -> train -> select -> attribute -> segment -> render -> critic -> judge -> overrides
     -> masks -> align -> reference -> mitigate.<name>... -> evaluate.<name>... -> results -> report
```

Each stage is a :class:`~lvlmva.pipeline.stage.Stage` whose run function reads only what it
declares. Named instances (``[mitigators.jtt]``, ``[evaluators.groups]``) become one stage each;
stages added by plugins are placed where they asked to be.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..protocols import PluginOptions
from ..records import (
    AlignmentSet,
    Critique,
    CritiqueRequest,
    Segmentation,
    SpuriousDataset,
    TrainedModel,
    Verdicts,
)
from ..registry import PluginRegistry
from ..settings import PluginChoice, Settings
from . import codecs
from .codecs import ModelArtifact
from .stage import Stage, StageCall, StageIncomplete, StageView

__all__ = ["build_stages", "branches", "branch_inputs", "Branch", "aligned_label", "critic_label", "critic_samples", "MODEL_ORDER"]

#: the run's own models, in the order tables list them (mitigators follow in settings order)
MODEL_ORDER = ("original", "aligned", "true_mask")


# -- helpers ------------------------------------------------------------------------------------


def critic_label(choice: PluginChoice | None) -> str:
    """How tables name a critic: its plugin and, for LVLM plugins, the model
    (``"oracle critic"``, ``"openai critic gpt-4o"``)."""
    if choice is None:
        return "no critic"
    model = getattr(choice.options, "model", None)
    return f"{choice.name} critic" + (f" {model}" if model else "")


def _check_shape(role: str, tensor: Any, want: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{role} returned {got}, expected a tensor of shape {want}")


def _check_answers(role: str, asked: Sequence[Any], answers: Sequence[Any]) -> None:
    if len(answers) != len(asked):
        raise ValueError(f"{role} returned {len(answers)} answers for {len(asked)} samples")
    for a, b in zip(asked, answers, strict=True):
        if a.sample_id != b.sample_id:
            raise ValueError(f"{role} answered sample {b.sample_id} where {a.sample_id} was asked: answers must keep the order")


def _unfinished(role: str, answers: Sequence[Critique | Verdicts]) -> None:
    """Raise :class:`StageIncomplete` when some answers could not be obtained: the stage is then
    not committed, the answers that came are in the response cache, and a re-run asks again for
    exactly the failed samples. The message counts the reasons, most common first."""
    failed = [a.failure for a in answers if a.retryable and a.failure]
    if not failed:
        return
    counts = Counter(failed).most_common()
    reason, n = counts[0]
    text = f"{reason}: {n} of {len(answers)} {role} requests failed"
    if len(counts) > 1:
        others = "; ".join(f"{r} ({k})" for r, k in counts[1:4])
        more = f" and {len(counts) - 4} other reasons" if len(counts) > 4 else ""
        text += f"; also {others}{more}"
    answered = len(answers) - len(failed)
    if answered:
        text += f" ({answered} answered and cached: a new run asks only for the {len(failed)} that failed)"
    raise StageIncomplete(text)


def _announce(plugin: Any, asked: Sequence[Any], call: StageCall) -> None:
    """Print, before anything is sent, how many requests an LVLM plugin will send and why
    (its ``plan``: missing, failed in transport, invalid so far)."""
    plan = getattr(plugin, "plan", None)
    if callable(plan):
        print(f"  > {plan(asked, call.ctx)}", file=sys.stderr, flush=True)


def _trainer(call: StageCall, data: SpuriousDataset) -> Any:
    from ..training import Trainer

    factory = call.plugin("model")
    return Trainer(lambda: factory.build(data.input_shape, data.num_classes), call.option("train"), call.ctx)


def reference_pool(attributor: Any, data: SpuriousDataset) -> Any:
    """The training images an attributor may draw a background from: all of them for one that
    ``needs_background``, none (an empty ``[0, C, H, W]``) for one that does not, so that such
    an attributor cannot come to depend on a pool it declared it does not use."""
    pool = data.train.inputs
    return pool if bool(attributor.needs_background) else pool[:0]


def _attribute_fn(call: StageCall, data: SpuriousDataset) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    attributor = call.plugin("attributor")
    if attributor is None:
        return None
    pool = reference_pool(attributor, data)
    return lambda model, x, y: attributor.attribute(model, x, y, pool, call.ctx)


#: the splits a training role (an aligner, a mitigator) is given: never the test split
TRAINING_SPLITS = ("train", "val")


def _for_training(data: SpuriousDataset, who: str, plugin: Any = None) -> SpuriousDataset:
    """The data set as a training role sees it: train and val; reading test raises, unless the
    plugin's options declare ``selection = "oracle-test"`` (its choice is then labelled an upper
    bound wherever it appears, :mod:`lvlmva.model_selection`)."""
    if getattr(getattr(plugin, "options", None), "selection", None) == "oracle-test":
        return data
    return data.for_reader(TRAINING_SPLITS, f"{who}: a training role reads the training and validation splits only")


def _no_critic(critics: Sequence[str]) -> Callable[[StageView], str | None]:
    def skip(view: StageView) -> str | None:
        return None if any(view.configured(s) for s in critics) else "no critic configured: nothing to explain to"

    return skip


# -- data and the original model ----------------------------------------------------------------


def _data(call: StageCall) -> SpuriousDataset:
    data = call.plugin("dataset").load(call.ctx)
    if not isinstance(data, SpuriousDataset):
        raise TypeError(f"dataset plugin returned {type(data).__name__}, not SpuriousDataset")
    return data


def _train(call: StageCall) -> ModelArtifact:
    data: SpuriousDataset = call["data"]
    model = _trainer(call, data).fit(data.train, tag="train")
    return ModelArtifact(model, data.input_shape, data.num_classes)


# -- detection ------------------------------------------------------------------------------------


def _select(call: StageCall) -> AlignmentSet:
    from ..selection import select_alignment_set

    data: SpuriousDataset = call["data"]
    return select_alignment_set(call["train"], data.train, call.option("selection"), call.ctx)


def _select_skip(critics: Sequence[str], aligners: Sequence[str]) -> Callable[[StageView], str | None]:
    def skip(view: StageView) -> str | None:
        if any(view.configured(s) for s in (*critics, *aligners)):
            return None
        return "no critic and no aligner: nothing uses alignment samples"

    return skip


def _selection_fits(view: StageView, data: SpuriousDataset) -> list[str]:
    n = view.option("selection").n
    if n > len(data.train):
        return [f"selection.n = {n}, but the training split has only {len(data.train)} samples"]
    return []


def _attribute(call: StageCall) -> dict[str, torch.Tensor]:
    data: SpuriousDataset = call["data"]
    idx = call["select"].indices
    images = data.train.inputs[idx]
    attributor = call.plugin("attributor")
    attributions = attributor.attribute(call["train"], images, data.train.labels[idx], reference_pool(attributor, data), call.ctx)
    _check_shape("attributor", attributions, tuple(images.shape))
    return {"attributions": attributions.detach().float().cpu()}


def _segment(call: StageCall) -> Segmentation:
    seg = call.plugin("segmenter").segment(call["attribute"]["attributions"], call.ctx)
    if not isinstance(seg, Segmentation):
        raise TypeError(f"segmenter returned {type(seg).__name__}, not Segmentation")
    return seg


def _render(call: StageCall) -> list:
    from ..rendering import render_samples

    data: SpuriousDataset = call["data"]
    chosen: AlignmentSet = call["select"]
    seg: Segmentation = call["segment"]
    return render_samples(
        data.train.display(chosen.indices),
        seg.labels,
        [int(i) for i in chosen.indices],
        call.option("render"),
        seg.num_clusters,
        call.ctx.stage_dir,
        call.stage.name,
    )


def _critic(call: StageCall) -> list[Critique]:
    data: SpuriousDataset = call["data"]
    chosen: AlignmentSet = call["select"]
    seg: Segmentation = call["segment"]
    critic = call.plugin("critic")
    with_truth = bool(getattr(critic, "needs_true_masks", False))
    draws = critic_samples(critic)
    requests = []
    for row, (index, sample) in enumerate(zip(chosen.indices.tolist(), call["render"], strict=True)):
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
                effect=seg.effect,
            )
        )
    if draws > 1:
        # every sample's k answers, sample by sample: one call, so that a concurrent critic
        # has all of them in flight together
        requests = [dataclasses.replace(r, draw=d) for r in requests for d in range(draws)]
    _announce(critic, requests, call)
    critiques = critic.critique(requests, call.ctx)
    _check_answers("critic", requests, critiques)
    if draws > 1:
        wrong = [(c.sample_id, c.draw, r.draw) for r, c in zip(requests, critiques, strict=True) if c.draw != r.draw]
        if wrong:
            raise ValueError(f"critic answered draw {wrong[0][1]} of sample {wrong[0][0]} where draw {wrong[0][2]} was asked")
    _unfinished("critic", critiques)
    return critiques


def critic_samples(critic: Any) -> int:
    """How many answers the critic gives per sample (its ``samples`` option; 1 without one)."""
    return int(getattr(getattr(critic, "options", None), "samples", 1) or 1)


def _judge(call: StageCall) -> list[Verdicts]:
    from ..verdicts import combine_draws

    critiques: list[Critique] = call["critic"]
    _announce(call.plugin("judge"), critiques, call)
    verdicts = call.plugin("judge").judge(critiques, call.ctx)
    _check_answers("judge", critiques, verdicts)
    _unfinished("judge", verdicts)
    # one Verdicts per sample: the majority of its answers' verdicts (the critic's answers come
    # sample by sample, the draws of one sample together)
    grouped: dict[int, list[Verdicts]] = {}
    for v in verdicts:
        grouped.setdefault(v.sample_id, []).append(v)
    return [combine_draws(group) for group in grouped.values()]


def _overrides(call: StageCall) -> list[Verdicts]:
    from ..overrides import OverridesError, apply_overrides, cluster_hash, read_overrides
    from .errors import StageInputError

    path = call.ctx.run_dir / call.stage.watch[0]  # this branch's file
    seg: Segmentation = call["segment"]
    clusters = {int(i): cluster_hash(seg.labels[row]) for row, i in enumerate(call["select"].indices.tolist())}
    try:
        return apply_overrides(call["judge"], read_overrides(path), path, clusters)
    except OverridesError as exc:
        raise StageInputError(str(exc)) from None


def _masks(call: StageCall) -> dict[str, Any]:
    data: SpuriousDataset = call["data"]
    chosen: AlignmentSet = call["select"]
    if call.option("masks.source") == "true":
        masks = data.train.spurious_masks[chosen.indices]
        return {"masks": masks, "relevant": ~masks, "ok": torch.ones(len(chosen), dtype=torch.bool), "failures": []}
    from ..masks import verdict_masks

    verdicts: list[Verdicts] = call["verdicts"]
    masks, relevant, ok = verdict_masks(call["segment"].labels, verdicts)
    failures = [{"sample_id": v.sample_id, "stage": "judge", "reason": v.failure} for v in verdicts if not v.ok]
    return {"masks": masks, "relevant": relevant, "ok": ok, "failures": failures}


def _masks_skip(judge: str) -> Callable[[StageView], str | None]:
    def skip(view: StageView) -> str | None:
        if view.option("masks.source") == "verdicts" and not view.configured(judge):
            return "no critic/judge configured and masks.source = 'verdicts'"
        return None

    return skip


# -- models made from the original ------------------------------------------------------------------


def _artifact(role: str, result: Any, data: SpuriousDataset) -> ModelArtifact:
    """An aligner's or mitigator's result (a module, or a :class:`TrainedModel` with the details
    of how it was chosen) as the artifact the model codec stores."""
    model, details = (result.model, dict(result.details)) if isinstance(result, TrainedModel) else (result, {})
    if not isinstance(model, nn.Module):
        raise TypeError(f"{role} returned {type(model).__name__}, not an nn.Module or TrainedModel")
    return ModelArtifact(model, data.input_shape, data.num_classes, details)


def _align(call: StageCall) -> ModelArtifact:
    data: SpuriousDataset = call["data"]
    chosen: AlignmentSet = call["select"]
    m = call["masks"]
    keep = m["ok"]
    if not bool(keep.any()):
        raise RuntimeError("no alignment sample has valid verdicts; see transcripts.jsonl and the judge's failures")
    subset = AlignmentSet(chosen.indices[keep], chosen.scores[keep], chosen.strategy, relevant=m["relevant"][keep])
    aligner = call.plugin("aligner")
    seen = _for_training(data, "the aligner", aligner)
    return _artifact("aligner", aligner.align(call["train"], seen, subset, m["masks"][keep], call.ctx), data)


def _reference(call: StageCall) -> ModelArtifact:
    data: SpuriousDataset = call["data"]
    chosen: AlignmentSet = call["select"]
    masks = data.train.spurious_masks[chosen.indices]
    aligner = call.plugin("aligner")
    seen = _for_training(data, "the aligner", aligner)
    chosen = dataclasses.replace(chosen, relevant=~masks)  # off the true masks: relevant
    return _artifact("aligner", aligner.align(call["train"], seen, chosen, masks, call.ctx), data)


def _needs_train_masks(what: str) -> Callable[[StageView, SpuriousDataset], list[str]]:
    """A data check: ``what`` reads true spurious masks of the training split. A provider's
    ``has_true_masks`` says it *can* give them; the loaded data set says whether it did (a knee
    folder whose marker CSV has no boxes has none), so this is checked on the data, before
    anything trains, instead of failing later inside the stage."""

    def check(view: StageView, data: SpuriousDataset) -> list[str]:
        if data.train.spurious_masks is None:
            return [f"{what} needs true spurious masks of the training split, which the loaded data set does not have"]
        return []

    return check


def _masks_check(view: StageView, data: SpuriousDataset) -> list[str]:
    if view.option("masks.source") != "true":
        return []
    return _needs_train_masks('masks.source = "true"')(view, data)


def _critic_check(view: StageView, data: SpuriousDataset) -> list[str]:
    if not view.flag("critic", "needs_true_masks"):
        return []
    return _needs_train_masks(f"the critic{'' if view.stage.slot('critic') == 'critic' else ' ' + repr(view.stage.slot('critic'))} (it reads the true masks)")(view, data)


def _reference_skip(view: StageView) -> str | None:  # noqa: D103
    if not view.option("masks.true_mask_reference"):
        return "masks.true_mask_reference = false"
    if view.option("masks.source") == "true":
        return "the aligned model already uses the true masks"
    if not view.flag("dataset", "has_true_masks"):
        return "the data set has no true spurious masks"
    return None


def _mitigate_stage(instance: str, choice: PluginChoice) -> Stage:
    slot = choice.slot

    def run(call: StageCall) -> ModelArtifact:
        data: SpuriousDataset = call["data"]
        # A copy: the original model is evaluated as "original" in the same run.
        original = copy.deepcopy(call["train"])
        mitigator = call.plugin(slot)
        seen = _for_training(data, f"mitigator {instance!r}", mitigator)
        result = mitigator.mitigate(original, _trainer(call, data), seen, call.ctx)
        return _artifact(f"mitigator {choice.name!r}", result, data)

    def check(view: StageView, data: SpuriousDataset) -> list[str]:
        problems = []
        who = f"mitigator {instance!r} ({choice.name})"
        if view.flag(slot, "needs_groups") and data.train.groups is None:
            problems.append(f"{who} trains with group labels, which the loaded data set does not have")
        if view.flag(slot, "needs_validation") and data.val is None:
            problems.append(f"{who} needs a validation split, which the loaded data set does not have")
        return problems

    label = instance if instance == choice.name.replace("-", "_") else f"{instance} ({choice.name})"
    return Stage(
        f"mitigate.{instance}",
        run,
        inputs=("data", "train"),
        settings=("train", "run.seed", "device"),
        plugins=(slot, "model"),
        codec=codecs.MODEL,
        model=instance,
        label=label,
        summary=f"baseline {choice.name}",
        check=check,
        validate=_flags_validate(slot, repr(choice.name)),
    )


# -- evaluation and outputs ----------------------------------------------------------------------------


def _evaluate_stage(instance: str, choice: PluginChoice, model_stages: Sequence[Stage]) -> Stage:
    slot = choice.slot

    def run(call: StageCall) -> dict[str, Any]:
        from ..report import evaluator_figures
        from ..results import check_evaluation

        data: SpuriousDataset = call["data"]
        evaluator = call.plugin(slot)
        attribute = _attribute_fn(call, data)
        split = str(getattr(evaluator, "split", "test"))
        reads = (split, *getattr(evaluator, "also_reads", ()))
        seen = data.for_reader(reads, f"evaluator {instance!r}, which declares split = {split!r}" + (f" and also_reads = {tuple(reads[1:])}" if reads[1:] else ""))
        models = {}
        for key, model in call.models().items():
            models[key] = evaluator.evaluate(model, seen, call.ctx, attribute=attribute)
        finalize = getattr(evaluator, "finalize", None)
        if callable(finalize):  # values across models (a difference to the original)
            models = finalize(models)
        # read after evaluating: an evaluator may declare metrics that depend on its options
        # and the data set (one per corruption it could resolve)
        declared = tuple(evaluator.metrics)
        for key, values in models.items():
            check_evaluation(choice.name, key, values, declared)
        out = {"plugin": choice.name, "split": split, "metrics": [m.to_dict() for m in declared], "models": models}
        labels = {info.model: info.label for _, info in call.model_inputs() if info.model in models}
        figures = evaluator_figures(evaluator, models, labels, call.ctx, f"evaluator {instance!r} ({choice.name})")
        return {**out, "figures": figures} if figures else out

    def check(view: StageView, data: SpuriousDataset) -> list[str]:
        who = f"evaluator {instance!r} ({choice.name})"
        problems = []
        if view.flag(slot, "needs_groups") and data.test.groups is None:
            problems.append(f"{who} needs group labels on the test split, which the loaded data set does not have")
        if view.flag(slot, "needs_true_masks") and data.test.spurious_masks is None:
            problems.append(f"{who} needs true spurious masks on the test split, which the loaded data set does not have")
        return problems

    return Stage(
        f"evaluate.{instance}",
        run,
        inputs=("data", *(f"{s.provides}?" for s in model_stages)),
        plugins=(slot, "attributor?"),
        codec=codecs.JSON,
        summary=f"{choice.name} metrics of every model",
        check=check,
        validate=_flags_validate(slot, repr(choice.name)),
    )


def branch_inputs(settings: Settings) -> list[dict[str, Any]]:
    """What the results and report stages read of each branch: its key, the slots of its
    critic and judge, how tables name them, and the names its artifacts are provided under."""
    out = []
    segmenters = settings.choices("segmenter")
    for branch in branches(settings) or [Branch(PluginChoice("segmenter", "", _NO_OPTIONS), PluginChoice("critic", "", _NO_OPTIONS), None)]:
        true_masks = settings.masks.source == "true"
        out.append({
            "key": branch.key,
            "critic_slot": branch.critic.slot,
            "critic": critic_label(branch.critic) if branch.critic.name else "no critic",
            "judge": branch.judge.name if branch.judge is not None else None,
            "segmenter": {
                "instance": branch.segmenter.instance, "plugin": branch.segmenter.name,
                "label": _segmenter_label(branch.segmenter, segmenters) if branch.segmenter.instance else branch.segmenter.name,
                "num_clusters": getattr(branch.segmenter.options, "num_clusters", None),
            },
            "names": {
                "segment": _suffixed("segment", branch.segmenter.instance), "render": _suffixed("render", branch.segmenter.instance),
                "critic": branch.name("critic"), "judge": branch.name("judge"), "verdicts": branch.name("verdicts"),
                "masks": "masks" if true_masks else branch.name("masks"),
            },
        })  # fmt: skip
    return out


def _results_stage(settings: Settings, model_stages: Sequence[Stage], evaluate_stages: Sequence[Stage]) -> Stage:
    parts = branch_inputs(settings)

    def run(call: StageCall) -> dict[str, Any]:
        from ..results import assemble_results

        return assemble_results(call, parts, model_stages, evaluate_stages)

    names = list(dict.fromkeys(n for b in parts for n in b["names"].values() if n not in ("render",) and not n.startswith("render")))
    return Stage(
        "results",
        run,
        inputs=(
            "data", "select?", *(f"{n}?" for n in names),
            *(f"{s.provides}?" for s in model_stages),
            *(f"{s.provides}?" for s in evaluate_stages),
        ),  # fmt: skip
        settings=("masks.source",),
        plugins=tuple(dict.fromkeys(f"{b['critic_slot']}?" for b in parts)),
        codec=codecs.JSON,
        summary="results.json",
    )


def _report_stage(settings: Settings, before: Sequence[Stage]) -> Stage:
    parts = branch_inputs(settings)

    def run(call: StageCall) -> dict[str, Any]:
        from ..report import report_stage

        return report_stage(call, [s.provides for s in before if s.persist], parts)

    return Stage(
        "report",
        run,
        # Every stage before it: the report shows their timings and reads what it shows lazily.
        inputs=("results", "data", *(f"{s.provides}?" for s in before if s.persist and s.provides != "results")),
        settings=("report",),
        plugins=("attributor?",),
        codec=codecs.JSON,
        summary="report.md and figures",
    )


# -- settings that cannot work: each stage says what it needs ------------------------------------------


def _needs_role(slot: str) -> Callable[[StageView], list[str]]:
    """A role every run needs (a data set, a model)."""

    def validate(view: StageView) -> list[str]:
        return [] if view.configured(slot) else [f"[{slot}] is required: set plugin = \"...\" (`lvlmva plugins --role {slot}` lists them)"]

    return validate


def _critic_validate(critic: str, judge: str, attributor: str = "attributor", segmenter: str = "segmenter") -> Callable[[StageView], list[str]]:
    """A critic needs a judge to turn its text into verdicts, and an attributor and a segmenter
    to make the clusters it discusses; a critic that reads true masks needs a data set with
    them."""

    def validate(view: StageView) -> list[str]:
        if not view.configured(critic):
            return []
        problems = []
        if not view.configured(judge):
            problems.append(f"[{critic}] is set but [{judge}] is not: a critic's text needs a judge to become verdicts")
        if not view.configured(attributor) or not view.configured(segmenter):
            problems.append(f"[{critic}] needs an [{attributor}] and a [{segmenter}] to produce the clusters it discusses")
        if view.flag(critic, "needs_true_masks") and not view.flag("dataset", "has_true_masks"):
            problems.append(
                f"[{critic}] needs true spurious masks, which the data set plugin {view.plugin_name('dataset')!r} does not provide: "
                'use an LVLM critic (plugin = "openai" or "transformers"), which needs no masks'
            )
        return problems

    return validate


def _judge_validate(judge: str, critic: str) -> Callable[[StageView], list[str]]:
    def validate(view: StageView) -> list[str]:
        return [f"[{judge}] is set but [{critic}] is not"] if view.configured(judge) and not view.configured(critic) else []

    return validate


def _judge_requests(critic: str) -> Callable[[StageView, int], int]:
    """The judge reads each of its critic's answers: ``critic.samples`` per alignment sample."""

    def count(view: StageView, n: int) -> int:
        return n * int(getattr(view.plugin_options(critic), "samples", 1) or 1)

    return count


def _render_validate(segmenter: str) -> Callable[[StageView], list[str]]:
    def validate(view: StageView) -> list[str]:
        j = getattr(view.plugin_options(segmenter), "num_clusters", None)
        palette = view.option("render.palette")
        if j is not None and j > len(palette):
            return [f"{segmenter}.num_clusters = {j} but render.palette names only {len(palette)} colours"]
        return []

    return validate


def _masks_validate(aligner: str, judge: str) -> Callable[[StageView], list[str]]:
    def validate(view: StageView) -> list[str]:
        if not view.configured(aligner):
            return []
        if view.option("masks.source") == "true":
            return [] if view.flag("dataset", "has_true_masks") else ["masks.source = 'true' needs a data set with true spurious masks"]
        if not view.configured(judge):
            return [f"[{aligner}] needs masks: configure [critic] and [judge], or set masks.source = 'true'"]
        return []

    return validate


def _flags_validate(slot: str, who: str) -> Callable[[StageView], list[str]]:
    """A mitigator's or evaluator's capability flags against the data set plugin's."""

    def validate(view: StageView) -> list[str]:
        problems = []
        if view.flag(slot, "needs_groups") and not view.flag("dataset", "has_groups"):
            problems.append(f"[{slot}] {who} needs group labels, which the data set does not provide")
        if view.flag(slot, "needs_true_masks") and not view.flag("dataset", "has_true_masks"):
            problems.append(f"[{slot}] {who} needs true spurious masks, which the data set does not provide")
        return problems

    return validate


# -- the list -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Branch:
    """One segmenter x critic/judge pair: the verdicts and masks it makes. ``key`` names it in
    stage names, model keys and review folders (``"j5.gpt4o"``); it is empty for a run with one
    segmenter and one critic given by their singular sections, whose stages keep their plain
    names (``critic``, ``judge``)."""

    segmenter: PluginChoice
    critic: PluginChoice
    judge: PluginChoice | None

    @property
    def key(self) -> str:
        return ".".join(p for p in (self.segmenter.instance, self.critic.instance) if p)

    def name(self, base: str) -> str:
        return f"{base}.{self.key}" if self.key else base


def _suffixed(base: str, *parts: str | None) -> str:
    rest = ".".join(p for p in parts if p)
    return f"{base}.{rest}" if rest else base


def branches(settings: Settings) -> list[Branch]:
    """Every segmenter x critic pair of a run, segmenters first, in the order of the file."""
    judges = {c.slot: c for c in settings.choices("judge")}
    return [
        Branch(seg, critic, judges.get(critic.judge) if critic.judge else None)
        for seg in settings.choices("segmenter")
        for critic in settings.choices("critic")
    ]


def _segmenter_label(seg: PluginChoice, all_segmenters: Sequence[PluginChoice]) -> str:
    """How a label names a segmenter among several: ``J=5`` when the cluster counts tell them
    apart, else the instance name."""
    counts = [getattr(c.options, "num_clusters", None) for c in all_segmenters]
    j = getattr(seg.options, "num_clusters", None)
    if j is not None and counts.count(j) == 1:
        return f"J={j}"
    return f"{seg.instance} segmenter"


def aligned_label(settings: Settings, aligner: PluginChoice, branch: Branch | None) -> str:
    """The label of an aligned model: ``aligned (oracle critic)`` in a run with one of each;
    with several, the branch it comes from (``aligned: rrr, gpt4o critic, J=7``)."""
    segmenters = settings.choices("segmenter")
    if branch is None:  # masks.source = "true"
        return "aligned (true masks)" if aligner.instance is None else f"aligned: {aligner.instance}, true masks"
    if aligner.instance is None and branch.key == "":
        return f"aligned ({critic_label(branch.critic)})"
    parts = [aligner.instance or aligner.name]
    parts.append(f"{branch.critic.instance} critic" if branch.critic.instance else critic_label(branch.critic))
    if branch.segmenter.instance:
        parts.append(_segmenter_label(branch.segmenter, segmenters))
    return "aligned: " + ", ".join(parts)


def aligned_models(settings: Settings) -> list[tuple[str, PluginChoice, Branch | None]]:
    """Every aligned model a run makes, in order: its key (``aligned``, then the instance names
    of its aligner, segmenter and critic where those are named: ``aligned.rrr.j5.gpt4o``), its
    aligner and its branch (``None`` when it aligns on the true masks or the run has no critic)."""
    run_branches = branches(settings)
    targets: list[Branch | None] = [None] if settings.masks.source == "true" or not run_branches else list(run_branches)
    out = []
    for aligner in settings.choices("aligner") or [PluginChoice("aligner", "", _NO_OPTIONS)]:
        for branch in targets:
            out.append((_suffixed("aligned", aligner.instance, branch.key if branch is not None else None), aligner, branch))
    return out


def _branch_stages(settings: Settings, branch: Branch) -> list[Stage]:
    """critic, judge, overrides and masks of one branch; inputs and plugins aliased so that the
    run functions read ``segment``, ``critic``, ``judge`` whatever the branch."""
    from ..overrides import overrides_file

    seg_key = branch.segmenter.instance
    segment, render = _suffixed("segment", seg_key), _suffixed("render", seg_key)
    critic, judge = branch.name("critic"), branch.name("judge")
    verdicts = branch.name("verdicts")
    critic_slot = branch.critic.slot
    judge_slot = branch.judge.slot if branch.judge is not None else "judge"
    stages = [
        Stage(
            critic, _critic, inputs=("data", "select", f"segment={segment}", f"render={render}"),
            plugins=(f"critic={critic_slot}",), codec=codecs.CRITIQUES, refreshable=True, summary="discuss clusters",
            check=_critic_check, validate=_critic_validate(critic_slot, judge_slot, segmenter=branch.segmenter.slot),
        ),
        Stage(
            judge, _judge, inputs=(f"critic={critic}",), plugins=(f"judge={judge_slot}",), codec=codecs.VERDICTS,
            refreshable=True, summary="turn critiques into verdicts",
            validate=_judge_validate(judge_slot, critic_slot), preflight_samples=_judge_requests(critic_slot),
        ),
        Stage(
            # a person's corrections (review/overrides.json, written by `lvlmva review`) on the
            # judge's verdicts: what masks read; without the file, the judge's verdicts as they are
            branch.name("overrides"), _overrides, inputs=("select", f"segment={segment}", f"judge={judge}"),
            provides=verdicts, codec=codecs.VERDICTS, watch=(overrides_file(branch.key).as_posix(),),
            summary="apply a person's review of the verdicts",
        ),
    ]  # fmt: skip
    if settings.masks.source == "verdicts":  # with true masks, one masks stage serves every aligner
        stages.append(
            Stage(
                branch.name("masks"), _masks, inputs=("data", "select", f"segment={segment}", f"verdicts={verdicts}"),
                settings=("masks.source",), codec=codecs.TENSORS, skip=_masks_skip(judge_slot), summary="correction masks",
            )
        )
    return stages


def _core_stages(settings: Settings) -> list[Stage]:
    critics = [c.slot for c in settings.choices("critic")] or ["critic"]
    aligners = settings.choices("aligner")
    aligner_slots = [a.slot for a in aligners] or ["aligner"]
    stages = [
        Stage(
            "data", _data, settings=("run.seed",), plugins=("dataset",), persist=False, summary="load the data set",
            validate=_needs_role("dataset"),
        ),
        Stage(
            "train", _train, inputs=("data",), settings=("train", "run.seed", "device"), plugins=("model",),
            codec=codecs.MODEL, model="original", label="original", summary="train the original model f",
            validate=_needs_role("model"),
        ),
        Stage(
            "select", _select, inputs=("data", "train"), settings=("selection",), codec=codecs.ALIGNMENT_SET,
            skip=_select_skip(critics, aligner_slots), check=_selection_fits, summary="choose alignment samples",
        ),
        Stage(
            "attribute", _attribute, inputs=("data", "train", "select"), plugins=("attributor",),
            codec=codecs.TENSORS, skip=_no_critic(critics), summary="explain f on them",
        ),
    ]
    segmenters = settings.choices("segmenter") or [PluginChoice("segmenter", "", _NO_OPTIONS)]
    for seg in segmenters:
        segment = _suffixed("segment", seg.instance)
        stages += [
            Stage(
                segment, _segment, inputs=("attribute",), plugins=(f"segmenter={seg.slot}",), codec=codecs.SEGMENTATION,
                skip=_no_critic(critics), summary="split explanations into clusters",
            ),
            Stage(
                _suffixed("render", seg.instance), _render, inputs=("data", "select", f"segment={segment}"),
                settings=("render",), codec=codecs.RENDERED, skip=_no_critic(critics), summary="draw cluster images",
                validate=_render_validate(seg.slot),
            ),
        ]
    run_branches = branches(settings)
    if not run_branches:  # no critic: the singular stages, skipped, say why (and check what is set)
        stages += _branch_stages(settings, Branch(segmenters[0], PluginChoice("critic", "", _NO_OPTIONS), None))
    for branch in run_branches:
        stages += _branch_stages(settings, branch)
    true_masks = settings.masks.source == "true"
    if true_masks:
        stages.append(
            Stage(
                # masks from the true masks do not read the verdicts: a failed critic must not
                # block them, and new answers must not recompute them
                "masks", _masks, inputs=("data", "select"), settings=("masks.source",), codec=codecs.TENSORS,
                summary="correction masks", check=_masks_check,
            )
        )
    made = aligned_models(settings)
    for aligner in aligners or [PluginChoice("aligner", "", _NO_OPTIONS)]:
        for model, _aligner, branch in (m for m in made if m[1].slot == aligner.slot):
            masks = "masks" if branch is None else branch.name("masks")
            judge = branch.judge.slot if branch is not None and branch.judge is not None else "judge"
            stages.append(
                Stage(
                    "align" + model.removeprefix("aligned"), _align, inputs=("data", "train", "select", f"masks={masks}"),
                    plugins=(f"aligner={aligner.slot}",), codec=codecs.MODEL, model=model,
                    label=aligned_label(settings, aligner, branch) if aligner.name else "",
                    summary="fine-tune with the masks", validate=_masks_validate(aligner.slot, judge),
                )
            )
        stages.append(
            Stage(
                _suffixed("reference", aligner.instance), _reference, inputs=("data", "train", "select"),
                plugins=(f"aligner={aligner.slot}",), settings=("masks.true_mask_reference", "masks.source"),
                codec=codecs.MODEL, model=_suffixed("true_mask", aligner.instance),
                label="true-mask reference" + (f": {aligner.instance}" if aligner.instance else ""), skip=_reference_skip,
                check=_needs_train_masks("the true-mask reference (set masks.true_mask_reference = false to run without it)"),
                summary="align with the true masks of the same samples",
            )
        )
    return stages  # fmt: skip


class _Unset(PluginOptions):
    """The options of a role no section picked (its stages are skipped and say why)."""


_NO_OPTIONS = _Unset()


def _place(stages: list[Stage], registry: PluginRegistry, placed: set[str]) -> None:
    """Insert the plugin stages whose anchor is in ``stages`` and that are not placed yet."""
    names = {s.name for s in stages}
    for entry in registry.stages():
        anchor = entry.after or entry.before
        if entry.name in names or anchor not in names:
            continue
        index = next(i for i, s in enumerate(stages) if s.name == anchor)
        stages.insert(index + 1 if entry.after else index, entry.stage)
        names.add(entry.name)
        placed.add(entry.name)
        if entry.stage.codec is not None:
            codecs.register_codec(entry.stage.codec)  # so that open_run reads it too


def build_stages(settings: Settings, registry: PluginRegistry) -> list[Stage]:
    """The stages of a run, in order: the core ones, one per mitigator and evaluator instance,
    results and report, with the stages plugins added placed where they asked."""
    stages = _core_stages(settings)
    for instance, choice in settings.instances("mitigator").items():
        stages.append(_mitigate_stage(instance, choice))
    placed: set[str] = set()
    _place(stages, registry, placed)
    model_stages = [s for s in stages if s.model is not None]
    evaluate = [_evaluate_stage(i, c, model_stages) for i, c in settings.instances("evaluator").items()]
    stages += evaluate
    stages.append(_results_stage(settings, model_stages, evaluate))
    stages.append(_report_stage(settings, list(stages)))
    _place(stages, registry, placed)
    unplaced = [e for e in registry.stages() if e.name not in placed]
    if unplaced:
        from .errors import ConfigurationError

        raise ConfigurationError(
            "\n".join(
                f"stage {e.name!r} (from {e.distribution}) is to go "
                f"{'after' if e.after else 'before'} {e.after or e.before!r}, which this run does not have"
                for e in unplaced
            )
        )
    return stages
