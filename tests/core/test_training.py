"""Tests of lvlmva.training: devices, seeding, the Trainer's loop, batched prediction, and the
alignment machinery (AlignmentTrainer, LossAligner) on an aligner written as a loss alone."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lvlmva.protocols import Aligner, check_capabilities
from lvlmva.records import AlignmentSet, Split, SpuriousDataset, TrainedModel
from lvlmva.report import read_training_curves, write_report
from lvlmva.settings import ReportOptions, TrainOptions
from lvlmva.training import (
    AlignmentOptions,
    AlignmentTrainer,
    EpochEnd,
    LossAligner,
    Trainer,
    _can_fuse,
    first_best,
    predict_logits,
    resolve_device,
    seed_everything,
    train_classifier,
)


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


def _build() -> nn.Module:
    """A fresh model from torch's global generator, as a model factory builds one."""
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _build()


def _trainer(ctx, **options) -> Trainer:
    opts = {"epochs": 3, "lr": 1e-2, "batch_size": 32, **options}
    return Trainer(_build, TrainOptions(**opts), ctx)


def _train(ctx, resident: str = "auto", epochs: int = 3, seed: int = 0, tag: str = "train"):
    return _trainer(ctx, resident=resident, epochs=epochs).fit(_blobs(), _model(seed), tag=tag)


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _close(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


def _reference_fit(model, split, opts, ctx, tag="train", indices=None, weights=None) -> nn.Module:
    """The training loop written out plainly, one sample list per step: what Trainer.fit must
    reproduce bit for bit (it is the loop train_classifier ran before Trainer existed, plus the
    documented meaning of indices and weights)."""
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        fused=_can_fuse(model, torch.device("cpu")),
    )
    listed = torch.arange(len(split)) if indices is None else indices
    for epoch in range(1, opts.epochs + 1):
        perm = torch.randperm(len(listed), generator=ctx.generator(f"{tag}-epoch-{epoch}"))
        model.train()
        for batch in listed[perm].split(opts.batch_size):
            logits = model(split.images[batch])
            if weights is None:
                loss = F.cross_entropy(logits, split.labels[batch])
            else:
                w = weights[batch]
                if w.sum() == 0:
                    continue
                ce = F.cross_entropy(logits, split.labels[batch], reduction="none")
                loss = (w * ce).sum() / w.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


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
    Trainer(_build, TrainOptions(epochs=4, lr=1e-2, batch_size=32), ctx).fit(split, model, tag="f")
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
    Trainer(_build, TrainOptions(epochs=1, lr=1e-9, batch_size=50), ctx).fit(split, model)
    (line,) = _metrics(ctx)
    assert line["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_zero_epochs_leave_the_model_alone(ctx):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(_build, TrainOptions(epochs=0), ctx).fit(_blobs(), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (ctx.run_dir / "metrics.jsonl").exists()


def test_empty_split_is_an_error(ctx):
    empty = Split(images=torch.zeros(0, 1, 2, 2), labels=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        Trainer(_build, TrainOptions(), ctx).fit(empty)


def test_diverging_loss_is_reported(ctx):
    split = _blobs()
    bad = Split(images=split.images * float("nan"), labels=split.labels)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        Trainer(_build, TrainOptions(epochs=1), ctx).fit(bad)


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


# -- Trainer: the one training loop, on a split, an index list or sample weights -------------


@pytest.mark.parametrize("resident", ["always", "never"])
@pytest.mark.parametrize("case", ["plain", "indices", "weights", "both"])
def test_fit_matches_the_reference_loop_bit_for_bit(ctx, resident, case):
    split = _blobs(100)
    g = torch.Generator().manual_seed(5)
    indices = torch.randint(0, 100, (130,), generator=g) if case in ("indices", "both") else None
    weights = None
    if case in ("weights", "both"):
        # Varying batch sums (a constant scale would hide a wrong normaliser from Adam) and a
        # block of zeros long enough that some batches of 4 are all zero.
        weights = torch.rand(100, generator=g) * 3
        weights[:70] = 0.0
    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=4, resident=resident)
    if weights is not None:
        listed = torch.arange(100) if indices is None else indices
        order = listed[torch.randperm(len(listed), generator=ctx.generator("train-epoch-1"))]
        assert any(weights[batch].sum() == 0 for batch in order.split(4))
    got = Trainer(_build, opts, ctx).fit(split, _model(), indices=indices, weights=weights)
    expected = _reference_fit(_model(), split, opts, ctx, indices=indices, weights=weights)
    assert _equal(got, expected)


def test_wrapper_and_explicit_indices_train_exactly_like_fit(ctx):
    split = _blobs()
    opts = TrainOptions(epochs=2, lr=1e-2, batch_size=32)
    fitted = Trainer(_build, opts, ctx).fit(split, _model(), tag="f")
    assert _equal(train_classifier(_model(), split, opts, ctx, tag="f"), fitted)
    indexed = Trainer(_build, opts, ctx).fit(split, _model(), indices=torch.arange(240), tag="f")
    assert _equal(indexed, fitted)
    lines = _metrics(ctx)
    assert [line["loss"] for line in lines[:2]] == [line["loss"] for line in lines[2:4]]
    assert [line["loss"] for line in lines[:2]] == [line["loss"] for line in lines[4:]]


def test_new_model_is_fresh_and_reproducible(ctx):
    trainer = _trainer(ctx)
    torch.manual_seed(3)
    first, second = trainer.new_model(), trainer.new_model()
    torch.manual_seed(3)
    again = trainer.new_model()
    assert not _equal(first, second) and _equal(first, again)
    # Without a model, fit trains the next fresh one.
    torch.manual_seed(3)
    fitted = trainer.fit(_blobs())
    torch.manual_seed(3)
    assert _equal(fitted, trainer.fit(_blobs(), trainer.new_model()))
    assert trainer.options.batch_size == 32 and trainer.device == ctx.device and trainer.ctx is ctx
    with pytest.raises(TypeError, match="not a Module"):
        Trainer(lambda: "model", TrainOptions(), ctx).new_model()


def test_indices_with_repeats_are_visited_as_often_as_listed(ctx):
    indices = torch.tensor([0, 0, 0, 5, 5, 7, 239], dtype=torch.int64)
    ends: list[EpochEnd] = []
    _trainer(ctx, batch_size=2, epochs=3).fit(_blobs(), indices=indices, on_epoch=ends.append)
    assert [end.epoch for end in ends] == [1, 2, 3]
    split = _blobs()
    for end in ends:
        assert end.order.dtype == torch.int64 and end.order.shape == (7,)
        assert torch.equal(end.order.sort().values, indices)
        assert end.predicted.shape == (7,)
        correct = (end.predicted == split.labels[end.order]).float().mean()
        assert end.train_accuracy == pytest.approx(float(correct))
    # Each epoch draws its own permutation of the list.
    assert len({tuple(end.order.tolist()) for end in ends}) > 1
    assert [line["epoch"] for line in _metrics(ctx)] == [1, 2, 3]


def test_indices_drawn_per_epoch_are_asked_once_per_epoch_in_order_and_visited(ctx):
    asked: list[int] = []
    draws = {1: torch.tensor([0, 0, 1, 2]), 2: torch.tensor([5, 6, 7, 7, 7, 8, 9]), 3: torch.tensor([3])}

    def draw(epoch: int) -> torch.Tensor:
        asked.append(epoch)
        return draws[epoch]

    ends: list[EpochEnd] = []
    _trainer(ctx, batch_size=2, epochs=3).fit(_blobs(), indices=draw, on_epoch=ends.append)
    assert asked == [1, 2, 3]
    for end in ends:
        assert torch.equal(end.order.sort().values, draws[end.epoch])
    with pytest.raises(ValueError, match="indices must lie in"):
        _trainer(ctx, epochs=2).fit(_blobs(), indices=lambda e: torch.tensor([0, 10_000]))
    asked.clear()
    _trainer(ctx, epochs=0).fit(_blobs(), indices=draw)
    assert asked == []  # no epoch, no draw


def test_all_one_weights_train_like_no_weights(ctx):
    split = _blobs()
    plain = _trainer(ctx).fit(split, _model())
    weighted = _trainer(ctx).fit(split, _model(), weights=torch.ones(240))
    assert _close(plain, weighted)


def test_zero_weights_train_like_the_complement_in_full_batches(ctx):
    # One batch per epoch: the weighted mean over all samples is the mean over the others.
    split = _blobs(60)
    keep = torch.arange(60) % 4 != 0
    trainer = _trainer(ctx, batch_size=60, epochs=5)
    weighted = trainer.fit(split, _model(), weights=keep.float())
    complement = trainer.fit(split, _model(), indices=keep.nonzero().squeeze(1))
    assert _close(weighted, complement)
    everything = trainer.fit(split, _model())
    assert not _close(weighted, everything)


def test_a_batch_of_zero_weights_takes_no_step(ctx):
    split = _blobs(40)
    weights = torch.ones(40)
    weights[:15] = 0.0
    model = _model()
    backward_calls = []
    model[1].weight.register_hook(lambda grad: backward_calls.append(1))
    _trainer(ctx, batch_size=1, epochs=2).fit(split, model, weights=weights)
    assert len(backward_calls) == 2 * 25
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_logged_loss_is_weighted_by_the_sample_weights(ctx):
    split = _blobs(60)
    model = _model()
    ce = F.cross_entropy(predict_logits(model, split.images, "cpu"), split.labels, reduction="none")
    weights = torch.linspace(0, 2, 60)
    indices = torch.tensor([1, 1, 1, 30, 59, 59])
    _trainer(ctx, lr=1e-9, epochs=1).fit(split, model, indices=indices, weights=weights)
    (line,) = _metrics(ctx)
    w = weights[indices]
    assert line["loss"] == pytest.approx(float((w * ce[indices]).sum() / w.sum()), rel=1e-4)


def test_cross_entropy_objective_trains_like_the_default_and_sees_the_batch_indices(ctx):
    split = _blobs()
    plain = _trainer(ctx).fit(split, _model())
    seen: list[torch.Tensor] = []

    def objective(model, x, y, idx):
        seen.append(idx.clone())
        assert torch.equal(split.labels[idx.cpu()], y.cpu())
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    ends: list[EpochEnd] = []
    custom = _trainer(ctx).fit(split, _model(), objective=objective, on_epoch=ends.append)
    assert _close(plain, custom)
    per_epoch = len(seen) // len(ends)
    for e, end in enumerate(ends):
        assert torch.equal(torch.cat(seen[e * per_epoch : (e + 1) * per_epoch]).cpu(), end.order)
    with pytest.raises(ValueError, match="not both"):
        _trainer(ctx).fit(split, _model(), objective=objective, weights=torch.ones(240))


def test_objective_loss_is_what_is_minimised_and_logged(ctx):
    split = _blobs(60)
    # Twice the cross-entropy: Adam is scale-invariant, so the weights match; the log doubles.
    plain = _trainer(ctx, epochs=1).fit(split, _model())
    plain_loss = _metrics(ctx)[-1]["loss"]

    def doubled(model, x, y, idx):
        logits = model(x)
        return 2 * F.cross_entropy(logits, y), logits

    custom = _trainer(ctx, epochs=1).fit(split, _model(), objective=doubled)
    assert _close(plain, custom)
    assert _metrics(ctx)[-1]["loss"] == pytest.approx(2 * plain_loss, rel=1e-4)


class _Spy(nn.Module):
    """Records the batches it sees and the logits it returns, with the train/eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        self.seen.append((x.clone(), logits.detach().clone(), self.training))
        return logits


def test_predicted_is_the_argmax_at_step_time(ctx):
    split = _blobs(50)
    spy = _Spy()
    ends: list[EpochEnd] = []
    # A high learning rate: predictions change from step to step, so a recomputation after the
    # epoch (or before it) would not match.
    # Handed over in eval mode, and put back in it by the callback: trained in train mode anyway.
    def record(end: EpochEnd) -> None:
        ends.append(end)
        end.model.eval()

    _trainer(ctx, lr=0.5, batch_size=8, epochs=2).fit(split, spy.eval(), on_epoch=record)
    per_epoch = -(-50 // 8)
    assert len(spy.seen) == 2 * per_epoch and all(mode for _, _, mode in spy.seen)
    for e, end in enumerate(ends):
        seen = spy.seen[e * per_epoch : (e + 1) * per_epoch]
        assert torch.equal(torch.cat([x for x, _, _ in seen]), split.images[end.order])
        argmax = torch.cat([logits.argmax(1) for _, logits, _ in seen])
        assert end.predicted.dtype == torch.int64 and torch.equal(end.predicted, argmax)
        correct = (end.predicted == split.labels[end.order]).float().mean()
        assert end.train_accuracy == pytest.approx(float(correct))
    after = predict_logits(spy.net, split.images[ends[-1].order], "cpu").argmax(1)
    assert not torch.equal(after, ends[-1].predicted)
    lines = _metrics(ctx)
    assert [(e.loss, e.train_accuracy) for e in ends] == [
        (line["loss"], line["train_accuracy"]) for line in lines
    ]


def test_on_epoch_returning_true_stops_training(ctx):
    calls = []

    def stop_at_two(end: EpochEnd) -> bool | None:
        calls.append(end.epoch)
        assert end.model.training and end.seconds >= 0
        return True if end.epoch == 2 else None

    model = _trainer(ctx, epochs=5).fit(_blobs(), on_epoch=stop_at_two)
    assert calls == [1, 2] and not model.training
    assert [line["epoch"] for line in _metrics(ctx)] == [1, 2]
    # Any other answer than True goes on.
    _trainer(ctx, epochs=3).fit(_blobs(), on_epoch=lambda end: False, tag="g")
    assert [line["epoch"] for line in _metrics(ctx) if line["stage"] == "g"] == [1, 2, 3]


def test_epochs_override(ctx):
    _trainer(ctx, epochs=5).fit(_blobs(), epochs=1)
    assert [line["epoch"] for line in _metrics(ctx)] == [1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indices": torch.tensor([0, 1], dtype=torch.int32)}, "indices must be a 1-D int64"),
        ({"indices": torch.ones(240, dtype=torch.bool)}, "indices must be a 1-D int64"),
        ({"indices": torch.zeros(2, 2, dtype=torch.int64)}, "indices must be a 1-D int64"),
        ({"indices": [0, 1]}, "indices must be a 1-D int64"),
        ({"indices": torch.zeros(0, dtype=torch.int64)}, "indices is empty"),
        ({"indices": torch.tensor([0, 240])}, r"indices must lie in \[0, 240\)"),
        ({"indices": torch.tensor([-1, 3])}, r"indices must lie in \[0, 240\)"),
        ({"weights": torch.ones(240, dtype=torch.int64)}, "weights must be a float"),
        ({"weights": torch.ones(239)}, r"weights must be \[240\]"),
        ({"weights": -torch.ones(240)}, "weights must be finite and >= 0"),
        ({"weights": torch.full((240,), float("nan"))}, "weights must be finite and >= 0"),
        ({"weights": torch.zeros(240)}, "weights are zero on every sample"),
        (
            {"weights": (torch.arange(240) > 0).float(), "indices": torch.tensor([0, 0])},
            "weights are zero on every sample",
        ),
        ({"epochs": -1}, "epochs must be an int >= 0"),
    ],
)
def test_fit_rejects_bad_arguments(ctx, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(ctx).fit(_blobs(), **kwargs)
    assert not (ctx.run_dir / "metrics.jsonl").exists()


def test_trainer_predict_is_predict_logits(ctx):
    model = _model()
    x = _blobs(20).images
    expected = predict_logits(model, x, "cpu", batch_size=3)
    assert torch.equal(_trainer(ctx).predict(model, x, batch_size=3), expected)


# -- the rule of grid choices ---------------------------------------------------------------


def test_first_best_takes_the_highest_value_and_ties_to_the_first():
    assert first_best([0.2, 0.5, 0.1]) == 1
    assert first_best([0.5, 0.2, 0.5]) == 0
    assert first_best([0.1, 0.7, 0.7]) == 1
    assert first_best([0.3]) == 0
    assert first_best([math.nan, 0.9]) == 0  # NaN compares as not lower: never overtaken
    assert first_best([0.4, math.nan, 0.6]) == 2
    with pytest.raises(ValueError, match="no values"):
        first_best([])


# -- alignment machinery ----------------------------------------------------------------------


class ToyLossAligner(LossAligner):
    """Plain cross-entropy, with the masked share of the batch's pixels as a named dummy term:
    an aligner written only as a loss."""

    seed_name = "toy"

    def loss(self, model, inputs, targets, masks):
        ce = F.cross_entropy(model(inputs), targets)
        return {"loss": ce, "ce": ce, "masked_share": masks.float().mean()}


class ScaledLossAligner(LossAligner):
    """``loss = a * ce + b``, with ``c`` passed through: a loss with parameters on a grid."""

    seed_name = "scaled"

    def __init__(self, options, params):
        super().__init__(options)
        self.params = params
        self.seen: list[dict] = []

    def loss_params(self):
        return self.params

    def loss(self, model, inputs, targets, masks, *, a, b, c):
        self.seen.append({"a": a, "b": b, "c": c})
        ce = F.cross_entropy(model(inputs), targets)
        return {"loss": a * ce + b, "ce": ce}


def _alignment_data(n_val: int = 30) -> SpuriousDataset:
    train, val = _blobs(60), _blobs(n_val, seed=1)
    return SpuriousDataset("test", train, train, ("a", "b", "c"), ("a", "b", "c"), val=val)


def _alignment_set(n: int = 5) -> tuple[AlignmentSet, torch.Tensor]:
    masks = torch.zeros(n, 2, 2, dtype=torch.bool)
    masks[:, 0] = True  # the top row of each 2 x 2 image: half its pixels
    return AlignmentSet(torch.arange(3, 3 + n), torch.zeros(n), "random"), masks


ALIGN_OPTS = {"epochs": 2, "lr": 1e-2, "alignment_batch": 4, "ordinary_batch": 16}


def test_an_aligner_written_as_a_loss_runs_and_its_terms_reach_metrics_and_report(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aligner = ToyLossAligner(AlignmentOptions(**ALIGN_OPTS))
    assert isinstance(aligner, Aligner) and check_capabilities("aligner", ToyLossAligner) == []
    assert aligner.check_data(data) == []

    aligned = aligner.align(model, data, alignment, masks, ctx)

    assert isinstance(aligned, nn.Module) and aligned is not model and not aligned.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not _equal(aligned, model)
    lines = _metrics(ctx)
    assert [(x["stage"], x["epoch"]) for x in lines] == [("align", 1), ("align", 2)]
    # 60 training samples in steps of 16: 16, 16, 16, 12 ordinary samples beside 4 alignment
    # samples, whose masks cover half of their pixels.
    expected_share = sum(0.5 * 4 / (4 + o) for o in (16, 16, 16, 12)) / 4
    for line in lines:
        assert set(line) == {"stage", "epoch", "loss", "ce", "masked_share", "steps", "seconds"}
        assert line["steps"] == 4
        assert line["loss"] == line["ce"]
        assert line["masked_share"] == pytest.approx(expected_share, rel=1e-6)
    assert lines[1]["ce"] < lines[0]["ce"]

    curves, notes = read_training_curves(ctx.run_dir)
    assert notes == []
    (curve,) = curves
    assert (curve.stage, curve.tag, curve.point, curve.label) == ("align", "align", {}, "align")
    assert curve.terms == ("ce", "masked_share")
    assert curve.epochs == [1, 2]
    assert curve.series["masked_share"] == [line["masked_share"] for line in lines]
    assert curve.series["loss"] == [line["loss"] for line in lines]
    report = write_report(
        ctx.run_dir, {}, options=ReportOptions(), rendered=[], verdicts=[], critiques=[],
        test_images=None, test_labels=None, attributions={}, class_names=[],
    )  # fmt: skip
    text = report.read_text(encoding="utf-8")
    assert "The loss terms the aligners name, per epoch (third panel): align: ce, masked_share." in text
    assert (ctx.run_dir / "figures" / "training_curves.png").stat().st_size > 0


def test_alignment_batches_follow_the_documented_seeds(ctx):
    """Each step: the next alignment samples of the cycled seeded permutation, then the next
    ordinary samples of the epoch's permutation, masks beside them."""
    data = _alignment_data()
    alignment, masks = _alignment_set(3)
    masks[1, 1, 1] = True  # a mask of its own, so a mix-up shows
    batches = []

    def spy(model, inputs, targets, batch_masks):
        batches.append((inputs.clone(), targets.clone(), batch_masks.clone()))
        return {"loss": F.cross_entropy(model(inputs), targets)}

    opts = AlignmentOptions(**{**ALIGN_OPTS, "alignment_batch": 2, "max_steps_per_epoch": 3})
    AlignmentTrainer(opts, ctx, seed_name="spy", who="Spy").align(
        _model(), data, alignment, masks, spy
    )
    gen = ctx.generator("spy-alignment-order")
    stream = torch.cat([torch.randperm(3, generator=gen) for _ in range(4)])
    assert len(batches) == 6
    for n, (inputs, targets, batch_masks) in enumerate(batches):
        epoch, step = divmod(n, 3)
        order = torch.randperm(60, generator=ctx.generator(f"spy-epoch-{epoch}"))
        a = stream[2 * n : 2 * n + 2]
        o = order[16 * step : 16 * step + 16]
        rows = torch.cat([alignment.indices[a], o])
        assert torch.equal(inputs, data.train.images[rows])
        assert torch.equal(targets, data.train.labels[rows])
        assert torch.equal(batch_masks[:2], masks[a]) and not batch_masks[2:].any()


def test_alignment_with_dropout_is_seeded_and_leaves_the_global_generator_alone(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    aligner = ToyLossAligner(AlignmentOptions(**ALIGN_OPTS))

    def run():
        torch.manual_seed(7)
        aligned = aligner.align(model, data, alignment, masks, ctx)
        return aligned, torch.rand(4)

    (a, after_a), (b, after_b) = run(), run()
    torch.manual_seed(7)
    assert torch.equal(after_a, torch.rand(4))  # restored: as if nothing had drawn from it
    assert torch.equal(after_a, after_b) and _equal(a, b)
    ctx.seed = 1  # another run seed: other dropout draws and another data order
    c, _ = run()
    assert not _equal(a, c)


def test_a_grid_of_loss_parameters_is_a_product_chosen_on_validation(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    model = _model()
    opts = AlignmentOptions(**{**ALIGN_OPTS, "epochs": 1})
    params = {"a": (0.0, 1.0), "b": (2.0, 3.0), "c": 5.0}
    aligner = ScaledLossAligner(opts, params)
    result = aligner.align(model, data, alignment, masks, ctx)

    points = [{"a": 0.0, "b": 2.0}, {"a": 0.0, "b": 3.0}, {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 3.0}]
    assert isinstance(result, TrainedModel)
    assert [{k: row[k] for k in ("a", "b")} for row in result.details["grid"]] == points
    assert {tuple(sorted(p.items())) for p in aligner.seen} == {
        tuple(sorted({**p, "c": 5.0}.items())) for p in points
    }
    # a = 0 trains nothing (the gradient of a constant is zero): the model's own accuracy; a = 1
    # trains, the same steps with either b. The first of the best is chosen.
    accs = [row["val_accuracy"] for row in result.details["grid"]]
    assert accs[0] == accs[1] < accs[2] == accs[3]
    assert result.details["selection"]["rule"] == "average"
    assert result.details["chosen"] == points[2]  # the first of the tie
    # the chosen model is the one a single fit with its parameters gives, to the bit
    single = ScaledLossAligner(opts, {"a": 1.0, "b": 2.0, "c": 5.0})
    assert _equal(result.model, single.align(model, data, alignment, masks, ctx))
    lines = _metrics(ctx)[:8]  # the grid's lines, not the single fit's
    align_lines = [x for x in lines if x["stage"] == "align"]
    assert [{k: x[k] for k in ("a", "b")} for x in align_lines] == points
    assert all("c" not in x for x in lines)  # only what varies tags a line
    selected = [x for x in lines if x["stage"] == "align-select"]
    assert [{k: x[k] for k in ("a", "b")} for x in selected] == points
    curves, _ = read_training_curves(ctx.run_dir)
    # the single fit's line has no a and b: a curve of its own after the grid's four
    assert [c.point for c in curves] == [*points, {}]
    labels = ["align, a 0, b 2", "align, a 0, b 3", "align, a 1, b 2", "align, a 1, b 3", "align"]
    assert [c.label for c in curves] == labels
    assert all(c.terms == ("ce",) for c in curves)


@pytest.mark.parametrize(
    ("terms", "error", "match"),
    [
        (lambda ce: ce, TypeError, "must return a mapping of named terms"),
        (lambda ce: {"ce": ce}, TypeError, r"with the total under 'loss'.*keys \['ce'\]"),
        (lambda ce: {"loss": ce, "epoch": ce}, ValueError, r"may not be named \['epoch'\]"),
        (lambda ce: {"loss": ce, "per_sample": ce.expand(3)}, TypeError, "'per_sample' must be a one-number tensor"),
        (lambda ce: {"loss": ce, "note": 1.0}, TypeError, "'note' must be a one-number tensor"),
        (lambda ce: {"loss": ce * math.inf, "ce": ce}, FloatingPointError, r"loss became inf at epoch 1 step 1 \(ce [0-9.]+\); lower lr"),
    ],
)
def test_alignment_loss_returns_are_checked(ctx, terms, error, match):
    data = _alignment_data()
    alignment, masks = _alignment_set()

    def loss(model, inputs, targets, masks):
        return terms(F.cross_entropy(model(inputs), targets))

    trainer = AlignmentTrainer(AlignmentOptions(**ALIGN_OPTS), ctx, seed_name="t", who="Toy")
    with pytest.raises(error, match=match):
        trainer.align(_model(), data, alignment, masks, loss)
    assert not (ctx.run_dir / "metrics.jsonl").exists()


def test_alignment_loss_terms_may_not_change_between_steps(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    calls = []

    def loss(model, inputs, targets, masks):
        calls.append(1)
        ce = F.cross_entropy(model(inputs), targets)
        return {"loss": ce, "ce": ce} if len(calls) == 1 else {"loss": ce, "ce2": ce}

    trainer = AlignmentTrainer(AlignmentOptions(**ALIGN_OPTS), ctx, seed_name="t", who="Toy")
    with pytest.raises(ValueError, match=r"returned terms \['loss', 'ce2'\] after \['loss', 'ce'\]"):
        trainer.align(_model(), data, alignment, masks, loss)


def test_alignment_grid_and_input_refusals(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    no_val = SpuriousDataset("test", data.train, data.test, data.class_names, data.class_descriptions)
    opts = AlignmentOptions(**ALIGN_OPTS)
    grid = ScaledLossAligner(opts, {"a": (1.0, 2.0), "b": (0.0, 1.0, 2.0), "c": 0.0})
    (problem,) = grid.check_data(no_val)
    assert problem.startswith("a x b is a grid of 6 values, chosen on the validation split")
    assert "give a x b a single value" in problem
    with pytest.raises(ValueError, match="ScaledLossAligner: a x b is a grid of 6 values"):
        grid.align(_model(), no_val, alignment, masks, ctx)
    by_wga = ScaledLossAligner(AlignmentOptions(**ALIGN_OPTS, selection="worst-group"), grid.params)
    assert "selection = 'worst-group' (for the a x b is a grid" in by_wga.check_data(data)[0]
    single = ScaledLossAligner(opts, {"a": 1.0, "b": 0.0, "c": 0.0})
    assert single.check_data(no_val) == []
    with pytest.raises(ValueError, match=r"masks must be \[5,2,2\]"):
        single.align(_model(), data, alignment, masks[:4], ctx)
    empty = AlignmentSet(torch.zeros(0, dtype=torch.int64), torch.zeros(0), "random")
    with pytest.raises(ValueError, match="the alignment set is empty"):
        single.align(_model(), data, empty, masks[:0], ctx)
    reserved = ScaledLossAligner(opts, {"a": 1.0, "b": 0.0, "c": 0.0, "steps": 1.0})
    with pytest.raises(ValueError, match=r"loss parameters may not be named \['steps'\]"):
        reserved.align(_model(), data, alignment, masks, ctx)
    assert not (ctx.run_dir / "metrics.jsonl").exists()


# -- the regions judged relevant, per batch ---------------------------------------------------


def _with_relevant(alignment: AlignmentSet, masks: torch.Tensor) -> AlignmentSet:
    """``alignment`` with relevant regions of their own (not the complement of the masks), so
    that a mix-up of the two, or of rows, shows."""
    relevant = torch.zeros_like(masks)
    for k in range(masks.shape[0]):
        relevant[k, 1, k % 2] = True
    return AlignmentSet(alignment.indices, alignment.scores, alignment.strategy, relevant=relevant)


def test_a_loss_that_asks_for_relevant_regions_gets_each_batchs(ctx):
    """With ``relevant=True`` every step's loss gets ``relevant=``: the alignment rows' own
    regions in the batch's order beside their masks, nothing for the ordinary rows."""
    data = _alignment_data()
    alignment, masks = _alignment_set(3)
    masks[1, 1, 1] = True
    alignment = _with_relevant(alignment, masks)
    batches = []

    def spy(model, inputs, targets, batch_masks, *, relevant):
        batches.append((inputs.clone(), batch_masks.clone(), relevant.clone()))
        return {"loss": F.cross_entropy(model(inputs), targets)}

    opts = AlignmentOptions(**{**ALIGN_OPTS, "alignment_batch": 2, "max_steps_per_epoch": 3})
    trainer = AlignmentTrainer(opts, ctx, seed_name="spy", who="Spy", relevant=True)
    trainer.align(_model(), data, alignment, masks, spy)
    gen = ctx.generator("spy-alignment-order")
    stream = torch.cat([torch.randperm(3, generator=gen) for _ in range(4)])
    assert len(batches) == 6
    for n, (inputs, batch_masks, relevant) in enumerate(batches):
        a = stream[2 * n : 2 * n + 2]
        assert torch.equal(inputs[:2], data.train.images[alignment.indices[a]])
        assert relevant.dtype == torch.bool and relevant.shape == batch_masks.shape
        assert torch.equal(relevant[:2], alignment.relevant[a]) and not relevant[2:].any()
        assert torch.equal(batch_masks[:2], masks[a]) and not batch_masks[2:].any()


def test_a_loss_aligner_asks_for_relevant_regions_by_its_flag(ctx):
    """``LossAligner.needs_relevant`` is what its trainer passes on: the loss gets ``relevant=``
    with the flag, and a loss without that keyword runs without it."""

    class Rewarding(LossAligner):
        seed_name = "rewarding"
        needs_relevant = True

        def loss(self, model, inputs, targets, masks, *, relevant):
            ce = F.cross_entropy(model(inputs), targets)
            return {"loss": ce, "relevant_share": relevant.float().mean()}

    assert ToyLossAligner.needs_relevant is False and Rewarding.needs_relevant is True
    opts = AlignmentOptions(**ALIGN_OPTS)
    assert ToyLossAligner(opts).trainer(ctx).relevant is False
    assert Rewarding(opts).trainer(ctx).relevant is True
    data = _alignment_data()
    alignment, masks = _alignment_set()
    Rewarding(opts).align(_model(), data, _with_relevant(alignment, masks), masks, ctx)
    # one relevant pixel of four in each of the 4 alignment rows, beside 16, 16, 16, 12 ordinary rows
    expected = sum(0.25 * 4 / (4 + o) for o in (16, 16, 16, 12)) / 4
    assert all(line["relevant_share"] == pytest.approx(expected, rel=1e-6) for line in _metrics(ctx))
    # the aligners that do not ask keep their plain call (ToyLossAligner's loss takes no relevant=)
    ToyLossAligner(opts).align(_model(), data, _with_relevant(alignment, masks), masks, ctx)


def test_relevant_regions_are_checked_before_training(ctx):
    data = _alignment_data()
    alignment, masks = _alignment_set()
    trainer = AlignmentTrainer(AlignmentOptions(**ALIGN_OPTS), ctx, seed_name="t", who="Rewarding", relevant=True)

    def loss(model, inputs, targets, masks, *, relevant):
        return {"loss": F.cross_entropy(model(inputs), targets)}

    with pytest.raises(ValueError, match=r"Rewarding: rewards attribution in the regions judged relevant, and the alignment set has none"):
        trainer.align(_model(), data, alignment, masks, loss)
    wrong = AlignmentSet(alignment.indices, alignment.scores, "random", relevant=masks[:, :1])
    with pytest.raises(ValueError, match=r"the relevant regions must be \[5,2,2\] for the alignment set, got \(5, 1, 2\)"):
        trainer.align(_model(), data, wrong, masks, loss)
    with pytest.raises(ValueError, match=r"loss parameters may not be named \['relevant'\]"):
        trainer.fit(_model(), data.train, _with_relevant(alignment, masks), masks, loss, {"relevant": 1.0})
    assert not (ctx.run_dir / "metrics.jsonl").exists()
