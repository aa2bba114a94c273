"""Tiny plugins for pipeline tests: fast, deterministic, and instrumented (they count calls and
can be told to fail or to stall, so resume and kill behaviour can be observed)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from lvlmva.hookspecs import hookimpl
from lvlmva.pipeline import Stage, codecs
from lvlmva.protocols import Metric, PluginOptions
from lvlmva.records import Critique, Segmentation, Split, SpuriousDataset, Verdicts

CALLS_FILE_ENV = "LVLMVA_TOY_CALLS"


def _count(name: str) -> None:
    path = os.environ.get(CALLS_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(name + "\n")


def _maybe_stall(name: str) -> None:
    if os.environ.get("LVLMVA_TOY_STALL") == name:
        Path(os.environ["LVLMVA_TOY_STALL_FLAG"]).write_text("stalling")
        time.sleep(120)
    if os.environ.get("LVLMVA_TOY_FAIL") == name:
        raise RuntimeError(f"toy {name} was told to fail")


class ToyDataset:
    """Two classes of 8x8 images; class 1 carries a bright pixel block in a corner (the shortcut)."""

    class Options(PluginOptions):
        n: int = Field(96, description="training samples")
        groups: bool = Field(True, description="provide group labels")
        val: int = Field(0, ge=0, description="validation samples (0: no validation split)")

    has_groups = True
    has_true_masks = True

    def __init__(self, options: Options) -> None:
        self.options = options

    def load(self, ctx):
        _count("data")
        g = ctx.generator("toy-data")

        def make(n: int) -> Split:
            labels = torch.randint(0, 2, (n,), generator=g)
            images = torch.rand(n, 1, 8, 8, generator=g) * 0.2
            images[labels == 1, 0, 2:6, 2:6] += 0.8
            masks = torch.zeros(n, 8, 8, dtype=torch.bool)
            masks[:, :2, :2] = True
            images[:, 0, :2, :2] = labels.view(-1, 1, 1).float()
            groups = labels.long() * 2 if self.options.groups else None
            return Split(images.float(), labels.long(), groups, masks)

        return SpuriousDataset(
            family="toy",
            train=make(self.options.n),
            test=make(48),
            val=make(self.options.val) if self.options.val else None,
            class_names=("plain", "square"),
            class_descriptions=("no square", "a square in the middle"),
            group_names=("plain/a", "plain/b", "square/a", "square/b"),
        )


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class ToyModel:
    """A 64-16-2 MLP."""

    class Options(PluginOptions):
        pass

    def __init__(self, options) -> None:
        self.options = options

    def build(self, input_shape, num_classes):
        return ToyNet()


class ToyAttributor:
    """Gradient times input."""

    class Options(PluginOptions):
        pass

    needs_background = False

    def __init__(self, options) -> None:
        self.options = options

    def attribute(self, model, inputs, targets, reference_pool, ctx):
        _count("attribute")
        x = inputs.clone().requires_grad_(True)
        out = model(x).gather(1, targets.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(out, x)
        return (grad * x).detach()


class ToySegmenter:
    """Four quadrants as four clusters."""

    class Options(PluginOptions):
        num_clusters: int = Field(4, description="always 4")

    def __init__(self, options) -> None:
        self.options = options

    def segment(self, attributions, ctx):
        _count("segment")
        b, _, h, w = attributions.shape
        rows = (torch.arange(h) >= h // 2).long().view(h, 1)
        cols = (torch.arange(w) >= w // 2).long().view(1, w)
        labels = (rows * 2 + cols).expand(b, h, w).clone()
        return Segmentation(
            labels=labels,
            shares=torch.full((b, 4), 0.25),
            num_clusters=4,
            degenerate=torch.zeros(b, dtype=torch.bool),
            log_likelihood=torch.zeros(b, dtype=torch.float64),
        )


class ToyCritic:
    """Calls the top-left quadrant spurious; fails the samples listed in ``LVLMVA_TOY_UNREACHABLE``
    (comma-separated ids) as an unreachable server would (retryable)."""

    class Options(PluginOptions):
        pass

    needs_true_masks = False

    def __init__(self, options) -> None:
        self.options = options

    def critique(self, requests, ctx):
        _count("critic")
        _maybe_stall("critic")
        unreachable = {int(x) for x in os.environ.get("LVLMVA_TOY_UNREACHABLE", "").split(",") if x}
        salt = os.environ.get("LVLMVA_TOY_CRITIC_SALT", "")
        out = []
        for r in requests:
            _count(f"critic-sample-{r.sample_id}")
            if r.sample_id in unreachable:
                out.append(Critique(r.sample_id, r.colors, None, failure="connection refused at http://toy", retryable=True))
                continue
            text = "\n".join(f"{c}: {salt}Verdict: {'no' if i == 0 else 'yes'}" for i, c in enumerate(r.colors))
            out.append(Critique(r.sample_id, r.colors, text, family=r.family, label=r.label))
        return out


class ToyJudge:
    """Reads the toy critic's lines; fails on sample ids listed in an option."""

    class Options(PluginOptions):
        fail_ids: list[int] = Field(default_factory=list, description="samples to fail")

    def __init__(self, options) -> None:
        self.options = options

    def judge(self, critiques, ctx):
        _count("judge")
        out = []
        for c in critiques:
            if c.sample_id in self.options.fail_ids:
                out.append(Verdicts(c.sample_id, c.colors, None, failure="told to fail"))
                continue
            rel = tuple(line.rstrip().endswith("yes") for line in c.text.splitlines())
            out.append(Verdicts(c.sample_id, c.colors, rel))
        return out


class ToyAligner:
    """Copies the model and nudges its head (enough to tell it apart)."""

    class Options(PluginOptions):
        shift: float = Field(0.01, description="added to the head bias")


    def __init__(self, options) -> None:
        self.options = options

    def align(self, model, data, alignment, masks, ctx):
        _count("align")
        _maybe_stall("align")
        new = copy.deepcopy(model)
        with torch.no_grad():
            new.head.bias += self.options.shift * float(masks.float().mean())
        return new


class ToyMitigator:
    """Copies the original and adds ``shift`` to its head bias (no training: fast)."""

    class Options(PluginOptions):
        shift: float = Field(0.1, description="added to the head bias")

    needs_groups = True
    needs_validation = False

    def __init__(self, options) -> None:
        self.options = options

    def mitigate(self, original, trainer, data, ctx):
        _count("mitigate")
        fresh = trainer.new_model()
        assert isinstance(fresh, ToyNet) and fresh is not original
        with torch.no_grad():
            original.head.bias += self.options.shift
        return original


class ToyEvaluator:
    """Accuracy on the test split."""

    class Options(PluginOptions):
        numpy_scalars: bool = Field(False, description="report numpy scalars, as sklearn metrics do")

    metrics = (Metric("accuracy", "Accuracy"),)
    needs_groups = False
    needs_true_masks = False

    def __init__(self, options) -> None:
        self.options = options

    def evaluate(self, model, data, ctx, attribute=None):
        _count("evaluate")
        with torch.no_grad():
            pred = model(data.test.images).argmax(1)
        accuracy = float((pred == data.test.labels).float().mean())
        if self.options.numpy_scalars:
            import numpy as np

            return {"accuracy": np.float64(accuracy), "where": Path("somewhere")}
        return {"accuracy": accuracy}


class FlipOptions(PluginOptions):
    """Settings of the toy flip stage."""

    colors: list[str] = Field(default_factory=list, description="colours whose verdicts are flipped")


def _flip(call):
    """A review-like stage: flips the verdicts of chosen colours (a person overriding the judge)."""
    _count("flip")
    flip = set(call.option("flip").colors)
    out = []
    for v in call["judge"]:
        if v.relevant is None:
            out.append(v)
            continue
        relevant = tuple((not r) if c in flip else r for c, r in zip(v.colors, v.relevant, strict=True))
        out.append(Verdicts(v.sample_id, v.colors, relevant, attempts=v.attempts))
    return out


FLIP_STAGE = Stage(
    "flip", _flip, inputs=("judge",), settings=("flip",), codec=codecs.VERDICTS, provides="judge",
    summary="flip chosen verdicts",
)


class FlipStagePlugin:
    """Adds the flip stage between judge and masks."""

    @staticmethod
    @hookimpl
    def lvlmva_register(registry):
        registry.add_stage(FLIP_STAGE, after="judge", options=FlipOptions)


TOYS = {
    "dataset": {"toy": ToyDataset},
    "model": {"toy": ToyModel},
    "attributor": {"toy": ToyAttributor},
    "segmenter": {"toy": ToySegmenter},
    "critic": {"toy": ToyCritic},
    "judge": {"toy": ToyJudge},
    "aligner": {"toy": ToyAligner},
    "mitigator": {"toy": ToyMitigator},
    "evaluator": {"toy": ToyEvaluator},
}


@hookimpl
def lvlmva_register(registry):
    for role, plugins in TOYS.items():
        for name, cls in plugins.items():
            registry.add(role, name, cls)


TOY_SETTINGS = """
[run]
seed = 0
device = "cpu"

[dataset]
plugin = "toy"

[model]
plugin = "toy"

[train]
epochs = 2
batch_size = 16

[selection]
n = 12

[attributor]
plugin = "toy"

[segmenter]
plugin = "toy"

[critic]
plugin = "toy"

[judge]
plugin = "toy"

[aligner]
plugin = "toy"

[evaluators.toy]
plugin = "toy"

[report]
enabled = false
"""


def toy_study(folder: Path, mitigator: str, plugin: str, seeds: list[int], **options: object) -> Path:
    """``folder/tiny.toml``: :data:`TOY_SETTINGS` with its cache in ``folder/cache``, the
    mitigator ``mitigators.<mitigator>`` of ``plugin`` with ``options``, and a study of ``seeds``
    that compares accuracy."""
    text = TOY_SETTINGS.replace("[run]\n", f'[run]\ncache_dir = "{(folder / "cache").as_posix()}"\n', 1)
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
    text += f'\n[mitigators.{mitigator}]\nplugin = "{plugin}"\n{lines}\n[study]\nseeds = {seeds}\nmetrics = ["accuracy"]\n'
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def toy_branches(cache: str, fail_ids: list[int] | tuple[int, ...] = (), n: int = 12, seed: int | None = 0) -> str:
    """The toy pipeline with two segmenters (``a``, ``b``) x two critic/judge pairs (``x`` read
    by the ``lenient`` judge, ``y`` by the ``strict`` one, which fails ``fail_ids``): four
    branches a.x, a.y, b.x, b.y. Callers append their aligners, evaluators and other sections."""
    seed_line = f"seed = {seed}\n" if seed is not None else ""
    return f"""
[run]
{seed_line}device = "cpu"
cache_dir = "{cache}"

[dataset]
plugin = "toy"

[model]
plugin = "toy"

[train]
epochs = 1
batch_size = 16

[selection]
n = {n}

[attributor]
plugin = "toy"

[segmenters.a]
plugin = "toy"

[segmenters.b]
plugin = "toy"

[critics.x]
plugin = "toy"
judge = "lenient"

[critics.y]
plugin = "toy"
judge = "strict"

[judges.lenient]
plugin = "toy"

[judges.strict]
plugin = "toy"
fail_ids = {list(fail_ids)}
"""

