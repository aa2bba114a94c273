"""Tests of JTT: the error set of epoch T as the trainer reported it, the stage-2 index list, the
grid and its choice, the empty error set."""

from __future__ import annotations

from collections import Counter

import pydantic
import pytest
import torch

from lvlmva.plugins.mitigators.jtt import JttMitigator, upsampled_indices
from lvlmva.testing.data import planted_spurious_dataset
from lvlmva.testing.trainers import RecordingTrainer
from lvlmva.training import EpochEnd


def _data():
    return planted_spurious_dataset(
        [[120, 8], [8, 120]], [[20, 5], [5, 20]], [[15, 15], [15, 15]], seed=2
    )


class SpyTrainer(RecordingTrainer):
    """A recording trainer of an 8-unit MLP, lr 3e-3, batches of 32."""

    def __init__(self, data, ctx, epochs: int = 2) -> None:
        super().__init__(data, ctx, epochs=epochs, lr=3e-3, batch_size=32, hidden=(8,))


def _jtt(data, ctx, **options):
    trainer = SpyTrainer(data, ctx)
    result = JttMitigator(JttMitigator.Options(**options)).mitigate(None, trainer, data, ctx)
    return result, trainer


def test_error_set_is_what_epoch_t_mispredicted_while_training(ctx):
    data = _data()
    result, trainer = _jtt(data, ctx, t_grid=[2], lambda_up_grid=[4], epochs=1)
    stage1, stage2 = trainer.calls
    assert (stage1["tag"], stage1["epochs"], stage2["tag"]) == ("jtt-stage1", 2, "jtt-T2-up4")
    end = stage1["ends"][1]  # epoch T = 2, as the trainer reported it
    assert end.epoch == 2
    wrong = end.order[end.predicted != data.train.labels[end.order]]
    assert 0 < wrong.numel() < len(data.train)
    counts = Counter(stage2["indices"].tolist())
    assert set(counts) == set(range(len(data.train)))
    assert {i for i, c in counts.items() if c == 5} == set(wrong.tolist())  # 1 + lambda_up
    assert {c for c in counts.values()} == {1, 5}
    assert stage2["split"] is data.train and stage2["epochs"] == 1
    point = result.details["grid"][0]
    assert point["error_set_size"] == wrong.numel()
    assert sum(point["error_set_groups"]) == wrong.numel()
    assert point["stage2_samples"] == len(data.train) + 4 * wrong.numel()


def test_eval_pass_error_set_is_a_separate_pass_after_epoch_t(ctx):
    data = _data()
    result, trainer = _jtt(data, ctx, t_grid=[1], lambda_up_grid=[2], error_set="eval-pass")
    stage1, stage2 = trainer.calls
    model = stage1["ends"][0].model  # the weights after epoch 1
    predicted = trainer.predict(model, data.train.images).argmax(dim=1)
    wrong = torch.nonzero(predicted != data.train.labels).flatten()
    assert torch.equal(stage2["indices"], upsampled_indices(len(data.train), wrong, 2))
    # Different from what the training pass of that epoch mispredicted.
    end = stage1["ends"][0]
    in_pass = torch.unique(end.order[end.predicted != data.train.labels[end.order]])
    assert not torch.equal(in_pass, wrong)
    assert result.details["error_set"] == "eval-pass"


def test_the_grid_is_recorded_and_the_best_point_kept(ctx):
    data = _data()
    result, trainer = _jtt(data, ctx, t_grid=[1, 2], lambda_up_grid=[2, 6], epochs=2)
    details = result.details
    params = [p["params"] for p in details["grid"]]
    assert params == [
        {"T": 1, "lambda_up": 2}, {"T": 1, "lambda_up": 6},
        {"T": 2, "lambda_up": 2}, {"T": 2, "lambda_up": 6},
    ]  # fmt: skip
    assert details["models_trained"] == 5 and len(trainer.calls) == 5
    assert trainer.calls[0]["epochs"] == 2  # one stage-1 run serves every T
    wga = [p["val"]["worst_group_accuracy"] for p in details["grid"]]
    best = wga.index(max(wga))
    assert details["chosen"]["index"] == best and details["chosen"]["params"] == params[best]
    # The returned weights are the chosen point's at its chosen epoch.
    epoch = details["grid"][best]["epoch"]
    kept = trainer.calls[1 + best]["ends"][epoch - 1].model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in result.model.state_dict().items())
    # Every stage-2 model starts from the same initialisation, not stage 1's.
    starts = [c["initial"] for c in trainer.calls]
    for start in starts[2:]:
        assert all(torch.equal(start[k], starts[1][k]) for k in start)
    assert not torch.equal(starts[0]["head.weight"], starts[1]["head.weight"])


class _PerfectTrainer:
    """A stand-in trainer whose model never errs during training."""

    device = torch.device("cpu")

    def __init__(self, data) -> None:
        self.data = data

    def new_model(self):
        return torch.nn.Linear(1, 2)

    def fit(self, split, model, *, epochs, tag, on_epoch, **kwargs):
        order = torch.arange(len(split))
        for epoch in range(1, epochs + 1):
            on_epoch(EpochEnd(epoch, model, 0.0, 1.0, 0.0, order, split.labels.clone()))
        return model


def test_an_empty_error_set_is_an_error_that_says_what_to_change(ctx):
    data = _data()
    plugin = JttMitigator(JttMitigator.Options(t_grid=[1, 3]))
    with pytest.raises(ValueError, match="error set is empty") as info:
        plugin.mitigate(None, _PerfectTrainer(data), data, ctx)
    message = str(info.value)
    assert "T = 1, 3" in message and "smaller T" in message and "train.lr" in message


class _FitsAfterEpochOne(SpyTrainer):
    """Stage 1 errs on five samples in epoch 1 and on none later; stage 2 trains for real."""

    def fit(self, split, model=None, *, on_epoch=None, **kwargs):
        if kwargs.get("tag") != "jtt-stage1":
            return super().fit(split, model, on_epoch=on_epoch, **kwargs)
        order = torch.arange(len(split))
        for epoch in range(1, kwargs["epochs"] + 1):
            predicted = split.labels.clone()
            if epoch == 1:
                predicted[:5] = 1 - predicted[:5]
            on_epoch(EpochEnd(epoch, model, 0.0, 1.0, 0.0, order, predicted))
        return model


def test_a_t_with_an_empty_error_set_is_skipped_and_recorded_and_t_means_final_epoch_t_minus_1(ctx):
    data = _data()
    trainer = _FitsAfterEpochOne(data, ctx)
    result = JttMitigator(
        JttMitigator.Options(t_grid=[1, 2], lambda_up_grid=[3], epochs=1)
    ).mitigate(None, trainer, data, ctx)
    details = result.details
    assert [p["params"] for p in details["grid"]] == [{"T": 1, "lambda_up": 3}]
    assert (
        details["grid"][0]["reference_final_epoch"] == 0
        and details["grid"][0]["error_set_size"] == 5
    )
    (skipped,) = details["skipped"]
    assert skipped["T"] == 2 and skipped["reference_final_epoch"] == 1
    assert "misclassified none" in skipped["reason"]
    assert details["chosen"]["params"]["T"] == 1 and details["chosen"]["reference_final_epoch"] == 0
    assert "--final_epoch T-1" in details["t_meaning"]
    assert details["models_trained"] == 2


def test_options_are_checked():
    defaults = JttMitigator.Options()
    assert defaults.lambda_up_grid == [20, 50, 100] and defaults.t_grid == [1, 2, 3]
    assert defaults.error_set == "train-pass"
    for bad in ({"t_grid": []}, {"t_grid": [0]}, {"lambda_up_grid": [20, 20]}, {"error_set": "x"}):
        with pytest.raises(pydantic.ValidationError):
            JttMitigator.Options(**bad)
