"""Tests of lvlmva.training: devices, seeding, the training loop and batched prediction."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from lvlmva.records import Split
from lvlmva.settings import TrainOptions
from lvlmva.training import predict_logits, resolve_device, seed_everything, train_classifier


@pytest.fixture
def restore_determinism():
    """seed_everything switches a process-wide torch flag; put it back for other tests."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _blobs(n: int = 240, seed: int = 0) -> Split:
    """Three well separated classes on 2 x 2 images: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = centres[labels] + 0.5 * torch.randn(n, 4, generator=g)
    return Split(images=x.reshape(n, 1, 2, 2), labels=labels)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(ctx, resident: str = "auto", epochs: int = 3, seed: int = 0, tag: str = "train") -> nn.Module:
    opts = TrainOptions(epochs=epochs, lr=1e-2, batch_size=32, resident=resident)
    return train_classifier(_model(seed), _blobs(), opts, ctx, tag=tag)


def _metrics(ctx) -> list[dict]:
    return [json.loads(line) for line in (ctx.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_seed_everything_repeats_every_generator(restore_determinism):
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(7, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("resident", ["always", "never"])
def test_same_seed_gives_identical_weights(ctx, resident):
    a = _train(ctx, resident).state_dict()
    b = _train(ctx, resident).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resident_and_dataloader_loops_agree(ctx):
    a = _train(ctx, "always").state_dict()
    b = _train(ctx, "never").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_order_depends_on_the_seed(ctx):
    a = _train(ctx).state_dict()
    ctx.seed = 1
    b = _train(ctx).state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_logs_each_epoch(ctx):
    split = _blobs()
    model = _model()
    before = (predict_logits(model, split.images, "cpu").argmax(1) == split.labels).float().mean()
    train_classifier(model, split, TrainOptions(epochs=4, lr=1e-2, batch_size=32), ctx, tag="f")
    after = (predict_logits(model, split.images, "cpu").argmax(1) == split.labels).float().mean()
    assert before < 0.6 and after > 0.95
    assert not model.training
    lines = _metrics(ctx)
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert {line["stage"] for line in lines} == {"f"}
    assert set(lines[0]) == {"stage", "epoch", "loss", "train_accuracy", "seconds"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["train_accuracy"] > 0.95
    assert all(line["seconds"] >= 0 for line in lines)


def test_logged_loss_is_the_mean_over_the_epoch(ctx):
    # lr so small that the weights barely move: the epoch's mean loss ~ the loss before training.
    split = _blobs()
    model = _model()
    expected = nn.functional.cross_entropy(predict_logits(model, split.images, "cpu"), split.labels)
    train_classifier(model, split, TrainOptions(epochs=1, lr=1e-9, batch_size=50), ctx)
    (line,) = _metrics(ctx)
    assert line["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_zero_epochs_leave_the_model_alone(ctx):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_classifier(model, _blobs(), TrainOptions(epochs=0), ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (ctx.run_dir / "metrics.jsonl").exists()


def test_empty_split_is_an_error(ctx):
    empty = Split(images=torch.zeros(0, 1, 2, 2), labels=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        train_classifier(_model(), empty, TrainOptions(), ctx)


def test_diverging_loss_is_reported(ctx):
    split = _blobs()
    bad = Split(images=split.images * float("nan"), labels=split.labels)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_classifier(_model(), bad, TrainOptions(epochs=1), ctx)


def test_progress_bar_path_trains_the_same(ctx):
    a = _train(ctx).state_dict()
    ctx.progress = True
    b = _train(ctx).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predict_logits_batches_and_restores_mode():
    model = _model()
    model.train()
    x = _blobs(50).images
    with torch.no_grad():
        reference = model.eval()(x)
    model.train()
    out = predict_logits(model, x, torch.device("cpu"), batch_size=7)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (50, 3)
    torch.testing.assert_close(out, reference)
    assert model.training
    assert not out.requires_grad
    assert predict_logits(model, x[:0], "cpu").shape == (0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        predict_logits(model, x, "cpu", batch_size=0)
