"""Tests of lvlmva.testing.toy_plugins: the two toy mitigators and their registration."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
from torch import nn

from lvlmva.protocols import Mitigator, RunContext
from lvlmva.records import Split, SpuriousDataset
from lvlmva.registry import PluginRegistry
from lvlmva.settings import TrainOptions
from lvlmva.testing import toy_plugins
from lvlmva.testing.toy_plugins import ToyRetrain, ToyUpweight
from lvlmva.training import Trainer

# Training samples per group (class x attribute): groups 2 and 3 are the smaller half.
COUNTS = (25, 20, 10, 5)


def _dataset(counts: tuple[int, ...] = COUNTS) -> SpuriousDataset:
    """Two classes on 2 x 2 images, four groups of unequal size."""
    g = torch.Generator().manual_seed(0)
    groups = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = groups % 2
    n = len(groups)
    x = torch.nn.functional.one_hot(labels, 4).float() * 2 + 0.5 * torch.randn(n, 4, generator=g)
    split = Split(images=x.reshape(n, 1, 2, 2), labels=labels, groups=groups)
    return SpuriousDataset(
        family="toy",
        train=split,
        test=split,
        class_names=("a", "b"),
        class_descriptions=("class a", "class b"),
        group_names=tuple(f"g{i}" for i in range(len(counts))),
    )


def _build() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class _RecordingTrainer(Trainer):
    """A Trainer that remembers the arguments of each ``fit``."""

    def __init__(self, ctx: RunContext, epochs: int = 2) -> None:
        super().__init__(_build, TrainOptions(epochs=epochs, lr=1e-2, batch_size=16), ctx)
        self.calls: list[dict] = []

    def fit(self, split, model=None, **kwargs):
        self.calls.append(kwargs)
        return super().fit(split, model, **kwargs)


def _mitigate(plugin, ctx: RunContext, data: SpuriousDataset | None = None, epochs: int = 2):
    """(model, trainer) of one ``mitigate`` call from a fixed initialisation."""
    trainer = _RecordingTrainer(ctx, epochs)
    torch.manual_seed(0)
    model = plugin.mitigate(_build(), trainer, data or _dataset(), ctx)
    return model, trainer


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _epochs_logged(ctx: RunContext, stage: str) -> list[int]:
    lines = [json.loads(line) for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["epoch"] for line in lines if line["stage"] == stage]


def test_registered_as_mitigators_that_satisfy_the_protocol():
    registry = PluginRegistry()
    toy_plugins.lvlmva_register(registry)
    assert registry.names("mitigator") == ["toy-retrain", "toy-upweight"]
    assert registry.get("mitigator", "toy-retrain") is ToyRetrain
    assert registry.get("mitigator", "toy-upweight") is ToyUpweight
    for cls in (ToyRetrain, ToyUpweight):
        assert isinstance(cls(cls.Options()), Mitigator)
        assert "not a baseline" in cls.__doc__
    assert (ToyRetrain.needs_groups, ToyUpweight.needs_groups) == (False, True)
    assert not ToyRetrain.needs_validation and not ToyUpweight.needs_validation


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (ToyRetrain, {"fraction": 0.0}),
        (ToyRetrain, {"fraction": 1.5}),
        (ToyRetrain, {"epochs": -1}),
        (ToyRetrain, {"upweight": 2.0}),
        (ToyUpweight, {"upweight": 0.0}),
        (ToyUpweight, {"upweight": -1.0}),
        (ToyUpweight, {"fraction": 0.5}),
    ],
)
def test_options_reject_bad_values(cls, options):
    with pytest.raises(pydantic.ValidationError):
        cls.Options(**options)


def test_option_defaults():
    assert ToyRetrain.Options().fraction == 0.5 and ToyRetrain.Options().epochs is None
    assert ToyRetrain.Options(fraction=1).fraction == 1.0
    assert ToyUpweight.Options().upweight == 5.0 and ToyUpweight.Options().epochs is None


def test_retrain_trains_a_fresh_model_on_a_seeded_share(ctx):
    data = _dataset()
    model, trainer = _mitigate(ToyRetrain(ToyRetrain.Options(fraction=0.3)), ctx, data, epochs=15)
    assert isinstance(model, nn.Module) and not model.training
    (call,) = trainer.calls
    expected = torch.randperm(60, generator=ctx.generator("toy-retrain"))[: math.ceil(0.3 * 60)]
    assert torch.equal(call["indices"], expected)
    assert _epochs_logged(ctx, "toy-retrain") == list(range(1, 16))  # the run's train.epochs
    torch.manual_seed(0)
    untrained = _build()
    assert not _equal(model, untrained)
    accuracy = (trainer.predict(model, data.train.images).argmax(1) == data.train.labels).float()
    assert accuracy.mean() > 0.8


def test_retrain_options_change_the_model(ctx):
    half, _ = _mitigate(ToyRetrain(ToyRetrain.Options()), ctx)
    again, _ = _mitigate(ToyRetrain(ToyRetrain.Options()), ctx)
    assert _equal(half, again)
    whole, _ = _mitigate(ToyRetrain(ToyRetrain.Options(fraction=1.0)), ctx)
    assert not _equal(half, whole)
    _mitigate(ToyRetrain(ToyRetrain.Options(epochs=3)), ctx)
    assert _epochs_logged(ctx, "toy-retrain")[-3:] == [1, 2, 3]


def test_upweight_weights_the_smaller_half_of_the_groups():
    weights = ToyUpweight(ToyUpweight.Options(upweight=3.0)).weights(_dataset())
    expected = torch.repeat_interleave(torch.tensor([1.0, 1.0, 3.0, 3.0]), torch.tensor(COUNTS))
    assert weights.dtype == torch.float32 and torch.equal(weights, expected)
    # Ties go to the lower group index; a group without training samples does not count, and
    # of an odd number of groups the smaller half is the smaller G // 2.
    tied = ToyUpweight(ToyUpweight.Options()).weights(_dataset((10, 10, 0, 30)))
    assert torch.equal(tied, torch.tensor([5.0] * 10 + [1.0] * 40))


def test_upweight_trains_with_the_weights_and_options_change_the_model(ctx):
    plugin = ToyUpweight(ToyUpweight.Options())
    model, trainer = _mitigate(plugin, ctx)
    assert isinstance(model, nn.Module) and not model.training
    (call,) = trainer.calls
    assert torch.equal(call["weights"], plugin.weights(_dataset()))
    assert _epochs_logged(ctx, "toy-upweight") == [1, 2]
    heavier, _ = _mitigate(ToyUpweight(ToyUpweight.Options(upweight=20.0)), ctx)
    assert not _equal(model, heavier)
    _mitigate(ToyUpweight(ToyUpweight.Options(epochs=1)), ctx)
    assert _epochs_logged(ctx, "toy-upweight")[-1:] == [1]


def test_upweight_needs_groups(ctx):
    data = _dataset()
    no_groups = SpuriousDataset(
        family=data.family,
        train=Split(images=data.train.images, labels=data.train.labels),
        test=data.test,
        class_names=data.class_names,
        class_descriptions=data.class_descriptions,
    )
    with pytest.raises(ValueError, match="needs group labels"):
        _mitigate(ToyUpweight(ToyUpweight.Options()), ctx, no_groups)
